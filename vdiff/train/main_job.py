"""The main job: data -> video VAE -> audio AE -> latent cache -> transformer -> report.

``vdiff train`` with no ``--config`` runs this with the tiny recipe on the built-in
"shapes" dataset. Each stage checkpoints in ``WORKDIR/checkpoints/STAGE`` and is
skipped once finished, so a rerun (or a resume after preemption) picks up where the
last run stopped.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np

from vdiff.errors import UserError
from vdiff.eval.report import write_report
from vdiff.parallel.mesh import make_mesh
from vdiff.train import stages
from vdiff.train.data import prepare_data
from vdiff.train.trained import Trained, restore_stage

log = logging.getLogger(__name__)


def run(config: ml_collections.ConfigDict, workdir: Path, *, report: bool = True) -> dict:
    """Runs every stage in ``config.train.stages`` and (optionally) the report."""
    t0 = time.time()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh(config)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json(indent=2))
    timings: dict[str, float] = {}

    t = time.time()
    data = prepare_data(config, workdir)
    if jax.process_index() == 0:
        (workdir / "data_stats.json").write_text(json.dumps({"mel": data.mel_stats}))
    timings["data_s"] = time.time() - t
    summaries = {}
    trained = Trained()
    for stage in config.train.stages:
        t = time.time()
        if stage == "vae":
            trained.vae, summaries["vae"] = stages.train_video_vae(config, workdir, mesh, data)
        elif stage == "audio_ae":
            if not config.data.audio:  # no sound in the batches: nothing to train
                log.info("audio_ae: skipped (data.audio=False)")
                continue
            trained.audio_ae, summaries["audio_ae"] = stages.train_audio_ae(
                config, workdir, mesh, data
            )
        elif stage == "dit":
            latents = stages.cache_latents(config, workdir, mesh, data, trained)
            timings["latents_s"] = time.time() - t
            t = time.time()
            trained.dit, summaries["dit"] = stages.train_dit(
                config, workdir, mesh, data, latents, trained
            )
            trained.latent_stats = latents.stats
        else:
            raise UserError(f"train.stages has unknown stage '{stage}'; use vae, audio_ae, dit")
        timings[f"{stage}_s"] = time.time() - t
    result = {"stages": summaries, "timings": timings}
    if report and trained.dit is not None:
        t = time.time()
        result["report"] = write_report(config, workdir, mesh, data, trained)
        timings["report_s"] = time.time() - t
    timings["total_s"] = time.time() - t0
    if jax.process_index() == 0:
        (workdir / "summary.json").write_text(json.dumps(result, indent=2, default=_jsonable))
    log.info(
        "main job done in %.0f s: %s", timings["total_s"], json.dumps(timings, default=_jsonable)
    )
    return result


def _jsonable(x):
    if isinstance(x, (np.generic,)):
        return x.item()
    return str(x)


def cache_latents_cli(config: ml_collections.ConfigDict, workdir: Path) -> Path:
    """``vdiff data latents``: encode every split with the workdir's trained autoencoders.

    Restores the newest ``vae`` / ``audio_ae`` checkpoints and writes the latent cache
    that the transformer stage reads: ArrayRecord shards of latent means, tokens and
    captions, ``stats.json`` and ``latents.json`` (:mod:`data_pipelines.latents`).
    A cache made from the same checkpoints is kept as it is.
    """
    workdir = Path(workdir)
    mesh = make_mesh(config)
    data = prepare_data(config, workdir)
    trained = Trained()
    trained.vae = restore_stage(workdir, "vae", stages.video_vae_engine(config, mesh))
    if config.data.audio:
        trained.audio_ae = restore_stage(workdir, "audio_ae", stages.audio_ae_engine(config, mesh))
    return stages.cache_latents(config, workdir, mesh, data, trained, shards=True).dir
