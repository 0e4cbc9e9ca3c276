"""The grain input pipeline: ArrayRecord clip shards -> per-process training batches.

Stages (per process)::

    record indices 0..N-1
      -> global shuffle, reshuffled every epoch (same seed on every host)
      -> per-process shard: process p takes stream positions p, p + P, p + 2P, ...
      -> load + decode one clip (a random window of `frames` frames at config.data.fps,
         resized and centre-cropped to the step's bucket in C) -> video float32 [-1, 1]
      -> audio of the same time window -> log-mel (frames / fps * 100 mel frames)
      -> caption tokens + mask
      -> batch (per-process batch size) -> prefetch (grain worker processes if asked)

Design: everything is a pure function of a position in the per-process stream.
Element ``j`` belongs to batch (= training step) ``j // batch_size``; its bucket is
:func:`bucket_for_step` of ``(seed, step)``, its clip window is drawn from an RNG keyed
by ``(seed, process_index, j)``. Nothing depends on which worker decodes it or in what
order, so grain's multiprocess prefetch (worker ``w`` of ``W`` decodes batches
``w, w + W, ...`` and the parent interleaves them back in order) gives the same batches
as the in-process path, every host uses the same bucket at the same step (global arrays
agree across hosts), and the iterator state is one integer: the next batch index.

Bad records (unreadable msgpack, :class:`~data_pipelines.video_io.BadVideo`, any decode
error, a video shorter than the clip) are skipped and counted, never fatal. A skipped
record is refilled from the next records of the same stream (positions ``j + 1``,
``j + 2``, ...; those clips then appear twice this epoch). Refilling in place rather than
filtering keeps every batch full and every host at the same number of batches per epoch,
which the hosts need to stay in lockstep; the counts come back with each batch and are
summed in :attr:`PipelineIterator.stats` (and kept in the checkpointed state).
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import re
from pathlib import Path
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from absl import flags
from tqdm import tqdm

from data_pipelines import records, video_io
from data_pipelines.audio import log_mel
from data_pipelines.buckets import bucket_for_step, check_buckets
from vdiff.errors import UserError

log = logging.getLogger(__name__)

# After this many consecutive bad records the data, not one file, is broken: stop clearly.
MAX_REFILLS = 64
# Decode threads per process (or per worker process) when reading ahead.
READ_THREADS = 2
_STATE_VERSION = 1
_SHARD_RE = re.compile(r"(.+)-\d{5}-of-\d{5}" + re.escape(records.SUFFIX))


# --------------------------------------------------------------------------- one clip


def mel_frames(frames: int, fps: float, sample_rate: int, hop: int) -> int:
    """Log-mel frames covering ``frames`` video frames (e.g. 16 at 8 fps, hop 160 @16k -> 200)."""
    return round(frames / fps * sample_rate / hop)


def clip_starts(duration: float, src_fps: float, clip_s: float) -> int:
    """Number of valid clip starts on the source frame grid (0 if the video is too short)."""
    # Small slack: containers round durations to their time base.
    slack = 0.5 / max(src_fps, 1.0)
    if duration + slack < clip_s:
        return 0
    return math.floor(max(duration - clip_s, 0.0) * src_fps + 1e-6) + 1


def decode_example(
    record: dict[str, Any],
    *,
    height: int,
    width: int,
    frames: int,
    fps: float,
    tokenizer,
    caption_len: int,
    audio: bool = True,
    sample_rate: int = 16000,
    hop: int = 160,
    n_mels: int = 64,
    rng: np.random.Generator | None = None,
) -> dict[str, Any]:
    """Decodes one record into one training example.

    Args:
        record: A decoded record dict (see :mod:`data_pipelines.records`).
        height, width, frames: The bucket.
        fps: Target frame rate; the clip spans ``frames / fps`` seconds.
        tokenizer: Has ``encode(texts, length) -> (ids, mask)``.
        caption_len: Tokens after pad/truncate.
        audio: Whether to produce ``mel`` and ``has_audio``.
        sample_rate, hop, n_mels: Log-mel settings (``sample_rate / hop`` frames per second).
        rng: Picks the clip start among the valid starts; None starts at 0 s.

    Returns:
        ``video`` float32 (T, H, W, 3) in [-1, 1], ``tokens`` int32 (L,), ``mask`` bool (L,),
        ``start_s`` float32, and with audio ``mel`` float32 (Tm, n_mels) (zeros when the
        file has no audio) and ``has_audio`` bool.

    Raises:
        BadVideo: If the clip cannot be decoded or is shorter than ``frames / fps``.
    """
    clip_s = frames / fps
    src_fps = float(record["fps"]) or fps
    n_starts = clip_starts(float(record["duration"]), src_fps, clip_s)
    if n_starts == 0:
        raise video_io.BadVideo(
            "too_short", f"{record['duration']:.3f} s < clip {clip_s:.3f} s ({record['key']})"
        )
    start_s = 0.0 if rng is None else int(rng.integers(n_starts)) / src_fps
    video = video_io.decode_clip(record["video"], start_s, frames, fps, size=(height, width))
    if video.shape != (frames, height, width, 3):
        raise video_io.BadVideo(video_io.DECODE_ERROR, f"decoded shape {video.shape}")
    ids, mask = tokenizer.encode([record["caption"]], caption_len)
    out = {
        "video": video.astype(np.float32) * np.float32(2 / 255) - np.float32(1),
        "tokens": np.asarray(ids[0], np.int32),
        "mask": np.asarray(mask[0], bool),
        "start_s": np.float32(start_s),
    }
    if audio:
        n_mel = mel_frames(frames, fps, sample_rate, hop)
        mel = np.zeros((n_mel, n_mels), np.float32)
        if record["has_audio"]:
            wave = video_io.decode_audio(record["video"], start_s, clip_s, sample_rate)
            m = np.asarray(
                log_mel(wave, sample_rate=sample_rate, hop=hop, n_mels=n_mels), np.float32
            )
            mel[: min(n_mel, len(m))] = m[:n_mel]
            if len(m) < n_mel:  # a log-mel without end padding can be a frame short
                mel[len(m) :] = m[-1]
        out["mel"] = mel
        out["has_audio"] = np.bool_(record["has_audio"])
    return out


# --------------------------------------------------------------------------- sources


def open_split(split_root: str | Path) -> grain.sources.ArrayRecordDataSource:
    """Opens the ArrayRecord shards of one split as a random-access source of record bytes.

    Args:
        split_root: A folder holding one shard set ``{prefix}-?????-of-?????.array_record``,
            or ``folder/prefix`` to pick one of several shard sets in a folder.

    Raises:
        FileNotFoundError: If there are no shards; ValueError if the choice is ambiguous.
    """
    root = Path(split_root)
    if root.is_dir():
        prefixes = sorted(
            {m.group(1) for p in root.iterdir() if (m := _SHARD_RE.fullmatch(p.name))}
        )
        if len(prefixes) > 1:
            raise ValueError(
                f"{root} holds several shard sets ({', '.join(prefixes)}); pass {root}/<prefix>"
            )
        paths = records.list_shards(root, prefixes[0]) if prefixes else []
    else:
        paths = records.list_shards(root.parent, root.name) if root.parent.is_dir() else []
    if not paths:
        raise FileNotFoundError(
            f"no ArrayRecord shards at {split_root}; run `vdiff data synth` or `vdiff data ingest`"
        )
    return grain.sources.ArrayRecordDataSource(paths)


class _LoadClip:
    """Picklable grain map: stream position + record index -> one decoded example."""

    def __init__(self, source, stream, *, settings, buckets, batch_size, seed, process_index):
        self.source = source
        self.stream = stream  # record indices of this process, for refills
        self.settings = settings
        self.buckets = buckets
        self.batch_size = batch_size
        self.seed = seed
        self.process_index = process_index

    def __call__(self, position: int, record_index: int) -> dict[str, Any]:
        height, width, frames = bucket_for_step(
            self.buckets, self.seed, position // self.batch_size
        )
        rng = np.random.default_rng([self.seed, self.process_index, position])
        skipped, last_error = 0, None
        for attempt in range(MAX_REFILLS):
            index = (
                record_index
                if attempt == 0
                else self.stream[(position + attempt) % len(self.stream)]
            )
            try:
                record = records.decode_record(self.source[int(index)])
                example = decode_example(
                    record, height=height, width=width, frames=frames, rng=rng, **self.settings
                )
            except Exception as e:  # any per-record failure skips the record, by design
                skipped += 1
                last_error = e
                log.debug("skipping record %d: %s", index, e)
                continue
            example["key"] = record["key"]
            example["index"] = np.int64(index)
            example["skipped"] = np.int32(skipped)
            return example
        raise RuntimeError(
            f"{MAX_REFILLS} records in a row failed to decode near stream position {position}; "
            f"the data looks broken (last error: {last_error!r}); re-run ingest"
        ) from last_error


# --------------------------------------------------------------------------- iterator


class PipelineIterator:
    """Iterator over numpy batch dicts with a small JSON-able, checkpointable state.

    The state is the next batch index (plus counters and a fingerprint of the pipeline
    arguments, checked on restore). Restoring rebuilds the grain iterator from that
    batch, so it also works in a new process and with a different ``worker_count``.
    """

    def __init__(self, batches: grain.MapDataset, *, worker_count: int, prefetch: int, fingerprint):
        self._batches = batches
        self._worker_count = worker_count
        self._prefetch = max(1, prefetch)
        self._fingerprint = fingerprint
        self._next = 0
        self._skipped = 0
        self._it = None

    def _start(self):
        ds = self._batches[self._next :].to_iter_dataset(
            grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=self._prefetch)
        )
        if self._worker_count > 0:
            _mark_flags_parsed()
            ds = ds.mp_prefetch(
                grain.MultiprocessingOptions(
                    num_workers=self._worker_count, per_worker_buffer_size=self._prefetch
                )
            )
        self._it = iter(ds)

    def __iter__(self) -> PipelineIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            self._start()
        batch = next(self._it)
        # Copy out of grain's shared memory so the buffer is released right away.
        batch = {k: np.array(v) for k, v in batch.items()}
        self._skipped += int(batch.pop("skipped").sum())
        self._next += 1
        return batch

    @property
    def stats(self) -> dict[str, int]:
        """``batches`` emitted so far and ``skipped`` bad records (both survive a restore)."""
        return {"batches": self._next, "skipped": self._skipped}

    def get_state(self) -> dict[str, Any]:
        """A JSON-able dict; :meth:`set_state` on an equal pipeline resumes at the next batch."""
        return {
            "version": _STATE_VERSION,
            "next_batch": self._next,
            "skipped": self._skipped,
            "pipeline": dict(self._fingerprint),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Resumes from :meth:`get_state` output.

        Raises:
            ValueError: If the state is malformed or came from a pipeline with other
                arguments (seed, batch size, process layout, data size, buckets).
        """
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"not a vdiff pipeline state (version {_STATE_VERSION}): {state!r:.200}"
            )
        saved = state.get("pipeline", {})
        diff = {k: (saved.get(k), v) for k, v in self._fingerprint.items() if saved.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"pipeline state does not match this pipeline ({detail}); "
                "restore with the same data, seed, batch size and process count"
            )
        self.close()
        self._next = int(state["next_batch"])
        self._skipped = int(state["skipped"])

    def close(self) -> None:
        """Stops reader threads and worker processes (restarted lazily by ``next``)."""
        if self._it is not None:
            close = getattr(self._it, "close", None)
            if close is not None:
                close()
            self._it = None

    def __enter__(self) -> PipelineIterator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _mark_flags_parsed() -> None:
    # grain's worker processes read absl flags; outside an absl app nobody parses them.

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _settings(config: ml_collections.ConfigDict, tokenizer) -> dict[str, Any]:
    d = config.data
    if d.fps <= 0 or d.caption_len <= 0 or d.hop <= 0 or d.sample_rate <= 0:
        raise ValueError(
            "data.fps, data.caption_len, data.hop and data.sample_rate must be positive"
        )
    return {
        "fps": float(d.fps),
        "tokenizer": tokenizer,
        "caption_len": int(d.caption_len),
        "audio": bool(d.audio),
        "sample_rate": int(d.sample_rate),
        "hop": int(d.hop),
        "n_mels": int(d.n_mels),
    }


