"""Audio-video sync of shapes clips: do clicks sound when shapes hit walls, at the right pitch?

* Audio onsets: spectral flux of the log-mel spectrogram (sum of positive rises over bands),
  peak-picked above a fixed threshold.
* Video bounces: each shape's sub-pixel centroid track (from :mod:`vdiff.eval.oracle`; frames
  where it touches another shape are left out) reverses direction along an axis while the
  shape is at that wall, moving at least MIN_STEP_PX per frame and away from the wall two
  frames either side; the contact time is refined to a fraction of a frame by fitting a
  symmetric "V" through the three frames around the turn.
* Matching: one-to-one, closest pairs first, within +-1 video frame. Precision is over
  onsets, recall over bounces; the offset is the mean |audio - video| time of matched pairs.
* Pitch binding: the dominant frequency just after each matched onset, snapped to the nearest
  pitch of the ladder, must be the pitch of the colour that bounced.
"""

from __future__ import annotations

import numpy as np

from data_pipelines.audio import log_mel, resample
from data_pipelines.shapes.scene import PITCHES
from vdiff.eval.oracle import analyze_video

SAMPLE_RATE = 16000
HOP = 160
FLUX_THRESHOLD = 8.0  # summed positive log-mel rise (nats over 64 bands) that counts as an onset
PEAK_RADIUS = 4  # log-mel frames: one onset per +-40 ms
MIN_STEP_PX = 0.3  # per frame: slower turns are centroid noise (shapes clips move >= 0.48)
WALL_TOL_FRAC = 0.08  # of the image side: how close to a wall the turn must happen
PITCH_WINDOW_S = (-0.01, 0.04)
_PITCH_NAMES = tuple(PITCHES)
_LOG_PITCHES = np.log(np.asarray([PITCHES[n] for n in _PITCH_NAMES]))


def _audio_16k(audio, sample_rate: int) -> np.ndarray:
    audio = np.asarray(audio, np.float32)
    if audio.ndim != 1:
        raise ValueError(f"audio must be mono (N,), got shape {audio.shape}")
    return resample(audio, sample_rate, SAMPLE_RATE) if sample_rate != SAMPLE_RATE else audio


