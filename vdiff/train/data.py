"""Data for every stage: shapes synth -> ArrayRecord ingest -> tokenizer -> bucketed clip streams.

Every split's records are first sorted into shape buckets (:mod:`data_pipelines.buckets`)
from the facts each record carries (width, height, frame count, frame rate), scanned
once into ``DATA_ROOT/index`` by every process for its own run of records. Records no
bucket takes are counted by reason.

The clip shards hold encoded mp4. ``data.decode`` says how training reads them:

- ``"cache"`` (the default): every clip decoded once at its bucket (uint8 frames,
  raw log-mel, caption tokens, frame rate) into a decoded-frames cache, ArrayRecord shards
  under ``DATA_ROOT/frames/<tag>``, one cache split per (split, bucket) (``train.32x48x16``),
  written by every process for its own run of records at once and merged by process 0;
  each stage streams it. A clip's window is its epoch-0 draw. Decoding once instead of
  every epoch is what keeps the main job inside its time budget; the cache costs disk
  (100 KB of arrays a clip at 32x32x16 before ArrayRecord's compression) and the OS page
  cache does the rest.
- ``"stream"``: the grain workers decode the mp4 records at every step
  (:func:`data_pipelines.pipeline.make_pipeline`), with a window drawn per epoch; nothing
  is written beyond the records and the index, which is what a corpus of millions of clips needs.

Either way a stage reads a :class:`~data_pipelines.bucket_stream.BucketedStream` that
holds a batch of one bucket per step, never a split. Everything is written under the
data root (``data.root`` or ``WORKDIR/data``) and reused while its tag matches.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from data_pipelines import clip_index
from data_pipelines import latents as cache
from data_pipelines.bucket_stream import BucketedStream, bucketed_stream
from data_pipelines.buckets import Bucket, Strides, batch_sizes, check_buckets
from data_pipelines.ingest import MANIFEST, ingest
from data_pipelines.pipeline import (
    decode_example,
    decode_settings,
    frame_fields,
    make_pipeline,
    open_split,
)
from data_pipelines.records import decode_record
from data_pipelines.shapes.synth import synth_splits
from data_pipelines.stream import READ_THREADS
from data_pipelines.tokenizer import Tokenizer, train_tokenizer
from vdiff.caption_encoder import SPIECE, load_tokenizer
from vdiff.errors import UserError
from vdiff.manifest import atomic_write_text, file_sha256
from vdiff.train.distributed import barrier

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "val_heldout")
DECODE_MODES = ("cache", "stream")
# With data.decode="stream": train clips whose log-mel gives the normalisation statistics.
MEL_STATS_CLIPS = 512
# Clips decoded ahead of the writer: memory stays bounded whatever the split's size.
DECODE_WINDOW = 64


@dataclasses.dataclass
class Examples:
    """A few examples of a split in memory (the report's and the sweeps' clips)."""

    video: np.ndarray  # uint8 (N, T, H, W, 3)
    mel: np.ndarray  # float32 (N, Tm, n_mels), raw log-mel
    mel_norm: np.ndarray  # (mel - mean) / std with train-split statistics
    has_audio: np.ndarray  # bool (N,)
    tokens: np.ndarray  # int32 (N, L)
    mask: np.ndarray  # bool (N, L)
    captions: list[str]
    keys: list[str]
    indices: np.ndarray  # int64 (N,): each clip's record index in its split's shards
    fps: np.ndarray  # float32 (N,): each clip's frame rate
    bucket: Bucket  # the shape every clip here has

    def __len__(self) -> int:
        return len(self.video)


def part_name(split: str, bucket: Bucket) -> str:
    """The cache split of ``split``'s clips in ``bucket`` (e.g. ``train.32x48x16``)."""
    return f"{split}.{bucket.name}"