def make_pipeline(
    config: ml_collections.ConfigDict,
    split_root: str | Path,
    *,
    tokenizer,
    batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    seed: int,
    num_epochs: int | None = None,
    worker_count: int | None = None,
) -> PipelineIterator:
    """Builds this process's batch iterator over one split.

    Args:
        config: The vdiff config (reads ``config.data``).
        split_root: Shards of the split (see :func:`open_split`).
        tokenizer: Has ``encode(texts, length) -> (ids, mask)``; must be picklable when
            ``worker_count > 0``.
        batch_size: Examples per batch on this process.
        process_index, process_count: This process's place; default from jax.
        seed: Shuffle, bucket and clip-window seed; must be equal on every host.
        num_epochs: Passes over the data; None repeats forever. The last partial batch
            is dropped.
        worker_count: grain worker processes (default ``config.data.num_workers``; 0
            decodes in this process with reader threads).

    Returns:
        A :class:`PipelineIterator` yielding dicts: ``video`` float32 (B, T, H, W, 3),
        ``tokens`` int32 (B, L), ``mask`` bool (B, L), ``start_s`` float32 (B,),
        ``index`` int64 (B,), ``key`` str (B,), and with ``config.data.audio``: ``mel``
        float32 (B, Tm, n_mels), ``has_audio`` bool (B,).
    """
    if process_index is None or process_count is None:
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if num_epochs is not None and num_epochs <= 0:
        raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
    worker_count = int(config.data.num_workers if worker_count is None else worker_count)
    buckets = check_buckets(config.data.buckets)
    settings = _settings(config, tokenizer)
    source = open_split(split_root)
    n = len(source)
    if n < process_count * batch_size:
        raise ValueError(
            f"{n} records cannot fill a batch of {batch_size} on each of {process_count} processes"
        )

    # One global order per epoch (same on every host), dealt round-robin to processes.
    order = grain.MapDataset.range(n).shuffle(seed=seed).repeat(num_epochs)
    per_process = len(order) // process_count
    stream = order[process_index : per_process * process_count : process_count]
    load = _LoadClip(
        source,
        stream,
        settings=settings,
        buckets=buckets,
        batch_size=batch_size,
        seed=seed,
        process_index=process_index,
    )
    batches = stream.map_with_index(load).batch(batch_size, drop_remainder=True)
    fingerprint = {
        "seed": int(seed),
        "batch_size": int(batch_size),
        "process_index": int(process_index),
        "process_count": int(process_count),
        "num_records": int(n),
        "num_epochs": num_epochs,
        "buckets": [list(b) for b in buckets],
    }
    return PipelineIterator(
        batches,
        worker_count=worker_count,
        prefetch=int(config.data.prefetch),
        fingerprint=fingerprint,
    )


