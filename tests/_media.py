"""Small in-memory media files for the data tests, written with PyAV directly.

Kept apart from ``data_pipelines.mp4`` so the decode and ingest tests check the readers
against an independent writer.
"""

import io
import tempfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def index_frames(num_frames: int, height: int = 32, width: int = 48, step: int = 8) -> np.ndarray:
    """Frames whose uniform grey level encodes their index: frame k has value ``step * k``.

    Args:
        num_frames: Number of frames; ``step * (num_frames - 1)`` must stay below 256.
        height: Frame height in pixels (even, for yuv420p).
        width: Frame width in pixels (even).
        step: Grey-level step between consecutive frames.

    Returns:
        uint8 array (num_frames, height, width, 3).
    """
    if step * (num_frames - 1) > 255:
        raise ValueError(f"{num_frames} frames at step {step} overflow uint8")
    levels = (np.arange(num_frames) * step).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (num_frames, height, width, 3)).copy()


def frame_index(frames: np.ndarray, step: int = 8) -> list[int]:
    """Recovers the indices encoded by :func:`index_frames` (after lossy coding)."""
    means = frames.reshape(frames.shape[0], -1).mean(axis=1)
    return [round(m / step) for m in means]


def tone(freq: float, seconds: float, sample_rate: int = 16000, amp: float = 0.5) -> np.ndarray:
    """A float32 mono sine tone."""
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _add_audio(container, stream, audio: np.ndarray, sample_rate: int) -> None:
    chunk = 1024
    for i in range(0, len(audio), chunk):
        part = audio[i : i + chunk][None, :].astype(np.float32)
        frame = av.AudioFrame.from_ndarray(part, format="flt", layout="mono")
        frame.sample_rate = sample_rate
        frame.pts = i
        frame.time_base = Fraction(1, sample_rate)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)


def make_mp4(
    frames: np.ndarray,
    fps: float,
    *,
    audio: np.ndarray | None = None,
    sample_rate: int = 16000,
    gop: int = 4,
    faststart: bool = False,
) -> bytes:
    """Encodes uint8 frames (T, H, W, 3) (+ optional mono float audio) as H.264/AAC mp4 bytes.

    ``faststart`` puts the index (moov) before the media data, as streaming files do.
    """
    if not faststart:
        buf = io.BytesIO()
        _write_mp4(buf, frames, fps, audio, sample_rate, gop, {})
        return buf.getvalue()
    # faststart rewrites the file to move the index to the front, so it needs a real file.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip.mp4"
        _write_mp4(str(path), frames, fps, audio, sample_rate, gop, {"movflags": "faststart"})
        return path.read_bytes()


def _write_mp4(target, frames, fps, audio, sample_rate, gop, options) -> None:
    with av.open(target, mode="w", format="mp4", options=options) as container:
        rate = Fraction(fps).limit_denominator(1001)
        vs = container.add_stream("libx264", rate=rate)
        vs.width, vs.height = frames.shape[2], frames.shape[1]
        vs.pix_fmt = "yuv420p"
        vs.codec_context.gop_size = gop
        vs.codec_context.options = {"crf": "12", "preset": "veryfast"}
        aus = None
        if audio is not None:
            aus = container.add_stream("aac", rate=sample_rate)
            aus.layout = "mono"
        for i, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            frame.pts = i
            frame.time_base = 1 / rate
            for packet in vs.encode(frame):
                container.mux(packet)
        for packet in vs.encode(None):
            container.mux(packet)
        if aus is not None:
            _add_audio(container, aus, audio, sample_rate)


def make_audio_only(audio: np.ndarray, sample_rate: int = 16000) -> bytes:
    """An mp4 (m4a) with one AAC stream and no video stream."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        aus = container.add_stream("aac", rate=sample_rate)
        aus.layout = "mono"
        _add_audio(container, aus, audio, sample_rate)
    return buf.getvalue()