class DecodedClips:
    """Random access to the clips of one split's bucket, decoded from mp4 at access time
    with the window of epoch 0: the decoded-frames record of each (see :func:`frame_fields`).

    Position ``i`` is the bucket's ``i``-th member. :meth:`read` leaves out records that
    do not decode and counts them by reason in :attr:`skipped`.
    """

    def __init__(self, split_root: Path, config, tokenizer, bucket: Bucket, members):
        self.split_root = Path(split_root)
        self.bucket = bucket
        self.members = np.asarray(members, np.int64)
        self.seed = int(config.seed)
        self.settings = decode_settings(config, tokenizer)
        self.source = open_split(split_root)
        self.skipped: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.members)

    def decode(self, i: int) -> tuple[dict[str, Any] | None, str | None]:
        """(frames record, None) or (None, the reason it is skipped)."""
        b, index = self.bucket, int(self.members[i])
        try:
            record = decode_record(self.source[index])
            ex = decode_example(
                record,
                height=b.height,
                width=b.width,
                frames=b.frames,
                window=(self.seed, 0, index),
                **self.settings,
            )
        except Exception as e:  # a bad clip is skipped and counted, never fatal
            return None, getattr(e, "reason", type(e).__name__)
        return {
            "key": record["key"],
            "index": index,
            "caption": record["caption"],
            **frame_fields(ex),
        }, None

    def records(self, positions: Sequence[int], progress: str | None = None):
        """The good records at ``positions`` in order, decoded by a few threads (PyAV
        releases the GIL), at most :data:`DECODE_WINDOW` clips in flight."""
        positions = list(positions)
        with (
            concurrent.futures.ThreadPoolExecutor(READ_THREADS) as pool,
            tqdm(
                total=len(positions), desc=progress, disable=progress is None, mininterval=2.0
            ) as bar,
        ):
            for start in range(0, len(positions), DECODE_WINDOW):
                for rec, reason in pool.map(self.decode, positions[start : start + DECODE_WINDOW]):
                    bar.update(1)
                    if reason is not None:
                        self.skipped[reason] = self.skipped.get(reason, 0) + 1
                    else:
                        yield rec

    def read(self, positions: Sequence[int]) -> dict[str, Any]:
        """The good records at ``positions`` stacked, as :meth:`CacheSource.read` gives them."""
        recs = list(self.records(list(positions)))
        if not recs:
            raise UserError(
                f"no clip of the requested ones decodes at the bucket {self.bucket.name}"
            )
        return cache.stack_records(recs)


