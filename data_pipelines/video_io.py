"""Robust video and audio decoding for vdiff records (PyAV / FFmpeg).

Every function takes the encoded container bytes (as stored in a record) and either returns
arrays or raises :class:`BadVideo` with a short machine-readable ``reason``. Ingest uses the
reasons to count and report skipped inputs; the training pipeline uses them to drop a bad clip
without crashing a worker.

Time convention: ``t = 0`` is the first video frame's presentation time, for video and audio
alike, so a clip's frames and its audio window stay in sync even when a container's streams do
not start at zero.
"""

import dataclasses
import io
import math
from fractions import Fraction
from typing import NamedTuple

import av
import numpy as np

# Skip reasons shared with ingest's manifest.
EMPTY_FILE = "empty_file"
NOT_A_VIDEO = "not_a_video"
TRUNCATED = "truncated"
NO_VIDEO_STREAM = "no_video_stream"
DECODE_ERROR = "decode_error"

# Errors FFmpeg/PyAV raise on malformed input (FFmpegError subclasses ValueError; some demuxer
# and codec paths surface as OSError, EOFError or IndexError instead).
_DECODE_ERRORS = (av.FFmpegError, ValueError, OSError, EOFError, IndexError, RuntimeError)


class BadVideo(Exception):  # noqa: N818 (the name says what the caller gets: a bad video)
    """The bytes are not a decodable video.

    Attributes:
        reason: A short code (``empty_file``, ``not_a_video``, ``truncated``,
            ``no_video_stream``, ``decode_error``) used to count skips.
        detail: Human-readable explanation (may be empty).
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe` learns about a video.

    Attributes:
        fps: Average frame rate (frames per second).
        num_frames: Frame count (exact when probed with ``verify=True``).
        width: Decoded frame width in pixels.
        height: Decoded frame height in pixels.
        duration: Length in seconds.
        has_audio: Whether the container has an audio stream.
    """

    fps: float
    num_frames: int
    width: int
    height: int
    duration: float
    has_audio: bool


class Fit(NamedTuple):
    """Resize-then-crop plan from :func:`fit_size`: resize to (height, width), then crop."""

    height: int
    width: int
    top: int
    left: int


