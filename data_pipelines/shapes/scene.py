"""The "shapes" world: palette, shapes, motion, captions and ground truth.

A scene is 1-3 shapes (circle, square, triangle) of distinct colours on a coloured background.
Each shape moves with constant velocity (px per frame) and bounces off the walls; every wall
contact makes a click whose pitch is tied to the shape's colour. Everything is deterministic
from ``(seed, split, clip index)`` through :func:`scene_rng`.

Coordinates: x to the right, y down, in pixels; the image covers ``[0, W] x [0, H]`` and pixel
``(row i, col j)`` has its centre at ``(j + 0.5, i + 0.5)``. Frame ``k`` is the snapshot at time
``k / fps`` seconds. A shape of ``size`` s has a bounding box of side s around its centre, so
its centre stays in ``[s/2, W - s/2]``.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

# Shape colours, in pitch-ladder order (index k sounds at PITCH_BASE_HZ * PITCH_RATIO**k).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (250, 140, 20),
    "yellow": (240, 230, 50),
    "green": (40, 190, 70),
    "cyan": (50, 215, 230),
    "blue": (40, 80, 230),
    "purple": (150, 60, 210),
    "white": (245, 245, 245),
}
# Backgrounds: the shape colours (minus those used in the clip) plus two that never move.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    **COLOURS,
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")
# Background vs shape brightness gap: yuv420p keeps luma at full resolution but chroma at half,
# so a crisp edge needs a luma step (black qualifies against every shape colour).
MIN_LUMA_CONTRAST = 40.0
DIRECTIONS = ("left", "right", "up", "down")
PITCH_BASE_HZ = 400.0
PITCH_RATIO = 1.4
PITCHES: dict[str, float] = {name: PITCH_BASE_HZ * PITCH_RATIO**k for k, name in enumerate(COLOURS)}
# Colour x shape pairs never rendered in train/val; the val_heldout split is built from them.
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("green", "circle"),
    ("blue", "square"),
    ("white", "triangle"),
)
HELDOUT_MODES = ("exclude", "require", "any")

# Motion, in units that scale with resolution and fps: size as a fraction of the side, speed
# in sides per second. At 32 px / 8 fps: 7.7-10.9 px shapes moving 1.6-2.6 px per frame, so a
# 16-frame clip holds 1-2 (rarely 3) bounces per shape.
SIZE_RANGE = (0.24, 0.34)
SPEED_RANGE = (0.4, 0.65)
MINOR_RATIO_RANGE = (0.3, 0.5)  # cross-axis speed / main-axis speed (or exactly 0)
P_STRAIGHT = 1 / 3  # probability of no cross-axis motion
NO_BOUNCE_START = 3.0  # frames: the caption's direction must be visible from the first frames
NO_BOUNCE_END = 1.5  # contacts after T - 1.5 frames have no frame after their nearest one
MIN_GAP_FRAMES = 1.25  # between any two contacts in a clip, so clicks and bounces pair up
# Free space between shapes' boxes in the first frames and the frames around any wall contact
# (shapes may pass over each other elsewhere; the oracle ignores frames where they touch).
CLEARANCE_PX = 2.0
SCENE_TRIES = 200  # fresh starts before giving up (3 shapes need ~10 at 32 px / 16 frames)

_VERBS = ("moves", "bounces", "slides", "glides", "travels")
_VERBS_ING = ("moving", "bouncing", "sliding", "gliding", "travelling")
_DIR_PHRASES = {
    "left": ("left", "to the left", "leftward"),
    "right": ("right", "to the right", "rightward"),
    "up": ("up", "upward"),
    "down": ("down", "downward"),
}
# (template, verb form): "a red circle moves left" vs "a red circle moving left".
_TEMPLATES = (
    ("{objects} on {bg} background", _VERBS),
    ("on {bg} background, {objects}", _VERBS),
    ("{bg} background with {objects}", _VERBS_ING),
    ("{objects}, on {bg} background", _VERBS_ING),
)


@dataclasses.dataclass(frozen=True)
class ShapeSpec:
    """One moving shape.

    Attributes:
        colour: Key of COLOURS.
        shape: One of SHAPES.
        size: Bounding-box side in pixels.
        x0: Centre x at frame 0 (pixels).
        y0: Centre y at frame 0 (pixels).
        vx: Velocity in pixels per frame along x.
        vy: Velocity in pixels per frame along y.
        direction: Dominant initial direction (left/right/up/down), the caption's word.
    """

    colour: str
    shape: str
    size: float
    x0: float
    y0: float
    vx: float
    vy: float
    direction: str


@dataclasses.dataclass(frozen=True)
class Scene:
    """A whole clip: canvas, timing, shapes (drawn in order, later on top) and caption."""

    resolution: int
    num_frames: int
    fps: float
    background: str
    shapes: tuple[ShapeSpec, ...]
    caption: str


def luma(rgb) -> float:
    """BT.601 luma of an RGB triple (what H.264 stores at full resolution)."""
    r, g, b = rgb
    return 0.299 * r + 0.587 * g + 0.114 * b


def background_choices(colours) -> list[str]:
    """Backgrounds allowed with these shape colours: distinct and with enough luma contrast."""
    return [
        b
        for b in BACKGROUNDS
        if b not in colours
        and all(abs(luma(BACKGROUNDS[b]) - luma(COLOURS[c])) >= MIN_LUMA_CONTRAST for c in colours)
    ]


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator for one clip; independent across seeds, splits and indices."""
    return np.random.default_rng([int(seed), zlib.crc32(split.encode()), int(index)])