@dataclasses.dataclass
class Data:
    """Where every split's clips are, by bucket, and what the stages need to read them."""

    config: ml_collections.ConfigDict
    root: Path
    records: Path  # the ArrayRecord clip splits (``records/<split>``)
    frames: Path | None  # the decoded-frames cache (data.decode="cache")
    tokenizer: object
    mel_stats: dict[str, float]
    buckets: tuple[Bucket, ...]
    members: dict[str, clip_index.SplitBuckets]  # per split: record indices by bucket
    bucket_counts: dict[str, dict[str, int]]  # split -> bucket name -> usable clips
    tag: dict  # what the decoded clips come from (records, tokenizer, buckets, ...)

    @property
    def counts(self) -> dict[str, int]:
        """Usable clips per split, all buckets together."""
        return {s: sum(c.values()) for s, c in self.bucket_counts.items()}

    def splits(self) -> list[str]:
        return list(self.bucket_counts)

    def parts(self, split: str) -> list[Bucket]:
        """The buckets that hold clips of ``split``, in config order."""
        counts = self.bucket_counts[split]
        return [b for b in self.buckets if counts.get(b.name, 0) > 0]

    def head_bucket(self, split: str) -> Bucket:
        """The first bucket holding clips of ``split`` (what the report evaluates)."""
        parts = self.parts(split)
        if not parts:
            raise UserError(f"split {split} has no usable clip in any bucket")
        return parts[0]

    def source(self, split: str, bucket: Bucket | None = None):
        """Random access to the decoded-frames records of ``split`` in ``bucket`` (default:
        :meth:`head_bucket`): ``len`` and ``read``."""
        bucket = bucket or self.head_bucket(split)
        if self.frames is not None:
            return cache.CacheSource(self.frames, part_name(split, bucket), cache.FRAMES)
        k = self.buckets.index(bucket)
        members = self.members[split].members[k]
        return DecodedClips(self.records / split, self.config, self.tokenizer, bucket, members)

    @property
    def mel_norm(self) -> dict[str, np.float32]:
        """``{"shift", "scale"}`` that normalise raw log-mel (for ``RecordFields``)."""
        return {
            "shift": np.float32(self.mel_stats["mean"]),
            "scale": np.float32(1.0 / self.mel_stats["std"]),
        }

    def stream(
        self,
        split: str,
        fields: dict[str, str],
        *,
        batch_sizes: dict[str, int],
        seed: int,
        images: bool = True,
    ) -> BucketedStream:
        """This process's batches of ``split``, one bucket per step.

        Args:
            fields: batch key -> frames field; the ``audio`` field (raw log-mel) comes
                normalised.
            batch_sizes: Bucket name -> per-process batch (see :func:`bucket_batches`).
            seed: The stream seed (equal on every process).
            images: Include the 1-frame buckets (the audio stage leaves them out: an
                image has no sound).
        """
        norms = {k: self.mel_norm for k, f in fields.items() if f == "audio"}
        transform = cache.RecordFields(fields, norms)
        d = self.config.data

        def make_stream(k: int, bucket: Bucket, batch: int, seed: int):
            if self.frames is None:
                return make_pipeline(
                    self.config,
                    self.records / split,
                    tokenizer=self.tokenizer,
                    batch_size=batch,
                    seed=seed,
                    transform=transform,
                    bucket=bucket,
                    members=self.members[split].members[k],
                )
            return cache.cache_stream(
                self.frames,
                part_name(split, bucket),
                transform,
                batch_size=batch,
                seed=seed,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
                kind=cache.FRAMES,
                worker_count=int(d.num_workers),
                prefetch=int(d.prefetch),
            )

        return self.bucketed(
            self.bucket_counts[split],
            make_stream,
            batch_sizes=batch_sizes,
            seed=seed,
            images=images,
            what=f"{split} clips",
        )

    def bucketed(
        self,
        counts: dict[str, int],
        make_stream,
        *,
        batch_sizes: dict[str, int],
        seed: int,
        what: str,
        images: bool = True,
    ) -> BucketedStream:
        """:func:`~data_pipelines.bucket_stream.bucketed_stream` over this run's buckets,
        image share and process count (``counts``: bucket name -> examples; ``make_stream``
        builds one bucket's stream); a bucket set that holds no full batch is a UserError."""
        try:
            return bucketed_stream(
                self.buckets,
                counts,
                make_stream,
                batch_sizes=batch_sizes,
                seed=seed,
                process_count=jax.process_count(),
                image_share=float(self.config.data.image_share),
                images=images,
                what=what,
            )
        except ValueError as e:
            raise UserError(str(e)) from None

    def head(self, split: str, k: int) -> Examples:
        """The first ``k`` clips of ``split``'s :meth:`head_bucket` (fewer if it holds
        fewer), in memory."""
        bucket = self.head_bucket(split)
        src = self.source(split, bucket)
        rows = src.read(range(min(k, len(src))))
        n = len(rows["video"])
        mel = rows.get("audio", np.zeros((n, 1, 1), np.float32))
        norm = self.mel_norm
        return Examples(
            video=rows["video"],
            mel=mel,
            mel_norm=((mel - norm["shift"]) * norm["scale"]).astype(np.float32),
            has_audio=rows["has_audio"],
            tokens=rows["tokens"],
            mask=rows["mask"],
            captions=rows["caption"],
            keys=rows["key"],
            indices=rows["index"],
            fps=rows["fps"],
            bucket=bucket,
        )


def bucket_batches(config, base_batch: int, divisor: int, explicit=()) -> dict[str, int]:
    """Bucket name -> global batch of a stage whose first bucket takes ``base_batch``
    clips: ``explicit`` sizes, else the same token budget for every bucket
    (:func:`data_pipelines.buckets.batch_sizes`)."""
    buckets = check_buckets(config.data.buckets, Strides.from_config(config))
    sizes = batch_sizes(
        buckets, base_batch, Strides.from_config(config), divisor=divisor, explicit=explicit
    )
    return {b.name: n for b, n in zip(buckets, sizes, strict=True)}


def data_root(config: ml_collections.ConfigDict, workdir: Path) -> Path:
    return Path(config.data.root) if config.data.root else Path(workdir) / "data"


def _on_process_zero(fn, name: str):
    """Runs ``fn`` on process 0 while the others wait (shared storage assumed)."""
    if jax.process_index() == 0:
        fn()
    barrier(name)


