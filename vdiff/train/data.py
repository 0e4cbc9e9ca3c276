"""Data for every stage: shapes synth -> ArrayRecord ingest -> tokenizer -> clip streams.

The clip shards hold encoded mp4. ``data.decode`` says how training reads them:

- ``"cache"`` (the default): every clip decoded once at the first bucket (uint8 frames,
  raw log-mel, caption tokens) into a decoded-frames cache, ArrayRecord shards under
  ``DATA_ROOT/frames/<bucket>``, written by every process for its own run of records at
  once and merged by process 0; each stage streams it. Decoding once instead of every
  epoch is what keeps the main job inside its time budget; the cache costs disk (100 KB
  of arrays a clip at 32x32x16 before ArrayRecord's compression) and the OS page cache does the rest.
- ``"stream"``: the grain workers decode the mp4 records at every step
  (:func:`data_pipelines.pipeline.make_pipeline`), with a window drawn per step; nothing
  is written beyond the records, which is what a corpus of millions of clips needs.

Either way a stage reads a stream that holds a batch, never a split. Everything is
written under the data root (``data.root`` or ``WORKDIR/data``) and reused while its
tag matches.
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

from data_pipelines import latents as cache
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
from vdiff.errors import UserError
from vdiff.manifest import file_sha256
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

    def __len__(self) -> int:
        return len(self.video)


class DecodedClips:
    """Random access to one split's clips decoded from mp4 at access time, at the first
    bucket from 0 s: the decoded-frames record of each (see :func:`frame_fields`).

    :meth:`read` leaves out records that do not decode and counts them by reason in
    :attr:`skipped`.
    """

    def __init__(self, split_root: Path, config, tokenizer):
        self.split_root = Path(split_root)
        self.bucket = tuple(int(x) for x in config.data.buckets[0])
        self.settings = decode_settings(config, tokenizer)
        self.source = open_split(split_root)
        self.skipped: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.source)

    def decode(self, index: int) -> tuple[dict[str, Any] | None, str | None]:
        """(frames record, None) or (None, the reason it is skipped)."""
        h, w, t = self.bucket
        try:
            record = decode_record(self.source[index])
            ex = decode_example(record, height=h, width=w, frames=t, **self.settings)
        except Exception as e:  # a bad clip is skipped and counted, never fatal
            return None, getattr(e, "reason", type(e).__name__)
        return {
            "key": record["key"],
            "index": index,
            "caption": record["caption"],
            **frame_fields(ex),
        }, None

    def records(self, indices: Sequence[int], progress: str | None = None):
        """The good records of ``indices`` in order, decoded by a few threads (PyAV
        releases the GIL), at most :data:`DECODE_WINDOW` clips in flight."""
        indices = list(indices)
        with (
            concurrent.futures.ThreadPoolExecutor(READ_THREADS) as pool,
            tqdm(
                total=len(indices), desc=progress, disable=progress is None, mininterval=2.0
            ) as bar,
        ):
            for start in range(0, len(indices), DECODE_WINDOW):
                for rec, reason in pool.map(self.decode, indices[start : start + DECODE_WINDOW]):
                    bar.update(1)
                    if reason is not None:
                        self.skipped[reason] = self.skipped.get(reason, 0) + 1
                    else:
                        yield rec

    def read(self, indices: Sequence[int]) -> dict[str, Any]:
        """The good records of ``indices`` stacked, as :meth:`CacheSource.read` gives them."""
        recs = list(self.records(list(indices)))
        if not recs:
            raise UserError("no clip of the requested ones decodes at the bucket")
        return cache.stack_records(recs)


@dataclasses.dataclass
class Data:
    """Where every split's clips are, and what the stages need to read them."""

    config: ml_collections.ConfigDict
    root: Path
    records: Path  # the ArrayRecord clip splits (``records/<split>``)
    frames: Path | None  # the decoded-frames cache (data.decode="cache")
    tokenizer: object
    mel_stats: dict[str, float]
    counts: dict[str, int]  # clips per split (usable ones, with the cache)
    tag: dict  # what the decoded clips come from (records, tokenizer, bucket, ...)

    def splits(self) -> list[str]:
        return list(self.counts)

    def source(self, split: str):
        """Random access to ``split``'s decoded-frames records (``len``, ``read``)."""
        if self.frames is not None:
            return cache.CacheSource(self.frames, split, cache.FRAMES)
        return DecodedClips(self.records / split, self.config, self.tokenizer)

    @property
    def mel_norm(self) -> dict[str, np.float32]:
        """``{"shift", "scale"}`` that normalise raw log-mel (for ``RecordFields``)."""
        return {
            "shift": np.float32(self.mel_stats["mean"]),
            "scale": np.float32(1.0 / self.mel_stats["std"]),
        }

    def stream(self, split: str, fields: dict[str, str], *, batch_size: int, seed: int):
        """This process's batches of ``split`` (``fields``: batch key -> frames field;
        the ``audio`` field, raw log-mel, comes normalised)."""
        norms = {k: self.mel_norm for k, f in fields.items() if f == "audio"}
        transform = cache.RecordFields(fields, norms)
        d = self.config.data
        if self.frames is None:
            return make_pipeline(
                self.config,
                self.records / split,
                tokenizer=self.tokenizer,
                batch_size=batch_size,
                seed=seed,
                transform=transform,
            )
        return cache.cache_stream(
            self.frames,
            split,
            transform,
            batch_size=batch_size,
            seed=seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            kind=cache.FRAMES,
            worker_count=int(d.num_workers),
            prefetch=int(d.prefetch),
        )

    def head(self, split: str, k: int) -> Examples:
        """The first ``k`` clips of ``split`` (fewer if it holds fewer), in memory."""
        src = self.source(split)
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
        )


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

    tok_path = root / "tokenizer.model"
    if not tok_path.exists():

        def make_tokenizer():
            src = open_split(records / "train")
            captions = [decode_record(src[i])["caption"] for i in range(len(src))]
            train_tokenizer(captions, str(root / "tokenizer"), vocab_size=config.data.vocab_size)

        _on_process_zero(make_tokenizer, "vdiff_tokenizer")
    tokenizer = Tokenizer(tok_path)
    mode = config.data.decode
    if mode not in DECODE_MODES:
        raise UserError(f"data.decode='{mode}' is not known; use 'cache' or 'stream'")
    splits = [s for s in SPLITS if (records / s).is_dir()]
    if "train" not in splits:
        raise UserError(f"no train split under {records}; check data.root")
    tag = _clips_tag(config, records, splits, tok_path)
    common = dict(config=config, root=root, records=records, tokenizer=tokenizer, tag=tag)
    if mode == "stream":
        return Data(
            frames=None,
            mel_stats=_sampled_mel_stats(config, records / "train", tokenizer),
            counts={s: len(open_split(records / s)) for s in splits},
            **common,
        )
    frames = _frames_cache(config, root, records, splits, tokenizer, tag)
    meta = cache.read_meta(frames, cache.FRAMES)
    return Data(
        frames=frames,
        mel_stats=meta["mel_stats"],
        counts={split: e["count"] for split, e in meta["splits"].items()},
        **common,
    )


