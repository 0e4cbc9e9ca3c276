"""Training batches across shape buckets: one stream per bucket, one bucket per step.

Each bucket's clips form their own :class:`~data_pipelines.stream.BatchStream` (its own
shuffle, epochs and batch size); global step ``s`` reads the next batch of bucket
``schedule(s)`` (:class:`~data_pipelines.buckets.BucketSchedule`, a pure function of
the seed and the step), so every process reads the same bucket at every step without
talking to the others. The state is the step count plus every bucket stream's
position; a resumed run continues each bucket where it stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from data_pipelines.buckets import Bucket, BucketSchedule, bucket_seed, step_weights
from data_pipelines.stream import STATE_VERSION as STREAM_VERSION
from data_pipelines.stream import BatchStream

log = logging.getLogger(__name__)

STATE_VERSION = 1
FORMAT = "vdiff.buckets"


class BucketedStream:
    """This process's batches, each from the bucket the schedule picks for its step.

    Args:
        names: Bucket names (e.g. ``"32x48x16"``), one per stream.
        streams: One :class:`BatchStream` per bucket.
        schedule: Step -> bucket index.
    """

    def __init__(
        self, names: Sequence[str], streams: Sequence[BatchStream], schedule: BucketSchedule
    ):
        if len(names) != len(streams) or not streams:
            raise ValueError("one stream per bucket name, at least one")
        self.names, self.streams, self.schedule = list(names), list(streams), schedule
        self.step = 0  # global steps drawn (all processes agree)
        self.last_bucket: int | None = None
        self.last_indices: np.ndarray | None = None
        # Bucket -> (batch read ahead by peek, its indices, the bucket's state before it).
        self._held: dict[int, tuple] = {}

    def __iter__(self) -> BucketedStream:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        k = self.schedule(self.step)
        if k in self._held:
            batch, self.last_indices, _ = self._held.pop(k)
        else:
            batch = next(self.streams[k])
            self.last_indices = self.streams[k].last_indices
        self.step += 1
        self.last_bucket = k
        return batch

    def peek(self, k: int) -> dict[str, np.ndarray]:
        """Bucket ``k``'s next batch, without using it up: the step that draws bucket
        ``k`` next gets it, and the state still counts it as unread (a warm-up can
        compile every bucket's step on real batches and change nothing)."""
        if k not in self._held:
            before = self.streams[k].get_state()
            batch = next(self.streams[k])
            self._held[k] = (batch, self.streams[k].last_indices, before)
        return self._held[k][0]

    @property
    def stats(self) -> dict[str, int]:
        return {
            "examples": sum(s.position for s in self.streams),
            "skipped": sum(s.stats["skipped"] for s in self.streams),
        }

    def steps_by_bucket(self) -> dict[str, int]:
        """Steps drawn so far (since step 0, resumed runs included), by bucket."""
        counts = np.bincount(
            [self.schedule(s) for s in range(self.step)], minlength=len(self.names)
        )
        return {n: int(c) for n, c in zip(self.names, counts, strict=True)}

    def get_state(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": STATE_VERSION,
            "position": self.step,  # what every process agrees on (see stream.pick_state)
            "buckets": {
                n: self._held[k][2] if k in self._held else s.get_state()
                for k, (n, s) in enumerate(zip(self.names, self.streams, strict=True))
            },
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues every bucket stream where the state left it.

        Raises:
            ValueError: If the state names other buckets, or is not a bucketed state (a
                checkpoint written before shape buckets).
        """
        self._held.clear()
        if (
            isinstance(state, dict)
            and "format" not in state
            and state.get("version") == STREAM_VERSION
        ):
            raise ValueError(
                "the checkpoint's data stream was saved before shape buckets (one stream "
                "for the whole split); finish that run with the vdiff that wrote it, or "
                "train the stage again in a new workdir"
            )
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"not a vdiff bucketed stream state: {state!r:.200}")
        saved = state["buckets"]
        if list(saved) != self.names:
            raise ValueError(
                f"the checkpoint's buckets ({', '.join(saved)}) differ from this run's "
                f"({', '.join(self.names)}); resume with the data.buckets it was saved with"
            )
        for name, stream in zip(self.names, self.streams, strict=True):
            stream.set_state(saved[name])
        self.step = int(state["position"])

    def close(self) -> None:
        for s in self.streams:
            s.close()

    def __enter__(self) -> BucketedStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bucketed_stream(
    buckets: Sequence[Bucket],
    counts: dict[str, int],
    make_stream: Callable[[int, Bucket, int, int], BatchStream],
    *,
    batch_sizes: dict[str, int],
    seed: int,
    process_count: int,
    image_share: float = -1.0,
    images: bool = True,
    what: str = "clips",
) -> BucketedStream:
    """One stream per bucket that holds a full global batch, drawn by their share of steps.

    Args:
        buckets: Every bucket, in config order.
        counts: Bucket name -> examples it holds.
        make_stream: ``(index, bucket, per-process batch, seed) -> BatchStream``.
        batch_sizes: Bucket name -> per-process batch.
        seed: The stream seed; bucket ``k``'s own is :func:`bucket_seed` of it.
        process_count: Processes a global batch is split over.
        image_share: Share of steps on 1-frame buckets (-1: by data).
        images: Include 1-frame buckets.
        what: What the examples are, for messages.

    Raises:
        ValueError: If no bucket holds a full batch.
    """
    names, streams, weights, is_image = [], [], [], []
    for k, bucket in enumerate(buckets):
        count = counts.get(bucket.name, 0)
        if count == 0 or (bucket.is_image and not images):
            continue
        batch = batch_sizes[bucket.name]
        if count < batch * process_count:
            log.warning(
                "bucket %s holds %d %s, fewer than its global batch %d: it is not trained",
                bucket.name, count, what, batch * process_count,
            )  # fmt: skip
            continue
        names.append(bucket.name)
        streams.append(make_stream(k, bucket, batch, bucket_seed(seed, k)))
        weights.append(count / batch)
        is_image.append(bucket.is_image)
    if not streams:
        raise ValueError(
            f"no bucket holds a full global batch of {what} (counts {counts}, per-process "
            f"batches {batch_sizes}); lower the batch size or add data"
        )
    weights = step_weights(weights, is_image, image_share)
    log.info(
        "buckets: %s",
        ", ".join(f"{n} ({w / sum(weights):.0%} of steps)" for n, w in zip(names, weights)),
    )
    return BucketedStream(names, streams, BucketSchedule(weights, seed))
