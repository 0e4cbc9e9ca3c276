"""The main job's training stages, each a model + loss on the shared engine.

- ``vae``: the video VAE on decoded clips (uint8 in memory, scaled on device).
- ``audio_ae``: the audio autoencoder on normalised log-mel.
- latent cache: both encoders run once over the data; per-channel latent statistics
  are computed over the train split and stored beside the cache.
- ``dit``: the diffusion transformer on cached latents + tokenized captions.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from vdiff.models.audio_ae import AudioAE
from vdiff.models.losses import audio_ae_loss, vae_loss
from vdiff.models.video_vae import VideoVAE, compute_latent_stats
from vdiff.train.data import Data
from vdiff.train.engine import Engine, OptimConfig
from vdiff.train.loop import ArraySource, run_stage

log = logging.getLogger(__name__)


def _per_process(batch_size: int) -> int:
    return batch_size // jax.process_count()


def _video_float(x: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 [-1, 1] (done on device, so the host ships bytes)."""
    return x.astype(jnp.float32) / 127.5 - 1.0


def _stage_engine(
    config, mesh, make_model, loss_fn, lr, steps, *, warmup=None, weight_decay=0.0, ema_decay=0.0
) -> Engine:
    """An Engine with the shared train.* settings; ``warmup`` defaults to a tenth of the
    stage's steps at most (the short autoencoder stages)."""
    t = config.train
    return Engine(
        make_model,
        loss_fn,
        mesh,
        config.mesh.rules,
        OptimConfig(
            lr=lr,
            warmup=min(t.warmup, max(1, steps // 10)) if warmup is None else warmup,
            steps=steps,
            b2=t.b2,
            weight_decay=weight_decay,
            grad_clip=t.grad_clip,
        ),
        ema_decay=ema_decay,
        microbatches=t.microbatches,
        compute_dtype=t.compute_dtype,
        max_nonfinite=t.max_nonfinite,
    )


def video_vae_engine(config, mesh) -> Engine:
    kl = config.vae.kl_weight

    def loss_fn(model, batch, rng):
        return vae_loss(model, _video_float(batch["video"]), rng, kl)

    return _stage_engine(
        config,
        mesh,
        lambda rngs: VideoVAE.from_config(config.vae, rngs),
        loss_fn,
        config.vae.lr,
        config.vae.steps,
    )


def audio_ae_engine(config, mesh) -> Engine:
    kl = config.audio_ae.kl_weight

    def loss_fn(model, batch, rng):
        return audio_ae_loss(model, batch["mel"], rng, kl)

    return _stage_engine(
        config,
        mesh,
        lambda rngs: AudioAE.from_config(config.audio_ae, config.data.n_mels, rngs),
        loss_fn,
        config.audio_ae.lr,
        config.audio_ae.steps,
    )


_STAGE_SEEDS = {"vae": 1, "audio_ae": 2, "dit": 3}


def _run(name, engine, arrays, config, workdir, steps, batch_size):
    source = ArraySource(arrays, _per_process(batch_size), seed=config.seed + _STAGE_SEEDS[name])
    t = config.train
    return run_stage(
        name,
        engine,
        source,
        steps=steps,
        workdir=workdir,
        config=config,
        seed=config.seed,
        log_every=min(t.log_every, steps),
        ckpt_every=t.ckpt_every,
        time_budget_s=t.time_budget_s,
    )


def train_video_vae(config, workdir: Path, mesh, data: Data):
    engine = video_vae_engine(config, mesh)
    state, summary = _run(
        "vae",
        engine,
        {"video": data.train.video},
        config,
        workdir,
        config.vae.steps,
        config.vae.batch_size,
    )
    return (engine, state), summary


def train_audio_ae(config, workdir: Path, mesh, data: Data):
    engine = audio_ae_engine(config, mesh)
    arrays = {"mel": data.train.mel_norm}
    state, summary = _run(
        "audio_ae",
        engine,
        arrays,
        config,
        workdir,
        config.audio_ae.steps,
        config.audio_ae.batch_size,
    )
    return (engine, state), summary


def _batched(fn, arrays: list[np.ndarray], batch: int) -> np.ndarray:
    outs = []
    n = len(arrays[0])
    for i in range(0, n, batch):
        chunk = [a[i : i + batch] for a in arrays]
        pad = batch - len(chunk[0])
        if pad:  # keep one compiled shape
            chunk = [np.concatenate([c, np.repeat(c[-1:], pad, 0)]) for c in chunk]
        out = np.asarray(fn(*chunk))
        outs.append(out[: batch - pad] if pad else out)
    return np.concatenate(outs)


def encoder_fns(ae: dict):
    """Jitted (video uint8 -> latent mean) and (normalised mel -> latent mean)."""
    fns = {}
    if "vae" in ae:
        engine, state = ae["vae"]
        gdef, params = nnx.split(engine.model(state))

        @jax.jit
        def enc_video(params, x):
            return nnx.merge(gdef, params).encode(_video_float(x))[0]

        fns["video"] = lambda x: enc_video(params, x)
    if "audio_ae" in ae:
        engine, state = ae["audio_ae"]
        gdef_a, params_a = nnx.split(engine.model(state))

        @jax.jit
        def enc_audio(params, m):
            return nnx.merge(gdef_a, params).encode(m)[0]

        fns["audio"] = lambda m: enc_audio(params_a, m)
    return fns


def cache_latents(config, workdir: Path, mesh, data: Data, ae: dict) -> dict:
    """Encodes every split once (latent means) and normalises with train-split statistics.

    Cached under WORKDIR/latents as .npy (no pickle); reused while the autoencoder
    checkpoints it was made from are unchanged.
    """
    out_dir = workdir / "latents"
    tag = {
        "vae_step": ae["vae"][1]["step"].item() if "vae" in ae else None,
        "audio_step": ae["audio_ae"][1]["step"].item() if "audio_ae" in ae else None,
    }
    meta_path = out_dir / "latents.json"
    if meta_path.exists() and json.loads(meta_path.read_text()).get("tag") == tag:
        return _load_latents(out_dir)
    fns = encoder_fns(ae)
    result: dict = {}
    for split in data.splits():
        arrays = data.split(split)
        if "video" in fns:
            result[f"{split}/video"] = _batched(fns["video"], [arrays.video], 64)
        if "audio" in fns:
            result[f"{split}/audio"] = _batched(fns["audio"], [arrays.mel_norm], 64)
    stats = {}
    for mod in ("video", "audio"):
        if f"train/{mod}" in result:
            s = compute_latent_stats(jnp.asarray(result[f"train/{mod}"]))
            stats[mod] = {k: np.asarray(v) for k, v in s.items()}
    if jax.process_index() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        for key, arr in result.items():
            np.save(out_dir / (key.replace("/", "_") + ".npy"), arr)
        for mod, s in stats.items():
            for k, v in s.items():
                np.save(out_dir / f"stats_{mod}_{k}.npy", v)
        meta_path.write_text(
            json.dumps({"tag": tag, "keys": sorted(result), "stats": sorted(stats)})
        )
    return {"latents": result, "stats": stats}


def _load_latents(out_dir: Path) -> dict:
    meta = json.loads((out_dir / "latents.json").read_text())
    result = {k: np.load(out_dir / (k.replace("/", "_") + ".npy")) for k in meta["keys"]}
    stats = {}
    for mod in meta["stats"]:
        stats[mod] = {k: np.load(out_dir / f"stats_{mod}_{k}.npy") for k in ("shift", "scale")}
    return {"latents": result, "stats": stats}


def normalized(latents: dict, split: str, mod: str) -> np.ndarray:
    s = latents["stats"][mod]
    return ((latents["latents"][f"{split}/{mod}"] - s["shift"]) * s["scale"]).astype(np.float32)


def dit_engine(config: ml_collections.ConfigDict, mesh) -> Engine:
    from vdiff.diffusion.flow import flow_loss
    from vdiff.models.dit import DiT

    def loss_fn(model, batch, rng):
        return flow_loss(model, batch, rng, config)

    t = config.train
    return _stage_engine(
        config,
        mesh,
        lambda rngs: DiT.from_config(config, rngs),
        loss_fn,
        t.lr,
        t.steps,
        warmup=t.warmup,
        weight_decay=t.weight_decay,
        ema_decay=t.ema_decay,
    )


def dit_arrays(config, data: Data, latents: dict, split: str = "train") -> dict[str, np.ndarray]:
    arrays = data.split(split)
    out = {
        "video_latents": normalized(latents, split, "video"),
        "tokens": arrays.tokens,
        "mask": arrays.mask,
    }
    if config.data.audio and f"{split}/audio" in latents["latents"]:
        out["audio_latents"] = normalized(latents, split, "audio")
        out["has_audio"] = arrays.has_audio
    return out


def train_dit(config, workdir: Path, mesh, data: Data, latents: dict):
    engine = dit_engine(config, mesh)
    arrays = dit_arrays(config, data, latents)
    state, summary = _run(
        "dit", engine, arrays, config, workdir, config.train.steps, config.train.batch_size
    )
    return (engine, state, latents["stats"]), summary
