"""``vdiff data ingest``: a folder of videos + captions -> ArrayRecord shards + manifest.

Input layout: videos (any container PyAV reads) and still images (jpg, png, webp: each
becomes a 1-frame record with ``fps`` and ``duration`` 0, which trains in the 1-frame
buckets) anywhere under a folder plus a captions file, either jsonl (one
``{"video": ..., "caption": ...}`` object a line) or csv (columns ``video``, ``caption``).
Video paths are relative to the captions file's folder. The shapes dataset's layout
``SRC/{split}/captions.jsonl`` (+ ``meta.jsonl``) is read with ``split=...``.

Every item is read, probed (a full decode, so damage anywhere is caught), optionally
re-encoded (smaller size, short GOP) and packed as a record. Bad items are skipped, never
fatal, and each gets a reason in ``manifest.json``. The output order is the input order
whatever the worker count, so shards are reproducible.

Worker processes are started with ``spawn`` and this module imports neither jax nor grain, so
workers stay small and never inherit an initialised accelerator runtime.
"""

import collections
import concurrent.futures as cf
import csv
import dataclasses
import hashlib
import io
import itertools
import json
import logging
import multiprocessing
import os
import re
import socket
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from array_record.python.array_record_module import ArrayRecordWriter
from tqdm import tqdm

from data_pipelines import records, video_io
from vdiff.errors import UserError
from vdiff.manifest import atomic_write_text, file_sha256

# Skip reasons, in addition to video_io's (empty_file, not_a_video, truncated,
# no_video_stream, decode_error).
MISSING_FILE = "missing_file"
UNREADABLE = "unreadable"
CAPTION_NOT_UTF8 = "caption_not_utf8"
EMPTY_CAPTION = "empty_caption"
BAD_CAPTION_LINE = "bad_caption_line"
ERROR = "error"  # anything unexpected; the detail holds the exception

MANIFEST = "manifest.json"
META_FILE = "meta.jsonl"
PARTS_DIR = ".ingest"  # one part record per finished shard
# 2: shard j holds chunk j of the captions file's entries; shards carry sizes and digests.
FORMAT_VERSION = 2
# Skips that may pass on their own (a flaky mount, an odd error): a rerun tries them again.
TRANSIENT = (UNREADABLE, ERROR)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Item:
    """One captions-file entry, before its video is read.

    Attributes:
        index: Position among the captions file's entries (0-based).
        line: 1-based line (jsonl) or row (csv) number, for messages.
        video: The video path as written (undecodable bytes shown escaped).
        path: Path of the video file (resolved against the captions file's folder).
        caption: The caption text.
        meta: JSON text from meta.jsonl, or "".
        reason: Skip reason found while parsing, or None.
        detail: Explanation of the skip.
    """

    index: int
    line: int
    video: str
    path: str = ""
    caption: str = ""
    meta: str = ""
    reason: str | None = None
    detail: str = ""


@dataclasses.dataclass
class Manifest:
    """What an ingest run wrote (also saved as ``OUT/manifest.json``)."""

    source: str
    captions: str
    prefix: str
    counts: dict[str, int]
    skip_reasons: dict[str, int]
    skipped: list[dict[str, Any]]
    shards: list[dict[str, Any]]
    records_per_shard: int
    options: dict[str, Any]
    version: int = 1  # FORMAT_VERSION of the ingest that wrote it
    fingerprint: str = ""  # of the captions files and options that made the shards

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, ensure_ascii=False)

    @classmethod
    def load(cls, path) -> "Manifest":
        """Reads ``manifest.json`` (a file, or the folder holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST
        return cls(**json.loads(path.read_text(encoding="utf-8")))

    def shard_paths(self, root) -> list[str]:
        """Absolute shard paths, given the folder the manifest lives in."""
        return [str(Path(root) / s["path"]) for s in self.shards]


def _printable(text: str) -> str:
    """Text safe to store as UTF-8 (undecodable bytes kept as \\x escapes)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def find_captions(src, split: str | None = None) -> Path:
    """Finds the captions file in a source folder.

    Looks for ``SRC/{split}/captions.jsonl`` when ``split`` is given, else
    ``SRC/captions.jsonl``, else the only ``*.jsonl`` (besides meta.jsonl), else the only ``*.csv``.

    Raises:
        UserError: If none, or more than one candidate, is found.
    """
    src = Path(src)
    if split is not None:
        path = src / split / "captions.jsonl"
        if not path.is_file():
            raise UserError(f"no {path}; is '{split}' a split of this dataset?")
        return path
    if (src / "captions.jsonl").is_file():
        return src / "captions.jsonl"
    for pattern in ("*.jsonl", "*.csv"):
        found = sorted(p for p in src.glob(pattern) if p.name != META_FILE)
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise UserError(f"several captions files in {src} ({names}); pass --captions FILE")
    raise UserError(
        f"no captions file in {src}: add captions.jsonl ({{'video':..., 'caption':...}} a line)"
        " or a csv with columns video, caption, or pass --captions FILE"
    )