def _clips_tag(config, records: Path, splits: list[str], tok_path: Path) -> dict:
    """What the decoded clips come from; a cache of them is reused only while this holds."""
    d = config.data
    return {
        "records": {s: file_sha256(records / s / MANIFEST) for s in splits},
        "tokenizer": file_sha256(tok_path),
        "bucket": [int(x) for x in d.buckets[0]],
        "fps": float(d.fps),
        "caption_len": int(d.caption_len),
        "audio": bool(d.audio),
        "mel": [int(d.sample_rate), int(d.hop), int(d.n_mels)],
    }


def _mel_stats(moments: cache.Moments | None) -> dict[str, float]:
    if moments is None:
        return {"mean": 0.0, "std": 1.0}
    mean, std = moments.mean_std(pooled=True)
    return {"mean": float(mean[0]), "std": float(std[0] + 1e-6)}


def _sampled_mel_stats(config, train: Path, tokenizer) -> dict[str, float]:
    """Raw log-mel mean and std over the first :data:`MEL_STATS_CLIPS` train clips (every
    process computes the same numbers)."""
    if not config.data.audio:
        return _mel_stats(None)
    clips = DecodedClips(train, config, tokenizer)
    moments = None
    for rec in clips.records(range(min(MEL_STATS_CLIPS, len(clips)))):
        if rec["audio"] is not None:
            moments = moments or cache.Moments(rec["audio"].shape[-1])
            moments.add(rec["audio"])
    return _mel_stats(moments)


