"""Pixels and sound for a shapes Scene.

Video: shapes are drawn at sub-pixel centres with 4x4 supersampled coverage (anti-aliased
edges), so motion is smooth even at 32x32. Audio: one click per wall contact, placed at the
exact contact time in seconds, pitched by the colour of the shape that hit the wall.
"""

from __future__ import annotations

import numpy as np

from data_pipelines.shapes.scene import (
    BACKGROUNDS,
    COLOURS,
    PITCHES,
    Scene,
    bounce_events,
    trajectory,
)

SUPERSAMPLE = 4
CLICK_AMPLITUDE = 0.5
CLICK_ATTACK_S = 0.001
CLICK_DECAY_S = 0.025  # the envelope falls to -40 dB over this time after the attack
_CLICK_TAU_S = CLICK_DECAY_S / np.log(100.0)


def subpixel_points(start: int, stop: int) -> np.ndarray:
    """Sub-sample coordinates (in pixels) of pixels ``start .. stop - 1`` along one axis."""
    return (np.arange(start * SUPERSAMPLE, stop * SUPERSAMPLE) + 0.5) / SUPERSAMPLE


def coverage(shape: str, cx: float, cy: float, size: float, xs: np.ndarray, ys: np.ndarray):
    """Fraction of each pixel inside the shape, from sub-sample points xs (W*ss,), ys (H*ss,)."""
    r = size / 2
    dx = xs[None, :] - cx
    dy = ys[:, None] - cy
    if shape == "circle":
        inside = dx**2 + dy**2 <= r**2
    elif shape == "square":
        inside = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    elif shape == "triangle":
        # Apex up, base down: the half-width grows from 0 at the top to r at the bottom.
        inside = (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    h, w = len(ys) // SUPERSAMPLE, len(xs) // SUPERSAMPLE
    return inside.reshape(h, SUPERSAMPLE, w, SUPERSAMPLE).mean(axis=(1, 3))


def render_video(scene: Scene) -> np.ndarray:
    """Renders the scene as uint8 RGB frames (T, H, W, 3)."""
    n = scene.resolution
    sub = subpixel_points(0, n)
    traj = trajectory(scene)
    bg = np.asarray(BACKGROUNDS[scene.background], np.float64)
    frames = np.empty((scene.num_frames, n, n, 3), np.uint8)
    for t in range(scene.num_frames):
        img = np.broadcast_to(bg, (n, n, 3)).copy()
        for i, s in enumerate(scene.shapes):
            a = coverage(s.shape, traj[t, i, 0], traj[t, i, 1], s.size, sub, sub)[..., None]
            img = a * np.asarray(COLOURS[s.colour], np.float64) + (1 - a) * img
        frames[t] = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return frames


def click(times_s: np.ndarray, pitch_hz: float) -> np.ndarray:
    """The click waveform at times relative to its onset (seconds); zero before the onset."""
    t = np.asarray(times_s, np.float64)
    env = np.where(
        t < CLICK_ATTACK_S,
        t / CLICK_ATTACK_S,
        np.exp(-(t - CLICK_ATTACK_S) / _CLICK_TAU_S),
    )
    env = np.where((t < 0) | (t > CLICK_ATTACK_S + 1.5 * CLICK_DECAY_S), 0.0, env)
    return CLICK_AMPLITUDE * env * np.sin(2 * np.pi * pitch_hz * t)


def render_audio(scene: Scene, sample_rate: int = 16000) -> np.ndarray:
    """Renders the clicks as float32 mono audio of duration T / fps seconds."""
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    num = round(scene.num_frames / scene.fps * sample_rate)
    wave = np.zeros(num, np.float64)
    span = int(np.ceil((CLICK_ATTACK_S + 1.5 * CLICK_DECAY_S) * sample_rate)) + 2
    for e in bounce_events(scene):
        start = int(np.floor(e["time_s"] * sample_rate))
        idx = np.arange(start, min(start + span, num))
        wave[idx] += click(idx / sample_rate - e["time_s"], PITCHES[e["colour"]])
    return wave.astype(np.float32)
