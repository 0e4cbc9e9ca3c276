"""The latent cache: encoder outputs of every clip as ArrayRecord shards.

Layout of a cache folder (``WORKDIR/latents``)::

    <split>-NNNNN-of-MMMMM.array_record   one msgpack record per clip (see below)
    stats.json                            per-channel shift/scale of each modality
    latents.json                          tag, per-split counts/shapes/dtypes/shards

A record is a msgpack map (never pickle): ``key`` (str), ``index`` (int: the clip's
record index in its split's clip shards), ``video`` and ``audio`` (raw, un-normalised
encoder means, each ``{"dtype", "shape", "data"}`` with little-endian bytes; ``audio`` is
nil without an audio encoder), ``has_audio`` (bool), ``tokens`` / ``mask`` (arrays, same
encoding) and ``caption`` (str).

``latents.json`` is written last and removed first on a rebuild, so its presence means
the shards it lists were complete. It records each shard's byte size, so a missing,
truncated or replaced shard is reported by name before ArrayRecord reads it; a shard
with the right size but damaged bytes fails ArrayRecord's chunk hash on read, which
is reported the same way. Both raise :class:`~vdiff.errors.UserError`.

Reading: :class:`LatentSource` is a random-access (grain-style) source over one
split's shards; :func:`load_split` reads a whole split into arrays for in-memory
training.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from data_pipelines.records import SUFFIX, ShardWriter, list_shards
from vdiff.errors import UserError
from vdiff.manifest import atomic_write_text, read_versioned_json

META = "latents.json"
STATS = "stats.json"
FORMAT = "vdiff.latents"
VERSION = 1
# ArrayRecord pads each file to 64 KiB blocks, so many tiny shards waste space; large
# shards are still read record by record (group_size 1).
SHARD_BYTES = 128 << 20
ARRAY_FIELDS = ("video", "audio", "tokens", "mask")
# Only plain numeric dtypes are accepted from a file (never object arrays).
_DTYPE_KINDS = "biuf"
_FIX = "remove {dir} and rerun 'vdiff data latents' or 'vdiff train' on its workdir to rebuild it"


class LatentRecordError(ValueError):
    """A latent record's bytes are not a valid record."""


# --------------------------------------------------------------------------- records


def pack_array(x: np.ndarray) -> dict[str, Any]:
    """numpy array -> ``{"dtype", "shape", "data"}`` (little-endian bytes, C order)."""
    x = np.asarray(x)
    if x.dtype.kind not in _DTYPE_KINDS:
        raise ValueError(f"cannot store a {x.dtype} array in a latent record")
    x = np.ascontiguousarray(x, x.dtype.newbyteorder("<"))
    return {"dtype": x.dtype.str, "shape": list(x.shape), "data": x.tobytes()}


def unpack_array(d: Any) -> np.ndarray:
    """Inverse of :func:`pack_array` (a read-only view of the record bytes)."""
    if not isinstance(d, dict) or set(d) != {"dtype", "shape", "data"}:
        raise LatentRecordError("array field must be a map of dtype, shape, data")
    try:
        dtype = np.dtype(d["dtype"])
    except (TypeError, ValueError) as e:
        raise LatentRecordError(f"unknown dtype {d['dtype']!r}") from e
    if dtype.kind not in _DTYPE_KINDS:
        raise LatentRecordError(f"dtype {dtype} is not a plain numeric type")
    shape = tuple(int(s) for s in d["shape"])
    if dtype.itemsize * math.prod(shape) != len(d["data"]):
        raise LatentRecordError(f"{len(d['data'])} bytes do not hold {dtype} {shape}")
    return np.frombuffer(d["data"], dtype).reshape(shape)


