"""The main job's training stages, each a model + loss on the shared engine.

- ``vae``: the video VAE on decoded clips (uint8 frames streamed from the frames cache,
  scaled on device).
- ``audio_ae``: the audio autoencoder on normalised log-mel.
- latent cache: both encoders run once over the data into ArrayRecord shards, every
  process encoding its own run of records (:mod:`data_pipelines.latents`); per-channel
  latent statistics of the train split are merged from every process's moments.
- ``dit``: the diffusion transformer on streamed cached latents + tokenized captions, or
  (``data.dit_input="clips"``) on streamed decoded clips encoded inside its train step.

Every stage reads a :class:`~data_pipelines.stream.BatchStream`: memory is bounded by
the batch and the prefetch depth, not by the dataset.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from data_pipelines import latents as lc
from vdiff.caption_encoder import CaptionEncoder, encoder_identity
from vdiff.diffusion.flow import flow_loss
from vdiff.errors import UserError
from vdiff.models.audio_ae import AudioAE
from vdiff.models.dit import DiT, DiTSizes
from vdiff.models.losses import audio_ae_loss, vae_loss
from vdiff.models.t5 import pretrained_width
from vdiff.models.video_vae import VideoVAE, from_pixels, normalize
from vdiff.train.data import Data, bucket_batches, part_name
from vdiff.train.distributed import barrier
from vdiff.train.engine import Engine, OptimConfig
from vdiff.train.loop import run_stage
from vdiff.train.trained import LatentCache, LatentStats, Trained, TrainedModel

log = logging.getLogger(__name__)


def stage_batches(config, engine: Engine, base_batch: int, explicit=()) -> dict[str, int]:
    """Bucket name -> this process's batch for a stage whose first bucket takes
    ``base_batch`` clips a step (:func:`vdiff.train.data.bucket_batches`): every global
    batch divides by the devices it is split over and by the process count."""
    mesh = engine.mesh
    devices = math.prod(mesh.shape[a] for a in engine.batch_axes)
    divisor = math.lcm(devices, jax.process_count())
    sizes = bucket_batches(config, base_batch, divisor, explicit)
    return {name: n // jax.process_count() for name, n in sizes.items()}


def _stage_engine(
    config,
    mesh,
    make_model,
    loss_fn,
    lr,
    steps,
    *,
    warmup=None,
    weight_decay=0.0,
    ema_decay=0.0,
    optimizer="adamw",
    muon_dims=None,
    frozen=(),
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
            optimizer=optimizer,
            muon_dims=muon_dims,
        ),
        ema_decay=ema_decay,
        microbatches=t.microbatches,
        compute_dtype=t.compute_dtype,
        max_nonfinite=t.max_nonfinite,
        frozen=frozen,
    )


def random_crops(x: jax.Array, rng: jax.Array, size: int, align: int) -> jax.Array:
    """A ``size`` x ``size`` spatial crop of every clip in ``x`` (B, T, H, W, C), each at its
    own random offset, a multiple of ``align`` so the crop keeps the encoder's stride phase."""
    b, _, h, w, _ = x.shape
    ky, kx = jax.random.split(rng)
    oy = jax.random.randint(ky, (b,), 0, (h - size) // align + 1) * align
    ox = jax.random.randint(kx, (b,), 0, (w - size) // align + 1) * align

    def crop(clip, y, x0):
        return jax.lax.dynamic_slice(
            clip, (0, y, x0, 0), (clip.shape[0], size, size, clip.shape[-1])
        )

    return jax.vmap(crop)(x, oy, ox)


def video_vae_engine(config, mesh, *, crop: int | None = None) -> Engine:
    """The video VAE's engine; ``crop`` (pixels, 0 = whole frames) overrides vae.train_crop."""
    kl = config.vae.kl_weight
    crop = config.vae.train_crop if crop is None else crop

    def loss_fn(model, batch, rng):
        x = batch["video"]
        if crop:
            rng, crop_rng = jax.random.split(rng)
            x = random_crops(x, crop_rng, crop, config.vae.spatial_down)
        return vae_loss(model, from_pixels(x), rng, kl)

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


def _run(
    name, engine, stream_for, config, workdir, steps, batch_size, time_budget_s=None, explicit=()
):
    """Runs a stage on ``stream_for(batch_sizes, seed)``: this process's batches, with
    per-bucket batch sizes scaled from ``batch_size`` (:func:`stage_batches`)."""
    batches = stage_batches(config, engine, batch_size, explicit)
    source = stream_for(batches, config.seed + _STAGE_SEEDS[name])
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
        time_budget_s=t.time_budget_s if time_budget_s is None else time_budget_s,
    )


def _clips(data: Data, fields: dict[str, str], split: str = "train", *, images: bool = True):
    """``stream_for(batch_sizes, seed)`` over ``split``'s decoded clips, every bucket
    (``fields``: batch key -> decoded-frames field; ``images``: with the 1-frame buckets)."""

    def stream_for(batch_sizes: dict[str, int], seed: int):
        return data.stream(split, fields, batch_sizes=batch_sizes, seed=seed, images=images)

    return stream_for


def vae_crop_steps(vae_config) -> int:
    """Steps (from the start) that train the video VAE on crops: all of them with
    ``train_crop`` alone, all but the last ``full_frame_steps`` with both, none without."""
    if not vae_config.train_crop:
        return 0
    return max(0, vae_config.steps - vae_config.full_frame_steps)


def train_video_vae(config, workdir: Path, mesh, data: Data) -> tuple[TrainedModel, dict]:
    """Trains the video VAE: on crops up to :func:`vae_crop_steps`, on whole frames after.

    The two phases are one stage (one checkpoint directory, one lr schedule over
    ``vae.steps``, one ``train.time_budget_s``): the whole-frame phase resumes from the
    crop phase's last checkpoint, and in a restarted job the phase its checkpoints have
    already passed trains nothing. A crop phase stopped by the time budget ends the stage
    there, so a rerun finishes the crop steps before any whole-frame step.
    """
    frames = _clips(data, {"video": "video"})
    steps, crop_steps = config.vae.steps, vae_crop_steps(config.vae)
    budget = config.train.time_budget_s
    batch = config.vae.batch_size
    first = None
    if 0 < crop_steps < steps:
        crops = video_vae_engine(config, mesh)
        state, first = _run("vae", crops, frames, config, workdir, crop_steps, batch)
        if first["end_step"] < crop_steps:  # out of time in the crop phase
            return TrainedModel(crops, state), {**first, "crop_steps": crop_steps}
        if budget > 0:  # what is left of it (at least one step: every process agrees)
            budget = max(budget - first["wall_s"], 1e-3)
    engine = video_vae_engine(config, mesh, crop=None if crop_steps == steps else 0)
    state, summary = _run("vae", engine, frames, config, workdir, steps, batch, budget)
    summary["crop_steps"] = crop_steps
    if first is not None:
        summary["full_frame_start_step"] = summary["start_step"]
        summary["start_step"] = first["start_step"]
        summary["crop_wall_s"] = first["wall_s"]
        summary["wall_s"] += first["wall_s"]
    return TrainedModel(engine, state), summary


def train_audio_ae(config, workdir: Path, mesh, data: Data) -> tuple[TrainedModel, dict]:
    engine = audio_ae_engine(config, mesh)
    state, summary = _run(
        "audio_ae",
        engine,
        _clips(data, {"mel": "audio"}, images=False),
        config,
        workdir,
        config.audio_ae.steps,
        config.audio_ae.batch_size,
    )
    return TrainedModel(engine, state), summary


def _host_params(part: TrainedModel):
    """(graphdef, params) of a trained model, the params as this host's full copies when
    another process holds part of them (so each process can run it on its own data)."""
    gdef, params = nnx.split(part.model())
    if all(x.is_fully_addressable for x in jax.tree.leaves(params)):
        return gdef, params
    host = jax.tree.map(
        lambda x: np.asarray(
            x if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True)
        ),
        params,
    )
    return gdef, host


