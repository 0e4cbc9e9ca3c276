"""One global example stream, read as per-process batches with a checkpointable position.

Every training stage reads its data through :class:`BatchStream`: clip shards decoded by
PyAV (:func:`data_pipelines.pipeline.make_pipeline`), decoded-frame shards and latent
shards (:func:`data_pipelines.example_cache.cache_stream`) alike.

The stream is defined once for the whole job, not per process:

- epoch ``e`` visits the ``n`` records in grain's index shuffle seeded by ``seed + e``
  (``MapDataset.range(n).shuffle(seed).repeat()``: O(1) memory, any ``n``);
- global batch ``k`` is stream positions ``[start + k G, start + (k + 1) G)`` with
  ``G = batch_size * process_count``;
- process ``p`` reads rows ``[p B, (p + 1) B)`` of it (``B = batch_size``), the order in
  which ``jax.make_array_from_process_local_data`` stacks the process slices.

So the global batches do not depend on the process count, and a position in the stream
is one integer: the examples consumed so far. That integer (plus counters) is the
iterator state every checkpoint stores. A run resumed with the same global batch sees
exactly the batches an uninterrupted run would have seen, on any process count; with
another global batch it continues at the same example (nothing replayed, nothing
skipped; only the batch boundaries move).

Each process decodes only its own rows, in grain reader threads and, with
``worker_count > 0``, in grain worker processes; nothing about a batch depends on which
thread or worker decoded it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grain
import numpy as np
from absl import flags

log = logging.getLogger(__name__)

STATE_VERSION = 2
# Decode threads per process (or per worker process) when reading ahead.
READ_THREADS = 2


class ProcessRows:
    """Element ``j`` of process ``p``: the global stream's position
    ``start + (j // B) * G + p * B + j % B``, mapped through ``order`` (picklable)."""

    def __init__(self, order: grain.MapDataset, *, batch_size, process_index, process_count, start):
        self._order = order
        self._b, self._p, self._g = batch_size, process_index, batch_size * process_count
        self._start = start

    def __len__(self) -> int:
        return (len(self._order) - self._start) // self._g * self._b

    def position(self, j: int) -> int:
        k, r = divmod(j, self._b)
        return self._start + k * self._g + self._p * self._b + r

    def __getitem__(self, j: int) -> int:
        return int(self._order[self.position(j)])


def global_order(num_records: int, seed: int) -> grain.MapDataset:
    """Record indices in stream order: a fresh shuffle every epoch, repeated forever."""
    if num_records <= 0:
        raise ValueError("the stream has no records")
    return grain.MapDataset.range(num_records).shuffle(seed=seed % 2**32).repeat(None)


def _mark_flags_parsed() -> None:
    # grain's worker processes read absl flags; outside an absl app nobody parses them.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class BatchStream:
    """This process's batches of one global stream; ``__iter__``, ``get_state``, ``set_state``.

    Args:
        num_records: Records in the source; the stream is over their indices.
        load: ``load(position, record_index) -> dict of numpy values``: one example. It
            must be picklable when ``worker_count > 0``. ``position`` is the global
            stream position (for per-example randomness that no process layout changes).
        batch_size: Rows per batch on this process.
        seed: Shuffle seed, equal on every process.
        process_index, process_count: This process's place in the job.
        worker_count: grain worker processes (0: decode in this process's threads).
        prefetch: Batches read ahead per reader.
        fingerprint: JSON-able description of the data; a state saved with another
            fingerprint is refused on restore (e.g. a different dataset).
        count_key: A per-example int field summed into ``stats["skipped"]`` and
            removed from the batch (the clip pipeline's refilled bad records).
    """

    def __init__(
        self,
        num_records: int,
        load: Callable[[int, int], dict[str, Any]],
        *,
        batch_size: int,
        seed: int,
        process_index: int,
        process_count: int,
        worker_count: int = 0,
        prefetch: int = 2,
        fingerprint: dict | None = None,
        count_key: str | None = None,
    ):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_records < batch_size * process_count:
            raise ValueError(
                f"{num_records} records cannot fill a batch of {batch_size} on each of "
                f"{process_count} processes"
            )
        self.num_records, self.batch_size, self.seed = num_records, batch_size, seed
        self.process_index, self.process_count = process_index, process_count
        self._load = load
        self._order = global_order(num_records, seed)
        self._worker_count = worker_count
        self._prefetch = max(1, prefetch)
        self._fingerprint = dict(fingerprint or {}, num_records=num_records, seed=seed)
        self._count_key = count_key
        self.position = 0  # examples of the global stream consumed (all processes)
        self._skipped = 0
        self._it = None
        self.last_indices: np.ndarray | None = None  # record indices of the last batch

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.process_count

    def _start(self) -> None:
        rows = ProcessRows(
            self._order,
            batch_size=self.batch_size,
            process_index=self.process_index,
            process_count=self.process_count,
            start=self.position,
        )
        load = _WithIndex(rows, self._load)
        ds = (
            grain.MapDataset.range(len(rows))
            .map(load)
            .batch(self.batch_size, drop_remainder=True)
            .to_iter_dataset(
                grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=self._prefetch)
            )
        )
        if self._worker_count > 0:
            _mark_flags_parsed()
            ds = ds.mp_prefetch(
                grain.MultiprocessingOptions(
                    num_workers=self._worker_count, per_worker_buffer_size=self._prefetch
                )
            )
        self._it = iter(ds)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            self._start()
        batch = next(self._it)
        # Copy out of grain's shared memory so the buffer is released right away.
        batch = {k: np.array(v) for k, v in batch.items()}
        if self._count_key is not None:
            self._skipped += int(batch.pop(self._count_key).sum())
        self.last_indices = batch.pop("_record")
        self.position += self.global_batch
        return batch

    @property
    def stats(self) -> dict[str, int]:
        """``examples`` of the global stream consumed and ``skipped`` bad records here."""
        return {"examples": self.position, "skipped": self._skipped}

    def get_state(self) -> dict[str, Any]:
        """This process's position, JSON-able; see :meth:`set_state`."""
        return {
            "version": STATE_VERSION,
            "position": self.position,
            "epoch": self.position // self.num_records,
            "global_batch": self.global_batch,
            "process_index": self.process_index,
            "process_count": self.process_count,
            "skipped": self._skipped,
            "data": dict(self._fingerprint),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues at the saved stream position.

        Exact when the global batch is unchanged (any process count); with another
        global batch the run continues at the same example, and says so.

        Raises:
            ValueError: If the state is not a stream state, or came from other data
                (record count, seed or the fingerprint given at construction).
        """
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a vdiff stream state (version {STATE_VERSION}): {state!r:.200}")
        saved = state.get("data", {})
        diff = {k: (saved.get(k), v) for k, v in self._fingerprint.items() if saved.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"the checkpoint's data stream does not match this one ({detail}); resume "
                "with the data and seed it was saved with"
            )
        if int(state["global_batch"]) != self.global_batch:
            log.warning(
                "data: global batch changed from %d to %d; continuing at example %d of the "
                "stream (no example replayed or skipped; later batches differ from the "
                "original run's)",
                state["global_batch"],
                self.global_batch,
                state["position"],
            )
        self.close()
        self.position = int(state["position"])
        same_layout = (
            int(state["process_count"]) == self.process_count
            and int(state["process_index"]) == self.process_index
        )
        self._skipped = int(state.get("skipped", 0)) if same_layout else 0

    def close(self) -> None:
        """Stops reader threads and worker processes (restarted lazily by ``next``)."""
        if self._it is not None:
            close = getattr(self._it, "close", None)
            if close is not None:
                close()
            self._it = None

    def __enter__(self) -> BatchStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _WithIndex:
    """Picklable map: element ``j`` -> ``load(position, record)`` plus ``_record``."""

    def __init__(self, rows: ProcessRows, load):
        self.rows, self.load = rows, load

    def __call__(self, j: int) -> dict[str, Any]:
        record = int(self.rows[j])
        example = self.load(self.rows.position(j), record)
        example["_record"] = np.int64(record)
        return example


def pick_state(states: list[dict], process_index: int, process_count: int) -> dict:
    """The state this process resumes from, out of every process's saved state.

    Its own when the process count is unchanged; otherwise any of them (they agree on
    the position: the stream is global), logged once.
    """
    if not states:
        raise ValueError("no saved stream state")
    positions = {int(s["position"]) for s in states}
    if len(positions) != 1:
        raise ValueError(f"processes saved different stream positions {sorted(positions)}")
    if len(states) == process_count:
        return states[process_index]
    if process_index == 0:
        log.info(
            "data: process count changed from %d to %d; every process continues at example "
            "%d of the global stream",
            len(states),
            process_count,
            positions.pop(),
        )
    return states[0]
