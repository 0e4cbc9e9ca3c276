"""Rotary position embeddings on a shared physical time axis.

The head dimension is split into three rotary groups: time (half of it), height
and width (a quarter each). Positions are ``(time_seconds, h, w)`` per token:

- time is physical seconds multiplied by ``time_scale`` (rotary units per second),
  so any fps or clip length maps to the same angles and video and audio tokens at
  the same instant get the same temporal angle (one frequency table for both);
- height and width are patch-grid indices (integers), so a larger latent grid
  extends positions rather than squeezing them;
- audio tokens sit at one fixed spatial position, the centre of the video grid,
  which keeps them equally far (in rotary terms) from every video patch row/column;
- text tokens get no rotation at all: their order is encoded by the text encoder,
  and in joint attention they act as a position-free set of conditioning tokens.

Rotation pairs dimension ``i`` with ``i + head_dim / 2`` ("rotate half" layout);
angles are computed and applied in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Head-dim sizes ``(time, height, width)``; each even, summing to ``head_dim``."""
    if head_dim % 2 or head_dim < 8:
        raise ValueError(
            f"3D RoPE needs an even head_dim >= 8, got {head_dim}; change model.width/heads"
        )
    dh = 2 * (head_dim // 8)
    return head_dim - 2 * dh, dh, dh


def inv_frequencies(dim: int, theta: float) -> np.ndarray:
    """``dim / 2`` inverse frequencies ``theta ** (-2i / dim)``."""
    return theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)


def rope_angles(
    positions: jax.Array, head_dim: int, *, time_scale: float, theta: float = 10000.0
) -> jax.Array:
    """Rotation angles for ``(..., N, 3)`` positions ``(seconds, h, w)``.

    Returns:
        ``(..., N, head_dim // 2)`` float32 angles.
    """
    dt, dh, dw = rope_split(head_dim)
    pos = jnp.asarray(positions, jnp.float32)
    if pos.shape[-1] != 3:
        raise ValueError(f"rope positions need a last axis of 3 (time, h, w), got {pos.shape}")
    parts = [
        (pos[..., 0:1] * time_scale) * inv_frequencies(dt, theta).astype(np.float32),
        pos[..., 1:2] * inv_frequencies(dh, theta).astype(np.float32),
        pos[..., 2:3] * inv_frequencies(dw, theta).astype(np.float32),
    ]
    return jnp.concatenate(parts, axis=-1)


def rope_angles_1d(length: int, head_dim: int, theta: float = 10000.0) -> jax.Array:
    """``(length, head_dim // 2)`` angles of integer positions (the text encoder)."""
    pos = np.arange(length, dtype=np.float32)[:, None]
    return jnp.asarray(pos * inv_frequencies(head_dim, theta).astype(np.float32)[None])


def apply_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
    """Rotates ``x (B, N, heads, head_dim)`` by ``angles (B|1, N, head_dim/2)`` or ``(N, head_dim/2)``."""
    if angles.ndim == 2:
        angles = angles[None]
    half = x.shape[-1] // 2
    if angles.shape[-1] != half or angles.shape[-2] != x.shape[1]:
        raise ValueError(f"rope angles {angles.shape} do not fit x {x.shape}")
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def video_positions(times: jax.Array, grid_hw: tuple[int, int]) -> jax.Array:
    """Positions of video tokens in patchify order ``(t, h, w)``.

    Args:
        times: seconds of each temporal token, ``(Tt,)`` or ``(B, Tt)``.
        grid_hw: ``(Ht, Wt)`` patch grid.

    Returns:
        ``(B|1, Tt * Ht * Wt, 3)`` positions.
    """
    times = jnp.asarray(times, jnp.float32)
    if times.ndim == 1:
        times = times[None]
    b, tt = times.shape
    ht, wt = grid_hw
    t = jnp.broadcast_to(times[:, :, None, None], (b, tt, ht, wt))
    h = jnp.broadcast_to(jnp.arange(ht, dtype=jnp.float32)[None, None, :, None], (b, tt, ht, wt))
    w = jnp.broadcast_to(jnp.arange(wt, dtype=jnp.float32)[None, None, None, :], (b, tt, ht, wt))
    return jnp.stack([t, h, w], axis=-1).reshape(b, tt * ht * wt, 3)


def audio_positions(times: jax.Array, grid_hw: tuple[int, int] | None) -> jax.Array:
    """Positions of audio tokens: their seconds, at the centre of the video grid.

    Args:
        times: seconds of each audio token, ``(Na,)`` or ``(B, Na)``.
        grid_hw: ``(Ht, Wt)`` of the video tokens they attend with (None -> (1, 1)).

    Returns:
        ``(B|1, Na, 3)`` positions.
    """
    times = jnp.asarray(times, jnp.float32)
    if times.ndim == 1:
        times = times[None]
    ht, wt = grid_hw or (1, 1)
    h = jnp.full_like(times, (ht - 1) / 2.0)
    w = jnp.full_like(times, (wt - 1) / 2.0)
    return jnp.stack([times, h, w], axis=-1)


