"""Per-clip array caches as ArrayRecord shards: the latent cache and the decoded-frames cache.

Both hold one record per clip, written by every process for its own consecutive run of
a split's clips (:class:`PartWriter`) and merged by process 0 (:func:`merge_parts`):

- the latent cache (``WORKDIR/latents``, :data:`LATENTS`, described by ``latents.json``):
  ``video`` / ``audio`` are raw encoder means;
- the decoded-frames cache (``DATA_ROOT/frames/<bucket>``, :data:`FRAMES`, described by
  ``frames.json``): ``video`` is uint8 frames (T, H, W, 3), ``audio`` raw log-mel.

Layout of a cache folder::

    <split>.pPPPPP-of-QQQQQ-NNNNN-of-MMMMM.array_record   part P's shards (records, see below)
    <split>.pPPPPP-of-QQQQQ.json                          part P's description and moments
    stats.json                                            per-channel shift/scale (latents)
    empty_caption.npz                                     a pretrained caption encoder's
                                                          empty caption (text, mask)
    latents.json | frames.json                            tag, per-split counts/shapes/shards

A record is a msgpack map (never pickle): ``key`` (str), ``index`` (int: the clip's
record index in its split's clip shards), ``video`` and ``audio`` (each
``{"dtype", "shape", "data"}`` with little-endian bytes; ``audio`` is nil when there is
none), ``has_audio`` (bool), ``tokens`` / ``mask`` (arrays, same encoding), ``text`` (a
pretrained caption encoder's bfloat16 embeddings of the caption's real tokens,
``(tokens, width)``; nil with the internal encoder), ``caption`` (str) and ``fps`` (float:
the clip's frame rate; frame ``i`` is at ``i / fps`` s). ``text`` keeps only the rows the
mask marks (a caption is a prefix of its padded length), so a 4096-wide embedding costs
what the caption is long, not ``text.max_len``; readers pad it back (:func:`pad_ragged`).

The description is written last and removed first on a rebuild, so its presence means
the shards it lists were complete. It records each shard's byte size, so a missing,
truncated or replaced shard is reported by name before ArrayRecord reads it; a shard
with the right size but damaged bytes fails ArrayRecord's chunk hash on read, which
is reported the same way. Both raise :class:`~vdiff.errors.UserError`.

Reading: :class:`CacheSource` is a random-access (grain-style) source over one split's
shards; :func:`cache_stream` reads it as a training stream.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import ml_dtypes
import msgpack
import numpy as np

from data_pipelines.records import SUFFIX, ShardWriter
from vdiff.errors import UserError
from vdiff.manifest import atomic_write_text, read_versioned_json

META = "latents.json"
STATS = "stats.json"
EMPTY_CAPTION = "empty_caption.npz"
FORMAT = "vdiff.latents"
VERSION = 3  # 2: records carry each clip's frame rate (fps); 3: caption embeddings (text)
# ArrayRecord pads each file to 64 KiB blocks, so many tiny shards waste space; large
# shards are still read record by record (group_size 1).
SHARD_BYTES = 128 << 20
ARRAY_FIELDS = ("video", "audio", "tokens", "mask", "text")
# Fields whose leading axis varies per record (up to the description's shape).
RAGGED_FIELDS = ("text",)
# Only plain numeric dtypes are accepted from a file (never object arrays), and bfloat16.
_DTYPE_KINDS = "biuf"
_BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
_FIX = "remove {dir} and rerun 'vdiff data latents' or 'vdiff train' on its workdir to rebuild it"


class LatentRecordError(ValueError):
    """A latent record's bytes are not a valid record."""


# --------------------------------------------------------------------------- records


def pack_array(x: np.ndarray) -> dict[str, Any]:
    """numpy array -> ``{"dtype", "shape", "data"}`` (little-endian bytes, C order)."""
    x = np.asarray(x)
    if x.dtype == _BFLOAT16:
        return {"dtype": "bfloat16", "shape": list(x.shape), "data": x.tobytes()}
    if x.dtype.kind not in _DTYPE_KINDS:
        raise ValueError(f"cannot store a {x.dtype} array in a latent record")
    x = np.ascontiguousarray(x, x.dtype.newbyteorder("<"))
    return {"dtype": x.dtype.str, "shape": list(x.shape), "data": x.tobytes()}


