"""The stage loop: resume, step, log, checkpoint, stop cleanly on SIGTERM/SIGINT.

Every stage (video VAE, audio AE, transformer) runs through :func:`run_stage` with its
own :class:`~vdiff.train.engine.Engine` and batch source, in its own checkpoint folder
``WORKDIR/checkpoints/STAGE``. Every host runs the same loop; process 0 alone writes
metrics.
"""

from __future__ import annotations

import contextlib
import json
import logging
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

    The order depends only on (seed, epoch), so a restored position yields exactly the
    batches an uninterrupted run would have seen.
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

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def next(self) -> dict[str, np.ndarray]:
        gbs = self.batch_size * self.pc
        if self.pos + gbs > self.n:  # drop the remainder, start the next epoch
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._perm(self.epoch)
        idx = self._order[
            self.pos + self.pi * self.batch_size : self.pos + (self.pi + 1) * self.batch_size
        ]
        self.pos += gbs
        return {k: v[idx] for k, v in self.arrays.items()}

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def set_state(self, state: dict) -> None:
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


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        log.warning("received signal %d: finishing this step, saving, exiting", signum)
        self.requested = True

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
) -> tuple[dict, dict[str, Any]]:
    """Trains one stage to ``steps`` (resuming from its checkpoints); returns (state, summary)."""
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
        with StopSignal() as stop:
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
                out_of_time = time_budget_s > 0 and time.time() - t0 > time_budget_s
                if step % ckpt_every == 0 or step == steps or stop.requested or out_of_time:
                    ckpt.save(step, state, data_state=source.get_state(), config=config, force=True)
                if stop.requested:
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