def video_token_times(
    num_latent_frames: int, patch_t: int, fps: float, temporal_down: int
) -> np.ndarray:
    """Seconds of each temporal video token from a causal video VAE.

    Latent frame 0 covers video frame 0 alone; latent frame ``k >= 1`` covers frames
    ``td*k - td + 1 .. td*k``. A token groups ``patch_t`` latent frames; its time is
    the midpoint of the first and last video frame it covers, divided by ``fps``.
    """
    if num_latent_frames % patch_t:
        raise ValueError(
            f"{num_latent_frames} latent frames are not divisible by patch_t={patch_t}"
        )
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    first = np.array(
        [0 if k == 0 else temporal_down * k - temporal_down + 1 for k in range(num_latent_frames)]
    )
    last = np.array([temporal_down * k for k in range(num_latent_frames)])
    n = num_latent_frames // patch_t
    starts = first[np.arange(n) * patch_t]
    ends = last[np.arange(n) * patch_t + patch_t - 1]
    return ((starts + ends) / 2.0 / fps).astype(np.float32)


def clip_token_times(
    fps: jax.Array, num_latent_frames: int, patch_t: int, temporal_down: int
) -> jax.Array:
    """``(B, T'/pt)`` seconds of each temporal video token of clips whose frames are at
    ``fps`` (B,) frames per second: :func:`video_token_times` per clip, so a token's
    time (and temporal RoPE angle) is its real time whatever the clip's frame rate."""
    frames = video_token_times(num_latent_frames, patch_t, 1.0, temporal_down)
    return jnp.asarray(frames)[None] / jnp.asarray(fps, jnp.float32).reshape(-1, 1)


def audio_token_times(num_latents: int, patch: int, latents_per_second: float) -> np.ndarray:
    """Seconds of each audio token: the midpoint of the span of ``patch`` latents it covers."""
    if num_latents % patch:
        raise ValueError(
            f"{num_latents} audio latents are not divisible by model.audio_patch={patch}"
        )
    n = num_latents // patch
    return ((np.arange(n) + 0.5) * patch / latents_per_second).astype(np.float32)


ABS_TIME_PERIODS = (8.0, 4.0, 2.0, 1.0, 0.5)  # seconds
ABS_SPACE_FREQS = (0.5, 1.0, 2.0, 4.0)  # x pi, on coordinates normalised to [-1, 1]
ABS_FEATURES = 2 * len(ABS_TIME_PERIODS) + 4 * len(ABS_SPACE_FREQS) + 1


def absolute_video_features(times: jax.Array, grid_hw: tuple[int, int]) -> jax.Array:
    """Where each video token sits in absolute terms, for ``model.abs_pos``.

    RoPE only tells a token how far it is from another; these features tell it how far
    it is from the frame's edges and from the clip's start (walls and the first latent
    frame, which a causal VAE codes from one frame alone). Rows/columns are normalised
    to [-1, 1] (token centres), so the same features describe any bucket size;
    time is in seconds. Layout: sin/cos of time at :data:`ABS_TIME_PERIODS`, sin/cos of
    row and column at :data:`ABS_SPACE_FREQS`, and a first-temporal-token flag.

    Args:
        times: seconds of each temporal video token, ``(Tt,)`` or ``(B, Tt)``.
        grid_hw: ``(Ht, Wt)`` patch grid.

    Returns:
        ``(B|1, Tt * Ht * Wt, ABS_FEATURES)`` float32, in patchify order.
    """
    pos = video_positions(times, grid_hw)  # (B, N, 3): seconds, row, column
    b, n, _ = pos.shape
    w_t = jnp.asarray([2 * np.pi / p for p in ABS_TIME_PERIODS], jnp.float32)
    w_s = jnp.asarray([np.pi * f for f in ABS_SPACE_FREQS], jnp.float32)
    sizes = jnp.asarray([grid_hw[0], grid_hw[1]], jnp.float32)
    rc = (pos[..., 1:] + 0.5) / sizes * 2.0 - 1.0  # (B, N, 2) in (-1, 1)
    at = pos[..., :1] * w_t  # (B, N, 5)
    asp = (rc[..., :, None] * w_s).reshape(b, n, -1)  # (B, N, 8)
    # patchify order is (t, h, w): the first Ht * Wt tokens are the first temporal token
    first = jnp.broadcast_to((jnp.arange(n) < grid_hw[0] * grid_hw[1])[None, :, None], (b, n, 1))
    parts = [jnp.sin(at), jnp.cos(at), jnp.sin(asp), jnp.cos(asp), first.astype(jnp.float32)]
    return jnp.concatenate(parts, axis=-1)