def _synth(config, raw: Path) -> None:
    d = config.data
    log.info(
        "generating the shapes dataset into %s (%d train / %d val clips)",
        raw,
        d.num_train,
        d.num_val,
    )
    synth_splits(
        raw,
        num_train=d.num_train,
        num_val=d.num_val,
        seed=config.seed,
        resolution=d.resolution,
        frames=d.frames,
        fps=d.fps,
        max_shapes=d.max_shapes,
        audio=d.audio,
        workers=max(1, d.synth_workers),
    )


def _ingest(raw: Path, records: Path, split: str, workers: int) -> None:
    ingest(raw, records / split, split=split, workers=workers, progress=True)


def prepare_data(config: ml_collections.ConfigDict, workdir: Path) -> Data:
    """Makes sure the dataset, records and tokenizer exist, then decodes every split."""

    root = data_root(config, workdir)
    raw, records = root / "raw", root / "records"
    if config.data.name == "shapes":
        if not (raw / "train" / "captions.jsonl").exists():
            _on_process_zero(lambda: _synth(config, raw), "vdiff_synth")
        for split in SPLITS:
            if (raw / split / "captions.jsonl").exists() and not (
                records / split / "manifest.json"
            ).exists():
                _on_process_zero(
                    lambda s=split: _ingest(raw, records, s, config.data.synth_workers),
                    f"vdiff_ingest_{split}",
                )
    elif config.data.name == "records":
        records = root
        if not (records / "train").exists():
            raise UserError(
                f"data.root={root} has no train/ folder of ArrayRecord shards; run 'vdiff data ingest SRC {root}/train' first"
            )
        for split in SPLITS:
            if (records / split).is_dir() and not (records / split / MANIFEST).is_file():
                raise UserError(
                    f"{records / split} has no {MANIFEST}: its ingest has not finished; rerun "
                    "'vdiff data ingest' for it (every --shard slice) until it writes one"
                )
    else:
        raise UserError(f"data.name='{config.data.name}' is not known; use 'shapes' or 'records'")

    tok_path, tokenizer = caption_tokenizer(config, root, records)
    mode = config.data.decode
    if mode not in DECODE_MODES:
        raise UserError(f"data.decode='{mode}' is not known; use 'cache' or 'stream'")
    splits = [s for s in SPLITS if (records / s).is_dir()]
    if "train" not in splits:
        raise UserError(f"no train split under {records}; check data.root")
    buckets = check_buckets(config.data.buckets, Strides.from_config(config))
    members = {s: _split_buckets(config, root, records, s, buckets) for s in splits}
    for split, m in members.items():
        log.info(
            "%s: clips by bucket %s; taken by no bucket: %s",
            split, m.counts(), m.skipped or "none",
        )  # fmt: skip
    tag = _clips_tag(config, records, splits, tok_path)
    common = dict(
        config=config, root=root, records=records, tokenizer=tokenizer, tag=tag,
        buckets=buckets, members=members,
    )  # fmt: skip
    if mode == "stream":
        return Data(
            frames=None,
            mel_stats=_sampled_mel_stats(config, records / "train", tokenizer, members["train"]),
            bucket_counts={s: m.counts() for s, m in members.items()},
            **common,
        )
    frames = _frames_cache(config, root, records, splits, tokenizer, tag, members)
    meta = cache.read_meta(frames, cache.FRAMES)
    counts = {s: {b.name: 0 for b in buckets} for s in splits}
    for part, entry in meta["splits"].items():
        split, name = part.split(".", 1)
        counts[split][name] = entry["count"]
    return Data(frames=frames, mel_stats=meta["mel_stats"], bucket_counts=counts, **common)


