"""Euler and Heun samplers for the flow-matching DiT, with classifier-free guidance.

Sampling integrates ``dx/dt = v(x, t)`` from t = 1 (noise) to t = 0 (data) over a
shifted time grid. Guidance runs the conditional and the unconditional (empty
caption) inputs in ONE batched model call (batch concatenated), then
``v = v_uncond + scale * (v_cond - v_uncond)`` with a scale per modality.

A modality given clean (``clean_video`` / ``clean_audio``) stays fixed at t = 0 and
only the other one is sampled (video -> audio, audio -> video). The empty caption of
the unconditional branch keeps the clean modality, so guidance is on the text only.

The whole loop (text encoding, every model call) runs inside one ``jax.jit``; the
model is passed as ``nnx.split`` state, the graph definition is static.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from vdiff.diffusion.flow import empty_captions

# The schedule and the noise live in a model-free module that export bundles share;
# they stay importable from here.
from vdiff.diffusion.schedule import initial_noise as initial_noise
from vdiff.diffusion.schedule import per_example_noise as per_example_noise
from vdiff.diffusion.schedule import time_grid as time_grid

SAMPLERS = ("euler", "heun")


def _velocity_fn(model, text, clean_video, clean_audio, scales, guided, cross_modal, times=None):
    """Returns ``v(xv, xa, t) -> (vv, va)`` for scalar t, with guidance and clean modalities
    (``times``: the video tokens' seconds, default the model's frame rate)."""

    def velocity(xv, xa, t):
        b = xv.shape[0]
        tv = jnp.full((b,), t, jnp.float32)
        ta = tv
        if clean_video is not None:
            xv, tv = clean_video, jnp.zeros_like(tv)
        if clean_audio is not None:
            xa, ta = clean_audio, jnp.zeros_like(ta)
        if guided:
            double = lambda x: None if x is None else jnp.concatenate([x, x], axis=0)  # noqa: E731
            xv, xa, tv, ta = double(xv), double(xa), double(tv), double(ta)
        audio_kw = {} if xa is None else dict(audio=xa, t_audio=ta)
        if cross_modal is not None:
            audio_kw["cross_modal"] = cross_modal
        if times is not None:
            audio_kw["video_times"] = times
        vv, va = model(xv, tv, None, None, text=text, **audio_kw)
        if guided:
            vv = vv[b:] + scales[0] * (vv[:b] - vv[b:])
            if va is not None:
                va = va[b:] + scales[1] * (va[:b] - va[b:])
        return vv, va

    return velocity


@functools.partial(jax.jit, static_argnames=("graphdef", "sampler", "guided", "cross_modal"))
def _sample_jit(
    graphdef,
    state,
    tokens,
    mask,
    xv,
    xa,
    clean_video,
    clean_audio,
    grid,
    scales,
    times,
    empty,
    *,
    sampler,
    guided,
    cross_modal,
):
    model = nnx.merge(graphdef, state)
    if guided:
        empty_tok, empty_mask = empty_captions(tokens, mask, empty)
        tokens = jnp.concatenate([tokens, empty_tok], axis=0)
        mask = jnp.concatenate([mask, empty_mask], axis=0)
    text = model.encode_text(tokens, mask)
    velocity = _velocity_fn(
        model, text, clean_video, clean_audio, scales, guided, cross_modal, times
    )
    sample_video, sample_audio = clean_video is None, xa is not None and clean_audio is None

    def step(i, carry):
        return _step(velocity, *carry, grid[i], grid[i + 1], sampler, sample_video, sample_audio)

    return jax.lax.fori_loop(0, grid.shape[0] - 1, step, (xv, xa))


def _step(velocity, xv, xa, t, t_next, sampler, sample_video, sample_audio):
    """One Euler or Heun step of ``velocity`` from ``t`` to ``t_next``."""

    def update(x, v, dt, on):
        return x + dt * v if (on and x is not None) else x

    dt = t_next - t
    vv, va = velocity(xv, xa, t)
    ev, ea = update(xv, vv, dt, sample_video), update(xa, va, dt, sample_audio)
    if sampler == "euler":
        return ev, ea

    def heun(_):
        vv2, va2 = velocity(ev, ea, t_next)
        avg = lambda a, b: None if a is None else (a + b) / 2  # noqa: E731
        return update(xv, avg(vv, vv2), dt, sample_video), update(
            xa, avg(va, va2), dt, sample_audio
        )

    # The last step ends at t = 0 where a second evaluation adds nothing: plain Euler.
    return jax.lax.cond(t_next > 0, heun, lambda _: (ev, ea), None)


def denoise_step(model, text, xv, xa, t, t_next, scales, *, sampler, guided, cross_modal=None):
    """One sampler step from ``t`` to ``t_next`` with precomputed text features.

    The body of :func:`sample`'s loop (no clean modality); export bundles serialize it
    so that a server repeats this sampler step for step.

    Args:
        model: a :class:`vdiff.models.dit.DiT`.
        text: ``model.encode_text`` of the captions, followed by the empty captions
            (twice the batch) when ``guided``.
        xv: video latents ``(B, T', H', W', C)`` at time ``t``.
        xa: audio latents ``(B, Ta, Ca)`` or None.
        t: current time (scalar).
        t_next: next time (scalar, smaller).
        scales: ``(2,)`` guidance scales (video, audio); unused without guidance.
        sampler: ``"euler"`` or ``"heun"``.
        guided: classifier-free guidance on.
        cross_modal: override of the model's audio<->video attention.

    Returns:
        ``(xv, xa)`` at ``t_next``.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not one of {SAMPLERS}")
    velocity = _velocity_fn(model, text, None, None, scales, guided, cross_modal)
    return _step(velocity, xv, xa, t, t_next, sampler, True, xa is not None)


def sample(
    model,
    tokens: jax.Array,
    mask: jax.Array,
    shapes: dict,
    rng: jax.Array,
    *,
    steps: int = 25,
    cfg: float | None = 4.0,
    audio_cfg: float | None = None,
    sampler: str = "euler",
    shift: float = 1.0,
    clean_video: jax.Array | None = None,
    clean_audio: jax.Array | None = None,
    noise: dict | None = None,
    cross_modal: bool | None = None,
    t_start: float = 1.0,
    fps: float | None = None,
    empty_caption=None,
) -> dict:
    """Samples latents from noise; deterministic for a given ``rng``.

    Args:
        model: a :class:`vdiff.models.dit.DiT`.
        tokens: caption tokens ``(B, L)``, or a pretrained encoder's caption embeddings
            ``(B, L, D)`` (then ``empty_caption`` is the guidance's unconditional input).
        mask: caption mask ``(B, L)``.
        shapes: ``{"video": (B, T', H', W', C), "audio": (B, Ta, Ca) or None}``; any
            latent size the patch sizes divide, also sizes not seen in training.
        rng: PRNG key for the initial noise.
        steps: integration steps (Heun uses 2 model calls per step but the last).
        cfg: video guidance scale; None = no guidance (conditional only, one call).
        audio_cfg: audio guidance scale (default: ``cfg``).
        sampler: ``"euler"`` or ``"heun"``.
        shift: time-grid shift.
        clean_video: ``(B, T', H', W', C)`` clean video to condition on (video -> audio).
        clean_audio: ``(B, Ta, Ca)`` clean audio to condition on (audio -> video).
        noise: optional starting noise ``{"video": ..., "audio": ...}`` (then ``rng``
            is unused); :func:`initial_noise` draws it per example so that an
            example's clip does not depend on the batch it is sampled in.
        cross_modal: override of the model's audio<->video attention (False: the
            masked-attention ablation).
        t_start: integrate from this time instead of 1 (the grid is the usual one
            scaled to ``[0, t_start]``); ``noise`` must then hold the latents at
            ``t_start``, e.g. ``(1 - t_start) x0 + t_start eps`` of real clips: how
            much of a clip's content the model keeps from that noise level on.
        fps: the frame rate of the clip to sample (its tokens' times in seconds);
            default the model's (``data.fps``).
        empty_caption: a pretrained encoder's empty caption ``(embedding (L, D), mask
            (L,))`` (see :func:`vdiff.diffusion.flow.empty_captions`).

    Returns:
        ``{"video": (B,T',H',W',C), "audio": (B,Ta,Ca) or None}`` latents; a clean
        input modality is returned unchanged.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not one of {SAMPLERS}")
    video_shape = tuple(shapes["video"])
    audio_shape = shapes.get("audio")
    if clean_audio is not None and audio_shape is None:
        audio_shape = tuple(clean_audio.shape)
    if audio_shape is not None and not model.has_audio:
        raise ValueError("audio was requested but the model has no audio stream")
    if clean_video is not None and clean_video.shape != video_shape:
        raise ValueError(f"clean_video shape {clean_video.shape} != shapes['video'] {video_shape}")
    if clean_audio is not None and tuple(clean_audio.shape) != tuple(audio_shape):
        raise ValueError(f"clean_audio shape {clean_audio.shape} != shapes['audio'] {audio_shape}")
    if clean_video is not None and clean_audio is not None:
        raise ValueError("give at most one of clean_video / clean_audio; nothing is left to sample")
    if tokens.shape[0] != video_shape[0]:
        raise ValueError(f"{tokens.shape[0]} captions for a batch of {video_shape[0]}")

    if noise is None:
        xv, xa = initial_noise(rng, video_shape, audio_shape)
    else:
        xv, xa = noise["video"], noise.get("audio")
        if tuple(xv.shape) != video_shape or (
            audio_shape is not None and (xa is None or tuple(xa.shape) != tuple(audio_shape))
        ):
            raise ValueError(
                f"noise shapes {jax.tree.map(jnp.shape, noise)} != {video_shape}, {audio_shape}"
            )
    if not 0.0 < t_start <= 1.0:
        raise ValueError(f"t_start must be in (0, 1], got {t_start}")
    guided = cfg is not None
    video_scale = 1.0 if cfg is None else float(cfg)
    audio_scale = video_scale if audio_cfg is None else float(audio_cfg)
    scales = jnp.asarray([video_scale, audio_scale], jnp.float32)
    times = None if fps is None else model.clip_times(jnp.asarray([fps]), video_shape[1])[0]
    graphdef, state = nnx.split(model)
    out_v, out_a = _sample_jit(
        graphdef, state, tokens, mask.astype(bool), xv, xa, clean_video, clean_audio,
        jnp.asarray(time_grid(steps, shift) * t_start), scales, times, empty_caption,
        sampler=sampler,
        guided=guided, cross_modal=cross_modal,
    )  # fmt: skip
    return {
        "video": out_v if clean_video is None else clean_video,
        "audio": out_a if clean_audio is None else clean_audio,
    }
