"""Orbax checkpoints: train state + data iterator state + config, saved together.

Saves are asynchronous and atomic (Orbax writes to a temporary folder and renames it
when complete), so a crash mid-save never touches the last good checkpoint. Restore
goes straight into the target shardings; a step whose files turn out to be unreadable
is skipped with a warning and the previous one is used.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def _abstract(abstract_state, shardings):
    """ShapeDtypeStructs carrying the target shardings (restore writes straight into them)."""
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract_state, shardings
    )


class Checkpointer:
    """A CheckpointManager for one training stage's folder.

    Args:
      directory: the stage's checkpoint folder (shared storage on multi-host runs).
      keep: how many of the newest checkpoints to keep.
      keep_every: additionally keep every K-th step (0 = off).
      async_save: write in a background thread while training continues.
    """

    def __init__(
        self, directory: str | Path, *, keep: int = 3, keep_every: int = 0, async_save: bool = True
    ):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            keep_period=keep_every or None,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "config")
        )

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
        args = {"state": ocp.args.StandardSave(state)}
        args["data"] = ocp.args.JsonSave(data_state if data_state is not None else {})
        args["config"] = ocp.args.JsonSave(
            json.loads(config.to_json()) if config is not None else {}
        )
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(
        self, abstract_state, shardings, step: int | None = None
    ) -> tuple[int, Any, Any] | None:
        """Restores ``step`` (default: newest readable) into ``shardings``.

        Returns (step, state, data_state) or None when there is no checkpoint. A newest
        checkpoint that fails to read (truncated, missing files) is reported and the
        previous one is tried.
        """
        steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
        target = _abstract(abstract_state, shardings)
        for s in steps:
            try:
                out = self.manager.restore(
                    s,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
                    ),
                )
            except Exception as e:
                if step is not None:
                    raise
                log.warning(
                    "checkpoint step %d in %s is unreadable (%s: %s); trying the previous one",
                    s,
                    self.directory,
                    type(e).__name__,
                    str(e).splitlines()[0][:200],
                )
                continue
            return s, out["state"], out["data"]
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
