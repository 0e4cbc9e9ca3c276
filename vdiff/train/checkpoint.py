"""Orbax checkpoints: train state + data iterator state + config, saved together.

Saves are asynchronous and atomic (Orbax writes to a temporary folder and renames it
when complete), so a crash mid-save never touches the last good checkpoint; temporary
folders left by a crash are removed by the next run's first save. Each save
also records a digest of every state array (a position-weighted wrapping sum of its
bits, computed on device, so it is the same on any mesh). Restore goes straight into
the target shardings, on any mesh or process count, and checks the digest: a step
whose files are truncated, missing or silently altered is skipped with a warning and
the previous one is used.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from orbax.checkpoint import checkpoint_managers as ocm

from vdiff.errors import UserError

log = logging.getLogger(__name__)

# Orbax writes a step into STEP.orbax-checkpoint-tmp and renames it when complete.
_TMP_SUFFIX = ".orbax-checkpoint-tmp"
# Odd multiplier (Knuth's): makes the digest depend on where each value sits.
_MIX = np.uint32(2654435761)


class CorruptCheckpointError(RuntimeError):
    """A checkpoint's arrays read back with a different digest than was saved."""


def _abstract(abstract_state, shardings):
    """ShapeDtypeStructs carrying the target shardings (restore writes straight into them)."""
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract_state, shardings
    )