def _frames_cache(config, root: Path, records: Path, splits, tokenizer, tag: dict) -> Path:
    """Decodes every split once at the first bucket into ``root/frames/HxWxT_...``.

    Each process decodes a consecutive run of each split's records and writes its own
    part (:class:`~data_pipelines.latents.PartWriter`); process 0 merges the parts and
    writes ``frames.json`` last, with the raw log-mel statistics of the train split.
    Records that do not decode at the bucket are skipped and counted by reason.
    """
    d = config.data
    h, w, t = d.buckets[0]
    out = root / "frames" / f"{h}x{w}x{t}_{d.fps:g}fps_L{d.caption_len}"
    try:
        meta = cache.read_meta(out, cache.FRAMES)
    except UserError as e:
        log.warning("decoding the clips again: %s", e)
        meta = None
    if meta is not None and meta["tag"] == tag:
        for split in splits:
            cache.check_split(out, split, meta, cache.FRAMES)
        return out
    pi, pc = jax.process_index(), jax.process_count()
    if pi == 0:
        cache.clear_cache(out, cache.FRAMES)
    barrier("vdiff_frames_clear")
    for split in splits:
        _decode_part(config, records / split, out, split, tokenizer, pi, pc)
    barrier("vdiff_frames_parts")
    if pi == 0:
        entries, skipped, mel = {}, {}, _mel_stats(None)
        for split in splits:
            skipped[split] = _skip_counts(out, split, pc)
            if not _part_counts(out, split, pc):
                counts = ", ".join(f"{n} {r}" for r, n in sorted(skipped[split].items()))
                raise UserError(
                    f"split {split} ({records / split}) has no usable clip for the bucket "
                    f"{h}x{w}x{t} at {d.fps:g} fps: {counts or 'no records'}; check its "
                    "manifest.json and data.buckets / data.fps"
                )
            entries[split], moments = cache.merge_parts(out, split, pc)
            if split == "train":
                mel = _mel_stats(moments.get("audio"))
        extra = {"mel_stats": mel, "skipped": skipped}
        cache.write_meta(out, tag, entries, {}, cache.FRAMES, extra)
        log.info(
            "decoded frames in %s: %s",
            out,
            ", ".join(
                f"{s} {e['count']} clips ({sum(skipped[s].values())} skipped)"
                for s, e in entries.items()
            ),
        )
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
    config, split_root: Path, out: Path, split: str, tokenizer, pi: int, pc: int
) -> None:
    """Process ``pi``'s consecutive run of the split's records -> its part of the cache."""
    clips = DecodedClips(split_root, config, tokenizer)
    lo, hi = len(clips) * pi // pc, len(clips) * (pi + 1) // pc
    writer = cache.PartWriter(out, split, pi, pc, moments=("audio",) if split == "train" else ())
    try:
        for rec in clips.records(range(lo, hi), progress=f"decode {split}" if pi == 0 else None):
            writer.write(rec)
    except BaseException:
        writer.abort()
        raise
    if clips.skipped:
        log.warning(
            "%s: skipped %d clips that do not decode at the bucket: %s",
            split,
            sum(clips.skipped.values()),
            clips.skipped,
        )
    writer.close(extra={"skipped": clips.skipped})