def encode_latent_record(rec: Mapping[str, Any]) -> bytes:
    """Packs one clip's latents (see the module docstring for the fields)."""
    audio = rec.get("audio")
    return msgpack.packb(
        {
            "key": str(rec["key"]),
            "index": int(rec["index"]),
            "video": pack_array(rec["video"]),
            "audio": None if audio is None else pack_array(audio),
            "has_audio": bool(rec["has_audio"]),
            "tokens": pack_array(rec["tokens"]),
            "mask": pack_array(rec["mask"]),
            "caption": str(rec["caption"]),
        },
        use_bin_type=True,
    )


def decode_latent_record(data: bytes) -> dict[str, Any]:
    """Unpacks :func:`encode_latent_record` bytes into numpy arrays and Python values.

    Raises:
        LatentRecordError: If the bytes are not a latent record.
    """
    try:
        rec = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (msgpack.UnpackException, ValueError, TypeError) as e:
        raise LatentRecordError(f"not msgpack: {e}") from e
    want = {"key", "index", "video", "audio", "has_audio", "tokens", "mask", "caption"}
    if not isinstance(rec, dict) or set(rec) != want:
        got = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
        raise LatentRecordError(f"expected fields {sorted(want)}, got {got}")
    for name in ARRAY_FIELDS:
        if rec[name] is not None:
            rec[name] = unpack_array(rec[name])
    if rec["video"] is None:
        raise LatentRecordError("record has no video latent")
    return rec


# --------------------------------------------------------------------------- writing


def _rows(arrays: Mapping[str, Any], i: int) -> dict[str, Any]:
    audio = arrays.get("audio")
    return {
        "key": arrays["key"][i],
        "index": arrays["index"][i],
        "video": arrays["video"][i],
        "audio": None if audio is None else audio[i],
        "has_audio": arrays["has_audio"][i],
        "tokens": arrays["tokens"][i],
        "mask": arrays["mask"][i],
        "caption": arrays["caption"][i],
    }


def write_split(
    out_dir: Path, split: str, arrays: Mapping[str, Any], records_per_shard: int | None = None
) -> dict[str, Any]:
    """Writes one split's latents as ``<split>-NNNNN-of-MMMMM.array_record`` shards.

    Args:
        out_dir: The cache folder.
        split: Split name (the shard prefix).
        arrays: ``key``, ``index``, ``video``, optional ``audio``, ``has_audio``,
            ``tokens``, ``mask``, ``caption``, each with the clips on the leading axis.
        records_per_shard: Clips per shard; default fills about :data:`SHARD_BYTES`.

    Returns:
        The split's entry for ``latents.json``: count, shapes, dtypes, shards.
    """
    n = len(arrays["video"])
    if n == 0:
        raise ValueError(f"split '{split}' has no clips to cache")
    first = encode_latent_record(_rows(arrays, 0))
    per_shard = records_per_shard or max(1, SHARD_BYTES // len(first))
    with ShardWriter(out_dir, split, per_shard, overwrite=True) as writer:
        writer.write(first)
        for i in range(1, n):
            writer.write(encode_latent_record(_rows(arrays, i)))
    fields = [f for f in ARRAY_FIELDS if arrays.get(f) is not None]
    return {
        "count": n,
        "shapes": {f: list(np.shape(arrays[f])[1:]) for f in fields},
        "dtypes": {f: np.asarray(arrays[f][:1]).dtype.newbyteorder("<").str for f in fields},
        "shards": [
            {"file": p.name, "records": k, "bytes": p.stat().st_size}
            for p, k in zip(writer.paths, writer.shard_sizes, strict=True)
        ],
    }


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, ensure_ascii=False))


