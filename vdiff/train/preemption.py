"""Stopping cleanly on SIGTERM/SIGINT (preemption, scancel, Ctrl-C) at the same step on
every process, and the time budget's agreement across processes."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


def preemption_service_running() -> bool:
    """Whether JAX's preemption sync service runs: ``jax.distributed.initialize`` starts it
    unless ``jax_enable_preemption_service`` is off."""
    return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


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
        self._service = False

    def __enter__(self):
        self._service = preemption_service_running()
        # With the preemption service, SIGTERM belongs to JAX's (C++) notifier: touching
        # it from Python would replace that handler and break cross-host agreement.
        signals = (signal.SIGINT,) if self._service else (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            with contextlib.suppress(ValueError):  # not the main thread
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self._service:
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
        if self._service:
            preempted = multihost_utils.reached_preemption_sync_point(next(_SYNC_POINTS))
        if jax.process_count() > 1 and (not self._service or self.timed):
            # Every process must join the same allgathers, so the step alone decides.
            if step % self.sync_every == 0:
                flags = np.array([self.requested, out_of_time], np.int32)
                agreed = np.asarray(multihost_utils.process_allgather(flags)).reshape(-1, 2)
                if not self._service:
                    preempted = bool(agreed[:, 0].any())
                out_of_time = bool(agreed[:, 1].any())
            else:
                if not self._service:
                    preempted = False
                out_of_time = False
        if preempted:
            log.warning("stopping at step %d on every process (stop requested)", step)
        return preempted, out_of_time

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False