# Module-level jits keyed by the (static, hashable) graph definition: encoding another
# checkpoint of the same architecture reuses the compiled function.
@functools.partial(jax.jit, static_argnums=0)
def _encode_video(graphdef, params, x):
    return nnx.merge(graphdef, params).encode(from_pixels(x))[0]


@functools.partial(jax.jit, static_argnums=0)
def _encode_audio(graphdef, params, mel):
    return nnx.merge(graphdef, params).encode(mel)[0]


def encoder_fns(trained: Trained):
    """Jitted (video uint8 -> latent mean) and (normalised mel -> latent mean)."""
    fns = {}
    for part, mod, encode in (
        (trained.vae, "video", _encode_video),
        (trained.audio_ae, "audio", _encode_audio),
    ):
        if part is not None:
            fns[mod] = functools.partial(encode, *_host_params(part))
    return fns


def dit_input(config) -> str:
    """``data.dit_input``: "latents" (read the latent cache) or "clips" (encode per step)."""
    mode = config.data.dit_input
    if mode not in ("latents", "clips"):
        raise UserError(f"data.dit_input='{mode}' is not known; use 'latents' or 'clips'")
    return mode


def _cache_tag(config, data: Data, trained: Trained) -> dict:
    """What a latent cache was made from; a cache is reused only while this is unchanged."""
    d, x = config.data, config.text
    text = {"encoder": x.encoder}
    if x.encoder != "internal":
        text.update(encoder_identity(Path(x.path)), max_len=int(x.max_len), dtype=x.dtype)
    return {
        "vae_step": trained.vae.step if trained.vae is not None else None,
        "audio_step": trained.audio_ae.step if trained.audio_ae is not None else None,
        "data": {
            "clips": dict(data.counts),
            "decoded": data.tag,
            "vocab_size": int(d.vocab_size),
        },
        "text": text,
    }


