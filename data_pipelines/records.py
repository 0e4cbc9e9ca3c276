"""Clip records and ArrayRecord shards.

A record is one clip: the encoded mp4 bytes plus its caption and a few facts, packed with
msgpack (never pickle), so any reader can decode it without running code from the file.

Shards are ArrayRecord files written with ``group_size:1`` (each record individually
addressable, which random access needs). The shard count is only known once all records are
written, so :class:`ShardWriter` writes ``{prefix}-{i:05d}.array_record.partial`` and, on
:meth:`ShardWriter.close`, renames them to ``{prefix}-{i:05d}-of-{n:05d}.array_record``. A
crashed write therefore never leaves files that :func:`list_shards` would pick up. (Ingest
knows its shard count up front and writes each shard on its own; its ``manifest.json``,
written once every shard is finished, is what says a split is complete.)

Reading: :class:`RecordSource` is a grain ``RandomAccessDataSource`` over all shards of a
prefix (the multi-file indexing is grain's ``ArrayRecordDataSource``); it decodes on access.
Pipelines that prefer to decode in a grain map can use ``RecordSource.raw`` (bytes) and
:func:`decode_record`.
"""

import json
import numbers
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

# Field name -> Python type, in the order records are written.
FIELDS: dict[str, type] = {
    "key": str,
    "video": bytes,
    "caption": str,
    "fps": float,
    "num_frames": int,
    "width": int,
    "height": int,
    "duration": float,
    "has_audio": bool,
    "meta": str,
}
WRITER_OPTIONS = "group_size:1"
SUFFIX = ".array_record"
_PARTIAL = SUFFIX + ".partial"


class RecordError(ValueError):
    """A record is malformed (missing, unexpected or mistyped field)."""


def _check(record: Mapping[str, Any]) -> None:
    missing = [k for k in FIELDS if k not in record]
    extra = [k for k in record if k not in FIELDS]
    if missing or extra:
        raise RecordError(f"record fields wrong: missing {missing}, unexpected {extra}")
    for name, typ in FIELDS.items():
        value = record[name]
        # bool is an int subclass; an int field holding True is a bug, not a count.
        ok = isinstance(value, typ) and (typ is bool or not isinstance(value, bool))
        if not ok:
            raise RecordError(
                f"record field {name!r}: expected {typ.__name__}, got {type(value).__name__}"
            )
    for name in ("key", "caption", "meta"):
        try:
            record[name].encode("utf-8")
        except UnicodeEncodeError as e:
            raise RecordError(f"record field {name!r} is not valid Unicode text: {e}") from e
    if record["meta"]:
        try:
            json.loads(record["meta"])
        except json.JSONDecodeError as e:
            raise RecordError(f"record field 'meta' is not JSON: {e}") from e


def _coerce(name: str, value: Any) -> Any:
    """Accepts numpy scalars and ints-for-floats on write; everything else goes to _check."""
    typ = FIELDS.get(name)
    if typ is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if typ is bool and isinstance(value, np.bool_):
        return bool(value)
    if typ is bytes and isinstance(value, bytearray | memoryview):
        return bytes(value)
    return value


def encode_record(record: Mapping[str, Any]) -> bytes:
    """Packs a clip record into bytes.

    Args:
        record: A mapping with exactly the keys of :data:`FIELDS`.

    Returns:
        msgpack bytes.

    Raises:
        RecordError: If a field is missing, unexpected or of the wrong type.
    """
    rec = {name: _coerce(name, value) for name, value in record.items()}
    _check(rec)
    return msgpack.packb({k: rec[k] for k in FIELDS}, use_bin_type=True)


def decode_record(data: bytes) -> dict[str, Any]:
    """Unpacks and validates record bytes written by :func:`encode_record`.

    Raises:
        RecordError: If the bytes are not a msgpack map with the record fields.
    """
    try:
        rec = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (msgpack.UnpackException, ValueError, TypeError) as e:
        raise RecordError(f"record bytes are not msgpack: {e}") from e
    if not isinstance(rec, dict):
        raise RecordError(f"record is a msgpack {type(rec).__name__}, expected a map")
    _check(rec)
    return rec


def check_prefix(prefix: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_.=+-]+", prefix or ""):
        raise ValueError(f"shard prefix {prefix!r} must be a plain name (letters, digits, _.=+-)")


