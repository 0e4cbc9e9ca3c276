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
import numpy as np
from flax import nnx

from vdiff.diffusion.flow import empty_captions, shift_t

SAMPLERS = ("euler", "heun")


def time_grid(steps: int, shift: float = 1.0) -> np.ndarray:
    """``steps + 1`` times from 1 down to 0, shifted like training (``shift > 1``: more at high noise)."""
    if steps < 1:
        raise ValueError(f"sampling needs steps >= 1, got {steps}")
    return np.asarray(shift_t(np.linspace(1.0, 0.0, steps + 1), shift), np.float32)


def _velocity_fn(model, text, clean_video, clean_audio, scales, guided):
    """Returns ``v(xv, xa, t) -> (vv, va)`` for scalar t, with guidance and clean modalities."""

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
        vv, va = model(xv, tv, None, None, text=text, **audio_kw)
        if guided:
            vv = vv[b:] + scales[0] * (vv[:b] - vv[b:])
            if va is not None:
                va = va[b:] + scales[1] * (va[:b] - va[b:])
        return vv, va

    return velocity


@functools.partial(jax.jit, static_argnames=("graphdef", "sampler", "guided"))
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
    *,
    sampler,
    guided,
):
    model = nnx.merge(graphdef, state)
    if guided:
        empty_tok, empty_mask = empty_captions(tokens, mask)
        tokens = jnp.concatenate([tokens, empty_tok], axis=0)
        mask = jnp.concatenate([mask, empty_mask], axis=0)
    text = model.encode_text(tokens, mask)
    velocity = _velocity_fn(model, text, clean_video, clean_audio, scales, guided)
    sample_video, sample_audio = clean_video is None, xa is not None and clean_audio is None

    def update(x, v, dt, on):
        return x + dt * v if (on and x is not None) else x

    def step(i, carry):
        xv, xa = carry
        t, t_next = grid[i], grid[i + 1]
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

    return jax.lax.fori_loop(0, grid.shape[0] - 1, step, (xv, xa))


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
) -> dict:
    """Samples latents from noise; deterministic for a given ``rng``.

    Args:
        model: a :class:`vdiff.models.dit.DiT`.
        tokens: caption tokens ``(B, L)``.
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

    kv, ka = jax.random.split(rng)
    xv = jax.random.normal(kv, video_shape, jnp.float32)
    xa = None if audio_shape is None else jax.random.normal(ka, tuple(audio_shape), jnp.float32)
    guided = cfg is not None
    video_scale = 1.0 if cfg is None else float(cfg)
    audio_scale = video_scale if audio_cfg is None else float(audio_cfg)
    scales = jnp.asarray([video_scale, audio_scale], jnp.float32)
    graphdef, state = nnx.split(model)
    out_v, out_a = _sample_jit(
        graphdef, state, tokens, mask.astype(bool), xv, xa, clean_video, clean_audio,
        jnp.asarray(time_grid(steps, shift)), scales, sampler=sampler, guided=guided,
    )  # fmt: skip
    return {
        "video": out_v if clean_video is None else clean_video,
        "audio": out_a if clean_audio is None else clean_audio,
    }
