"""Multi-host start-up from the environment (``jax.distributed``).

Called once at the start of ``vdiff train``, before any other JAX call. Recognises, in
this order:

- ``VDIFF_DISTRIBUTED=0``: never initialise (one process, whatever the environment says);
- explicit ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0) with ``JAX_NUM_PROCESSES``,
  ``JAX_PROCESS_ID`` and optionally ``JAX_LOCAL_DEVICE_IDS`` (comma-separated): what
  ``launch/local.py`` and ``launch/gke_jobset.yaml`` set;
- an ``srun`` step of more than one task (``SLURM_STEP_NUM_TASKS``), a GKE TPU pod
  (``TPU_WORKER_HOSTNAMES``) or ``VDIFF_DISTRIBUTED=auto`` (what ``launch/tpu_vm.sh``
  sets on TPU VM pods): JAX's own cluster auto-detection.

On a single machine with none of these it does nothing. CPU processes exchange
collectives over gloo. After start-up the log prefix shows the process index, and
JAX's preemption service turns SIGTERM on any host into an agreed stop step (see
:class:`vdiff.train.preemption.StopSignal`).
"""

from __future__ import annotations

import logging
import os
import re

import jax
from jax.experimental import multihost_utils

from vdiff.errors import UserError

log = logging.getLogger(__name__)
_DONE = [False]


def _int_env(env, name: str) -> int:
    value = env.get(name)
    if value is None:
        raise UserError(
            f"JAX_COORDINATOR_ADDRESS is set but {name} is not; set JAX_NUM_PROCESSES and "
            "JAX_PROCESS_ID too (or unset JAX_COORDINATOR_ADDRESS for a single process)"
        )
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name}={value!r} is not an integer") from None


def explicit_args(env=None) -> dict | None:
    """``jax.distributed.initialize`` arguments from the ``JAX_*`` variables (None if unset)."""
    env = os.environ if env is None else env
    address = env.get("JAX_COORDINATOR_ADDRESS")
    if not address:
        return None
    if ":" not in address:
        raise UserError(
            f"JAX_COORDINATOR_ADDRESS={address!r} needs a port: write it as HOST:PORT "
            "(the address of process 0)"
        )
    num, pid = _int_env(env, "JAX_NUM_PROCESSES"), _int_env(env, "JAX_PROCESS_ID")
    if num < 1 or not 0 <= pid < num:
        raise UserError(
            f"JAX_PROCESS_ID={pid} must be in [0, JAX_NUM_PROCESSES={num}); "
            "number the processes 0 .. N-1"
        )
    args = {"coordinator_address": address, "num_processes": num, "process_id": pid}
    ids = env.get("JAX_LOCAL_DEVICE_IDS", "").strip()
    if ids:
        try:
            args["local_device_ids"] = [int(i) for i in ids.split(",")]
        except ValueError:
            raise UserError(
                f"JAX_LOCAL_DEVICE_IDS={ids!r} must be comma-separated integers, e.g. 0,1,2,3"
            ) from None
    return args


def wants_auto_detect(env=None) -> bool:
    """True when the environment is a cluster JAX can describe itself."""
    env = os.environ if env is None else env
    if env.get("VDIFF_DISTRIBUTED", "").lower() == "auto":
        return True
    # SLURM_STEP_NUM_TASKS is set inside `srun` only: a batch script's own shell (one
    # process, SLURM_NTASKS of the whole job) must not wait for peers that never come.
    if int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1:
        return True
    return "TPU_WORKER_HOSTNAMES" in env or "TPU_PROCESS_ADDRESSES" in env


def _relabel_log_prefix(rank: int) -> None:
    """The CLI's log prefix guesses the rank from env; make it the real process index."""
    for handler in logging.getLogger().handlers:
        fmt = getattr(handler.formatter, "_fmt", None)
        if fmt and re.match(r"^\[[^\]]*\]", fmt):
            handler.setFormatter(
                logging.Formatter(
                    re.sub(r"^\[[^\]]*\]", f"[{rank}]", fmt), handler.formatter.datefmt
                )
            )


def initialize() -> None:
    """Initialises jax.distributed when the environment describes a multi-process job."""
    if _DONE[0]:
        return
    env = os.environ
    if env.get("VDIFF_DISTRIBUTED", "").lower() in ("0", "off", "false"):
        _DONE[0] = True
        return
    args = explicit_args()
    if args is None and not wants_auto_detect():
        _DONE[0] = True
        return
    # Gloo carries cross-process collectives between CPU devices (jax's default since
    # 0.4.3x, set explicitly so an environment default cannot leave CPU runs without).
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if args is not None:
        jax.distributed.initialize(**args)
    else:
        jax.distributed.initialize()  # cluster auto-detection (SLURM, TPU pod, GKE TPU)
    _DONE[0] = True
    _relabel_log_prefix(jax.process_index())
    log.info(
        "process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def barrier(name: str) -> None:
    """Every process waits here until all arrive (nothing to do with one process): after
    each process wrote its part of a shared folder, before process 0 merges them."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