def _check_entry(item: Item, video: Any, caption: Any) -> None:
    """Fills item.video/caption or marks the item bad."""
    if not isinstance(video, str) or not video:
        item.reason, item.detail = BAD_CAPTION_LINE, "missing or empty 'video'"
        return
    item.video = _printable(video)
    item.path = video  # raw: undecodable bytes in a file name still reach the file system
    if not isinstance(caption, str):
        item.reason, item.detail = BAD_CAPTION_LINE, "missing or non-string 'caption'"
        return
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError:
        # Undecodable input bytes came through as lone surrogates (surrogateescape).
        item.reason, item.detail = CAPTION_NOT_UTF8, _printable(caption)[:200]
        return
    if not caption.strip():
        item.reason, item.detail = EMPTY_CAPTION, ""
        return
    item.caption = caption


def _parse_jsonl(raw: bytes) -> Iterator[Item]:
    # Decoded line by line: a bad byte sequence costs only its own line.
    index = 0
    for line_no, line in enumerate(raw.split(b"\n"), start=1):
        text = line.decode("utf-8", "surrogateescape").strip().lstrip("\ufeff")
        if not text:
            continue
        item = Item(index=index, line=line_no, video="")
        index += 1
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            item.reason, item.detail = BAD_CAPTION_LINE, f"not JSON: {e}"
            yield item
            continue
        if not isinstance(obj, dict):
            item.reason, item.detail = BAD_CAPTION_LINE, "not a JSON object"
        else:
            _check_entry(item, obj.get("video"), obj.get("caption"))
        yield item


def _parse_csv(raw: bytes) -> Iterator[Item]:
    text = raw.decode("utf-8-sig", "surrogateescape")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames or not {"video", "caption"} <= set(reader.fieldnames):
        raise UserError(
            f"captions csv needs columns 'video' and 'caption', found {reader.fieldnames}"
        )
    for index, row in enumerate(reader):
        item = Item(index=index, line=reader.line_num, video="")
        _check_entry(item, row.get("video"), row.get("caption"))
        yield item


def _read_meta(path: Path) -> tuple[dict[str, str], list[str]]:
    """meta.jsonl -> (by video path, by line order); lines that do not parse give ""."""
    by_video, by_line = {}, []
    for line in path.read_bytes().split(b"\n"):
        if not line.strip():
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            by_line.append("")
            continue
        text = json.dumps(obj, ensure_ascii=False)
        by_line.append(text)
        if isinstance(obj, dict) and isinstance(obj.get("video"), str):
            by_video[obj["video"]] = text
    return by_video, by_line