ENCODE_BATCH = 64  # clips per encoder call while caching (one compiled shape)


def _encode_padded(fn, x: np.ndarray) -> np.ndarray:
    """``fn`` on up to ENCODE_BATCH clips, padded with the last one: one compiled shape."""
    n = len(x)
    if n < ENCODE_BATCH:
        x = np.concatenate([x, np.repeat(x[-1:], ENCODE_BATCH - n, 0)])
    return np.asarray(fn(x))[:n]


def _encode_part(
    data: Data, split: str, bucket, fns, writer: lc.PartWriter, captions: CaptionEncoder | None
) -> None:
    """This process's consecutive run of ``split``'s clips in ``bucket`` -> latent records
    (with ``captions``, each with its caption's embedding, kept to its real tokens)."""
    src = data.source(split, bucket)
    pi, pc = jax.process_index(), jax.process_count()
    lo, hi = len(src) * pi // pc, len(src) * (pi + 1) // pc
    norm = data.mel_norm
    for start in range(lo, hi, ENCODE_BATCH):
        rows = src.read(range(start, min(hi, start + ENCODE_BATCH)))
        n = len(rows["video"])
        z = {"video": _encode_padded(fns["video"], rows["video"])}
        if "audio" in fns and "audio" in rows:
            mel = ((rows["audio"] - norm["shift"]) * norm["scale"]).astype(np.float32)
            z["audio"] = _encode_padded(fns["audio"], mel)
        if captions is not None:
            z["text"] = captions.encode_ids(rows["tokens"], rows["mask"])
        for i in range(n):
            writer.write(
                {
                    "key": rows["key"][i],
                    "index": int(rows["index"][i]),
                    "video": z["video"][i],
                    "audio": z["audio"][i] if "audio" in z else None,
                    "text": z["text"][i][: rows["mask"][i].sum()] if "text" in z else None,
                    "has_audio": bool(rows["has_audio"][i]),
                    "tokens": rows["tokens"][i],
                    "mask": rows["mask"][i],
                    "caption": rows["caption"][i],
                    "fps": float(rows["fps"][i]),
                }
            )


