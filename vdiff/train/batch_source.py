"""Where a training stage's batches come from: a source with a checkpointable position.

A stage asks its source for this process's rows of the next global batch; the train
loop stores ``get_state()`` in every checkpoint and gives it back through ``set_state``
on resume, so a resumed run sees exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import logging
from typing import Protocol

import jax
import numpy as np

log = logging.getLogger(__name__)


class BatchSource(Protocol):
    """Process-local batches with a checkpointable position."""

    def next(self) -> dict[str, np.ndarray]: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...


class ArraySource:
    """Batches from in-memory arrays: seeded shuffle per epoch, this process's slice.

    The stream is defined globally: epoch ``e`` visits the examples in the order of a
    permutation seeded by ``(seed, e)``; global batch ``k`` of the epoch is that order's
    slice ``[k * G, (k + 1) * G)`` with ``G = batch_size * process_count``, and process
    ``p`` takes rows ``[p * batch_size, (p + 1) * batch_size)`` of it (the order in which
    ``jax.make_array_from_process_local_data`` stacks process slices). The position
    (epoch, examples consumed in the epoch) is what a checkpoint stores, so a restored
    source yields exactly the batches an uninterrupted run would have seen, and with the
    same global batch it does so on any process count.
    """

    def __init__(
        self,
        arrays: dict[str, np.ndarray],
        batch_size: int,
        seed: int,
        *,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        self.arrays = arrays
        self.n = len(next(iter(arrays.values())))
        self.batch_size = batch_size
        self.seed = seed
        self.pi = jax.process_index() if process_index is None else process_index
        self.pc = jax.process_count() if process_count is None else process_count
        if batch_size * self.pc > self.n:
            raise ValueError(
                f"global batch {batch_size * self.pc} exceeds the dataset ({self.n} examples)"
            )
        self.epoch, self.pos = 0, 0
        self._order = self._perm(0)
        self.last_indices: np.ndarray | None = None  # dataset rows of the last batch

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.pc

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def next(self) -> dict[str, np.ndarray]:
        gbs = self.global_batch
        if self.pos + gbs > self.n:  # drop the remainder, start the next epoch
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._perm(self.epoch)
        idx = self._order[
            self.pos + self.pi * self.batch_size : self.pos + (self.pi + 1) * self.batch_size
        ]
        self.pos += gbs
        self.last_indices = idx
        return {k: v[idx] for k, v in self.arrays.items()}

    def get_state(self) -> dict:
        return {
            "epoch": self.epoch,
            "pos": self.pos,
            "seed": self.seed,
            "global_batch": self.global_batch,
            "process_count": self.pc,
        }

    def set_state(self, state: dict) -> None:
        """Restores a position; says so when the run's layout differs from the saved one."""
        saved_gbs = int(state.get("global_batch", self.global_batch))
        if saved_gbs != self.global_batch:
            log.warning(
                "data: global batch changed from %d to %d; continuing from example %d of "
                "epoch %d (later batches differ from the original run's)",
                saved_gbs,
                self.global_batch,
                int(state["pos"]),
                int(state["epoch"]),
            )
        elif int(state.get("process_count", self.pc)) != self.pc:
            log.info(
                "data: process count changed from %s to %d; the global batch stream is unchanged",
                state.get("process_count"),
                self.pc,
            )
        if int(state.get("seed", self.seed)) != self.seed:
            log.warning("data: shuffle seed changed from %s to %d", state.get("seed"), self.seed)
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._perm(self.epoch)