def audio_onsets(audio, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Onset times in seconds (float64, sorted) by spectral-flux peak picking."""
    wave = _audio_16k(audio, sample_rate)
    lm = log_mel(wave, SAMPLE_RATE, hop=HOP)
    flux = np.zeros(len(lm))
    flux[1:] = np.maximum(np.diff(lm, axis=0), 0.0).sum(-1)
    peaks = []
    for i in np.nonzero(flux >= FLUX_THRESHOLD)[0]:
        lo, hi = max(0, i - PEAK_RADIUS), i + PEAK_RADIUS + 1
        # The first maximum of its neighbourhood, so a flat top gives one onset.
        if flux[i] == flux[lo:hi].max() and not np.any(flux[lo:i] == flux[i]):
            peaks.append(i)
    return np.asarray(peaks, np.float64) * HOP / SAMPLE_RATE


def _turns(p: np.ndarray, near_high: np.ndarray, near_low: np.ndarray, min_step: float):
    """Sub-frame times (in frames) where track p turns back at a wall."""
    out = []
    for k in range(1, len(p) - 1):
        a, b = p[k] - p[k - 1], p[k + 1] - p[k]
        if np.isnan(a) or np.isnan(b):
            continue
        if a >= 0 >= b and near_high[k]:  # turned back from the high wall (right / bottom)
            q = p
        elif a <= 0 <= b and near_low[k]:
            q, a, b = -p, -a, -b  # mirror so the turn is a maximum
        else:
            continue
        v = max(a, -b)
        if v < min_step:
            continue
        # A real turn is a "V": two frames away on either side the shape is at least one
        # frame's travel from the wall (a one-frame jump of the centroid is not).
        far = [q[k] - q[j] for j in (k - 2, k + 2) if 0 <= j < len(q) and not np.isnan(q[j])]
        if any(d < 0.75 * v for d in far):
            continue
        # Symmetric V: p = wall - v |t - t_b| gives t_b = k + (a + b) / (2 v).
        out.append(k + float(np.clip((a + b) / (2 * v), -0.5, 0.5)))
    merged = []
    for t in sorted(out):
        if merged and t - merged[-1] < 1.0:
            merged[-1] = (merged[-1] + t) / 2  # a tie at the turn shows up twice
        else:
            merged.append(t)
    return merged


def video_bounces(frames: np.ndarray, fps: float, analysis: dict | None = None) -> list[dict]:
    """Wall bounces seen in the pixels.

    Args:
        frames: uint8 RGB (T, H, W, 3).
        fps: Frame rate.
        analysis: Optional precomputed :func:`analyze_video` result for these frames.

    Returns:
        Dicts ``{"time_s", "frame", "colour", "axis"}`` sorted by time.
    """
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    det = analysis if analysis is not None else analyze_video(frames)
    _, h, w, _ = np.shape(frames)
    events = []
    for colour, obj in det["objects"].items():
        track, bbox = obj["track"], obj["bbox"]
        for axis, size, lo_edge, hi_edge in (("x", w, 0, 2), ("y", h, 1, 3)):
            tol = WALL_TOL_FRAC * size
            with np.errstate(invalid="ignore"):
                near_low = bbox[:, lo_edge] <= tol
                near_high = bbox[:, hi_edge] >= size - tol
            for t in _turns(track[:, 0 if axis == "x" else 1], near_high, near_low, MIN_STEP_PX):
                events.append({"time_s": t / fps, "frame": t, "colour": colour, "axis": axis})
    return sorted(events, key=lambda e: e["time_s"])


def dominant_pitch_colour(wave16k: np.ndarray, time_s: float) -> str | None:
    """Colour whose ladder pitch is nearest (in log frequency) to the peak after ``time_s``."""
    lo = max(0, round((time_s + PITCH_WINDOW_S[0]) * SAMPLE_RATE))
    hi = min(len(wave16k), round((time_s + PITCH_WINDOW_S[1]) * SAMPLE_RATE))
    seg = wave16k[lo:hi]
    if len(seg) < 16 or not np.any(seg):
        return None
    spec = np.abs(np.fft.rfft(seg * np.hanning(len(seg)), n=8192))
    freqs = np.fft.rfftfreq(8192, 1 / SAMPLE_RATE)
    band = (freqs >= 200) & (freqs <= 7000)
    f = freqs[band][np.argmax(spec[band])]
    return _PITCH_NAMES[int(np.argmin(np.abs(_LOG_PITCHES - np.log(f))))]


def match_events(onsets: np.ndarray, bounces: list[dict], fps: float) -> list[tuple[int, int]]:
    """One-to-one (onset index, bounce index) pairs within +-1 frame, closest pairs first."""
    tol = 1.0 / fps + 1e-9
    pairs = sorted(
        (abs(t - b["time_s"]), i, j)
        for i, t in enumerate(onsets)
        for j, b in enumerate(bounces)
        if abs(t - b["time_s"]) <= tol
    )
    used_o, used_b, out = set(), set(), []
    for _, i, j in pairs:
        if i not in used_o and j not in used_b:
            used_o.add(i)
            used_b.add(j)
            out.append((i, j))
    return sorted(out)


def sync_counts(onsets, bounces, fps: float, audio16k: np.ndarray) -> dict:
    """Raw counts for one clip (what :func:`aggregate` sums)."""
    pairs = match_events(onsets, bounces, fps)
    offsets = [abs(onsets[i] - bounces[j]["time_s"]) for i, j in pairs]
    bound = sum(
        dominant_pitch_colour(audio16k, onsets[i]) == bounces[j]["colour"] for i, j in pairs
    )
    return {
        "n_onsets": len(onsets),
        "n_bounces": len(bounces),
        "n_matched": len(pairs),
        "n_bound": int(bound),
        "offset_sum_ms": float(np.sum(offsets) * 1000.0),
    }


def aggregate(counts: list[dict]) -> dict:
    """Micro-averaged precision, recall, F1, mean |offset| (ms) and pitch-binding accuracy.

    Empty denominators follow the usual convention: nothing predicted and nothing to find is
    perfect (1.0); an offset or binding with no matched pair is NaN.
    """
    tot = {k: sum(c[k] for c in counts) for k in counts[0]} if counts else {}
    if not tot:
        raise ValueError("aggregate needs at least one clip's counts")
    m = tot["n_matched"]
    precision = m / tot["n_onsets"] if tot["n_onsets"] else float(tot["n_bounces"] == 0)
    recall = m / tot["n_bounces"] if tot["n_bounces"] else float(tot["n_onsets"] == 0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "offset_ms": tot["offset_sum_ms"] / m if m else float("nan"),
        "binding_acc": tot["n_bound"] / m if m else float("nan"),
        **{k: tot[k] for k in ("n_onsets", "n_bounces", "n_matched")},
    }


def sync_scores(frames: np.ndarray, fps: float, audio, sample_rate: int = SAMPLE_RATE) -> dict:
    """Sync scores of one clip: precision, recall, f1, offset_ms, binding_acc and the counts."""
    wave = _audio_16k(audio, sample_rate)
    counts = sync_counts(audio_onsets(wave), video_bounces(frames, fps), fps, wave)
    return aggregate([counts])


def sync_scores_many(clips) -> dict:
    """Micro-averaged :func:`sync_scores` over ``(frames, fps, audio, sample_rate)`` tuples."""
    counts = []
    for frames, fps, audio, sr in clips:
        wave = _audio_16k(audio, sr)
        counts.append(sync_counts(audio_onsets(wave), video_bounces(frames, fps), fps, wave))
    return aggregate(counts)