def _leaf_digest(x: jax.Array) -> jax.Array:
    """uint32 wrapping sum of ``bits * (position * MIX + 1)``: order-free, so mesh-free."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    else:
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
        bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    pos = jnp.arange(bits.size, dtype=jnp.uint32).reshape(bits.shape)
    return jnp.sum(bits * (pos * _MIX + np.uint32(1)), dtype=jnp.uint32)


def state_digest(state: Any) -> list[int]:
    """One uint32 per array of ``state`` (in tree order); equal values give equal digests.

    Runs on the devices holding ``state`` (a collective on multi-process meshes, so
    every process must call it).
    """
    leaves = [x for x in jax.tree.leaves(state) if isinstance(x, jax.Array)]
    if not leaves:
        return []
    mesh = getattr(leaves[0].sharding, "mesh", None)
    out = _digest_fn(NamedSharding(mesh, PartitionSpec()) if mesh is not None else None)(leaves)
    return [int(v) for v in np.asarray(jax.device_get(out))]


@functools.lru_cache(maxsize=16)
def _digest_fn(out_sharding):
    # Replicated output: every process can read it (the arrays may span processes).
    return jax.jit(lambda xs: jnp.stack([_leaf_digest(x) for x in xs]), out_shardings=out_sharding)


def _all_processes_agree(ok: bool) -> bool:
    """True when ``ok`` holds on every process (a tiny allgather on multi-process runs)."""
    if jax.process_count() == 1:
        return ok

    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


class Checkpointer:
    """A CheckpointManager for one training stage's folder.

    Args:
      directory: the stage's checkpoint folder (shared storage on multi-host runs:
        every process writes its shards there and reads any of them back).
      keep: how many of the newest checkpoints to keep (>= 1).
      keep_every: additionally keep every step that is a multiple of K (0 = off).
      async_save: write in a background thread while training continues.
    """

    def __init__(
        self, directory: str | Path, *, keep: int = 3, keep_every: int = 0, async_save: bool = True
    ):
        if keep < 1:
            raise UserError(f"train.keep={keep} must be >= 1 (the newest checkpoint is needed)")
        if keep_every < 0:
            raise UserError(f"train.keep_every={keep_every} must be >= 0 (0 = off)")
        self.directory = Path(directory).absolute()
        policies = [ocm.LatestN(keep)]
        if keep_every:
            policies.append(ocm.EveryNSteps(keep_every))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocm.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            # Leftovers are cleared by our first save instead (see _prepare_to_write): a
            # reader (``vdiff sample`` during training) must never touch the folder.
            cleanup_tmp_directories=False,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "config", "meta")
        )
        self._unreadable: list[int] = []  # steps restore skipped, set aside before writing
        self._writing = False

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_state: Any = None,
        config: ml_collections.ConfigDict | None = None,
        force: bool = False,
    ) -> bool:
        """Starts saving ``step`` (returns once the arrays are copied off the devices)."""
        if not self._writing:
            self._prepare_to_write()
        meta = {"digest": state_digest(state), "process_count": jax.process_count()}
        args = {
            "state": ocp.args.StandardSave(state),
            "data": ocp.args.JsonSave(data_state if data_state is not None else {}),
            "config": ocp.args.JsonSave(json.loads(config.to_json()) if config is not None else {}),
            "meta": ocp.args.JsonSave(meta),
        }
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def _read(self, step: int, target) -> tuple[Any, Any]:
        items = {"state": ocp.args.StandardRestore(target), "data": ocp.args.JsonRestore()}
        has_meta = (self.directory / str(step) / "meta").exists()
        if has_meta:
            items["meta"] = ocp.args.JsonRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return out, (out["meta"] if has_meta else None)

    def restore(
        self, abstract_state, shardings, step: int | None = None
    ) -> tuple[int, Any, Any] | None:
        """Restores ``step`` (default: newest readable) into ``shardings``.

        Returns (step, state, data_state), or None when the folder has no checkpoint.
        A checkpoint that fails to read or whose digest differs (truncated, missing or
        altered files) is reported and the previous one is tried; every process takes
        the same decision. Steps skipped that way are renamed ``STEP.unreadable`` by
        the first :meth:`save` (restoring alone never changes the folder). Raises when checkpoints exist but none is readable (rather
        than silently starting over), or when an explicit ``step`` is unreadable.
        """
        steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
        target = _abstract(abstract_state, shardings)
        errors = []
        for s in steps:
            out, meta, err = None, None, None
            try:
                out, meta = self._read(s, target)
            except Exception as e:  # any read failure means: this step is not usable
                err = e
            # A failure on one process (its shard files) must skip the step everywhere.
            if _all_processes_agree(err is None):
                saved = (meta or {}).get("digest")
                if saved is not None and state_digest(out["state"]) != saved:
                    err = CorruptCheckpointError(
                        "array contents differ from the digest recorded at save time"
                    )
                else:
                    self._unreadable = [b for b in steps if b > s]
                    return s, out["state"], out["data"]
            elif err is None:
                err = RuntimeError("another process could not read this step")
            reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            if step is not None:
                raise UserError(f"checkpoint step {s} in {self.directory} is unreadable ({reason})")
            log.warning(
                "checkpoint step %d in %s is unreadable (%s); trying the previous one",
                s,
                self.directory,
                reason,
            )
            errors.append(f"step {s}: {reason}")
        if errors:
            raise UserError(
                f"no readable checkpoint in {self.directory} ({'; '.join(errors)}); if the "
                "config changed since they were written (e.g. train.optimizer or model sizes), "
                "resume with the config they were saved with (WORKDIR/config.json); otherwise "
                "move the folder away to start this stage over"
            )
        return None

    def _prepare_to_write(self) -> None:
        """Before this run's first save: clear what earlier runs left in the way.

        Temporary folders of interrupted saves are deleted; steps that restore found
        unreadable are renamed ``STEP.unreadable`` (renamed, not deleted: a read error on
        a flaky filesystem must not cost data), so this run can write those steps again.
        """
        self._writing = True
        if jax.process_index() == 0:
            for tmp in self.directory.glob(f"*{_TMP_SUFFIX}*"):
                if tmp.is_dir():
                    shutil.rmtree(tmp, ignore_errors=True)
                    log.info("removed %s, left by an interrupted save", tmp.name)
            for b in self._unreadable:
                src = self.directory / str(b)
                if not src.exists():
                    continue
                dst = self.directory / f"{b}.unreadable"
                n = 1
                while dst.exists():
                    n += 1
                    dst = self.directory / f"{b}.unreadable{n}"
                src.rename(dst)
                log.warning("moved unreadable checkpoint %s to %s", src, dst.name)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("vdiff_checkpoint_prepare_to_write")
        self._unreadable = []
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