def read_captions(path) -> list[Item]:
    """Parses a captions file (jsonl or csv) into items, marking bad entries with a reason.

    Video paths are resolved against the captions file's folder. A ``meta.jsonl`` beside it
    supplies each item's ``meta``: matched on its ``video`` field when meta lines carry one,
    else by line order.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"captions file {path} not found")
    raw = path.read_bytes()
    items = list(_parse_csv(raw) if path.suffix.lower() == ".csv" else _parse_jsonl(raw))
    meta_path = path.parent / META_FILE
    by_video, by_line = (
        _read_meta(meta_path) if meta_path.is_file() and path != meta_path else ({}, [])
    )
    for item in items:
        if item.path:
            item.path = str(path.parent / item.path)
        if by_video:
            item.meta = by_video.get(item.video, "")
        elif item.index < len(by_line):
            item.meta = by_line[item.index]
    return items


@dataclasses.dataclass(frozen=True)
class _Options:
    max_resolution: int | None
    reencode: bool
    gop: int


def _process(job: tuple[Item, str, _Options]) -> tuple[bytes | None, str, str]:
    """Worker: one item -> (record bytes or None, skip reason, detail)."""
    item, key, opts = job
    try:
        try:
            data = Path(item.path).read_bytes()
        except FileNotFoundError:
            return None, MISSING_FILE, item.path
        except OSError as e:
            return None, UNREADABLE, str(e)
        info = video_io.probe(data, verify=True)
        too_big = opts.max_resolution and min(info.height, info.width) > opts.max_resolution
        if (opts.reencode or too_big) and info.num_frames > 1:  # stills are kept as they are
            data = video_io.transcode(data, max_resolution=opts.max_resolution, gop=opts.gop)
            info = video_io.probe(data)
        image = info.num_frames == 1  # a still (jpg, png, webp): a 1-frame record, no time
        record = {
            "key": key,
            "video": data,
            "caption": item.caption,
            "fps": 0.0 if image else info.fps,
            "num_frames": info.num_frames,
            "width": info.width,
            "height": info.height,
            "duration": 0.0 if image else info.duration,
            "has_audio": info.has_audio,
            "meta": item.meta,
        }
        return records.encode_record(record), "", ""
    except video_io.BadVideo as e:
        return None, e.reason, e.detail[:300]
    except Exception as e:  # one odd file must not stop a long ingest
        return None, ERROR, f"{type(e).__name__}: {e}"[:300]


def _ordered_map(fn: Callable, jobs: Iterable, workers: int) -> Iterator:
    """map(fn, jobs) over worker processes, in input order, with a bounded queue."""
    if workers <= 1:
        yield from map(fn, jobs)
        return
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        it = iter(jobs)
        window = collections.deque(pool.submit(fn, j) for j in itertools.islice(it, 4 * workers))
        while window:
            try:
                result = window.popleft().result()
            except cf.process.BrokenProcessPool as e:
                raise RuntimeError(
                    "an ingest worker process died (a crash inside FFmpeg, or no importable "
                    "__main__ for spawn); re-run with workers=1 to find the file"
                ) from e
            for j in itertools.islice(it, 1):
                window.append(pool.submit(fn, j))
            yield result


def _unique_keys(items: list[Item]) -> list[str]:
    """Record keys: the video path, with ``#n`` added to repeats (several captions per video)."""
    seen: collections.Counter = collections.Counter()
    keys = []
    for item in items:
        n = seen[item.video]
        seen[item.video] += 1
        keys.append(item.video if n == 0 else f"{item.video}#{n}")
    return keys


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)``: this host's slice of an ingest split over ``n`` hosts."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise UserError(f"--shard {text!r}: write it as i/n with 0 <= i < n, e.g. --shard 0/4")
    return i, n


@dataclasses.dataclass
class _Part:
    """One finished shard: what ``OUT/.ingest/<shard>.json`` records (written after the shard)."""

    path: str
    records: int
    bytes: int
    sha256: str
    skipped: list[dict[str, Any]]
    fingerprint: str

    def matches(self, out: Path, fingerprint: str, *, digest: bool) -> bool:
        """Whether the shard on disk is this part's, for this chunk of this ingest job, and
        none of its entries was skipped for a reason that may pass (a read error)."""
        shard = out / self.path
        if self.fingerprint != fingerprint or not shard.is_file():
            return False
        if any(e["reason"] in TRANSIENT for e in self.skipped):
            return False
        if shard.stat().st_size != self.bytes:
            return False
        return not digest or file_sha256(shard) == self.sha256


def _job_fingerprint(
    captions_path: Path, prefix: str, records_per_shard: int, opts: _Options
) -> str:
    """What decides every shard: the captions (and meta) files, where their paths resolve,
    the options and this format's version."""
    h = hashlib.sha256(captions_path.read_bytes())
    meta = captions_path.parent / META_FILE
    h.update(meta.read_bytes() if meta.is_file() and meta != captions_path else b"")
    where = str(captions_path.parent.resolve())
    h.update(
        json.dumps(
            [FORMAT_VERSION, where, prefix, records_per_shard, dataclasses.asdict(opts)]
        ).encode()
    )
    return h.hexdigest()


def _chunk_fingerprint(job: str, chunk: list[Item]) -> str:
    """The job's fingerprint plus each video file's size and modification time: a video
    replaced or repaired since a shard was written makes that shard stale."""
    h = hashlib.sha256(job.encode())
    for item in chunk:
        try:
            st = Path(item.path).stat() if item.path else None
        except OSError:
            st = None
        h.update(json.dumps([item.path, st and st.st_size, st and st.st_mtime_ns]).encode())
    return h.hexdigest()