def cache_latents(
    config, workdir: Path, mesh, data: Data, trained: Trained, *, shards: bool | None = None
) -> LatentCache:
    """Encodes every split once (latent means) and stores them with train-split statistics.

    Writes ``WORKDIR/latents``: ArrayRecord shards of raw latents + tokens + captions,
    ``stats.json`` and ``latents.json`` (see :mod:`data_pipelines.latents`). Every
    process encodes a consecutive run of each split's clips and writes its own part;
    process 0 merges the parts (record order is the split's, whatever the process
    count) and the latent moments into the statistics. The cache is reused while its
    tag (autoencoder checkpoint steps, decoded data) is unchanged.

    Args:
        shards: Write the per-clip shards (default: when ``data.dit_input`` is
            "latents"); False encodes the train split only for the statistics that the
            on-the-fly ("clips") path normalises with.
    """
    if trained.vae is None:
        raise UserError("the latent cache needs the video VAE; keep 'vae' in train.stages")
    if shards is None:
        shards = dit_input(config) == "latents"
    out_dir = Path(workdir) / "latents"
    tag = _cache_tag(config, data, trained)
    want = data.splits() if shards else []
    try:
        meta = lc.read_meta(out_dir)
    except UserError as e:  # a foreign or older cache: this stage owns the folder, so rebuild
        log.warning("rebuilding the latent cache: %s", e)
        meta = None
    want_parts = [part_name(s, b) for s in want for b in data.parts(s)]
    if meta is not None and meta["tag"] == tag and set(want_parts) <= set(meta["splits"]):
        for part in want_parts:
            lc.check_split(out_dir, part, meta)
        log.info("latent cache %s matches the autoencoders; reusing it", out_dir)
        return LatentCache(out_dir, lc.load_stats(out_dir), meta)

    t0 = time.time()
    pi, pc = jax.process_index(), jax.process_count()
    if pi == 0:
        lc.clear_cache(out_dir)
    barrier("vdiff_latents_clear")
    fns = encoder_fns(trained)
    captions = None
    if config.text.encoder != "internal" and want:
        captions = CaptionEncoder.from_config(config)
        if pi == 0:
            lc.save_empty_caption(out_dir, *captions.empty())
    parts = [(split, b) for split in want or ["train"] for b in data.parts(split)]
    for split, bucket in parts:
        writer = lc.PartWriter(
            out_dir,
            part_name(split, bucket),
            pi,
            pc,
            moments=("video", "audio") if split == "train" else (),
            keep_records=bool(want),
        )
        try:
            _encode_part(data, split, bucket, fns, writer, captions)
        except BaseException:
            writer.abort()
            raise
        writer.close()
    barrier("vdiff_latents_parts")
    if pi == 0:
        entries, train_moments = {}, {}
        for split, bucket in parts:
            entry, moments = lc.merge_parts(out_dir, part_name(split, bucket), pc)
            if split in want:
                entries[part_name(split, bucket)] = entry
            if split == "train":  # the statistics pool every train bucket
                lc.pool_moments(train_moments, moments)
        stats = {mod: m.latent_stats() for mod, m in train_moments.items()}
        lc.write_meta(out_dir, tag, entries, stats)
    barrier("vdiff_latents_meta")
    meta = lc.read_meta(out_dir)
    size = sum(p.stat().st_size for p in out_dir.iterdir())
    log.info(
        "latent cache %s written in %.1f s by %d process(es) (%s, %.2f MB)",
        out_dir,
        time.time() - t0,
        pc,
        ", ".join(f"{k}: {v['count']}" for k, v in meta["splits"].items()) or "statistics only",
        size / 1e6,
    )
    return LatentCache(out_dir, lc.load_stats(out_dir), meta)


def empty_caption(config, latents: LatentCache):
    """The cached empty caption of a pretrained encoder; None with the internal one."""
    return None if config.text.encoder == "internal" else lc.load_empty_caption(latents.dir)


def clip_encoder(config, trained: Trained, stats: LatentStats):
    """The frozen encoders as a traceable batch map, for ``data.dit_input="clips"``.

    ``video`` uint8 (B, T, H, W, 3) becomes ``video_latents`` and ``mel`` (normalised
    log-mel) becomes ``audio_latents``, both encoder means normalised with ``stats``
    exactly as the cache path does; other keys pass through. Runs inside the train
    step's jit. The encoder weights are host copies captured as constants of that jit
    (fine for the small autoencoders here, on any process count).
    """

    def frozen(part: TrainedModel):
        gdef, params = _host_params(part)
        return gdef, jax.tree.map(np.asarray, params)

    def norm(z, s):
        return jax.lax.stop_gradient(normalize(z, s))

    video = frozen(trained.vae)
    audio = frozen(trained.audio_ae) if config.data.audio and "audio" in stats else None

    def encode(batch: dict) -> dict:
        out = {k: v for k, v in batch.items() if k not in ("video", "mel")}
        z = nnx.merge(*video).encode(from_pixels(batch["video"]))[0]
        out["video_latents"] = norm(z, stats["video"])
        if audio is not None and "mel" in batch:
            za = nnx.merge(*audio).encode(batch["mel"])[0]
            out["audio_latents"] = norm(za, stats["audio"])
        return out

    return encode


def dit_sizes(config: ml_collections.ConfigDict) -> DiTSizes:
    """What the transformer takes from the rest of the config: the autoencoders' latent
    channels and strides, the vocabulary, the clip and audio latent rates, the numerics."""
    d, t = config.data, config.train
    return DiTSizes(
        latent_channels=config.vae.latent_channels,
        audio_channels=config.audio_ae.latent_channels if d.audio else None,
        vocab_size=d.vocab_size,
        text_features=pretrained_width(config.text),
        fps=d.fps,
        temporal_down=config.vae.temporal_down,
        audio_latents_per_second=d.sample_rate / d.hop / config.audio_ae.time_down,
        remat=t.remat,
        dtype=jnp.dtype(t.compute_dtype),
        param_dtype=jnp.dtype(t.param_dtype),
    )


