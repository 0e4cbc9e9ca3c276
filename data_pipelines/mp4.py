"""Encode and fully decode small mp4 clips (H.264 video + optional AAC mono audio) with PyAV.

``encode_mp4`` is deterministic: the same frames and audio give the same bytes, because the
encoders run single-threaded and the muxer is told to leave out wall-clock metadata. That is
what makes a synthesised dataset byte-identical across runs.

``decode_mp4`` is a plain full decode (every frame, all audio) for tests and the oracle; the
training pipeline has its own seeking decoder.
"""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np

# Low enough that the 2x2 chroma subsampling of yuv420p is the main colour loss, not the encoder.
DEFAULT_CRF = 18
AUDIO_BITRATE = 64_000


def _rate(fps: float) -> Fraction:
    """A rational frame rate for ``fps`` (e.g. 8.0 -> 8/1, 29.97 -> 30000/1001)."""
    if not np.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    return Fraction(fps).limit_denominator(1001)


def rgb_to_yuv420p(frames: np.ndarray) -> np.ndarray:
    """BT.601 limited-range RGB -> planar yuv420p, uint8 (T, H * 3 // 2, W).

    Done in numpy rather than by the encoder's scaler so the encoder input is bit-exact and
    reproducible (chroma is the mean of each 2x2 block).
    """
    x = frames.astype(np.float64) / 255.0
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = 16 + 65.481 * r + 128.553 * g + 24.966 * b
    cb = 128 - 37.797 * r - 74.203 * g + 112.0 * b
    cr = 128 + 112.0 * r - 93.786 * g - 18.214 * b
    t, h, w = y.shape

    def half(c):
        return c.reshape(t, h // 2, 2, w // 2, 2).mean(axis=(2, 4)).reshape(t, h // 4, w)

    planes = np.concatenate([y, half(cb), half(cr)], axis=1)
    return np.clip(np.round(planes), 0, 255).astype(np.uint8)


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(
            f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {tuple(frames.shape)}"
        )
    t, h, w, _ = frames.shape
    if t == 0:
        raise ValueError("frames is empty: an mp4 needs at least one frame")
    if h % 2 or w % 2:
        # yuv420p stores chroma at half resolution, so libx264 refuses odd sizes.
        raise ValueError(
            f"H.264 yuv420p needs even height and width, got {h}x{w}; crop or pad by one pixel"
        )
    return np.ascontiguousarray(frames)


def encode_mp4(
    frames: np.ndarray,
    fps: float,
    audio: np.ndarray | None = None,
    sample_rate: int = 16000,
    gop: int = 8,
    crf: int = DEFAULT_CRF,
) -> bytes:
    """Encodes frames (and mono audio) into mp4 bytes.

    Args:
        frames: uint8 array (T, H, W, 3), RGB; H and W must be even.
        fps: Frame rate.
        audio: Optional float32 mono waveform in [-1, 1] (longer or shorter than T/fps is kept
            as is).
        sample_rate: Audio sample rate in Hz.
        gop: Keyframe interval in frames (a seeking decoder jumps to these).
        crf: libx264 constant rate factor (lower = better quality, bigger files).

    Returns:
        The mp4 file as bytes; identical inputs give identical bytes.

    Raises:
        ValueError: on a bad shape, dtype, odd size or non-positive rate.
    """
    frames = _check_frames(frames)
    rate = _rate(fps)
    if gop < 1:
        raise ValueError(f"gop must be >= 1, got {gop}")
    t, h, w, _ = frames.shape
    buf = io.BytesIO()
    # fflags=bitexact keeps version strings and wall-clock metadata out of the container.
    with av.open(buf, mode="w", format="mp4", options={"fflags": "+bitexact"}) as out:
        vs = out.add_stream(
            "libx264",
            rate=rate,
            options={
                "crf": str(crf),
                "g": str(gop),
                "keyint_min": str(gop),
                "sc_threshold": "0",  # keyframes exactly every `gop` frames, never on scene cuts
                "threads": "1",  # the same bytes whatever the machine's core count
                "preset": "medium",
                # MB-tree makes tiny (32x32) encodes depend on earlier encodes in the same
                # process (measured); without it the same input always gives the same bytes.
                "x264-params": "mbtree=0",
            },
        )
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.codec_context.thread_count = 1
        vs.time_base = 1 / rate
        vs.codec_context.flags |= av.codec.context.Flags.bitexact
        as_ = None
        if audio is not None:
            audio = np.asarray(audio, dtype=np.float32)
            if audio.ndim != 1:
                raise ValueError(f"audio must be mono (N,), got shape {audio.shape}")
            if sample_rate <= 0:
                raise ValueError(f"sample_rate must be positive, got {sample_rate}")
            as_ = out.add_stream("aac", rate=int(sample_rate))
            as_.layout = "mono"
            as_.bit_rate = AUDIO_BITRATE
            as_.codec_context.flags |= av.codec.context.Flags.bitexact
        yuv = rgb_to_yuv420p(frames)
        for i in range(t):
            frame = av.VideoFrame.from_ndarray(yuv[i], format="yuv420p")
            frame.pts = i
            frame.time_base = 1 / rate
            out.mux(vs.encode(frame))
        out.mux(vs.encode(None))
        if as_ is not None:
            _encode_audio(out, as_, audio, int(sample_rate))
    return buf.getvalue()


def _encode_audio(out, stream, audio: np.ndarray, sample_rate: int) -> None:
    """Feeds the waveform to the AAC encoder in its native frame size."""
    chunk = stream.codec_context.frame_size or 1024
    data = np.clip(audio, -1.0, 1.0).astype(np.float32)
    for start in range(0, len(data), chunk):
        piece = data[start : start + chunk]
        # fltp mono: one plane, shape (1, n).
        frame = av.AudioFrame.from_ndarray(piece[None, :], format="fltp", layout="mono")
        frame.sample_rate = sample_rate
        frame.pts = start
        frame.time_base = Fraction(1, sample_rate)
        out.mux(stream.encode(frame))
    out.mux(stream.encode(None))


def decode_mp4(data: bytes) -> tuple[np.ndarray, float, np.ndarray | None, int]:
    """Decodes a whole mp4 held in memory.

    Args:
        data: The mp4 file bytes.

    Returns:
        ``(frames, fps, audio, sample_rate)``: uint8 RGB frames (T, H, W, 3), the frame rate,
        the float32 mono waveform (``None`` when there is no audio track; trimmed to the video
        duration T/fps when longer, which drops the encoder's end padding) and its sample rate
        (0 when there is no audio).

    Raises:
        ValueError: when the bytes hold no video stream or cannot be parsed.
    """
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except av.error.FFmpegError as e:
        raise ValueError(f"not a readable mp4 ({e}); re-encode it with vdiff data synth") from e
    with container:
        if not container.streams.video:
            raise ValueError("mp4 has no video stream")
        vs = container.streams.video[0]
        rate = vs.average_rate or vs.guessed_rate or vs.base_rate
        fps = float(rate) if rate else 0.0
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    video = np.stack(frames) if frames else np.zeros((0, vs.height, vs.width, 3), np.uint8)

    audio, sr = None, 0
    with av.open(io.BytesIO(data), mode="r") as container:
        if container.streams.audio:
            astream = container.streams.audio[0]
            sr = int(astream.rate)
            # Downmix to mono float32 in one pass; the resampler also removes planar layouts.
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sr)
            pieces = []
            for frame in container.decode(audio=0):
                for out in resampler.resample(frame):
                    pieces.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                pieces.append(out.to_ndarray().reshape(-1))
            audio = np.concatenate(pieces).astype(np.float32) if pieces else np.zeros(0, np.float32)
            if fps > 0:
                n = round(len(video) / fps * sr)
                audio = audio[:n]
    return video, fps, audio, sr