def _split_buckets(
    config, root: Path, records: Path, split: str, buckets
) -> clip_index.SplitBuckets:
    """``split``'s records by bucket, from their facts (scanned once into
    ``root/index``: every process reads its own run of records, all read every part)."""
    out = root / "index"
    sha = file_sha256(records / split / MANIFEST)
    meta_path = out / f"{split}.json"

    def current():
        if not meta_path.is_file():
            return None
        meta = json.loads(meta_path.read_text())
        return meta if meta.get("manifest") == sha else None

    def part(p: int, n: int) -> Path:
        return out / f"{split}.{sha[:16]}.p{p:05d}-of-{n:05d}.npz"

    meta = current()
    barrier(f"vdiff_index_check_{split}")  # every process decided before anyone writes
    if meta is None:
        pi, pc = jax.process_index(), jax.process_count()
        src = open_split(records / split)
        lo, hi = len(src) * pi // pc, len(src) * (pi + 1) // pc
        out.mkdir(parents=True, exist_ok=True)
        clip_index.save_facts(part(pi, pc), clip_index.read_facts(src, range(lo, hi)))
        barrier(f"vdiff_index_parts_{split}")
        if pi == 0:
            atomic_write_text(meta_path, json.dumps({"manifest": sha, "parts": pc}))
        barrier(f"vdiff_index_meta_{split}")
        meta = current()
    n = int(meta["parts"])
    facts = clip_index.load_facts([part(p, n) for p in range(n)])
    return clip_index.SplitBuckets.assign(facts, buckets, float(config.data.fps))


def caption_tokenizer(config, root: Path, records: Path):
    """``(path, tokenizer)`` of the captions: a pretrained encoder's ``spiece.model``
    (``text.encoder="t5"``), else ``DATA_ROOT/tokenizer.model``, trained on the train
    split's captions on first use."""
    if config.text.encoder != "internal":
        folder = Path(config.text.path)
        return folder / SPIECE, load_tokenizer(folder)
    tok_path = root / "tokenizer.model"
    if not tok_path.exists():

        def make_tokenizer():
            src = open_split(records / "train")
            captions = [decode_record(src[i])["caption"] for i in range(len(src))]
            train_tokenizer(captions, str(root / "tokenizer"), vocab_size=config.data.vocab_size)

        _on_process_zero(make_tokenizer, "vdiff_tokenizer")
    return tok_path, Tokenizer(tok_path)


def _clips_tag(config, records: Path, splits: list[str], tok_path: Path) -> dict:
    """What the decoded clips come from; a cache of them is reused only while this holds."""
    d = config.data
    return {
        "records": {s: file_sha256(records / s / MANIFEST) for s in splits},
        "tokenizer": file_sha256(tok_path),
        "buckets": [[int(x) for x in b] for b in d.buckets],
        "fps": float(d.fps),
        "seed": int(config.seed),  # the clip windows
        "caption_len": int(config.text.max_len),
        "audio": bool(d.audio),
        "mel": [int(d.sample_rate), int(d.hop), int(d.n_mels), int(config.audio_ae.time_down)],
    }


def _mel_stats(moments: cache.Moments | None) -> dict[str, float]:
    if moments is None:
        return {"mean": 0.0, "std": 1.0}
    mean, std = moments.mean_std(pooled=True)
    return {"mean": float(mean[0]), "std": float(std[0] + 1e-6)}


