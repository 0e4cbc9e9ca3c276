"""Log-mel features: framing, click timing against video bounces, Griffin-Lim, resampling."""

import numpy as np
import pytest

from data_pipelines.audio import (
    LOG_EPS,
    istft,
    log_mel,
    log_mel_jax,
    mel_filterbank,
    mel_to_wave,
    resample,
    stft,
)
from data_pipelines.mp4 import decode_mp4, encode_mp4
from data_pipelines.shapes.render import click, render_audio, render_video
from data_pipelines.shapes.scene import bounce_events, sample_scene, scene_rng, trajectory
from vdiff.eval.oracle import analyze_video
from vdiff.eval.sync import audio_onsets, dominant_pitch_colour

SR = 16000


def _flux_peak_frame(lm: np.ndarray, near: float, radius: int = 5) -> int:
    """Log-mel frame of the largest spectral-flux rise within +-radius of frame ``near``."""
    flux = np.zeros(len(lm))
    flux[1:] = np.maximum(np.diff(lm, axis=0), 0).sum(-1)
    lo = max(0, round(near) - radius)
    return lo + int(np.argmax(flux[lo : round(near) + radius + 1]))


def test_log_mel_framing_and_floor():
    wave = np.zeros(32000, np.float32)
    lm = log_mel(wave)
    assert lm.shape == (1 + 32000 // 160, 64) and lm.dtype == np.float32
    assert np.allclose(lm, np.log(LOG_EPS))  # silence sits exactly on the floor
    # A full-scale sine has STFT magnitude ~1 at its bin.
    t = np.arange(16000) / SR
    mag = np.abs(stft(np.sin(2 * np.pi * 1000 * t).astype(np.float32)))
    assert abs(mag[50].max() - 1.0) < 0.05
    with pytest.raises(ValueError, match="mono"):
        log_mel(np.zeros((2, 100), np.float32))


def test_mel_filterbank_covers_the_band():
    fb = mel_filterbank(16000, 512, 64)
    assert fb.shape == (64, 257)
    assert np.all(fb.max(axis=1) > 0.3)  # no empty filter
    assert np.all(np.diff(fb.argmax(axis=1)) >= 0)  # centres ascend
    with pytest.raises(ValueError, match="fmax"):
        mel_filterbank(16000, 512, 64, fmax=9000)


def test_click_lands_in_expected_frame_and_video_shows_the_bounce():
    scene = sample_scene(scene_rng(0, "train", 2))
    events = bounce_events(scene)
    assert events
    frames, fps, wave, _ = decode_mp4(
        encode_mp4(render_video(scene), scene.fps, render_audio(scene))
    )
    lm = log_mel(wave)
    tracks = analyze_video(frames)["objects"]
    truth = trajectory(scene)
    for e in events:
        # Audio: the onset is in log-mel frame time * 100 (+-1).
        assert abs(_flux_peak_frame(lm, e["time_s"] * 100) - e["time_s"] * 100) <= 1
        # Video: the frame nearest the contact is where the motion along that axis reverses,
        # in the true trajectory and in the track read back from the decoded pixels.
        k, ax = e["frame_index"], 0 if e["axis"] == "x" else 1
        assert round(e["time_s"] * fps) == k
        for p in (truth[:, e["shape"], ax], tracks[e["colour"]]["track"][:, ax]):
            before, after = p[k] - p[k - 2], p[k + 2] - p[k]
            assert before * after < 0


def test_single_click_time_precision():
    n = np.arange(2 * SR)
    for t in (0.2, 0.7234, 1.4999):
        wave = click(n / SR - t, 1097.6).astype(np.float32)
        lm = log_mel(wave)
        assert abs(_flux_peak_frame(lm, t * 100) - t * 100) <= 1
        (onset,) = audio_onsets(wave)
        assert abs(onset - t) <= 0.011


def test_stft_istft_round_trip():
    wave = np.random.default_rng(0).standard_normal(8000).astype(np.float32) * 0.1
    back = istft(stft(wave), length=len(wave))
    assert np.abs(back - wave).max() < 1e-5


def test_mel_to_wave_keeps_click_onsets_and_pitch():
    for i in range(4):
        scene = sample_scene(scene_rng(1, "train", i))
        wave = render_audio(scene)
        rebuilt = mel_to_wave(log_mel(wave), iters=32, length=len(wave))
        assert rebuilt.shape == wave.shape and rebuilt.dtype == np.float32
        truth = np.asarray([e["time_s"] for e in bounce_events(scene)])
        found = audio_onsets(rebuilt)
        assert len(found) == len(truth)
        assert np.abs(found - truth).max() <= 0.02  # within 2 log-mel frames
        for e, t in zip(bounce_events(scene), found):
            assert dominant_pitch_colour(rebuilt, t) == e["colour"]
    # Deterministic (fixed initial phase).
    lm = log_mel(wave)
    assert np.array_equal(mel_to_wave(lm, iters=4), mel_to_wave(lm, iters=4))


def test_resample_keeps_pitch_and_duration():
    t = np.arange(SR) / SR
    wave = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    for dst in (8000, 22050, 44100):
        out = resample(wave, SR, dst)
        assert out.dtype == np.float32 and abs(len(out) - dst) <= 1
        spec = np.abs(np.fft.rfft(out))
        assert abs(np.fft.rfftfreq(len(out), 1 / dst)[spec.argmax()] - 440) <= 1.5
    assert np.array_equal(resample(wave, SR, SR), wave)
    with pytest.raises(ValueError, match="positive"):
        resample(wave, SR, 0)


def test_log_mel_jax_matches_numpy():
    scene = sample_scene(scene_rng(0, "train", 3))
    noise = np.random.default_rng(0).standard_normal(32000).astype(np.float32)
    wave = render_audio(scene) + 0.3 * noise
    ref = log_mel(wave)
    got = np.asarray(log_mel_jax(np.stack([wave, wave])))
    assert got.shape == (2, *ref.shape)
    loud = ref > np.log(LOG_EPS) + 2  # float32 FFT rounding only matters near the floor
    assert loud.mean() > 0.9
    assert np.abs(got[1][loud] - ref[loud]).max() < 1e-2
