"""Probing, seeking clip decode, audio windows and re-encoding (data_pipelines.video_io)."""

import io

import av
import numpy as np
import pytest
from _media import frame_index, index_frames, make_audio_only, make_mp4, tone

from data_pipelines import video_io
from data_pipelines.video_io import BadVideo, decode_audio, decode_clip, fit_size, probe

SRC_FPS = 8.0
NUM = 24  # 3 s at 8 fps


@pytest.fixture(scope="module")
def clip():
    """24 frames at 8 fps (frame k has grey level 8k), keyframe every 4, a 440 Hz tone."""
    return make_mp4(index_frames(NUM), SRC_FPS, audio=tone(440.0, NUM / SRC_FPS), gop=4)


def expected_indices(start_s, n, fps, src_fps=SRC_FPS, src_n=NUM):
    """Nearest source frame for each target time (no ties in the cases used), clamped."""
    times = start_s + np.arange(n) / fps
    return [min(int(np.floor(t * src_fps + 0.5)), src_n - 1) for t in times]


def test_probe_reports_stream_facts(clip):
    info = probe(clip, verify=True)
    assert info.fps == pytest.approx(SRC_FPS)
    assert info.num_frames == NUM
    assert (info.height, info.width) == (32, 48)
    assert info.duration == pytest.approx(NUM / SRC_FPS, abs=0.05)
    assert info.has_audio
    assert not probe(make_mp4(index_frames(4), SRC_FPS)).has_audio


def _cut(data: bytes, keep: float) -> bytes:
    return data[: int(len(data) * keep)]


def _faststart_cut():
    # Index at the front, media cut short: the container opens, the last frames are gone.
    return _cut(make_mp4(index_frames(NUM), SRC_FPS, gop=4, faststart=True), 0.9)


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda: b"", video_io.EMPTY_FILE),
        (lambda: np.random.default_rng(0).bytes(4096), video_io.NOT_A_VIDEO),
        (lambda: _cut(make_mp4(index_frames(NUM), SRC_FPS), 0.5), video_io.TRUNCATED),
        (_faststart_cut, video_io.TRUNCATED),
        (lambda: make_audio_only(tone(300.0, 1.0)), video_io.NO_VIDEO_STREAM),
    ],
    ids=["empty", "random", "truncated", "truncated_faststart", "audio_only"],
)
def test_probe_rejects_bad_input_with_reason(make, reason):
    data = make()
    with pytest.raises(BadVideo) as err:
        probe(data, verify=True)
    assert err.value.reason == reason
    if reason != video_io.TRUNCATED:  # a front-indexed cut file still has decodable frames
        with pytest.raises(BadVideo):
            decode_clip(data, 0.0, 4, SRC_FPS)


@pytest.mark.parametrize(
    "start_s, n, fps",
    [
        (0.0, NUM, SRC_FPS),  # same rate: every frame once
        (0.0, 8, 4.0),  # half rate: every other frame
        (1.0, 8, 6.0),  # non-integer ratio
        (1.3, 6, SRC_FPS),  # start between keyframes (seek back, decode forward)
        (0.7, 10, 12.0),  # higher rate: some frames repeat
    ],
)
def test_decode_clip_picks_nearest_source_frames(clip, start_s, n, fps):
    frames = decode_clip(clip, start_s, n, fps)
    assert frames.shape == (n, 32, 48, 3) and frames.dtype == np.uint8
    assert frame_index(frames) == expected_indices(start_s, n, fps)


def test_decode_clip_repeats_last_frame_past_the_end(clip):
    frames = decode_clip(clip, 2.5, 8, SRC_FPS)
    got = frame_index(frames)
    assert got == expected_indices(2.5, 8, SRC_FPS)
    assert got[-4:] == [NUM - 1] * 4


