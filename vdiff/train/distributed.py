"""Multi-host start-up from the environment (``jax.distributed``).

Called once at the start of ``vdiff train``, before any other JAX call. Recognises:
explicit ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``;
SLURM (``SLURM_*``, auto-detected by JAX); TPU pods and GKE JobSets (auto-detected
by JAX). On a single machine with none of these it does nothing. Grain worker
processes never call this (they don't run ``vdiff train``'s entry point).
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)
_DONE = [False]


def initialize() -> None:
    """Initialises jax.distributed when the environment describes a multi-process job."""
    if _DONE[0]:
        return
    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env:
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env["JAX_PROCESS_ID"]),
        )
    elif (
        int(env.get("SLURM_NTASKS", "1")) > 1
        or "TPU_WORKER_HOSTNAMES" in env
        or "JOBSET_NAME" in env
    ):
        jax.distributed.initialize()  # cluster auto-detection (SLURM, TPU pod, GKE)
    else:
        _DONE[0] = True
        return
    _DONE[0] = True
    log.info(
        "process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
