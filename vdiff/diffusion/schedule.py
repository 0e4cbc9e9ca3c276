"""The sampling schedule: time grid, timestep shift and starting noise.

Pure jax/numpy with no model code, so that both the training-side sampler
(:mod:`vdiff.diffusion.samplers`, :mod:`vdiff.sampling`) and a server that loads an
export bundle (:mod:`vdiff.serving`, which must not import flax) draw the same noise
and step through the same times.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def shift_t(t: jax.Array, shift: float) -> jax.Array:
    """Timestep shift ``shift t / (1 + (shift - 1) t)`` (identity at shift 1; keeps 0 and 1)."""
    if shift <= 0:
        raise ValueError(f"timestep shift must be > 0, got {shift}")
    return shift * t / (1.0 + (shift - 1.0) * t)


def time_grid(steps: int, shift: float = 1.0) -> np.ndarray:
    """``steps + 1`` times from 1 down to 0, shifted like training (``shift > 1``: more at high noise)."""
    if steps < 1:
        raise ValueError(f"sampling needs steps >= 1, got {steps}")
    return np.asarray(shift_t(np.linspace(1.0, 0.0, steps + 1), shift), np.float32)


def noise_key(seed: int, prompt_index: int) -> jax.Array:
    """The PRNG key of a clip's starting noise: a function of (seed, prompt index) only."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), prompt_index)


def initial_noise(rng: jax.Array, video_shape, audio_shape=None):
    """Standard-normal starting noise ``(video, audio or None)`` from one key."""
    kv, ka = jax.random.split(rng)
    xv = jax.random.normal(kv, tuple(video_shape), jnp.float32)
    xa = None if audio_shape is None else jax.random.normal(ka, tuple(audio_shape), jnp.float32)
    return xv, xa


def per_example_noise(rngs, video_shape, audio_shape=None) -> dict:
    """Stacked :func:`initial_noise` of one key per example (shapes without batch)."""
    pairs = [initial_noise(k, (1, *video_shape), audio_shape and (1, *audio_shape)) for k in rngs]
    out = {"video": jnp.concatenate([p[0] for p in pairs])}
    if audio_shape is not None:
        out["audio"] = jnp.concatenate([p[1] for p in pairs])
    return out
