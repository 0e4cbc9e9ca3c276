"""Oracle scorer for shapes clips: reads colours, shapes and motion straight from pixels.

No learned networks. Every pixel is labelled with its nearest palette colour (if close
enough); each shape colour's mask is cleaned with a small morphological opening (removing the
1-2 px colour fringes that anti-aliasing and yuv420p chroma subsampling leave around edges)
to give a "core". The outline around each core then comes from luma, which yuv420p keeps at
full resolution (shapes clips always have a luma step between shape and background). Then

* the background is the most common label on the image border,
* a shape's class is the one whose template (circle, square or apex-up triangle, drawn by
  the shapes renderer at the coverage's centroid and area) lies closest to its coverage,
  voted over the frames where it is whole and apart from the other shapes,
* its direction comes from the centroid track over the first frames (shapes clips never bounce
  in their first three frames, and shapes are apart there).

``score_clip`` compares that with what the caption asks for. On ground-truth clips decoded
from mp4 it scores 1.0; with shuffled captions, or with every caption's shape words swapped
for other shapes, it falls to chance or below; with pixel noise or a blur that leave the shapes
plain to see it still reads them (tests/test_oracle.py).
"""

from __future__ import annotations

import re

import numpy as np
from scipy import ndimage

from data_pipelines.shapes.render import coverage, subpixel_points
from data_pipelines.shapes.scene import BACKGROUNDS, COLOURS, SHAPES, parse_direction_word

PALETTE_NAMES = tuple(BACKGROUNDS)
_PALETTE = np.asarray([BACKGROUNDS[n] for n in PALETTE_NAMES], np.float32)
# RGB distance beyond which a pixel belongs to no palette colour (blends, compression noise).
MAX_COLOUR_DIST = 60.0
MIN_AREA_FRAC = 0.004  # a shape needs this fraction of the image after opening to count
MIN_LUMA_STEP = 20.0  # background/shape luma gap needed to take the outline from luma
REGION_PX = 3.0  # how far outside its colour core a shape's outline may lie
ALPHA_FLOOR = 0.15  # coverage below this is background noise
AREA_PER_BOX = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}  # area / box side^2
TEMPLATE_SCALES = np.linspace(0.85, 1.15, 7)  # template sizes tried around the area's own
MAX_VOTES = 8  # frames whose shape call is voted on, per object
DIRECTION_FRAMES = 4  # frames 0..3 carry the caption's initial direction
_CROSS = ndimage.generate_binary_structure(2, 1)[None]  # spatial-only, per frame
_SQUARE = np.ones((1, 3, 3), bool)


def parse_caption(caption: str) -> dict:
    """Reads the background and the (colour, shape, direction) triples from a caption.

    Works on every shapes template: the colour word right before "background" is the
    background, the colour word right before a shape word is that shape's colour, and the first
    direction word after the shape word (before the next shape) is its direction.

    Returns:
        ``{"background": str | None, "shapes": [(colour, shape, direction | None), ...]}``.
    """
    words = re.findall(r"[a-z]+", caption.lower())
    background = None
    shapes = []
    for i, w in enumerate(words):
        prev = words[i - 1] if i else ""
        if w == "background" and prev in BACKGROUNDS:
            background = prev
        elif w in SHAPES and prev in COLOURS:
            direction = None
            for nxt in words[i + 1 :]:
                if nxt in SHAPES:
                    break
                direction = parse_direction_word(nxt)
                if direction:
                    break
            shapes.append((prev, w, direction))
    return {"background": background, "shapes": shapes}


def label_pixels(frames: np.ndarray) -> np.ndarray:
    """Nearest palette index per pixel, -1 where no palette colour is within reach; (T, H, W)."""
    x = np.asarray(frames, np.float32)
    d2 = ((x[..., None, :] - _PALETTE) ** 2).sum(-1)
    labels = d2.argmin(-1)
    far = np.take_along_axis(d2, labels[..., None], -1)[..., 0] > MAX_COLOUR_DIST**2
    return np.where(far, -1, labels)