def write_cache(
    out_dir: Path,
    tag: Mapping[str, Any],
    splits: Mapping[str, Mapping[str, Any]],
    stats: Mapping[str, Mapping[str, np.ndarray]],
    *,
    records_per_shard: int | None = None,
) -> dict[str, Any]:
    """Writes a whole cache: shards of every split, ``stats.json``, then ``latents.json``.

    Any earlier cache in ``out_dir`` is removed first (its ``latents.json`` before
    anything else), so a crash midway leaves a folder that is rebuilt, never reused.
    ``splits`` may be empty: a statistics-only cache (``data.dit_input="clips"``).

    Returns:
        The written ``latents.json`` content.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / META).unlink(missing_ok=True)
    # Shards of any earlier cache, and the .npy files of the format before shards.
    for old in [*out_dir.glob(f"*{SUFFIX}*"), *out_dir.glob("*.npy"), out_dir / STATS]:
        old.unlink(missing_ok=True)
    meta_splits = {
        split: write_split(out_dir, split, arrays, records_per_shard)
        for split, arrays in splits.items()
    }
    save_stats(out_dir, stats)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "tag": dict(tag),
        "modalities": sorted(stats),
        "stats": STATS,
        "splits": meta_splits,
    }
    _write_json(out_dir / META, meta)
    return meta


# --------------------------------------------------------------------------- stats


def save_stats(out_dir: Path, stats: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """``{modality: {"shift", "scale"}}`` -> ``stats.json`` (float32 values, exact in JSON)."""
    obj = {
        mod: {k: np.asarray(v, np.float32).tolist() for k, v in s.items()}
        for mod, s in stats.items()
    }
    _write_json(Path(out_dir) / STATS, {"dtype": "float32", "stats": obj})


def load_stats(cache_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    """Reads ``stats.json``: ``{modality: {"shift": (C,), "scale": (C,)}}`` float32.

    Raises:
        UserError: If the file is missing or malformed.
    """
    path = Path(cache_dir) / STATS
    try:
        obj = json.loads(path.read_text())
        return {
            mod: {k: np.asarray(s[k], np.float32) for k in ("shift", "scale")}
            for mod, s in obj["stats"].items()
        }
    except FileNotFoundError:
        raise UserError(f"{path} is missing; {_FIX.format(dir=Path(cache_dir))}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(
            f"{path} is not a latent statistics file ({e}); {_FIX.format(dir=cache_dir)}"
        ) from e


# --------------------------------------------------------------------------- reading


def read_meta(cache_dir: Path) -> dict[str, Any] | None:
    """``latents.json`` of a cache folder, or None if there is none (nothing cached yet).

    Raises:
        UserError: If the file exists but is not a vdiff latent cache description.
    """
    path = Path(cache_dir) / META
    if not path.exists():
        return None
    return read_versioned_json(
        path,
        fmt=FORMAT,
        version_key="version",
        version=VERSION,
        what="vdiff latent cache",
        fix=_FIX.format(dir=cache_dir),
    )


def check_split(cache_dir: Path, split: str, meta: Mapping[str, Any] | None = None) -> list[str]:
    """The split's shard paths, after checking each exists with its recorded size.

    Raises:
        UserError: If the cache, the split or a shard is missing or has the wrong size.
    """
    cache_dir = Path(cache_dir)
    meta = read_meta(cache_dir) if meta is None else meta
    fix = _FIX.format(dir=cache_dir)
    if meta is None:
        raise UserError(f"no latent cache in {cache_dir} ({META} missing); {fix}")
    if split not in meta["splits"]:
        raise UserError(
            f"the latent cache in {cache_dir} has no split '{split}' "
            f"(has {sorted(meta['splits']) or 'statistics only'}); {fix}"
        )
    paths = []
    for shard in meta["splits"][split]["shards"]:
        path = cache_dir / shard["file"]
        if not path.is_file():
            raise UserError(f"latent shard {path} is missing; {fix}")
        size = path.stat().st_size
        if size != shard["bytes"]:
            raise UserError(
                f"latent shard {path} has {size} bytes, the cache wrote {shard['bytes']} "
                f"(truncated or replaced); {fix}"
            )
        paths.append(str(path))
    try:
        found = list_shards(cache_dir, split)
    except ValueError:
        found = []
    if sorted(found) != sorted(paths):
        raise UserError(f"latent shards of '{split}' in {cache_dir} differ from {META}; {fix}")
    return paths


class LatentSource:
    """Random access to one split's latent records (decoded dicts), grain-style.

    Args:
        cache_dir: The cache folder (holding ``latents.json``).
        split: Split name.

    Raises:
        UserError: If the cache or a shard is missing, damaged or does not match
            ``latents.json`` (on open or on a read).
    """

    def __init__(self, cache_dir: Path, split: str):
        import grain  # pulls in jax; imported only where shards are read

        self.cache_dir = Path(cache_dir)
        self.split = split
        self.meta = read_meta(self.cache_dir)
        self.paths = check_split(self.cache_dir, split, self.meta)
        self.info = self.meta["splits"][split]
        try:
            self._raw = grain.sources.ArrayRecordDataSource(self.paths)
            n = len(self._raw)
        except RuntimeError as e:
            raise self._damaged(e) from e
        if n != self.info["count"]:
            raise UserError(
                f"latent shards of '{split}' in {self.cache_dir} hold {n} records, "
                f"{META} says {self.info['count']}; {_FIX.format(dir=self.cache_dir)}"
            )

    def _damaged(self, e: Exception) -> UserError:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return UserError(
            f"latent shards of '{self.split}' in {self.cache_dir} are damaged ({reason}); "
            f"{_FIX.format(dir=self.cache_dir)}"
        )

    def __len__(self) -> int:
        return self.info["count"]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        for i in indices:
            if not 0 <= i < len(self):
                raise IndexError(f"latent record {i} out of range [0, {len(self)})")
        try:
            return [decode_latent_record(b) for b in self._raw.__getitems__(list(indices))]
        except (RuntimeError, LatentRecordError) as e:
            raise self._damaged(e) from e

    def __repr__(self) -> str:
        return f"LatentSource({self.split!r}, {len(self.paths)} shards, {len(self)} records)"


def load_split(cache_dir: Path, split: str, *, chunk: int = 1024) -> dict[str, np.ndarray]:
    """Reads a whole split into arrays (the in-memory training path).

    Returns:
        ``video`` (N, ...) and, with an audio encoder, ``audio`` (N, ...) raw latents in
        their stored dtype; ``has_audio`` bool (N,); ``tokens`` / ``mask`` (N, L);
        ``index`` int64 (N,); ``key`` and ``caption`` unicode arrays (N,). Rows are in
        the order the clips were written.

    Raises:
        UserError: As :class:`LatentSource`, or if a record's array disagrees with the
            shapes and dtypes in ``latents.json``.
    """
    src = LatentSource(cache_dir, split)
    n = len(src)
    info = src.info
    out = {}
    for f, shape in info["shapes"].items():
        dtype = np.dtype(info["dtypes"][f])
        if dtype.kind not in _DTYPE_KINDS:
            raise UserError(f"{META} in {src.cache_dir} lists dtype {dtype} for {f}")
        out[f] = np.empty((n, *shape), dtype)
    out["has_audio"] = np.empty((n,), bool)
    out["index"] = np.empty((n,), np.int64)
    keys, captions = [], []
    for start in range(0, n, chunk):
        for i, rec in enumerate(src.__getitems__(range(start, min(n, start + chunk))), start):
            for f in info["shapes"]:
                x = rec[f]
                if x is None or x.shape != out[f].shape[1:] or x.dtype != out[f].dtype:
                    got = None if x is None else f"{x.dtype} {x.shape}"
                    raise UserError(
                        f"latent record {i} of '{split}' in {src.cache_dir}: {f} is {got}, "
                        f"{META} says {out[f].dtype} {out[f].shape[1:]}; "
                        f"{_FIX.format(dir=src.cache_dir)}"
                    )
                out[f][i] = x
            out["has_audio"][i] = rec["has_audio"]
            out["index"][i] = rec["index"]
            keys.append(rec["key"])
            captions.append(rec["caption"])
    out["key"] = np.asarray(keys, dtype=str)
    out["caption"] = np.asarray(captions, dtype=str)
    return out