def dit_engine(
    config: ml_collections.ConfigDict, mesh, *, encode=None, empty_caption=None
) -> Engine:
    """The transformer's engine; ``encode`` (see :func:`clip_encoder`) maps raw clip
    batches to latents inside the step, for ``data.dit_input="clips"``;
    ``empty_caption`` (:func:`empty_caption`) is what caption dropout swaps in for a
    pretrained encoder's embeddings (a constant of the step)."""

    def loss_fn(model, batch, rng):
        batch = batch if encode is None else encode(batch)
        return flow_loss(model, batch, rng, config, empty_caption)

    t = config.train
    return _stage_engine(
        config,
        mesh,
        lambda rngs: DiT.from_config(config.model, dit_sizes(config), rngs),
        loss_fn,
        t.lr,
        t.steps,
        warmup=t.warmup,
        weight_decay=t.weight_decay,
        ema_decay=t.ema_decay,
        optimizer=t.optimizer,
        muon_dims=DiT.muon_dims,
        # A pretrained encoder is outside the model (and never trained); the internal one
        # is part of it, trained unless model.freeze_text.
        frozen=("text_encoder",) if freeze_internal_text(config) else (),
    )


def freeze_internal_text(config) -> bool:
    """Whether the transformer's own text encoder is held fixed (``model.freeze_text``)."""
    return bool(config.model.freeze_text) and config.text.encoder == "internal"


def dit_latent_fields(config, latents: LatentCache) -> dict[str, str]:
    """Transformer input -> latent record field, for ``data.dit_input="latents"``."""
    caption = "tokens" if config.text.encoder == "internal" else "text"
    fields = {"video_latents": "video", caption: caption, "mask": "mask", "fps": "fps"}
    if config.data.audio and "audio" in latents.stats:
        fields.update(audio_latents="audio", has_audio="has_audio")
    return fields


def dit_latent_stream(config, data: Data, latents: LatentCache, split: str = "train"):
    """``stream_for(batch_sizes, seed)``: normalised latents, tokens, mask and frame rate
    from the cache, one bucket per step."""
    fields = dit_latent_fields(config, latents)
    norms = {k: latents.stats[f] for k, f in fields.items() if f in ("video", "audio")}
    counts = {
        b.name: latents.meta["splits"].get(part_name(split, b), {}).get("count", 0)
        for b in data.buckets
    }

    def make_stream(k, bucket, batch: int, seed: int):
        return lc.cache_stream(
            latents.dir,
            part_name(split, bucket),
            lc.RecordFields(fields, norms),
            batch_size=batch,
            seed=seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            worker_count=int(config.data.num_workers),
            prefetch=int(config.data.prefetch),
        )

    def stream_for(batch_sizes: dict[str, int], seed: int):
        return data.bucketed(
            counts, make_stream, batch_sizes=batch_sizes, seed=seed, what=f"{split} latents"
        )

    return stream_for


def dit_clip_fields(config, stats: dict) -> dict[str, str]:
    """Transformer input -> frame field, for "clips" (uint8 video, normalised mel)."""
    fields = {"video": "video", "tokens": "tokens", "mask": "mask", "fps": "fps"}
    if config.data.audio and "audio" in stats:
        fields.update(mel="audio", has_audio="has_audio")
    return fields


def train_dit(
    config, workdir: Path, mesh, data: Data, latents: LatentCache, trained: Trained
) -> tuple[TrainedModel, dict]:
    """Trains the transformer from the latent cache, or (``data.dit_input="clips"``) from
    the decoded clips, encoding each batch with the frozen autoencoders in ``trained``."""
    if dit_input(config) == "latents":
        engine = dit_engine(config, mesh, empty_caption=empty_caption(config, latents))
        stream_for = dit_latent_stream(config, data, latents)
    else:
        if trained.vae is None:
            raise UserError(
                "data.dit_input='clips' needs the trained autoencoders; keep 'vae' (and "
                "'audio_ae') in train.stages"
            )
        engine = dit_engine(config, mesh, encode=clip_encoder(config, trained, latents.stats))
        stream_for = _clips(data, dit_clip_fields(config, latents.stats))
    state, summary = _run(
        "dit",
        engine,
        stream_for,
        config,
        workdir,
        config.train.steps,
        config.train.batch_size,
        explicit=tuple(config.data.bucket_batch),
    )
    return TrainedModel(engine, state), summary
