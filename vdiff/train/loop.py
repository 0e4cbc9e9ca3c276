"""The stage loop: resume, step, log, checkpoint, stop cleanly on SIGTERM/SIGINT.

Every stage (video VAE, audio AE, transformer) runs through :func:`run_stage` with its
own :class:`~vdiff.train.engine.Engine` and batch source, in its own checkpoint folder
``WORKDIR/checkpoints/STAGE``. Every host runs the same loop; process 0 alone writes
metrics.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from vdiff.train.checkpoint import Checkpointer
from vdiff.train.engine import Engine

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


def to_global(
    batch: dict[str, np.ndarray], mesh, batch_axes=("data", "fsdp")
) -> dict[str, jax.Array]:
    """Process-local numpy batch -> global jax.Arrays sharded over the batch axes."""
    out = {}
    for k, v in batch.items():
        sh = NamedSharding(mesh, PartitionSpec(batch_axes, *([None] * (v.ndim - 1))))
        out[k] = jax.make_array_from_process_local_data(sh, v)
    return out


class MetricWriter:
    """metrics.jsonl + TensorBoard events under WORKDIR/metrics/STAGE (process 0 only)."""

    def __init__(self, directory: Path):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        directory.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(directory / "metrics.jsonl", "a")  # noqa: SIM115 - open for the stage's life
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(directory))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


def _preemption_sync_manager():
    """JAX's preemption service, running when jax.distributed was initialised (else None)."""
    try:
        from jax._src import distributed as jax_distributed  # no public accessor in jax 0.10
    except ImportError:  # pragma: no cover - layout of a future jax
        return None
    state = jax_distributed.global_state
    return state.preemption_sync_manager if state.client is not None else None


# Counts every stop check in this process across stages: JAX's preemption protocol needs
# an id that only grows and is equal on every process at the same point of the program.
_SYNC_POINTS = itertools.count()


class StopSignal:
    """SIGTERM/SIGINT -> stop after the current step, at the same step on every process.

    - Single process: a handler sets a flag that :meth:`check` reads after each step.
    - jax.distributed running (multi-host): SIGTERM stays with JAX's preemption
      notifier, which tells every process; ``reached_preemption_sync_point`` then turns
      True on all of them at the same step. SIGINT is re-sent as SIGTERM so it takes
      the same path. Only that path needs no collective.
    - Multi-process without JAX's preemption service (or for the time budget): the
      local flags are OR-ed across processes with a tiny allgather every
      ``sync_every`` steps, so all processes see the same answer at the same step.

    Args:
      sync_every: steps between allgathers on the fallback path.
      timed: the caller passes a time-budget flag to :meth:`check` (multi-process runs
        then agree on it every ``sync_every`` steps).
    """

    def __init__(self, sync_every: int = 10, *, timed: bool = False):
        self.requested = False
        self.sync_every = max(1, int(sync_every))
        self.timed = timed
        self._old = {}
        self._manager = None

    def __enter__(self):
        self._manager = _preemption_sync_manager()
        # With the preemption service, SIGTERM belongs to JAX's (C++) notifier: touching
        # it from Python would replace that handler and break cross-host agreement.
        signals = (signal.SIGINT,) if self._manager is not None else (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            with contextlib.suppress(ValueError):  # not the main thread
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self._manager is not None:
            log.warning("received signal %d: passing it on as a preemption notice", signum)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        log.warning("received signal %d: finishing this step, saving, exiting", signum)
        self.requested = True

    def check(self, step: int, *, out_of_time: bool = False) -> tuple[bool, bool]:
        """Called after every step on every process; returns (preempted, out_of_time).

        Both answers are the same on every process (``out_of_time`` is this process's
        own clock reading, OR-ed across processes on multi-process runs).
        """
        preempted = self.requested
        if self._manager is not None:
            from jax.experimental import multihost_utils

            preempted = multihost_utils.reached_preemption_sync_point(next(_SYNC_POINTS))
        if jax.process_count() > 1 and (self._manager is None or self.timed):
            # Every process must join the same allgathers, so the step alone decides.
            if step % self.sync_every == 0:
                from jax.experimental import multihost_utils

                flags = np.array([self.requested, out_of_time], np.int32)
                agreed = np.asarray(multihost_utils.process_allgather(flags)).reshape(-1, 2)
                if self._manager is None:
                    preempted = bool(agreed[:, 0].any())
                out_of_time = bool(agreed[:, 1].any())
            else:
                if self._manager is None:
                    preempted = False
                out_of_time = False
        if preempted:
            log.warning("stopping at step %d on every process (stop requested)", step)
        return preempted, out_of_time

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


class PreemptedError(Exception):
    """Raised after a signal-triggered save; the CLI exits 0 with a message."""


def run_stage(
    name: str,
    engine: Engine,
    source: BatchSource,
    *,
    steps: int,
    workdir: Path,
    config: ml_collections.ConfigDict,
    seed: int,
    log_every: int = 50,
    ckpt_every: int = 500,
    time_budget_s: float = 0.0,
    sync_every: int = 10,
) -> tuple[dict, dict[str, Any]]:
    """Trains one stage to ``steps`` (resuming from its checkpoints); returns (state, summary).

    Raises :class:`PreemptedError` after SIGTERM/SIGINT (or a preemption notice on any
    host) once the step in flight is done and its checkpoint is written. ``sync_every``:
    steps between the multi-process agreements on the time budget (and on signals where
    JAX's preemption service is not running).
    """
    ckpt = Checkpointer(
        workdir / "checkpoints" / name, keep=config.train.keep, keep_every=config.train.keep_every
    )
    restored = ckpt.restore(engine.abstract_state, engine.state_shardings)
    if restored is not None:
        start, state, data_state = restored
        source.set_state(data_state)
        log.info("%s: resumed from step %d", name, start)
    else:
        start, state = 0, engine.init(seed)
    writer = MetricWriter(workdir / "metrics" / name)
    summary: dict[str, Any] = {"start_step": start}
    t0 = time.time()
    step = start
    last: dict[str, float] = {}
    bar = tqdm(
        total=steps, initial=start, desc=name, disable=jax.process_index() != 0, mininterval=2.0
    )
    try:
        with StopSignal(sync_every, timed=time_budget_s > 0) as stop:
            while step < steps:
                batch = to_global(source.next(), engine.mesh, engine.batch_axes)
                state, metrics = engine.step(state, batch)
                step += 1
                bar.update(1)
                if step % log_every == 0 or step == steps:
                    last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    last["s_per_step"] = (time.time() - t0) / (step - start)
                    writer.write(step, last)
                    bar.set_postfix(loss=f"{last['loss']:.4f}")
                preempted, out_of_time = stop.check(
                    step, out_of_time=time_budget_s > 0 and time.time() - t0 > time_budget_s
                )
                if step % ckpt_every == 0 or step == steps or preempted or out_of_time:
                    ckpt.save(step, state, data_state=source.get_state(), config=config, force=True)
                if preempted:
                    ckpt.close()
                    raise PreemptedError(
                        f"{name}: stopped by signal at step {step}; checkpoint saved, rerun to resume"
                    )
                if out_of_time:
                    log.warning(
                        "%s: time budget %.0f s reached at step %d", name, time_budget_s, step
                    )
                    break
    finally:
        bar.close()
        writer.close()
    ckpt.close()
    summary.update(
        end_step=step, wall_s=time.time() - t0, **{f"final_{k}": v for k, v in last.items()}
    )
    return state, summary