def dtype_name(x: np.ndarray) -> str:
    """The dtype as a record stores it: little-endian ``str`` or ``"bfloat16"``."""
    dt = np.asarray(x).dtype
    return "bfloat16" if dt == _BFLOAT16 else dt.newbyteorder("<").str


def pad_ragged(x: np.ndarray, length: int) -> np.ndarray:
    """A ragged field's rows zero-padded to ``length`` along the leading axis."""
    if len(x) > length:
        raise ValueError(f"{len(x)} rows do not fit a length of {length}")
    return np.concatenate([x, np.zeros((length - len(x), *x.shape[1:]), x.dtype)])


def unpack_array(d: Any) -> np.ndarray:
    """Inverse of :func:`pack_array` (a read-only view of the record bytes)."""
    if not isinstance(d, dict) or set(d) != {"dtype", "shape", "data"}:
        raise LatentRecordError("array field must be a map of dtype, shape, data")
    try:
        dtype = _BFLOAT16 if d["dtype"] == "bfloat16" else np.dtype(d["dtype"])
    except (TypeError, ValueError) as e:
        raise LatentRecordError(f"unknown dtype {d['dtype']!r}") from e
    if dtype.kind not in _DTYPE_KINDS and dtype != _BFLOAT16:
        raise LatentRecordError(f"dtype {dtype} is not a plain numeric type")
    shape = tuple(int(s) for s in d["shape"])
    if dtype.itemsize * math.prod(shape) != len(d["data"]):
        raise LatentRecordError(f"{len(d['data'])} bytes do not hold {dtype} {shape}")
    return np.frombuffer(d["data"], dtype).reshape(shape)