def _sampled_mel_stats(config, train: Path, tokenizer, members: clip_index.SplitBuckets):
    """Raw log-mel mean and std over up to :data:`MEL_STATS_CLIPS` train clips with audio,
    the first of each video bucket in turn (every process computes the same numbers)."""
    if not config.data.audio:
        return _mel_stats(None)
    moments = None
    buckets = [
        (b, m) for b, m in zip(members.buckets, members.members) if not b.is_image and len(m)
    ]
    for b, m in buckets:
        clips = DecodedClips(train, config, tokenizer, b, m)
        for rec in clips.records(range(min(MEL_STATS_CLIPS // len(buckets) + 1, len(clips)))):
            if rec["audio"] is not None and rec["has_audio"]:
                moments = moments or cache.Moments(rec["audio"].shape[-1])
                moments.add(rec["audio"])
    return _mel_stats(moments)


def _cache_folder(config) -> str:
    d = config.data
    names = [Bucket(*map(int, b)).name for b in d.buckets]
    label = names[0] if len(names) == 1 else f"{names[0]}+{len(names) - 1}"
    return f"{label}_{d.fps:g}fps_L{config.text.max_len}"


def _frames_cache(config, root: Path, records: Path, splits, tokenizer, tag: dict, members) -> Path:
    """Decodes every split once, each clip at its bucket, into ``root/frames/<buckets>_...``.

    Each process decodes a consecutive run of each (split, bucket)'s records and writes
    its own part (:class:`~data_pipelines.latents.PartWriter`); process 0 merges the
    parts and writes ``frames.json`` last, with the raw log-mel statistics of the train
    split. Records that do not decode at their bucket are skipped and counted by reason,
    beside the records no bucket takes.
    """
    d = config.data
    out = root / "frames" / _cache_folder(config)
    try:
        meta = cache.read_meta(out, cache.FRAMES)
    except UserError as e:
        log.warning("decoding the clips again: %s", e)
        meta = None
    if meta is not None and meta["tag"] == tag:
        for part in meta["splits"]:
            cache.check_split(out, part, meta, cache.FRAMES)
        return out
    pi, pc = jax.process_index(), jax.process_count()
    if pi == 0:
        cache.clear_cache(out, cache.FRAMES)
    barrier("vdiff_frames_clear")
    for split in splits:
        m = members[split]
        for bucket, idx in zip(m.buckets, m.members):
            if len(idx):
                _decode_part(config, records / split, out, split, bucket, idx, tokenizer, pi, pc)
    barrier("vdiff_frames_parts")
    if pi == 0:
        entries, skipped, train_moments = {}, {}, {}
        for split in splits:
            m = members[split]
            skipped[split] = dict(m.skipped)
            for bucket, idx in zip(m.buckets, m.members):
                if not len(idx):
                    continue
                part = part_name(split, bucket)
                for reason, n in _skip_counts(out, part, pc).items():
                    skipped[split][reason] = skipped[split].get(reason, 0) + n
                if not _part_counts(out, part, pc):
                    continue
                entries[part], moments = cache.merge_parts(out, part, pc)
                if split == "train":  # the statistics pool every train bucket
                    cache.pool_moments(train_moments, moments)
            if not any(p.startswith(f"{split}.") for p in entries):
                counts = ", ".join(f"{n} {r}" for r, n in sorted(skipped[split].items()))
                raise UserError(
                    f"split {split} ({records / split}) has no usable clip for any bucket of "
                    f"data.buckets at {d.fps:g} fps: {counts or 'no records'}; check its "
                    "manifest.json and data.buckets / data.fps"
                )
        mel = _mel_stats(train_moments.get("audio"))
        extra = {"mel_stats": mel, "skipped": skipped}
        cache.write_meta(out, tag, entries, {}, cache.FRAMES, extra)
        log.info(
            "decoded frames in %s: %s",
            out,
            ", ".join(f"{s} {e['count']} clips" for s, e in entries.items()),
        )
        for split, reasons in skipped.items():
            if reasons:
                log.warning("%s: %d clips skipped: %s", split, sum(reasons.values()), reasons)
    barrier("vdiff_frames_meta")
    return out


def _parts(out: Path, split: str, pc: int) -> list[dict]:
    return [
        json.loads((out / f"{cache.part_name(split, p, pc)}.json").read_text()) for p in range(pc)
    ]


def _part_counts(out: Path, split: str, pc: int) -> int:
    return sum(part["count"] for part in _parts(out, split, pc))


def _skip_counts(out: Path, split: str, pc: int) -> dict[str, int]:
    total: dict[str, int] = {}
    for part in _parts(out, split, pc):
        for reason, n in part.get("skipped", {}).items():
            total[reason] = total.get(reason, 0) + n
    return total


def _decode_part(
    config, split_root: Path, out: Path, split: str, bucket: Bucket, members, tokenizer, pi, pc
) -> None:
    """Process ``pi``'s consecutive run of a bucket's records -> its part of the cache."""
    clips = DecodedClips(split_root, config, tokenizer, bucket, members)
    lo, hi = len(clips) * pi // pc, len(clips) * (pi + 1) // pc
    part = part_name(split, bucket)
    writer = cache.PartWriter(out, part, pi, pc, moments=("audio",) if split == "train" else ())
    try:
        progress = f"decode {part}" if pi == 0 else None
        for rec in clips.records(range(lo, hi), progress=progress):
            writer.write(rec)
    except BaseException:
        writer.abort()
        raise
    if clips.skipped:
        log.warning(
            "%s: skipped %d clips that do not decode at the bucket: %s",
            part,
            sum(clips.skipped.values()),
            clips.skipped,
        )
    writer.close(extra={"skipped": clips.skipped})