def fit_size(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> Fit:
    """Plans an aspect-preserving resize of the shorter side plus a centre crop.

    The source is scaled so that it just covers ``dst_hw``, then the centre ``dst_hw``
    window is cut out, so nothing is stretched.

    Args:
        src_hw: Source (height, width).
        dst_hw: Target (height, width).

    Returns:
        The resize size and the crop's top-left corner.
    """
    (sh, sw), (dh, dw) = src_hw, dst_hw
    if min(sh, sw, dh, dw) <= 0:
        raise ValueError(f"sizes must be positive, got src {src_hw} dst {dst_hw}")
    scale = max(dh / sh, dw / sw)
    rh, rw = max(dh, round(sh * scale)), max(dw, round(sw * scale))
    return Fit(rh, rw, (rh - dh) // 2, (rw - dw) // 2)


def _looks_like_container(data: bytes) -> bool:
    """True if the bytes start like a known video container (so a failed open means damage)."""
    head = data[:12]
    return (
        head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip")  # ISO BMFF (mp4/mov)
        or head[:4] == b"\x1aE\xdf\xa3"  # Matroska / WebM (EBML)
        or head[:4] == b"RIFF"  # AVI
        or head[:3] == b"FLV"
        or head[:4] == b"OggS"
        or (len(data) > 188 and data[0] == 0x47 and data[188] == 0x47)  # MPEG-TS sync bytes
    )


def _open(data: bytes):
    """Opens container bytes for reading, mapping every failure to :class:`BadVideo`."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"expected encoded video bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise BadVideo(EMPTY_FILE, "zero bytes")
    try:
        return av.open(io.BytesIO(data), mode="r")
    except _DECODE_ERRORS as e:
        if _looks_like_container(data):
            raise BadVideo(TRUNCATED, f"container header found but unreadable ({e})") from e
        raise BadVideo(NOT_A_VIDEO, f"no known container ({e})") from e


def _video_stream(container):
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise BadVideo(NO_VIDEO_STREAM, f"streams: {', '.join(kinds)}")
    return container.streams.video[0]


def _origin(container) -> float:
    """Presentation time (s) of t = 0: the video stream's start, else the container's."""
    if container.streams.video:
        vs = container.streams.video[0]
        if vs.start_time is not None:
            return float(vs.start_time * vs.time_base)
    if container.start_time is not None:
        return container.start_time / av.time_base
    return 0.0


def _stream_fps(vs) -> float:
    rate = vs.average_rate or vs.guessed_rate or vs.base_rate
    return float(rate) if rate else 0.0


def probe(data: bytes, *, verify: bool = False) -> VideoInfo:
    """Reads a video's basic facts and checks that its first frame decodes.

    Args:
        data: Encoded container bytes.
        verify: Decode every frame too (slower). Catches files truncated after a
            front-loaded index, and makes ``num_frames`` exact.

    Returns:
        The video's :class:`VideoInfo`.

    Raises:
        BadVideo: For empty, unrecognised, truncated or audio-only input, or any decode error.
    """
    with _open(data) as container:
        vs = _video_stream(container)
        cut = False  # set when the demuxer hands over a packet cut short by the end of data

        def frames():
            nonlocal cut
            for packet in container.demux(vs):
                cut = cut or packet.is_corrupt
                yield from packet.decode()

        first, count, last_t = None, 0, 0.0
        try:
            for frame in frames():
                if first is None:
                    first = frame
                count += 1
                if frame.time is not None:
                    last_t = frame.time
                if not verify:
                    break
        except _DECODE_ERRORS as e:
            raise BadVideo(TRUNCATED if first is None or cut else DECODE_ERROR, str(e)) from e
        if first is None:
            raise BadVideo(TRUNCATED, "no video frame could be decoded")
        if verify and cut:
            raise BadVideo(TRUNCATED, f"last packet cut short after {count} frames")
        fps = _stream_fps(vs)
        if vs.duration:
            duration = float(vs.duration * vs.time_base)
        elif container.duration:
            duration = container.duration / av.time_base
        else:
            duration = 0.0
        declared = vs.frames or (round(duration * fps) if fps > 0 else 0)
        if verify:
            if declared and count < declared:
                raise BadVideo(TRUNCATED, f"decoded {count} of {declared} frames")
            num_frames = count
            if fps <= 0 and count > 1:
                fps = (count - 1) / max(last_t - _origin(container), 1e-9)
        else:
            num_frames = declared or 1
        if fps <= 0:
            raise BadVideo(DECODE_ERROR, "unknown frame rate")
        if duration <= 0:
            duration = num_frames / fps
        return VideoInfo(
            fps=fps,
            num_frames=int(num_frames),
            width=first.width,
            height=first.height,
            duration=duration,
            has_audio=bool(container.streams.audio),
        )


def _to_rgb(frame, size: tuple[int, int] | None) -> np.ndarray:
    """Converts (and optionally resizes + centre-crops) a frame in C via swscale."""
    if size is None:
        return frame.to_ndarray(format="rgb24")
    fit = fit_size((frame.height, frame.width), size)
    # AREA averages all covered pixels when shrinking (no aliasing); bilinear when growing.
    interp = "AREA" if fit.height < frame.height else "BILINEAR"
    img = frame.reformat(width=fit.width, height=fit.height, format="rgb24", interpolation=interp)
    arr = img.to_ndarray()
    return arr[fit.top : fit.top + size[0], fit.left : fit.left + size[1]]


def decode_clip(
    data: bytes,
    start_s: float,
    num_frames: int,
    fps: float,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Decodes ``num_frames`` frames sampled at a target frame rate.

    Target time i is ``start_s + i / fps``; each takes the source frame whose presentation
    time is nearest (ties go to the earlier frame). Past the end of the video the last frame
    repeats. Decoding seeks to the keyframe before ``start_s`` and stops one frame after the
    last target, so a short clip from a long video costs little.

    Args:
        data: Encoded container bytes.
        start_s: Clip start in seconds (t = 0 is the first frame).
        num_frames: Frames to return.
        fps: Target frame rate.
        size: Optional (height, width): resize the shorter side and centre-crop
            (see :func:`fit_size`). None keeps the source size.

    Returns:
        uint8 array (num_frames, H, W, 3), RGB.

    Raises:
        BadVideo: If the bytes cannot be decoded.
    """
    if num_frames <= 0 or fps <= 0 or start_s < 0 or not math.isfinite(start_s):
        raise ValueError(
            f"need num_frames > 0, fps > 0, start_s >= 0; got {num_frames}, {fps}, {start_s}"
        )
    targets = start_s + np.arange(num_frames) / fps
    out: np.ndarray | None = None
    with _open(data) as container:
        vs = _video_stream(container)
        origin = _origin(container)
        step = 1.0 / (_stream_fps(vs) or fps)
        i = 0
        prev = prev_t = prev_img = None

        def take(frame, img):
            nonlocal out
            if img is None:
                img = _to_rgb(frame, size)
                if out is None:
                    out = np.empty((num_frames, *img.shape), np.uint8)
                elif img.shape != out.shape[1:]:  # resolution changed mid-stream
                    img = _to_rgb(frame.reformat(width=out.shape[2], height=out.shape[1]), None)
            out[i] = img
            return img

        try:
            if start_s > 0:
                offset = math.floor((origin + start_s) / vs.time_base)
                container.seek(offset, stream=vs, backward=True)
            for frame in container.decode(vs):
                if frame.time is not None:
                    t = frame.time - origin
                else:
                    t = prev_t + step if prev_t is not None else 0.0
                if prev is None:
                    # Targets before the first decoded frame take that frame.
                    cur_img = None
                    while i < num_frames and targets[i] <= t:
                        cur_img = take(frame, cur_img)
                        i += 1
                    prev, prev_t, prev_img = frame, t, cur_img
                    continue
                while i < num_frames and targets[i] - prev_t <= t - targets[i] + 1e-9:
                    prev_img = take(prev, prev_img)
                    i += 1
                if i == num_frames:
                    break
                prev, prev_t, prev_img = frame, t, None
        except _DECODE_ERRORS as e:
            raise BadVideo(DECODE_ERROR, str(e)) from e
        if prev is None and out is None:
            raise BadVideo(TRUNCATED, "no video frame could be decoded")
        while i < num_frames:  # the video ended early: repeat the last frame
            prev_img = take(prev, prev_img)
            i += 1
    return out


def decode_audio(
    data: bytes, start_s: float, duration_s: float, sample_rate: int = 16000
) -> np.ndarray:
    """Decodes a mono float32 audio window, resampled to ``sample_rate``.

    Args:
        data: Encoded container bytes.
        start_s: Window start in seconds (t = 0 is the first video frame).
        duration_s: Window length in seconds.
        sample_rate: Output sample rate.

    Returns:
        float32 array of exactly ``round(duration_s * sample_rate)`` samples; zeros where the
        audio does not reach, and all zeros if there is no audio stream.

    Raises:
        BadVideo: If the bytes cannot be decoded.
    """
    if duration_s < 0 or start_s < 0 or sample_rate <= 0:
        raise ValueError(
            f"need start_s, duration_s >= 0 and sample_rate > 0; got {start_s}, {duration_s}, {sample_rate}"
        )
    n = round(duration_s * sample_rate)
    out = np.zeros(n, np.float32)
    with _open(data) as container:
        if not container.streams.audio or n == 0:
            return out
        stream = container.streams.audio[0]
        want = _origin(container) + start_s  # absolute time of out[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        pos = None  # output index of the next resampled sample

        def place(frames) -> bool:
            nonlocal pos
            for f in frames:
                chunk = f.to_ndarray().reshape(-1)
                lo, hi = max(pos, 0), min(pos + len(chunk), n)
                if hi > lo:
                    out[lo:hi] = chunk[lo - pos : hi - pos]
                pos += len(chunk)
            return pos >= n

        try:
            if start_s > 0:
                container.seek(math.floor(want / stream.time_base), stream=stream, backward=True)
            for frame in container.decode(stream):
                if pos is None:
                    t0 = float(frame.time) if frame.time is not None else want
                    pos = round((t0 - want) * sample_rate)
                if place(resampler.resample(frame)):
                    break
            else:
                if pos is not None:
                    place(resampler.resample(None))
        except _DECODE_ERRORS as e:
            raise BadVideo(DECODE_ERROR, f"audio: {e}") from e
    return out


def scaled_size(height: int, width: int, max_resolution: int | None) -> tuple[int, int]:
    """(height, width) with the shorter side capped at ``max_resolution``, both even (yuv420p)."""
    scale = 1.0
    if max_resolution and min(height, width) > max_resolution:
        scale = max_resolution / min(height, width)
    return max(2, round(height * scale / 2) * 2), max(2, round(width * scale / 2) * 2)


def transcode(
    data: bytes,
    *,
    max_resolution: int | None = None,
    gop: int = 8,
    crf: int = 18,
    preset: str = "medium",
) -> bytes:
    """Re-encodes a video as H.264 (+ AAC) mp4 with a short GOP, optionally downscaled.

    A short GOP keeps random clip access cheap: a seek decodes at most ``gop - 1`` frames
    it does not return. Frames are re-timed to a constant rate (the source's average rate).

    Args:
        data: Encoded container bytes.
        max_resolution: Cap on the shorter side (aspect kept); None keeps the size.
        gop: Keyframe interval in frames.
        crf: x264 constant rate factor (lower = better quality, bigger file).
        preset: x264 speed preset.

    Returns:
        The mp4 bytes.

    Raises:
        BadVideo: If the input cannot be decoded.
    """
    if gop < 1:
        raise ValueError(f"gop must be >= 1, got {gop}")
    info = probe(data)
    height, width = scaled_size(info.height, info.width, max_resolution)
    buf = io.BytesIO()
    bitexact = av.codec.context.Flags.bitexact
    try:
        # Bit-exact flags and one x264 thread: the same input gives the same bytes, so
        # parallel and serial ingest write identical shards.
        with (
            _open(data) as src,
            av.open(buf, mode="w", format="mp4", options={"fflags": "+bitexact"}) as dst,
        ):
            vin = src.streams.video[0]
            ain = src.streams.audio[0] if src.streams.audio else None
            rate = Fraction(info.fps).limit_denominator(1001)
            options = {"crf": str(crf), "preset": preset, "threads": "1"}
            # Keyframes exactly every `gop` frames (no scene-cut keyframes).
            options.update(g=str(gop), keyint_min=str(gop), sc_threshold="0")
            vout = dst.add_stream("libx264", rate=rate, options=options)
            vout.width, vout.height, vout.pix_fmt = width, height, "yuv420p"
            vout.codec_context.flags |= bitexact
            aout = None
            if ain is not None:
                aout = dst.add_stream("aac", rate=ain.codec_context.sample_rate)
                aout.layout = "mono" if ain.codec_context.layout.nb_channels == 1 else "stereo"
                aout.codec_context.flags |= bitexact
            index = 0
            for packet in src.demux([vin] if ain is None else [vin, ain]):
                for frame in packet.decode():
                    if packet.stream is vin:
                        out = frame.reformat(width=width, height=height, format="yuv420p")
                        # A fresh frame from the pixels alone. Fed `reformat`'s own frames,
                        # x264 now and then wrote different bytes for the same visible pixels
                        # (5 of 800 transcodes of one test clip, in one video packet); from
                        # the pixel array, 0 of 1600, and the output is otherwise the same.
                        # It also drops the source's picture types, which the encoder would
                        # obey as forced keyframes (keyframes follow `gop` instead).
                        out = av.VideoFrame.from_ndarray(out.to_ndarray(), format="yuv420p")
                        out.pts, out.time_base = index, Fraction(1) / rate
                        index += 1
                        dst.mux(vout.encode(out))
                    else:
                        dst.mux(aout.encode(frame))
            dst.mux(vout.encode(None))
            if aout is not None:
                dst.mux(aout.encode(None))
    except _DECODE_ERRORS as e:
        raise BadVideo(DECODE_ERROR, f"transcode: {e}") from e
    return buf.getvalue()