def test_decode_clip_converts_higher_source_rate():
    src = make_mp4(index_frames(30), 24.0, gop=6)
    frames = decode_clip(src, 0.25, 7, 8.0)
    assert frame_index(frames) == expected_indices(0.25, 7, 8.0, src_fps=24.0, src_n=30)


def test_fit_size_covers_target_and_centres_crop():
    for src, dst in [((32, 48), (16, 16)), ((720, 1280), (64, 96)), ((50, 30), (32, 32))]:
        fit = fit_size(src, dst)
        assert fit.height >= dst[0] and fit.width >= dst[1]
        assert min(fit.height - dst[0], fit.width - dst[1]) == 0  # shorter side fits exactly
        assert abs(fit.width / fit.height - src[1] / src[0]) < 2 / min(fit.height, fit.width)
        assert fit.top == (fit.height - dst[0]) // 2 and fit.left == (fit.width - dst[1]) // 2


def test_decode_clip_resizes_and_crops_centre():
    # Left and right thirds red and blue, middle green: a centre square crop is all green.
    img = np.zeros((1, 32, 96, 3), np.uint8)
    img[:, :, :32, 0] = img[:, :, 32:64, 1] = img[:, :, 64:, 2] = 255
    data = make_mp4(np.repeat(img, 4, axis=0), SRC_FPS)
    frames = decode_clip(data, 0.0, 2, SRC_FPS, size=(16, 16))
    assert frames.shape == (2, 16, 16, 3)
    mean = frames.reshape(-1, 3).mean(axis=0)
    assert mean[1] > 200 and mean[0] < 40 and mean[2] < 40


def test_decode_audio_length_and_frequency(clip):
    for sr, start, dur in [(16000, 0.5, 1.0), (8000, 0.25, 0.77)]:
        wave = decode_audio(clip, start, dur, sample_rate=sr)
        assert wave.dtype == np.float32 and wave.shape == (round(dur * sr),)
        spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
        peak_hz = np.argmax(spectrum) * sr / len(wave)
        assert abs(peak_hz - 440.0) < 2 * sr / len(wave)
        assert 0.4 < np.abs(wave).max() < 0.6


def test_decode_audio_window_is_in_sync_and_zero_padded():
    # Silence for 1 s, then the tone: a window from 0.5 s must show the onset at 0.5 s in.
    audio = np.concatenate([np.zeros(16000, np.float32), tone(1000.0, 2.0)])
    data = make_mp4(index_frames(NUM), SRC_FPS, audio=audio)
    wave = decode_audio(data, 0.5, 3.0)
    assert wave.shape == (48000,)
    onset = int(np.argmax(np.abs(wave) > 0.1))
    assert abs(onset - 8000) < 160  # within 10 ms
    # Past the 3 s of audio (allowing one AAC frame of encoder tail): exact zeros.
    assert not wave[-8000 + 1024 :].any()


def test_decode_audio_without_audio_stream_is_silence():
    wave = decode_audio(make_mp4(index_frames(4), SRC_FPS), 0.0, 0.5)
    assert wave.shape == (8000,) and not wave.any()


def test_transcode_downscales_with_short_gop_and_is_deterministic(clip):
    out = video_io.transcode(clip, max_resolution=16, gop=2)
    assert out == video_io.transcode(clip, max_resolution=16, gop=2)
    info = probe(out, verify=True)
    assert (info.height, info.width, info.num_frames) == (16, 24, NUM)
    assert info.has_audio
    assert frame_index(decode_clip(out, 0.0, NUM, SRC_FPS)) == list(range(NUM))
    with av.open(io.BytesIO(out)) as c:
        keys = [p.is_keyframe for p in c.demux(c.streams.video[0]) if p.size]
    assert keys == [i % 2 == 0 for i in range(NUM)]
    wave = decode_audio(out, 0.5, 1.0)
    peak_hz = np.argmax(np.abs(np.fft.rfft(wave))) * 16000 / len(wave)
    assert abs(peak_hz - 440.0) < 2.0