def encode_latent_record(rec: Mapping[str, Any]) -> bytes:
    """Packs one clip's latents (see the module docstring for the fields)."""
    audio, text = rec.get("audio"), rec.get("text")
    return msgpack.packb(
        {
            "key": str(rec["key"]),
            "index": int(rec["index"]),
            "video": pack_array(rec["video"]),
            "audio": None if audio is None else pack_array(audio),
            "text": None if text is None else pack_array(text),
            "has_audio": bool(rec["has_audio"]),
            "tokens": pack_array(rec["tokens"]),
            "mask": pack_array(rec["mask"]),
            "caption": str(rec["caption"]),
            "fps": float(rec["fps"]),
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
    want = {"key", "index", "video", "audio", "text", "has_audio", "tokens", "mask", "caption",
            "fps"}  # fmt: skip
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


class CacheKind(NamedTuple):
    """Which cache a folder holds: its description file and format name."""

    meta: str
    format: str
    fix: str


LATENTS = CacheKind(META, FORMAT, _FIX)
FRAMES = CacheKind(
    "frames.json",
    "vdiff.frames",
    "remove {dir} and rerun 'vdiff train' (it decodes the clips again)",
)


class Moments:
    """Per-channel count, sum and sum of squares (float64) of arrays ``(..., C)``, added
    record by record and merged across processes: mean and std without holding the data."""

    def __init__(self, channels: int):
        self.count = 0
        self.sum = np.zeros(channels, np.float64)
        self.sumsq = np.zeros(channels, np.float64)

    def add(self, x: np.ndarray) -> None:
        flat = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
        self.count += flat.shape[0]
        self.sum += flat.sum(0)
        self.sumsq += np.square(flat).sum(0)

    def merge(self, other: Moments) -> None:
        self.count += other.count
        self.sum += other.sum
        self.sumsq += other.sumsq

    def to_json(self) -> dict:
        return {"count": self.count, "sum": self.sum.tolist(), "sumsq": self.sumsq.tolist()}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Moments:
        m = cls(len(d["sum"]))
        m.count, m.sum, m.sumsq = int(d["count"]), np.asarray(d["sum"]), np.asarray(d["sumsq"])
        return m

    def mean_std(self, *, pooled: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Per channel (or over every channel with ``pooled``), population std."""
        n, s, q = self.count, self.sum, self.sumsq
        if pooled:
            n, s, q = n * len(s), s.sum(keepdims=True), q.sum(keepdims=True)
        if n < 2:
            raise ValueError("statistics need at least 2 values per channel")
        mean = s / n
        return mean, np.sqrt(np.maximum(q / n - mean**2, 0.0))

    def latent_stats(self) -> dict[str, np.ndarray]:
        """``{"shift": mean, "scale": 1 / (std + 1e-6)}`` float32, as
        :func:`vdiff.models.video_vae.compute_latent_stats` gives for the same data."""
        mean, std = self.mean_std()
        return {"shift": mean.astype(np.float32), "scale": (1.0 / (std + 1e-6)).astype(np.float32)}


def pool_moments(pooled: dict[str, Moments], moments: Mapping[str, Moments]) -> None:
    """Merges ``moments`` (field -> Moments, e.g. one bucket's) into ``pooled`` in place."""
    for field, m in moments.items():
        if field in pooled:
            pooled[field].merge(m)
        else:
            pooled[field] = m


def part_name(split: str, part: int, num_parts: int) -> str:
    return f"{split}.p{part:05d}-of-{num_parts:05d}"


class PartWriter:
    """One process's part of one split: records in, shards and a part description out.

    Process ``part`` of ``num_parts`` writes ``<split>.pPPPPP-NNNNN-of-MMMMM.array_record``
    shards and, on :meth:`close`, ``<split>.pPPPPP-of-QQQQQ.json`` (count, shapes,
    dtypes, shard sizes, the moments of the fields named in ``moments``), atomically:
    the part file says the part is complete. :func:`merge_parts` turns the parts into
    the cache description. Parts hold consecutive runs of the split's records, so the
    merged cache lists the records in the same order whatever the process count.
    """

    def __init__(
        self,
        out_dir: Path,
        split: str,
        part: int = 0,
        num_parts: int = 1,
        *,
        moments: Sequence[str] = (),
        records_per_shard: int | None = None,
        keep_records: bool = True,
    ):
        self.out_dir, self.split = Path(out_dir), split
        self.keep_records = keep_records  # False: moments only (statistics-only caches)
        self.name = part_name(split, part, num_parts)
        self._moments_fields = tuple(moments)
        self.moments: dict[str, Moments] = {}
        self._per_shard = records_per_shard
        self._writer: ShardWriter | None = None
        self.count = 0
        self.shapes: dict[str, list[int]] = {}
        self.dtypes: dict[str, str] = {}
        (self.out_dir / f"{self.name}.json").unlink(missing_ok=True)

    def write(self, rec: Mapping[str, Any]) -> None:
        """Appends one record (fields as :func:`encode_latent_record` takes them)."""
        for f in self._moments_fields:
            x = rec.get(f)
            # A clip without sound holds silence in its audio field: not a statistic of sound.
            if x is not None and (f != "audio" or rec.get("has_audio", True)):
                self.moments.setdefault(f, Moments(np.shape(x)[-1])).add(np.asarray(x))
        if not self.keep_records:
            self.count += 1  # clips seen: the moments' count of clips
            return
        data = encode_latent_record(rec)
        if self._writer is None:
            per_shard = self._per_shard or max(1, SHARD_BYTES // len(data))
            self._writer = ShardWriter(self.out_dir, self.name, per_shard, overwrite=True)
            for f in ARRAY_FIELDS:
                if rec.get(f) is not None:
                    self.shapes[f] = list(np.shape(rec[f]))
                    self.dtypes[f] = dtype_name(rec[f])
        for f in RAGGED_FIELDS:  # the description holds the longest
            if rec.get(f) is not None and f in self.shapes:
                self.shapes[f][0] = max(self.shapes[f][0], len(rec[f]))
        self._writer.write(data)
        self.count += 1

    def close(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Names the shards and writes the part description (plus ``extra``); returns it."""
        paths, sizes = [], []
        if self._writer is not None:
            paths, sizes = self._writer.close(), self._writer.shard_sizes
        part = {
            "count": self.count,
            "shapes": self.shapes,
            "dtypes": self.dtypes,
            "shards": [
                {"file": p.name, "records": k, "bytes": p.stat().st_size}
                for p, k in zip(paths, sizes, strict=True)
            ],
            "moments": {f: m.to_json() for f, m in self.moments.items()},
            **dict(extra or {}),
        }
        _write_json(self.out_dir / f"{self.name}.json", part)
        return part

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()


def merge_parts(
    out_dir: Path, split: str, num_parts: int
) -> tuple[dict[str, Any], dict[str, Moments]]:
    """Every part of ``split`` -> its cache description entry and merged moments.

    Raises:
        UserError: If a part is missing (its process did not finish) or the parts
            disagree on shapes.
    """
    out_dir = Path(out_dir)
    entry: dict[str, Any] = {
        "count": 0,
        "shapes": {},
        "dtypes": {},
        "shards": [],
        "parts": num_parts,
    }
    moments: dict[str, Moments] = {}
    for p in range(num_parts):
        path = out_dir / f"{part_name(split, p, num_parts)}.json"
        if not path.is_file():
            raise UserError(f"{path} is missing: process {p} did not finish its part of '{split}'")
        part = json.loads(path.read_text())
        for f in RAGGED_FIELDS:  # the longest of every part
            if f in part["shapes"] and f in entry["shapes"]:
                longest = max(part["shapes"][f][0], entry["shapes"][f][0])
                part["shapes"][f][0] = entry["shapes"][f][0] = longest
        for key in ("shapes", "dtypes"):
            for f, v in part[key].items():
                if entry[key].setdefault(f, v) != v:
                    raise UserError(
                        f"'{split}' parts disagree on {f}: {entry[key][f]} and {v} ({path})"
                    )
        entry["count"] += part["count"]
        entry["shards"] += part["shards"]
        for f, m in part["moments"].items():
            moments.setdefault(f, Moments(len(m["sum"]))).merge(Moments.from_json(m))
    if entry["count"] == 0:
        raise UserError(f"split '{split}' has no clips to cache")
    return entry, moments


def clear_cache(out_dir: Path, kind: CacheKind = LATENTS) -> None:
    """Removes a cache's description first, then its shards, parts and statistics."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / kind.meta).unlink(missing_ok=True)
    # Shards, part files, and the .npy files of the format before shards.
    for old in [*out_dir.glob(f"*{SUFFIX}*"), *out_dir.glob("*.p*-of-*.json"),
                *out_dir.glob("*.npy"), out_dir / STATS, out_dir / EMPTY_CAPTION]:  # fmt: skip
        old.unlink(missing_ok=True)


def write_meta(
    out_dir: Path,
    tag: Mapping[str, Any],
    splits: Mapping[str, Mapping[str, Any]],
    stats: Mapping[str, Mapping[str, np.ndarray]],
    kind: CacheKind = LATENTS,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes ``stats.json`` then the description (last: its presence means complete)."""
    save_stats(out_dir, stats)
    meta = {
        "format": kind.format,
        "version": VERSION,
        "tag": dict(tag),
        "modalities": sorted(stats),
        "stats": STATS,
        "splits": dict(splits),
        **dict(extra or {}),
    }
    _write_json(Path(out_dir) / kind.meta, meta)
    return meta


def write_cache(
    out_dir: Path,
    tag: Mapping[str, Any],
    splits: Mapping[str, Mapping[str, Any]],
    stats: Mapping[str, Mapping[str, np.ndarray]],
    *,
    records_per_shard: int | None = None,
) -> dict[str, Any]:
    """Writes a whole latent cache from arrays in one process (tests, small tools).

    ``splits[name]`` holds ``key``, ``index``, ``video``, optional ``audio``,
    ``has_audio``, ``tokens``, ``mask``, ``caption``, clips on the leading axis. Any
    earlier cache in ``out_dir`` is removed first (its description before anything
    else), so a crash midway leaves a folder that is rebuilt, never reused.
    """
    clear_cache(out_dir)
    entries = {}
    for split, arrays in splits.items():
        writer = PartWriter(out_dir, split, records_per_shard=records_per_shard)
        for i in range(len(arrays["video"])):
            writer.write(_rows(arrays, i))
        writer.close()
        entries[split], _ = merge_parts(out_dir, split, 1)
    return write_meta(out_dir, tag, entries, stats)


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


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, ensure_ascii=False))


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


def save_empty_caption(out_dir: Path, text: np.ndarray, mask: np.ndarray) -> None:
    """The empty caption's embedding ``(L, D)`` (stored as float32: bfloat16 values are exact
    in it) and mask ``(L,)``: the unconditional input of caption dropout and guidance."""
    path = Path(out_dir) / EMPTY_CAPTION
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, text=np.asarray(text, np.float32), mask=np.asarray(mask, bool))
    tmp.replace(path)


def load_empty_caption(cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(text (L, D) bfloat16, mask (L,) bool)`` from :func:`save_empty_caption`.

    Raises:
        UserError: If the file is missing or is not such a file.
    """
    path = Path(cache_dir) / EMPTY_CAPTION
    try:
        with np.load(path, allow_pickle=False) as f:
            return f["text"].astype(ml_dtypes.bfloat16), f["mask"].astype(bool)
    except FileNotFoundError:
        raise UserError(f"{path} is missing; {_FIX.format(dir=Path(cache_dir))}") from None
    except (ValueError, KeyError, OSError) as e:
        raise UserError(
            f"{path} is not an empty-caption file ({e}); {_FIX.format(dir=Path(cache_dir))}"
        ) from None


# --------------------------------------------------------------------------- reading


def read_meta(cache_dir: Path, kind: CacheKind = LATENTS) -> dict[str, Any] | None:
    """A cache folder's description, or None if there is none (nothing cached yet).

    Raises:
        UserError: If the file exists but is not a vdiff cache description of ``kind``.
    """
    path = Path(cache_dir) / kind.meta
    if not path.exists():
        return None
    return read_versioned_json(
        path,
        fmt=kind.format,
        version_key="version",
        version=VERSION,
        what=f"vdiff {kind.format.removeprefix('vdiff.')} cache",
        fix=kind.fix.format(dir=cache_dir),
    )


def check_split(
    cache_dir: Path, split: str, meta: Mapping[str, Any] | None = None, kind: CacheKind = LATENTS
) -> list[str]:
    """The split's shard paths, after checking each exists with its recorded size.

    Raises:
        UserError: If the cache, the split or a shard is missing or has the wrong size.
    """
    cache_dir = Path(cache_dir)
    meta = read_meta(cache_dir, kind) if meta is None else meta
    fix = kind.fix.format(dir=cache_dir)
    if meta is None:
        raise UserError(f"no cache in {cache_dir} ({kind.meta} missing); {fix}")
    if split not in meta["splits"]:
        raise UserError(
            f"the cache in {cache_dir} has no split '{split}' "
            f"(has {sorted(meta['splits']) or 'statistics only'}); {fix}"
        )
    paths = []
    for shard in meta["splits"][split]["shards"]:
        path = cache_dir / shard["file"]
        if not path.is_file():
            raise UserError(f"cache shard {path} is missing; {fix}")
        size = path.stat().st_size
        if size != shard["bytes"]:
            raise UserError(
                f"cache shard {path} has {size} bytes, the cache wrote {shard['bytes']} "
                f"(truncated or replaced); {fix}"
            )
        paths.append(str(path))
    found = sorted(str(p) for p in cache_dir.glob(f"{split}.p*-of-*{SUFFIX}"))
    if found != sorted(paths):
        raise UserError(f"shards of '{split}' in {cache_dir} differ from {kind.meta}; {fix}")
    return paths


class CacheSource:
    """Random access to one split's cache records (decoded dicts), grain-style.

    Args:
        cache_dir: The cache folder (holding its description file).
        split: Split name.
        kind: :data:`LATENTS` or :data:`FRAMES`.

    Raises:
        UserError: If the cache or a shard is missing, damaged or does not match the
            description (on open or on a read).
    """

    def __init__(self, cache_dir: Path, split: str, kind: CacheKind = LATENTS):
        import grain  # pulls in jax; imported only where shards are read

        self.cache_dir = Path(cache_dir)
        self.split, self.kind = split, kind
        self.meta = read_meta(self.cache_dir, kind)
        self.paths = check_split(self.cache_dir, split, self.meta, kind)
        self.info = self.meta["splits"][split]
        try:
            self._raw = grain.sources.ArrayRecordDataSource(self.paths)
            n = len(self._raw)
        except RuntimeError as e:
            raise self._damaged(e) from e
        if n != self.info["count"]:
            raise UserError(
                f"shards of '{split}' in {self.cache_dir} hold {n} records, {kind.meta} says "
                f"{self.info['count']}; {kind.fix.format(dir=self.cache_dir)}"
            )

    def _damaged(self, e: Exception) -> UserError:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return UserError(
            f"shards of '{self.split}' in {self.cache_dir} are damaged ({reason}); "
            f"{self.kind.fix.format(dir=self.cache_dir)}"
        )

    def __len__(self) -> int:
        return self.info["count"]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        for i in indices:
            if not 0 <= i < len(self):
                raise IndexError(f"cache record {i} out of range [0, {len(self)})")
        try:
            recs = [decode_latent_record(b) for b in self._raw.__getitems__(list(indices))]
        except (RuntimeError, LatentRecordError) as e:
            raise self._damaged(e) from e
        for i, rec in zip(indices, recs, strict=True):
            for f, shape in self.info["shapes"].items():
                x = rec[f]
                if x is not None and f in RAGGED_FIELDS and len(x) <= shape[0]:
                    shape = [len(x), *shape[1:]]
                if x is None or list(x.shape) != shape or dtype_name(x) != self.info["dtypes"][f]:
                    got = None if x is None else f"{x.dtype} {x.shape}"
                    raise UserError(
                        f"record {i} of '{self.split}' in {self.cache_dir}: {f} is {got}, "
                        f"{self.kind.meta} says {self.info['dtypes'][f]} {shape}; "
                        f"{self.kind.fix.format(dir=self.cache_dir)}"
                    )
        return recs

    def read(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """Records ``indices`` stacked into arrays (``key`` and ``caption`` as lists)."""
        return stack_records(self.__getitems__(list(indices)))

    def __repr__(self) -> str:
        return f"CacheSource({self.split!r}, {len(self.paths)} shards, {len(self)} records)"


def stack_records(recs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Records (as :func:`decode_latent_record` gives them) stacked like a batch: each
    array field the records hold, ``has_audio``, ``index``; ``key`` and ``caption`` as lists."""
    out: dict[str, Any] = {
        f: np.stack([_padded(r, f) for r in recs])
        for f in ARRAY_FIELDS
        if recs[0].get(f) is not None
    }
    out["has_audio"] = np.asarray([r["has_audio"] for r in recs], bool)
    out["index"] = np.asarray([r["index"] for r in recs], np.int64)
    out["fps"] = np.asarray([r["fps"] for r in recs], np.float32)
    out["key"] = [r["key"] for r in recs]
    out["caption"] = [r["caption"] for r in recs]
    return out


def _padded(rec: Mapping[str, Any], field: str) -> np.ndarray:
    """A record's field, a ragged one padded to the caption length (its mask's)."""
    x = np.asarray(rec[field])
    return pad_ragged(x, len(rec["mask"])) if field in RAGGED_FIELDS else x


# --------------------------------------------------------------------------- streaming


class RecordFields:
    """A cache record -> one training example (picklable, for grain workers).

    Args:
        fields: ``{example key: record field}``; record fields that are None (no audio
            encoder) are left out.
        norms: ``{example key: {"shift", "scale"}}``: that value becomes
            ``((x - shift) * scale)`` in float32.
    """

    def __init__(self, fields: Mapping[str, str], norms: Mapping[str, Mapping] | None = None):
        self.fields = dict(fields)
        self.norms = {
            k: (np.asarray(v["shift"], np.float32), np.asarray(v["scale"], np.float32))
            for k, v in (norms or {}).items()
        }

    def __call__(self, rec: Mapping[str, Any]) -> dict[str, Any]:
        out = {}
        for key, field in self.fields.items():
            if rec[field] is None:
                continue
            x = _padded(rec, field)
            if key in self.norms:
                shift, scale = self.norms[key]
                x = (x.astype(np.float32) - shift) * scale
            out[key] = x
        return out


class _CacheLoad:
    """``load(position, index)`` for :class:`~data_pipelines.stream.BatchStream`; opens
    the shards lazily, so each grain worker process has its own readers."""

    def __init__(self, cache_dir: Path, split: str, kind: CacheKind, transform):
        self.args = (cache_dir, split, kind)
        self.transform = transform
        self._source = None

    def __getstate__(self):
        return {**self.__dict__, "_source": None}

    def __call__(self, position: int, index: int) -> dict[str, Any]:
        if self._source is None:
            self._source = CacheSource(*self.args)
        return self.transform(self._source[index])


def cache_stream(
    cache_dir: Path,
    split: str,
    transform,
    *,
    batch_size: int,
    seed: int,
    process_index: int,
    process_count: int,
    kind: CacheKind = LATENTS,
    worker_count: int = 0,
    prefetch: int = 2,
):
    """This process's batches of one cached split, as a checkpointable stream.

    Args:
        transform: record -> example dict (e.g. :class:`RecordFields`).
        Others: see :class:`~data_pipelines.stream.BatchStream`.
    """
    from data_pipelines.stream import BatchStream  # grain, jax: only where shards are read

    source = CacheSource(cache_dir, split, kind)
    return BatchStream(
        len(source),
        _CacheLoad(Path(cache_dir), split, kind, transform),
        batch_size=batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        worker_count=worker_count,
        prefetch=prefetch,
        fingerprint={"cache": kind.format, "split": split, "tag": source.meta["tag"]},
    )
