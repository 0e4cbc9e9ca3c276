"""Rectified-flow (flow matching) training objective for video and audio latents.

Convention: ``t = 0`` is data, ``t = 1`` is pure noise,
``x_t = (1 - t) x0 + t eps`` and the model predicts the velocity ``eps - x0``
(so sampling integrates from t = 1 down to t = 0, see :mod:`vdiff.diffusion.samplers`).

Timesteps are logit-normal (``sigmoid(N(mean, std))``) followed by the shift
``t' = shift t / (1 + (shift - 1) t)``; ``shift > 1`` spends more of the training
signal at high noise, where the layout of a clip is decided.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from vdiff.diffusion.schedule import shift_t as shift_t  # shared with the sampler and serving
from vdiff.models.text_encoder import PAD_ID


def sample_t(
    rng: jax.Array,
    shape,
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
    uniform: float = 0.0,
) -> jax.Array:
    """Logit-normal timesteps in (0, 1), then shifted; with probability ``uniform`` a
    timestep is instead uniform on (0, 1) (unshifted), which keeps the low-noise end,
    where outlines are finished, in training when the logit-normal sits at high noise."""
    t = shift_t(jax.nn.sigmoid(mean + std * jax.random.normal(rng, shape, jnp.float32)), shift)
    if uniform <= 0:
        return t
    k_mix, k_u = jax.random.fold_in(rng, 1), jax.random.fold_in(rng, 2)
    u = jax.random.uniform(k_u, shape, jnp.float32, minval=1e-3, maxval=1.0 - 1e-3)
    return jnp.where(jax.random.uniform(k_mix, shape) < uniform, u, t)


def resolution_shift(num_tokens: int, base_tokens: int, base_shift: float = 1.0) -> float:
    """Shift for ``num_tokens`` given ``base_shift`` at ``base_tokens``: scales with sqrt of the ratio.

    More tokens average away more noise at a given t, so larger clips need more time
    at high noise to keep the same effective signal-to-noise ratio.
    """
    if num_tokens <= 0 or base_tokens <= 0:
        raise ValueError(f"token counts must be > 0, got {num_tokens}, {base_tokens}")
    return base_shift * math.sqrt(num_tokens / base_tokens)


def _bcast(t: jax.Array, x: jax.Array) -> jax.Array:
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim)).astype(x.dtype)


def interpolate(x0: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
    """``x_t = (1 - t) x0 + t eps`` with per-example ``t (B,)``."""
    tb = _bcast(t, x0)
    return (1.0 - tb) * x0 + tb * eps


def _per_example_mse(pred: jax.Array, target: jax.Array) -> jax.Array:
    err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    return jnp.mean(err.reshape(err.shape[0], -1), axis=1)


def _weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def empty_captions(caption: jax.Array, mask: jax.Array, empty=None) -> tuple[jax.Array, jax.Array]:
    """The unconditional caption shaped like ``(caption, mask)``.

    ``empty`` is a pretrained encoder's ``(embedding (L, D), mask (L,))`` of the empty
    caption, repeated over the batch; None (the internal encoder): all pad tokens with an
    all-False mask.
    """
    if empty is None:
        return jnp.full_like(caption, PAD_ID), jnp.zeros_like(mask, dtype=bool)
    emb, emask = empty
    return (
        jnp.broadcast_to(jnp.asarray(emb).astype(caption.dtype), caption.shape),
        jnp.broadcast_to(jnp.asarray(emask, bool), mask.shape),
    )


def batch_caption(batch: dict) -> jax.Array:
    """The caption input of a batch: cached embeddings ``text`` (a pretrained encoder) or
    token ids ``tokens`` (the internal encoder)."""
    if "text" in batch:
        return batch["text"]
    if "tokens" in batch:
        return batch["tokens"]
    raise ValueError(f"batch has neither 'text' nor 'tokens' (keys: {sorted(batch)})")


def flow_loss(
    model, batch: dict, rng: jax.Array, cfg, empty_caption=None
) -> tuple[jax.Array, dict]:
    """Flow-matching loss of one batch.

    Per example: caption dropout (empty caption with prob ``caption_dropout``); one
    ``t`` shared by video and audio (sampling moves them together), except that an
    example with audio may instead have clean audio (``t_audio = 0``, prob
    ``p_clean_audio``: audio -> video) or clean video (``t_video = 0``, prob
    ``p_clean_video``: video -> audio); a clean modality gets no loss. Examples
    without audio (``has_audio`` False) get no audio loss and their audio tokens are
    hidden from attention. Each modality's loss is a mean over the examples that
    contribute to it; the total is ``loss_video + audio_loss_weight * loss_audio``.
    With ``p_no_cross_modal > 0`` that fraction of examples is denoised with
    audio<->video attention masked, so that the model also knows how to generate each
    modality alone from the text: the masked-attention ablation of the sync score
    (``oracle.nocross.*`` in the report) then measures what the joint attention adds.

    Args:
        model: a :class:`vdiff.models.dit.DiT` (or anything with its call signature
            and a ``has_audio`` attribute).
        batch: ``video_latents (B,T',H',W',C)``, ``tokens (B,L)`` or a pretrained
            encoder's caption embeddings ``text (B,L,D)``, ``mask (B,L)``,
            optional ``audio_latents (B,Ta,Ca)``, ``has_audio (B,)`` and ``fps (B,)``
            (each clip's frame rate; frame ``i`` is at ``i / fps`` s; default the model's).
        rng: PRNG key (fixes t, noise, dropout and the clean-modality draw).
        cfg: the whole config or its ``diffusion`` section.
        empty_caption: with ``text`` embeddings, the empty caption's ``(embedding (L, D),
            mask (L,))`` that caption dropout swaps in (see :func:`empty_captions`).

    Returns:
        ``(loss, metrics)``; metrics are scalars.
    """
    d = cfg.diffusion if hasattr(cfg, "diffusion") else cfg
    for key in ("video_latents", "mask"):
        if key not in batch:
            raise ValueError(f"flow_loss: batch has no '{key}' (keys: {sorted(batch)})")
    if "text" in batch and empty_caption is None:
        raise ValueError("flow_loss: caption embeddings need the empty caption's embedding")
    x0_v = batch["video_latents"]
    b = x0_v.shape[0]
    x0_a = batch.get("audio_latents")
    if x0_a is not None and not getattr(model, "has_audio", True):
        raise ValueError(
            "batch has audio_latents but the model has no audio stream; set data.audio consistently"
        )
    k_t, k_ev, k_ea, k_drop, k_clean, k_cross = jax.random.split(rng, 6)

    caption, mask = batch_caption(batch), batch["mask"].astype(bool)
    drop = jax.random.uniform(k_drop, (b,)) < d.caption_dropout
    empty_cap, empty_mask = empty_captions(caption, mask, empty_caption)
    caption = jnp.where(drop.reshape((b,) + (1,) * (caption.ndim - 1)), empty_cap, caption)
    mask = jnp.where(drop[:, None], empty_mask, mask)

    t = sample_t(k_t, (b,), d.t_mean, d.t_std, d.shift, d.t_uniform)
    eps_v = jax.random.normal(k_ev, x0_v.shape, jnp.float32).astype(x0_v.dtype)
    zero = jnp.zeros((b,), bool)
    clean_audio = clean_video = zero
    has_audio = zero
    if x0_a is not None:
        has_audio = batch.get("has_audio", jnp.ones((b,), bool)).astype(bool)
        u = jax.random.uniform(k_clean, (b,))
        clean_audio = has_audio & (u < d.p_clean_audio)
        clean_video = has_audio & (u >= d.p_clean_audio) & (u < d.p_clean_audio + d.p_clean_video)
    t_v = jnp.where(clean_video, 0.0, t)
    t_a = jnp.where(clean_audio, 0.0, t)

    xt_v = interpolate(x0_v, eps_v, t_v)
    kwargs = {}
    if x0_a is not None:
        eps_a = jax.random.normal(k_ea, x0_a.shape, jnp.float32).astype(x0_a.dtype)
        kwargs = dict(audio=interpolate(x0_a, eps_a, t_a), t_audio=t_a, audio_mask=has_audio)
        p_sep = d.p_no_cross_modal
        if p_sep > 0:  # per-example: video and audio denoised without seeing each other
            kwargs["cross_modal"] = jax.random.uniform(k_cross, (b,)) >= p_sep
    if "fps" in batch:  # each clip's own frame rate: its tokens' real times
        kwargs["video_times"] = model.clip_times(batch["fps"], x0_v.shape[1])
    pred_v, pred_a = model(xt_v, t_v, caption, mask, **kwargs)

    w_v = (~clean_video).astype(jnp.float32)
    loss_v = _weighted_mean(_per_example_mse(pred_v, eps_v - x0_v), w_v)
    loss = loss_v
    metrics = {
        "loss_video": loss_v,
        "t_mean": jnp.mean(t),
        "caption_dropped": jnp.mean(drop.astype(jnp.float32)),
    }
    if x0_a is not None:
        w_a = (has_audio & ~clean_audio).astype(jnp.float32)
        loss_a = _weighted_mean(_per_example_mse(pred_a, eps_a - x0_a), w_a)
        loss = loss + d.audio_loss_weight * loss_a
        metrics.update(
            loss_audio=loss_a,
            clean_audio=jnp.mean(clean_audio.astype(jnp.float32)),
            clean_video=jnp.mean(clean_video.astype(jnp.float32)),
            has_audio=jnp.mean(has_audio.astype(jnp.float32)),
        )
    metrics["loss"] = loss
    return loss, metrics
