"""What the main job's stages hand each other: trained models and the latent cache.

Each training stage returns a :class:`TrainedModel` (its engine and train state); the
latent cache stage returns a :class:`LatentCache`; :class:`Trained` gathers them for the
stages after (the cache, the transformer, the report, sampling).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from flax import nnx

from vdiff.errors import UserError
from vdiff.train.checkpoint import Checkpointer
from vdiff.train.engine import Engine

# Per-modality latent statistics: {"video" | "audio": {"shift": (C,), "scale": (C,)}}.
LatentStats = dict[str, dict[str, np.ndarray]]


@dataclasses.dataclass
class TrainedModel:
    """One stage's engine and train state (params, EMA, optimiser, step)."""

    engine: Engine
    state: dict

    def model(self, *, ema: bool = False) -> nnx.Module:
        """The model holding the trained (``ema``: the EMA) parameters."""
        return self.engine.model(self.state, ema=ema)

    @property
    def step(self) -> int:
        """The number of updates the state has taken."""
        return int(self.state["step"].item())


@dataclasses.dataclass
class LatentCache:
    """The autoencoders' latents of every split (see :mod:`data_pipelines.latents`).

    ``dir`` holds the shards, ``stats`` the train split's per-channel statistics that
    normalise the transformer's inputs, ``meta`` the cache's ``latents.json``.
    """

    dir: Path
    stats: LatentStats
    meta: dict


@dataclasses.dataclass
class Trained:
    """The trained parts of a run so far; a part not trained (yet) is None."""

    vae: TrainedModel | None = None
    audio_ae: TrainedModel | None = None
    dit: TrainedModel | None = None
    # The statistics the transformer's latents were normalised with (sampling undoes them).
    latent_stats: LatentStats | None = None


def restore_stage(
    workdir: Path, name: str, engine: Engine, step: int | None = None
) -> TrainedModel:
    """Stage ``name``'s checkpoint ``step`` in ``workdir`` (default: the newest readable)."""
    ckpt = Checkpointer(Path(workdir) / "checkpoints" / name)
    try:
        out = ckpt.restore(engine.abstract_state, engine.state_shardings, step=step)
    finally:
        ckpt.close()
    if out is None:
        raise UserError(
            f"{workdir}/checkpoints/{name} has no checkpoint; train that stage first ('vdiff train')"
        )
    return TrainedModel(engine, out[1])