# --------------------------------------------------------------------------- global arrays


# --------------------------------------------------------------------------- in memory


def decode_all(
    split_root: str | Path, config: ml_collections.ConfigDict, tokenizer, *, progress: bool = True
) -> dict[str, np.ndarray]:
    """Decodes every clip of a small split once into RAM (the tiny CPU recipe).

    Each clip is taken from 0 s at the first bucket of ``config.data.buckets``, with the
    same decode as :func:`make_pipeline`. Bad records are skipped (logged with a count).

    Returns:
        Arrays with the keys and dtypes of a pipeline batch (``video`` float32 [-1, 1] etc.),
        leading dim = number of good clips. 2048 clips of 32x32x16 take ~400 MB.
    """

    height, width, frames = check_buckets(config.data.buckets)[0]
    settings = _settings(config, tokenizer)
    source = open_split(split_root)

    def one(index: int) -> tuple[dict[str, Any] | None, str | None]:
        try:
            record = records.decode_record(source[index])
            example = decode_example(record, height=height, width=width, frames=frames, **settings)
        except Exception as e:  # a bad clip is skipped, as in the streaming pipeline
            return None, getattr(e, "reason", type(e).__name__)
        example["key"] = record["key"]
        example["index"] = np.int64(index)
        return example, None

    rows: list[dict[str, Any]] = []
    reasons: dict[str, int] = {}
    # PyAV decodes with the GIL released, so a few threads overlap the clips.
    with concurrent.futures.ThreadPoolExecutor(READ_THREADS) as pool:
        results = pool.map(one, range(len(source)))
        for example, reason in tqdm(
            results, total=len(source), desc="decode clips", disable=not progress
        ):
            if reason is not None:
                reasons[reason] = reasons.get(reason, 0) + 1
            else:
                rows.append(example)
    if reasons:
        log.warning("decode_all skipped %d bad records: %s", sum(reasons.values()), reasons)
    if not rows:
        counts = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items())) or "no records"
        raise UserError(
            f"split {Path(split_root).name} ({split_root}) has no usable clip for the bucket "
            f"{height}x{width}x{frames} at {config.data.fps:g} fps: {counts}; check its "
            "manifest.json and data.buckets / data.fps"
        )
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
