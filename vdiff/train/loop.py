"""The stage loop: resume, step, log, checkpoint, stop cleanly on SIGTERM/SIGINT.

Every stage (video VAE, audio AE, transformer) runs through :func:`run_stage` with its
own :class:`~vdiff.train.engine.Engine` and batch source
(:mod:`vdiff.train.batch_source`), in its own checkpoint folder
``WORKDIR/checkpoints/STAGE``. Every host runs the same loop; process 0 alone writes
metrics (:mod:`vdiff.train.metrics_writer`); signals and the time budget stop every
process at the same step (:mod:`vdiff.train.preemption`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from data_pipelines.stream import pick_state
from vdiff.errors import UserError
from vdiff.parallel.mesh import to_global
from vdiff.train.batch_source import BatchSource
from vdiff.train.checkpoint import Checkpointer
from vdiff.train.engine import Engine
from vdiff.train.metrics_writer import MetricWriter
from vdiff.train.preemption import StopSignal

log = logging.getLogger(__name__)


def _every_process(state: dict) -> dict:
    """``{"processes": [state of process 0, 1, ...]}``: every process's data state, for
    process 0 to write into the checkpoint (each process passes its own)."""
    if jax.process_count() == 1:
        return {"processes": [state]}
    blob = np.frombuffer(json.dumps(state).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.asarray([len(blob)], np.int64)).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: len(blob)] = blob
    blobs = multihost_utils.process_allgather(padded).reshape(len(sizes), -1)
    return {"processes": [json.loads(b[:n].tobytes()) for b, n in zip(blobs, sizes, strict=True)]}


def _restore_position(name: str, source: BatchSource, data_state: dict) -> None:
    processes = (data_state or {}).get("processes")
    if not processes:  # a checkpoint written before data states were streams
        log.warning(
            "%s: the checkpoint holds no data stream position; the stream starts over", name
        )
        return
    try:
        source.set_state(pick_state(processes, jax.process_index(), jax.process_count()))
    except ValueError as e:  # another dataset or seed than the checkpoint's
        raise UserError(f"{name}: {e}") from e


def warm_up(name: str, engine: Engine, state: dict, source) -> dict[str, float]:
    """Compiles the step for every bucket of ``source`` on its first real batch (kept
    for its step), so a run never stalls mid-way on a bucket drawn late; returns the
    seconds each compile took, by bucket."""
    seconds = {}
    for k, bucket in enumerate(getattr(source, "names", [])):
        batch = to_global(source.peek(k), engine.mesh, engine.batch_axes)
        t0 = time.time()
        engine.lower(state, batch).compile()
        seconds[bucket] = time.time() - t0
        log.info("%s: compiled the step for bucket %s in %.1f s", name, bucket, seconds[bucket])
    return seconds


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
        _restore_position(name, source, data_state)
        log.info("%s: resumed from step %d", name, start)
    else:
        start, state = 0, engine.init(seed)
    summary: dict[str, Any] = {"start_step": start}
    if start < steps and hasattr(source, "peek"):
        summary["compile_s"] = warm_up(name, engine, state, source)
    writer = MetricWriter(workdir / "metrics" / name)
    t0 = time.time()
    step = start
    last: dict[str, float] = {}
    bar = tqdm(
        total=steps, initial=start, desc=name, disable=jax.process_index() != 0, mininterval=2.0
    )
    try:
        with StopSignal(sync_every, timed=time_budget_s > 0) as stop:
            while step < steps:
                batch = to_global(next(source), engine.mesh, engine.batch_axes)
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
                    ckpt.save(
                        step,
                        state,
                        data_state=_every_process(source.get_state()),
                        config=config,
                        force=True,
                    )
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
        close = getattr(source, "close", None)
        if close is not None:  # reader threads and worker processes
            close()
    ckpt.close()
    summary.update(
        end_step=step, wall_s=time.time() - t0, **{f"final_{k}": v for k, v in last.items()}
    )
    if hasattr(source, "steps_by_bucket"):
        summary["bucket_steps"] = source.steps_by_bucket()
    return state, summary