def _reflect(p: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Folds an unbounded coordinate into [lo, hi] (a triangle wave: elastic walls)."""
    span = hi - lo
    u = np.mod(p - lo, 2 * span)
    return lo + np.where(u <= span, u, 2 * span - u)


def shape_positions(shape: ShapeSpec, resolution: int, times: np.ndarray) -> np.ndarray:
    """Centre (x, y) of a shape at times given in frames (may be fractional); shape (N, 2)."""
    times = np.asarray(times, dtype=np.float64)
    lo, hi = shape.size / 2, resolution - shape.size / 2
    x = _reflect(shape.x0 + shape.vx * times, lo, hi)
    y = _reflect(shape.y0 + shape.vy * times, lo, hi)
    return np.stack([x, y], axis=-1)


def trajectory(scene: Scene) -> np.ndarray:
    """Centres at every frame, float64 (T, num_shapes, 2) as (x, y)."""
    t = np.arange(scene.num_frames, dtype=np.float64)
    if not scene.shapes:
        return np.zeros((scene.num_frames, 0, 2))
    return np.stack([shape_positions(s, scene.resolution, t) for s in scene.shapes], axis=1)


def _contact_times(p0, v, size, resolution: int, end: float) -> np.ndarray:
    """Wall-contact times in (0, end) frames along one axis, vectorised over candidates.

    Args:
        p0, v, size: (B,) start coordinate, velocity (px/frame) and box side.

    Returns:
        (B, K) float64 times, NaN-padded.
    """
    p0, v, size = (np.atleast_1d(np.asarray(x, np.float64)) for x in (p0, v, size))
    span = resolution - size
    # The unfolded coordinate p0 + v t hits a wall whenever (p - size/2) is a multiple of span.
    k_max = int(np.ceil(np.max(np.abs(v)) * end / np.min(span))) + 1
    k = np.arange(-k_max, k_max + 2, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (k * span[:, None] - (p0 - size / 2)[:, None]) / v[:, None]
    return np.where((t > 0) & (t < end), t, np.nan)


def _contacts(shape: ShapeSpec, resolution: int, end: float) -> list[tuple[float, str]]:
    """Wall contacts of one shape in (0, end) frames, as (time in frames, axis)."""
    out = []
    for axis, p0, v in (("x", shape.x0, shape.vx), ("y", shape.y0, shape.vy)):
        times = _contact_times(p0, v, shape.size, resolution, end)[0]
        out += [(float(t), axis) for t in times[np.isfinite(times)]]
    return out


def bounce_events(scene: Scene) -> list[dict]:
    """Every wall contact inside the clip's audio span [0, T / fps), sorted by time.

    Returns:
        Dicts with ``shape`` (index), ``colour``, ``axis`` ("x"/"y"), ``frame`` (exact time in
        frames), ``frame_index`` (nearest frame), ``time_s`` (exact time in seconds) and
        ``pitch_hz``.
    """
    events = []
    for i, s in enumerate(scene.shapes):
        for t, axis in _contacts(s, scene.resolution, float(scene.num_frames)):
            events.append(
                {
                    "shape": i,
                    "colour": s.colour,
                    "axis": axis,
                    "frame": t,
                    "frame_index": round(t),
                    "time_s": t / scene.fps,
                    "pitch_hz": PITCHES[s.colour],
                }
            )
    return sorted(events, key=lambda e: e["frame"])


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _pick_pairs(rng: np.random.Generator, n: int, heldout: str) -> list[tuple[str, str]]:
    """Distinct colours with shapes, honouring the held-out rule."""
    held = set(HELDOUT_PAIRS)
    colours = list(COLOURS)
    pairs: list[tuple[str, str]] = []
    if heldout == "require":
        pairs.append(HELDOUT_PAIRS[int(rng.integers(len(HELDOUT_PAIRS)))])
    while len(pairs) < n:
        c = _pick(rng, colours)
        s = _pick(rng, SHAPES)
        if any(c == p[0] for p in pairs) or (heldout != "any" and (c, s) in held):
            continue
        pairs.append((c, s))
    return pairs


def _near_contact(times: np.ndarray, num_frames: int) -> np.ndarray:
    """(B, T) bool: frames floor(t) - 1 .. ceil(t) + 1 around any contact t (times (B, K)).

    These are the frames a turn is read from (the nearest frame and one either side).
    """
    f = np.arange(num_frames, dtype=np.float64)[None, None, :]
    t = times[:, :, None]
    with np.errstate(invalid="ignore"):
        near = (f >= np.floor(t) - 1) & (f <= np.ceil(t) + 1)
    return near.any(axis=1)


def _sample_geometry(
    rng: np.random.Generator,
    colour: str,
    shape: str,
    resolution: int,
    num_frames: int,
    fps: float,
    placed: list[ShapeSpec],
    batch: int = 256,
    tries: int = 2,
) -> ShapeSpec | None:
    """Rejection-samples size, start and velocity for one shape; None if nothing fits.

    Candidates are drawn in batches and checked together; the first one that passes is kept:
    contacts only in (NO_BOUNCE_START, T - NO_BOUNCE_END), at least MIN_GAP_FRAMES from every
    contact already in the clip, and CLEARANCE_PX from the placed shapes in the first frames
    and around either's contacts.
    """
    end = float(num_frames)
    frames = np.arange(num_frames, dtype=np.float64)
    placed_times = [_contact_times(o.x0, o.vx, o.size, resolution, end) for o in placed]
    placed_times += [_contact_times(o.y0, o.vy, o.size, resolution, end) for o in placed]
    old = np.concatenate([t[0] for t in placed_times]) if placed else np.zeros(0)
    old = old[np.isfinite(old)]
    for _ in range(tries):
        size = resolution * rng.uniform(*SIZE_RANGE, batch)
        speed = rng.uniform(*SPEED_RANGE, batch) * resolution / fps
        straight = rng.random(batch) < P_STRAIGHT
        minor = speed * rng.uniform(*MINOR_RATIO_RANGE, batch) * rng.choice([-1.0, 1.0], batch)
        minor = np.where(straight, 0.0, minor)
        d = rng.integers(0, len(DIRECTIONS), batch)  # index into DIRECTIONS
        sign = np.where((d == 0) | (d == 2), -1.0, 1.0)  # left / up move towards 0
        horizontal = d < 2
        vx = np.where(horizontal, sign * speed, minor)
        vy = np.where(horizontal, minor, sign * speed)
        x0 = size / 2 + rng.random(batch) * (resolution - size)
        y0 = size / 2 + rng.random(batch) * (resolution - size)

        times = np.concatenate(
            [
                _contact_times(x0, vx, size, resolution, end),
                _contact_times(y0, vy, size, resolution, end),
            ],
            axis=1,
        )
        with np.errstate(invalid="ignore"):
            ok = ~np.any((times <= NO_BOUNCE_START) | (times >= end - NO_BOUNCE_END), axis=1)
        every = np.sort(np.concatenate([times, np.broadcast_to(old, (batch, len(old)))], 1), 1)
        gaps = np.diff(every, axis=1)
        ok &= np.where(np.isnan(gaps), np.inf, gaps).min(axis=1, initial=np.inf) >= MIN_GAP_FRAMES
        lo, hi = size[:, None] / 2, resolution - size[:, None] / 2
        pos = np.stack(
            [
                _reflect(x0[:, None] + vx[:, None] * frames, lo, hi),
                _reflect(y0[:, None] + vy[:, None] * frames, lo, hi),
            ],
            axis=-1,
        )
        mine_near = _near_contact(times, num_frames)
        mine_near[:, : int(NO_BOUNCE_START) + 1] = True
        for j, o in enumerate(placed):
            o_times = np.concatenate([placed_times[j], placed_times[len(placed) + j]], axis=1)
            protected = mine_near | _near_contact(o_times, num_frames)
            gap = np.abs(pos - shape_positions(o, resolution, frames)[None])
            reach = (size + o.size)[:, None] / 2 + CLEARANCE_PX
            ok &= ~np.any(protected & np.all(gap < reach[..., None], axis=-1), axis=1)
        hits = np.nonzero(ok)[0]
        if len(hits):
            i = hits[0]
            return ShapeSpec(
                colour,
                shape,
                float(size[i]),
                float(x0[i]),
                float(y0[i]),
                float(vx[i]),
                float(vy[i]),
                DIRECTIONS[int(d[i])],
            )
    return None


def make_caption(rng: np.random.Generator, background: str, shapes) -> str:
    """A templated caption with varied wording for the given shapes and background."""
    template, verbs = _pick(rng, _TEMPLATES)
    parts = []
    for s in shapes:
        article = "an" if s.colour[0] in "aeiou" else "a"
        parts.append(
            f"{article} {s.colour} {s.shape} {_pick(rng, verbs)} "
            f"{_pick(rng, _DIR_PHRASES[s.direction])}"
        )
    objects = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    bg_article = "an" if background[0] in "aeiou" else "a"
    return template.format(objects=objects, bg=f"{bg_article} {background}")


def sample_scene(
    rng: np.random.Generator,
    resolution: int = 32,
    num_frames: int = 16,
    fps: float = 8.0,
    max_shapes: int = 3,
    heldout: str = "exclude",
) -> Scene:
    """Samples one scene.

    Args:
        rng: The clip's generator (see :func:`scene_rng`).
        resolution: Side of the square canvas in pixels.
        num_frames: Frames in the clip.
        fps: Frame rate.
        max_shapes: Up to this many shapes (1..max_shapes, uniform); at most len(COLOURS).
        heldout: "exclude" (no HELDOUT_PAIRS: train/val), "require" (the first shape is a
            held-out pair, the others are not: val_heldout) or "any".

    Returns:
        A Scene whose contacts are all in (NO_BOUNCE_START, T - NO_BOUNCE_END) frames and at
        least MIN_GAP_FRAMES apart.

    Raises:
        ValueError: on bad arguments, or when no scene fits the constraints (clips too short
            or too fast for the timing rules).
    """
    if heldout not in HELDOUT_MODES:
        raise ValueError(f"heldout must be one of {HELDOUT_MODES}, got {heldout!r}")
    if not 1 <= max_shapes <= len(COLOURS):
        raise ValueError(f"max_shapes must be in 1..{len(COLOURS)}, got {max_shapes}")
    if resolution < 8 or num_frames < 2 or fps <= 0:
        raise ValueError(
            f"need resolution >= 8, num_frames >= 2, fps > 0; got {resolution}, {num_frames}, {fps}"
        )
    n = int(rng.integers(1, max_shapes + 1))
    for _ in range(SCENE_TRIES):
        placed: list[ShapeSpec] = []
        for colour, shape in _pick_pairs(rng, n, heldout):
            spec = _sample_geometry(rng, colour, shape, resolution, num_frames, fps, placed)
            if spec is None:
                break
            placed.append(spec)
        else:
            background = _pick(rng, background_choices([s.colour for s in placed]))
            caption = make_caption(rng, background, placed)
            return Scene(resolution, num_frames, fps, background, tuple(placed), caption)
    raise ValueError(
        f"no shapes scene fits {resolution}px x {num_frames} frames at {fps} fps; "
        "use more frames or a higher fps"
    )


def parse_direction_word(word: str) -> str | None:
    """Maps a caption word (left, leftward, up, upward, ...) to a direction, else None."""
    for d in DIRECTIONS:
        if word in (d, d + "ward", d + "wards"):
            return d
    return None


def scene_metadata(scene: Scene, ndigits: int = 4) -> dict:
    """Ground truth as a JSON-ready dict (floats rounded so the file is compact and stable)."""
    traj = trajectory(scene)

    def r(x):
        return round(float(x), ndigits)

    shapes = []
    for i, s in enumerate(scene.shapes):
        shapes.append(
            {
                "colour": s.colour,
                "shape": s.shape,
                "direction": s.direction,
                "size": r(s.size),
                "velocity": [r(s.vx), r(s.vy)],
                "pitch_hz": r(PITCHES[s.colour]),
                "trajectory": [[r(x), r(y)] for x, y in traj[:, i]],
            }
        )
    bounces = [
        {**e, "frame": r(e["frame"]), "time_s": r(e["time_s"]), "pitch_hz": r(e["pitch_hz"])}
        for e in bounce_events(scene)
    ]
    return {
        "caption": scene.caption,
        "background": scene.background,
        "resolution": scene.resolution,
        "frames": scene.num_frames,
        "fps": scene.fps,
        "shapes": shapes,
        "bounces": bounces,
    }
