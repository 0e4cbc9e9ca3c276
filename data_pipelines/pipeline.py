"""Clips decoded from ArrayRecord mp4 shards, as per-process batches of one bucket.

Per process, per bucket (:mod:`data_pipelines.buckets`; the bucket's members come from
:class:`~data_pipelines.clip_index.SplitBuckets`)::

    the bucket's global stream (data_pipelines/stream.py): its members, reshuffled every
    epoch, global batch k = positions [kG, (k+1)G), this process's rows of each
      -> load + decode one clip: `frames` whole source frames at the stride nearest
         config.data.fps from a window start drawn from (seed, epoch, record), resized
         to cover the bucket and centre-cropped in C -> video float32 [-1, 1], its fps
      -> audio from the window start -> log-mel (frames / data.fps * 100 mel frames)
      -> caption tokens + mask
      -> batch (per-process batch size) -> prefetch (grain worker processes if asked)

:class:`~data_pipelines.bucket_stream.BucketedStream` then reads one bucket's stream per
step. Everything is a pure function of the stream position and the record: nothing
depends on which worker decodes it, so grain's multiprocess prefetch gives the same
batches as the in-process path, and a layout change moves no clip window.

Bad records (unreadable msgpack, :class:`~data_pipelines.video_io.BadVideo`, any decode
error, a video shorter than the clip) are skipped and counted, never fatal. A skipped
record is refilled from the next records of the global stream (positions ``j + 1``,
``j + 2``, ...; those clips then appear twice this epoch). Refilling in place rather than
filtering keeps every batch full and every host at the same number of batches per epoch,
which the hosts need to stay in lockstep; the counts are summed in the stream's
``stats["skipped"]`` (and kept in the checkpointed state).

With ``data.decode="cache"`` the training stages read clips through the decoded-frames
cache (:mod:`vdiff.train.data`), which decodes each clip once with :func:`decode_example`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import grain
import jax
import ml_collections
import numpy as np

from data_pipelines import records, video_io
from data_pipelines.audio import log_mel
from data_pipelines.buckets import (
    Bucket,
    check_buckets,
    frame_stride,
    frames_available,
    is_image,
    window_start,
)
from data_pipelines.stream import BatchStream, global_order

log = logging.getLogger(__name__)

# After this many consecutive bad records the data, not one file, is broken: stop clearly.
MAX_REFILLS = 64
_SHARD_RE = re.compile(r"(.+)-\d{5}-of-\d{5}" + re.escape(records.SUFFIX))


# --------------------------------------------------------------------------- one clip


def mel_frames(frames: int, fps: float, sample_rate: int, hop: int, multiple: int = 1) -> int:
    """Log-mel frames covering ``frames`` video frames at ``fps`` (16 at 8 fps, hop 160 @16k
    -> 200), rounded down to a ``multiple`` (the audio autoencoder's time stride), at least one."""
    n = round(frames / fps * sample_rate / hop)
    return max(multiple, n // multiple * multiple)


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
    mel_multiple: int = 1,
    window: tuple[int, int, int] | None = None,
) -> dict[str, Any]:
    """Decodes one record into one training example of a (height, width, frames) bucket.

    Frames are whole source frames at the stride nearest ``fps``
    (:func:`~data_pipelines.buckets.frame_stride`): the clip keeps its own frame rate,
    returned as ``fps``; frame ``i`` is at ``i / fps`` seconds after the window start.
    A 1-frame record (an image) gives its one frame.

    Args:
        record: A decoded record dict (see :mod:`data_pipelines.records`).
        height, width, frames: The bucket (resize to cover, centre crop).
        fps: The frame rate the stride aims at; the audio window is ``frames / fps``
            seconds whatever the clip's own rate.
        tokenizer: Has ``encode(texts, length) -> (ids, mask)``.
        caption_len: Tokens after pad/truncate.
        audio: Whether to produce ``mel`` and ``has_audio``.
        sample_rate, hop, n_mels: Log-mel settings (``sample_rate / hop`` frames per second).
        mel_multiple: The log-mel length is a multiple of this (the audio AE's stride).
        window: ``(seed, epoch, record)`` that draws the window start among the starts
            that fit (:func:`~data_pipelines.buckets.window_start`); None starts at 0 s.

    Returns:
        ``video`` float32 (T, H, W, 3) in [-1, 1], ``tokens`` int32 (L,), ``mask`` bool (L,),
        ``start_s`` and ``fps`` float32, and with audio ``mel`` float32 (Tm, n_mels)
        (zeros when the file has no audio) and ``has_audio`` bool.

    Raises:
        BadVideo: If the clip cannot be decoded or holds fewer than ``frames`` frames at
            its stride.
    """
    image = is_image(int(record["num_frames"]))
    src_fps = float(record["fps"]) or fps
    stride = 1 if image else frame_stride(src_fps, fps)
    clip_fps = fps if image else src_fps / stride
    num = max(1, int(record["num_frames"]) or round(float(record["duration"]) * src_fps))
    if not image and frames_available(num, src_fps, fps) < frames:
        raise video_io.BadVideo(
            "too_short",
            f"{num} frames at stride {stride} < {frames} ({record['key']})",
        )
    if image and frames != 1:
        raise video_io.BadVideo(
            "too_short", f"an image in a {frames}-frame bucket ({record['key']})"
        )
    first = 0
    if window is not None and not image:
        seed, epoch, index = window
        first = window_start(seed, epoch, index, num_frames=num, stride=stride, frames=frames)
    start_s = first / src_fps
    video = video_io.decode_clip(record["video"], start_s, frames, clip_fps, size=(height, width))
    if video.shape != (frames, height, width, 3):
        raise video_io.BadVideo(video_io.DECODE_ERROR, f"decoded shape {video.shape}")
    ids, mask = tokenizer.encode([record["caption"]], caption_len)
    out = {
        "video": video.astype(np.float32) * np.float32(2 / 255) - np.float32(1),
        "tokens": np.asarray(ids[0], np.int32),
        "mask": np.asarray(mask[0], bool),
        "start_s": np.float32(start_s),
        "fps": np.float32(clip_fps),
    }
    if audio:
        n_mel = mel_frames(frames, fps, sample_rate, hop, mel_multiple)
        mel = np.zeros((n_mel, n_mels), np.float32)
        has_audio = bool(record["has_audio"]) and not image
        if has_audio:
            wave = video_io.decode_audio(
                record["video"], start_s, n_mel * hop / sample_rate, sample_rate
            )
            m = np.asarray(
                log_mel(wave, sample_rate=sample_rate, hop=hop, n_mels=n_mels), np.float32
            )
            mel[: min(n_mel, len(m))] = m[:n_mel]
            if len(m) < n_mel:  # a log-mel without end padding can be a frame short
                mel[len(m) :] = m[-1]
        out["mel"] = mel
        out["has_audio"] = np.bool_(has_audio)
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


def frame_fields(example: dict[str, Any]) -> dict[str, Any]:
    """A :func:`decode_example` output as the fields of a decoded-frames record: ``video``
    uint8 (T, H, W, 3), ``audio`` raw log-mel or None, ``has_audio``, ``tokens``, ``mask``,
    ``fps`` (the clip's frame rate)."""
    return {
        "video": np.round((example["video"] + 1.0) * 127.5).astype(np.uint8),
        "audio": example.get("mel"),
        "has_audio": bool(example.get("has_audio", False)),
        "tokens": example["tokens"],
        "mask": example["mask"],
        "fps": np.float32(example["fps"]),
    }


class _LoadClip:
    """Picklable ``load(position, j)`` for one bucket's
    :class:`~data_pipelines.stream.BatchStream`: member ``j`` of the bucket decoded at
    the bucket's shape, its window drawn from ``(seed, epoch, record)``."""

    def __init__(self, source, members, order, *, settings, bucket: Bucket, seed, transform=None):
        self.source = source
        self.members = members  # the bucket's record indices
        self.transform = transform  # applied to frame_fields(example) when given
        self.order = order  # the bucket's stream of member positions, for refills
        self.settings = settings
        self.bucket = bucket
        self.seed = seed

    def __call__(self, position: int, j: int) -> dict[str, Any]:
        b = self.bucket
        epoch = position // len(self.members)
        skipped, last_error = 0, None
        for attempt in range(MAX_REFILLS):
            m = j if attempt == 0 else int(self.order[position + attempt])
            index = int(self.members[m])
            try:
                record = records.decode_record(self.source[index])
                example = decode_example(
                    record,
                    height=b.height,
                    width=b.width,
                    frames=b.frames,
                    window=(self.seed, epoch, index),
                    **self.settings,
                )
            except Exception as e:  # any per-record failure skips the record, by design
                skipped += 1
                last_error = e
                log.debug("skipping record %d: %s", index, e)
                continue
            if self.transform is not None:
                example = self.transform(frame_fields(example))
            else:
                example["key"] = record["key"]
                example["index"] = np.int64(index)
            example["skipped"] = np.int32(skipped)
            return example
        raise RuntimeError(
            f"{MAX_REFILLS} records in a row failed to decode near stream position {position}; "
            f"the data looks broken (last error: {last_error!r}); re-run ingest"
        ) from last_error


def audio_frame_multiple(config) -> int:
    """Log-mel frames of a clip are a multiple of this: whole audio latents (the audio AE's
    time stride) in whole transformer audio tokens (``model.audio_patch``)."""
    return int(config.audio_ae.time_down) * int(config.model.audio_patch)


def decode_settings(config: ml_collections.ConfigDict, tokenizer) -> dict[str, Any]:
    d = config.data
    if d.fps <= 0 or config.text.max_len <= 0 or d.hop <= 0 or d.sample_rate <= 0:
        raise ValueError("data.fps, text.max_len, data.hop and data.sample_rate must be positive")
    return {
        "fps": float(d.fps),
        "tokenizer": tokenizer,
        "caption_len": int(config.text.max_len),
        "audio": bool(d.audio),
        "sample_rate": int(d.sample_rate),
        "hop": int(d.hop),
        "n_mels": int(d.n_mels),
        "mel_multiple": audio_frame_multiple(config),
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
    worker_count: int | None = None,
    transform=None,
    bucket: Bucket | None = None,
    members: np.ndarray | None = None,
) -> BatchStream:
    """This process's batches of one bucket's clips, decoded from one split's mp4 records.

    Args:
        config: The vdiff config (reads ``config.data``).
        split_root: Shards of the split (see :func:`open_split`).
        tokenizer: Has ``encode(texts, length) -> (ids, mask)``; must be picklable when
            ``worker_count > 0``.
        batch_size: Examples per batch on this process.
        process_index, process_count: This process's place; default from jax.
        seed: Shuffle and clip-window seed; must be equal on every host.
        worker_count: grain worker processes (default ``config.data.num_workers``; 0
            decodes in this process with reader threads).
        transform: Maps each example's :func:`frame_fields` to what the batch holds
            (e.g. :class:`data_pipelines.latents.RecordFields`, as the training stages
            use it); None keeps the fields below.
        bucket: The (height, width, frames) of every clip; default the first of
            ``config.data.buckets``.
        members: The record indices of the bucket
            (:class:`~data_pipelines.clip_index.SplitBuckets`); default every record.

    Returns:
        A :class:`~data_pipelines.stream.BatchStream` yielding dicts: ``video`` float32
        (B, T, H, W, 3), ``tokens`` int32 (B, L), ``mask`` bool (B, L), ``start_s`` and
        ``fps`` float32 (B,), ``index`` int64 (B,), ``key`` str (B,), and with
        ``config.data.audio``: ``mel`` float32 (B, Tm, n_mels), ``has_audio`` bool (B,).
        Its ``stats["skipped"]`` counts the bad records refilled so far.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    worker_count = int(config.data.num_workers if worker_count is None else worker_count)
    bucket = bucket or check_buckets(config.data.buckets)[0]
    settings = decode_settings(config, tokenizer)
    source = open_split(split_root)
    members = np.arange(len(source)) if members is None else np.asarray(members, np.int64)
    load = _LoadClip(
        source,
        members,
        global_order(len(members), seed),
        settings=settings,
        bucket=bucket,
        seed=seed,
        transform=transform,
    )
    return BatchStream(
        len(members),
        load,
        batch_size=batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        worker_count=worker_count,
        prefetch=int(config.data.prefetch),
        fingerprint={"bucket": bucket.name, "fps": float(config.data.fps)},
        count_key="skipped",
    )