class ShardWriter:
    """Writes records into numbered ArrayRecord shards of ``records_per_shard`` each.

    Use as a context manager; on a clean exit the shards get their final
    ``-of-{n:05d}`` names, on an exception the partial files are removed.

    Args:
        out_dir: Folder for the shards (created if needed).
        prefix: Shard name prefix, e.g. ``"train"``.
        records_per_shard: Records per shard (the last may hold fewer).
        overwrite: Remove existing shards with this prefix instead of refusing.
    """

    def __init__(self, out_dir, prefix: str, records_per_shard: int = 256, *, overwrite=False):
        check_prefix(prefix)
        if records_per_shard <= 0:
            raise ValueError(f"records_per_shard must be positive, got {records_per_shard}")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.records_per_shard = records_per_shard
        self.out_dir.mkdir(parents=True, exist_ok=True)
        old = sorted(self.out_dir.glob(f"{prefix}-*{SUFFIX}")) + sorted(
            self.out_dir.glob(f"{prefix}-*{_PARTIAL}")
        )
        if old and not overwrite:
            raise FileExistsError(
                f"{self.out_dir} already holds {len(old)} '{prefix}' shards; "
                "pass overwrite=True or choose another folder/prefix"
            )
        for path in old:
            path.unlink()
        self._writer: ArrayRecordWriter | None = None
        self._partials: list[Path] = []
        self.shard_sizes: list[int] = []
        self.paths: list[Path] = []
        self._closed = False

    def write(self, record: bytes | Mapping[str, Any]) -> None:
        """Appends one record (encoded bytes or a record dict)."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        data = record if isinstance(record, bytes) else encode_record(record)
        if self._writer is None or self.shard_sizes[-1] >= self.records_per_shard:
            self._roll()
        self._writer.write(data)
        self.shard_sizes[-1] += 1

    def _roll(self) -> None:
        if self._writer is not None:
            self._writer.close()
        path = self.out_dir / f"{self.prefix}-{len(self._partials):05d}{_PARTIAL}"
        self._writer = ArrayRecordWriter(str(path), WRITER_OPTIONS)
        self._partials.append(path)
        self.shard_sizes.append(0)

    def close(self) -> list[Path]:
        """Finishes the last shard and gives every shard its final name.

        Returns:
            The final shard paths, in order (empty if nothing was written).
        """
        if self._closed:
            return self.paths
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        n = len(self._partials)
        for i, partial in enumerate(self._partials):
            final = self.out_dir / f"{self.prefix}-{i:05d}-of-{n:05d}{SUFFIX}"
            partial.rename(final)
            self.paths.append(final)
        self._closed = True
        return self.paths

    def abort(self) -> None:
        """Stops writing and deletes the partial shards."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for partial in self._partials:
            partial.unlink(missing_ok=True)
        self._closed = True

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def list_shards(root, prefix: str) -> list[str]:
    """Finds the complete shard set ``{prefix}-?????-of-?????.array_record`` under ``root``.

    Returns:
        Sorted shard paths; empty if there are none.

    Raises:
        ValueError: If the set is incomplete or mixes shard counts (e.g. two runs' leftovers).
    """
    check_prefix(prefix)
    pattern = re.compile(re.escape(prefix) + r"-(\d{5})-of-(\d{5})" + re.escape(SUFFIX))
    found = {}
    for path in Path(root).glob(f"{prefix}-*-of-*{SUFFIX}"):
        if m := pattern.fullmatch(path.name):
            found[(int(m.group(1)), int(m.group(2)))] = str(path)
    if not found:
        return []
    counts = {n for _, n in found}
    indices = sorted(i for i, _ in found)
    if len(counts) != 1 or indices != list(range(next(iter(counts)))):
        raise ValueError(
            f"shards '{prefix}' in {root} are incomplete or mixed (indices {indices}, "
            f"counts {sorted(counts)}); re-run the ingest or the stage that wrote them"
        )
    return [found[k] for k in sorted(found)]


class RecordSource:
    """Random access to decoded clip records across many shards (a grain data source).

    Args:
        shards: A folder (with ``prefix``) or a sequence of shard paths.
        prefix: Shard prefix when ``shards`` is a folder.

    Raises:
        FileNotFoundError: If no shards are found.
    """

    def __init__(self, shards, prefix: str | None = None):
        # Imported here: grain pulls in jax, which ingest worker processes must not load.
        import grain

        if isinstance(shards, str | Path):
            if prefix is None:
                raise ValueError("RecordSource(folder) needs prefix=...")
            paths = list_shards(shards, prefix)
            where = f"{shards} (prefix '{prefix}')"
        else:
            paths = [str(p) for p in shards]
            where = "the given paths"
        if not paths:
            raise FileNotFoundError(f"no ArrayRecord shards in {where}; run `vdiff data ingest`")
        self.paths: list[str] = paths
        self.raw = grain.sources.ArrayRecordDataSource(paths)

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, index) -> dict[str, Any]:
        if not 0 <= index < len(self.raw):
            raise IndexError(f"record {index} out of range [0, {len(self.raw)})")
        return decode_record(self.raw[index])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [decode_record(b) for b in self.raw.__getitems__(indices)]

    def __repr__(self) -> str:
        return f"RecordSource({len(self.paths)} shards, {len(self)} records)"