def _check(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames must be (T, H, W, 3) with T >= 1, got {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 RGB, got {frames.dtype}")
    return frames


def _template(shape: str, cx: float, cy: float, size: float, rows: slice, cols: slice):
    """Anti-aliased coverage of ``shape`` (box side ``size``, area centroid at ``(cx, cy)``)
    on the pixel window ``rows x cols``, drawn by the shapes renderer itself."""
    ys = subpixel_points(rows.start, rows.stop)
    xs = subpixel_points(cols.start, cols.stop)
    # An apex-up triangle's area centroid lies size/6 below its box centre.
    box_cy = cy - size / 6 if shape == "triangle" else cy
    return coverage(shape, cx, box_cy, size, xs, ys)


def classify_shape(alpha: np.ndarray) -> str | None:
    """The shape whose rendered template best matches one object's 2D coverage map.

    For each class, templates with the object's area centroid and sizes around the one its
    soft area implies are drawn by the shapes renderer; the class of the template with the
    least L1 distance wins. Pixel noise and a soft outline add about the same distance to
    every class, so they barely move the decision; a fill-ratio rule (area over bounding
    box) did not have that property: background speckle near a shape inflates the box, and
    it read 22% of the shapes in the VAE's own reconstructions of val clips as the wrong
    class. None when the map is empty.
    """
    a = np.where(alpha > ALPHA_FLOOR, alpha, 0.0)
    area = a.sum()
    if area <= 0:
        return None
    h, w = a.shape
    cx, cy = _track(a[None])[0]
    best, best_shape = np.inf, None
    for shape in SHAPES:
        for size in np.sqrt(area / AREA_PER_BOX[shape]) * TEMPLATE_SCALES:
            r = int(np.ceil(size / 2 + REGION_PX))
            rows = slice(max(0, int(cy) - r), min(h, int(cy) + r + 1))
            cols = slice(max(0, int(cx) - r), min(w, int(cx) + r + 1))
            inside = a[rows, cols]
            dist = np.abs(inside - _template(shape, cx, cy, size, rows, cols)).sum()
            dist += area - inside.sum()  # coverage outside the window matches nothing
            if dist < best:
                best, best_shape = dist, shape
    return best_shape


def _track(weights: np.ndarray) -> np.ndarray:
    """Weighted centroid (x, y) per frame in pixel coordinates (centres at i + 0.5)."""
    _, h, w = weights.shape
    ys = np.arange(h) + 0.5
    xs = np.arange(w) + 0.5
    total = weights.sum((1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = (weights.sum(1) * xs).sum(-1) / total
        cy = (weights.sum(2) * ys).sum(-1) / total
    return np.stack([cx, cy], -1)


def _direction(track: np.ndarray, valid: np.ndarray) -> str | None:
    """Dominant direction of the centroid over the first DIRECTION_FRAMES frames."""
    idx = np.nonzero(valid[:DIRECTION_FRAMES])[0]
    if len(idx) < 2:
        return None
    vx, vy = (np.polyfit(idx, track[idx, k], 1)[0] for k in range(2))
    if abs(vx) >= abs(vy):
        return "right" if vx > 0 else "left"
    return "down" if vy > 0 else "up"


def _luma(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32) @ np.asarray([0.299, 0.587, 0.114], np.float32)


def segment(frames: np.ndarray) -> tuple[str | None, dict]:
    """Background name and, per shape colour present, its per-frame coverage ``alpha``.

    Colour decides which shape is which (a cleaned nearest-palette mask, the "core"); the exact
    outline comes from luma, which yuv420p keeps at full resolution: near its core, a pixel's
    coverage is where its luma lies between background and shape luma. (Shapes clips always
    have a luma step there; without one the colour mask is used as is.)

    Returns:
        ``(background, {colour: (alpha (T, H, W) float32 in [0, 1], present (T,) bool)})``.
    """
    frames = _check(frames)
    t, h, w, _ = frames.shape
    labels = label_pixels(frames)
    luma = _luma(frames)
    edge = np.zeros((h, w), bool)
    edge[[0, -1], :] = True
    edge[:, [0, -1]] = True
    border = labels[:, edge]
    counts = np.bincount(border[border >= 0], minlength=len(PALETTE_NAMES))
    bg_idx = int(counts.argmax()) if counts.sum() else -1
    background = PALETTE_NAMES[bg_idx] if bg_idx >= 0 else None
    bg_luma = luma[:, edge][border == bg_idx]
    y_bg = float(np.median(bg_luma if len(bg_luma) else luma[:, edge]))
    min_area = max(3.0, MIN_AREA_FRAC * h * w)

    cores = {}
    for k, name in enumerate(PALETTE_NAMES):
        raw = labels == k
        if name not in COLOURS or k == bg_idx or raw.sum() < min_area:
            continue
        core = ndimage.binary_opening(raw, _CROSS)
        present = core.sum((1, 2)) >= min_area
        if present.sum() * 2 >= t:
            cores[name] = (raw, core, present)

    # Each pixel near a core goes to the nearest core, so touching shapes don't share pixels.
    owner = np.full((t, h, w), -1)
    seeds = np.zeros((t, h, w), np.int32)
    for j, (_, core, _) in enumerate(cores.values()):
        seeds[core] = j + 1
    for i in range(t):
        if seeds[i].any():
            dist, (ri, ci) = ndimage.distance_transform_edt(seeds[i] == 0, return_indices=True)
            owner[i] = np.where(dist <= REGION_PX, seeds[i][ri, ci] - 1, -1)

    out = {}
    for j, (name, (raw, core, present)) in enumerate(cores.items()):
        y_obj = float(np.median(luma[core]))
        if abs(y_obj - y_bg) >= MIN_LUMA_STEP:
            alpha = np.clip((luma - y_bg) / (y_obj - y_bg), 0.0, 1.0) * (owner == j)
        else:
            alpha = (raw & ndimage.binary_dilation(core, _SQUARE)).astype(np.float32)
        out[name] = (alpha.astype(np.float32), present)
    return background, out


def describe_object(alpha: np.ndarray, present: np.ndarray, others: np.ndarray) -> dict:
    """Shape, direction, centroid track and boxes of one object.

    Args:
        alpha: Its coverage (T, H, W) from :func:`segment`.
        present: (T,) frames where it was found.
        others: (T, H, W) bool, pixels covered by the other objects.
    """
    t = alpha.shape[0]
    mask = alpha > 0.5
    # Soft area: binary pixel counts of small shapes jump with the sub-pixel position.
    area = np.where(alpha > ALPHA_FLOOR, alpha, 0.0).sum((1, 2), dtype=np.float64)
    # Frames where the shape touches another one (occlusion, shared outline) mislead; the
    # reference size is taken high because a long occlusion drags the median down.
    touching = (ndimage.binary_dilation(mask, _SQUARE) & others).any((1, 2))
    near = (ndimage.binary_dilation(mask, _SQUARE, iterations=2) & others).any((1, 2))
    ratio = area / max(np.percentile(area[present], 75), 1.0)
    valid = present & ~touching & (ratio >= 0.8) & (ratio <= 1.25)
    clean = present & (ratio >= 0.85) & (ratio <= 1.2)
    frames = np.nonzero(clean & ~near)[0]
    if len(frames) == 0:
        frames = np.nonzero(clean)[0]
    if len(frames) > MAX_VOTES:  # spread over the clip; neighbouring frames say the same
        frames = frames[np.linspace(0, len(frames) - 1, MAX_VOTES).round().astype(int)]
    votes = [classify_shape(alpha[i]) for i in frames]
    # Soft weights on and just around the outline give sub-pixel centroids; only frames where
    # the shape is whole and apart from the others count.
    track = _track(alpha * ndimage.binary_dilation(mask, _CROSS))
    track[~valid] = np.nan
    bbox = np.full((t, 4), np.nan)
    for i in np.nonzero(valid)[0]:
        rows, cols = np.nonzero(mask[i])
        bbox[i] = (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
    return {
        "shape": max(SHAPES, key=votes.count) if votes else None,
        "direction": _direction(track, valid),
        "track": track,
        "bbox": bbox,
        "area": area,
        "valid": valid,
    }


def analyze_video(frames: np.ndarray) -> dict:
    """Detects the background and every shape colour present, with shape, direction and track.

    Args:
        frames: uint8 RGB (T, H, W, 3).

    Returns:
        ``{"background": name, "objects": {colour: {...}}}`` where each object has ``shape``,
        ``direction``, ``track`` (T, 2) sub-pixel centroids as (x, y) (NaN where unreliable),
        ``bbox`` (T, 4) as (left, top, right, bottom) pixel edges, ``area`` (T,) and
        ``valid`` (T,) bool. See :func:`segment` for how pixels are assigned.
    """
    background, found = segment(frames)
    masks = {name: a > 0.5 for name, (a, _) in found.items()}
    objects = {}
    for name, (alpha, present) in found.items():
        others = np.zeros(alpha.shape, bool)
        for other, m in masks.items():
            if other != name:
                others |= m
        objects[name] = describe_object(alpha, present, others)
    return {"background": background, "objects": objects}


def score_clip(frames: np.ndarray, caption: str, analysis: dict | None = None) -> dict:
    """Scores one clip against its caption.

    Per captioned shape: colour (a shape of that colour is present), shape (it has the
    captioned shape), direction (it moves that way at the start); averaged over the caption's
    shapes. Background: the detected background equals the captioned one.

    Args:
        frames: uint8 RGB (T, H, W, 3).
        caption: The prompt the clip should show.
        analysis: Optional precomputed :func:`analyze_video` result for these frames.

    Returns:
        Dict with colour_acc, shape_acc, direction_acc, background_acc (floats in [0, 1]) and
        num_shapes (shapes the caption names).

    Raises:
        ValueError: when the caption names no shape (nothing to score).
    """
    attrs = parse_caption(caption)
    if not attrs["shapes"]:
        raise ValueError(f"caption names no coloured shape: {caption!r}")
    det = analysis if analysis is not None else analyze_video(frames)
    colour, shape, direction = [], [], []
    for c, s, d in attrs["shapes"]:
        obj = det["objects"].get(c)
        colour.append(obj is not None)
        shape.append(obj is not None and obj["shape"] == s)
        direction.append(obj is not None and obj["direction"] == d)
    return {
        "colour_acc": float(np.mean(colour)),
        "shape_acc": float(np.mean(shape)),
        "direction_acc": float(np.mean(direction)),
        "background_acc": float(det["background"] == attrs["background"]),
        "num_shapes": len(attrs["shapes"]),
    }


def score_clips(clips) -> dict:
    """Mean of :func:`score_clip` over ``(frames, caption)`` pairs, plus the clip count ``n``."""
    rows = [score_clip(f, c) for f, c in clips]
    if not rows:
        raise ValueError("score_clips needs at least one (frames, caption) pair")
    keys = ("colour_acc", "shape_acc", "direction_acc", "background_acc")
    out = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    out["n"] = len(rows)
    return out