def _read_part(path: Path) -> _Part | None:
    try:
        return _Part(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):  # missing, cut short or foreign: not finished
        return None


def _own_name(path: Path, suffix: str) -> Path:
    """``path`` with a suffix of this process's own: hosts never touch each other's files."""
    return path.with_name(f"{path.name}.{socket.gethostname()}-{os.getpid()}{suffix}")


def ingest(
    src,
    out,
    *,
    captions=None,
    split: str | None = None,
    prefix: str | None = None,
    max_resolution: int | None = None,
    reencode: bool = False,
    gop: int = 8,
    workers: int = 2,
    records_per_shard: int = 256,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
) -> Manifest | None:
    """Ingests videos + captions into ArrayRecord shards and writes ``OUT/manifest.json``.

    The captions file's entries are cut into consecutive chunks of ``records_per_shard``;
    chunk ``j`` becomes shard ``j`` (its good entries, in order), so a shard's bytes depend
    only on the source list and the options, whoever writes it and whenever. A host given
    ``shard=(i, n)`` writes the shards ``j`` with ``j % n == i``. Each finished shard gets a
    part record ``OUT/.ingest/<shard>.json`` (records, bytes, sha256, its skipped entries),
    written after the shard itself; a rerun keeps every shard whose part record matches the
    file on disk (size and sha256) and writes the others, so a killed ingest resumes. The
    call that finds every shard finished merges the parts into ``manifest.json``.

    Args:
        src: Source folder.
        out: Output folder (created).
        captions: Captions file; found in ``src`` if None (see :func:`find_captions`).
        split: Read ``SRC/{split}/captions.jsonl`` (shapes layout).
        prefix: Shard name prefix; default ``split`` or ``"clips"``.
        max_resolution: Re-encode videos whose shorter side is larger than this, down to it.
        reencode: Re-encode every video (H.264, keyframe every ``gop`` frames).
        gop: Keyframe interval when re-encoding.
        workers: Worker processes (<= 1: in this process).
        records_per_shard: Captions-file entries per shard (a shard holds the good ones).
        shard: ``(i, n)``: this call's slice of the shards, for ``n`` hosts.
        progress: Show a progress bar.

    Returns:
        The :class:`Manifest` (also written to ``out/manifest.json``), or None while shards
        of other slices are still missing.

    Raises:
        UserError: If the captions file cannot be found or has the wrong columns.
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise UserError(f"ingest source {src} is not a folder")
    if gop < 1 or records_per_shard < 1:
        raise UserError(f"gop and records_per_shard must be >= 1, got {gop}, {records_per_shard}")
    host, hosts = shard
    if not 0 <= host < hosts:
        raise UserError(f"shard {host}/{hosts}: use i/n with 0 <= i < n")
    captions_path = Path(captions) if captions is not None else find_captions(src, split)
    prefix = prefix or split or "clips"
    try:
        records.check_prefix(prefix)
    except ValueError as e:
        raise UserError(f"ingest prefix: {e}") from None
    items = read_captions(captions_path)
    keys = _unique_keys(items)
    opts = _Options(max_resolution=max_resolution, reencode=reencode, gop=gop)
    job = _job_fingerprint(captions_path, prefix, records_per_shard, opts)
    num = -(-len(items) // records_per_shard)
    spans = [
        range(j * records_per_shard, min(len(items), (j + 1) * records_per_shard))
        for j in range(num)
    ]
    fingerprints = [_chunk_fingerprint(job, [items[k] for k in span]) for span in spans]
    names = [f"{prefix}-{j:05d}-of-{num:05d}{records.SUFFIX}" for j in range(num)]
    parts_dir = out / PARTS_DIR
    parts_dir.mkdir(parents=True, exist_ok=True)
    _remove_other_jobs(out, prefix, num, job, clear_files=host == 0)

    mine = range(host, num, hosts)
    todo = []
    for j in mine:
        part = _read_part(parts_dir / f"{names[j]}.json")
        if part is None or not part.matches(out, fingerprints[j], digest=True):
            todo.append(j)
    if len(todo) < len(mine):
        log.info("ingest: %d shards already complete, kept", len(mine) - len(todo))
    jobs = [(items[k], keys[k], opts) for j in todo for k in spans[j] if not items[k].reason]
    results = _ordered_map(_process, jobs, workers)
    bar = tqdm(
        total=sum(len(spans[j]) for j in todo), desc="ingest", unit="clip", disable=not progress
    )
    for j in todo:
        _write_shard(out, names[j], [items[k] for k in spans[j]], results, fingerprints[j], bar)
    bar.close()
    return _merge_manifest(
        out,
        names,
        fingerprints,
        job,
        src,
        captions_path,
        prefix,
        len(items),
        records_per_shard,
        opts,
    )


def _remove_other_jobs(out: Path, prefix: str, num: int, job: str, *, clear_files: bool) -> None:
    """Clears what another ingest job left under this prefix. Every host drops a manifest
    of another job at once (readers must not take the shards being rewritten for it);
    slice 0 alone (``clear_files``) removes shards and part records of another shard count
    (the shards of this count are rewritten as they fail to match)."""
    manifest = out / MANIFEST
    if manifest.is_file():
        try:
            old = json.loads(manifest.read_text(encoding="utf-8"))
        except ValueError:
            old = {"prefix": prefix}
        if old.get("prefix") == prefix and old.get("fingerprint") != job:
            manifest.unlink(missing_ok=True)
    if not clear_files:
        return
    shard = re.compile(re.escape(prefix) + r"-\d{5}-of-(\d{5})" + re.escape(records.SUFFIX))
    for folder in (out, out / PARTS_DIR):
        for path in folder.glob(f"{prefix}-*"):
            m = shard.match(path.name)
            if m and int(m.group(1)) != num:  # of another shard count, finished or not
                path.unlink(missing_ok=True)


def _write_shard(
    out: Path, name: str, chunk: list[Item], results: Iterator, fingerprint: str, bar
) -> None:
    """Writes one shard from its chunk of entries (results come in the same order), then its part."""
    skipped = []
    final = out / name
    # What a killed writer of this shard left (only this slice writes it).
    for stale in [*out.glob(f"{name}.*.partial"), *(out / PARTS_DIR).glob(f"{name}.json.*.tmp")]:
        stale.unlink(missing_ok=True)
    partial = _own_name(final, ".partial")
    writer = ArrayRecordWriter(str(partial), records.WRITER_OPTIONS)
    written = 0
    try:
        for item in chunk:
            if item.reason:
                reason, detail, data = item.reason, item.detail, None
            else:
                data, reason, detail = next(results)
            if data is None:
                entry = {"index": item.index, "line": item.line, "video": item.video}
                skipped.append(entry | {"reason": reason, "detail": _printable(detail)})
            else:
                writer.write(data)
                written += 1
            bar.update(1)
    finally:
        writer.close()
    partial.replace(final)
    part = _Part(name, written, final.stat().st_size, file_sha256(final), skipped, fingerprint)
    atomic_write_text(
        out / PARTS_DIR / f"{name}.json", json.dumps(dataclasses.asdict(part), ensure_ascii=False)
    )


def _merge_manifest(
    out, names, fingerprints, job, src, captions_path, prefix, total, records_per_shard, opts
):
    """The manifest, once every shard's part is there and matches its file (by size)."""
    parts = [_read_part(out / PARTS_DIR / f"{n}.json") for n in names]
    # Sizes only: every shard's digest was checked by the process that kept or wrote it.
    done = [p is not None and p.matches(out, f, digest=False) for p, f in zip(parts, fingerprints)]
    if not all(done):
        log.info(
            "ingest: %d of %d shards complete; the other slices write the rest",
            sum(done),
            len(names),
        )
        return None
    skipped = sorted((e for p in parts for e in p.skipped), key=lambda e: e["index"])
    reasons = collections.Counter(e["reason"] for e in skipped)
    manifest = Manifest(
        source=_printable(str(src)),
        captions=_printable(str(captions_path)),
        prefix=prefix,
        counts={"total": total, "written": sum(p.records for p in parts), "skipped": len(skipped)},
        skip_reasons=dict(sorted(reasons.items())),
        skipped=skipped,
        shards=[
            {"path": p.path, "records": p.records, "bytes": p.bytes, "sha256": p.sha256}
            for p in parts
        ],
        records_per_shard=records_per_shard,
        options=dataclasses.asdict(opts),
        fingerprint=job,
        version=FORMAT_VERSION,
    )
    atomic_write_text(
        out / MANIFEST, manifest.to_json()
    )  # a manifest always describes finished shards
    return manifest
