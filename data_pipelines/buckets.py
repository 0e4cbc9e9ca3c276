"""Shape buckets: which (height, width, frames) each clip trains at, and each step's bucket.

A clip goes to one bucket, chosen from its own shape (:func:`assign`): the bucket
nearest its aspect ratio (so a portrait clip never lands in a landscape bucket), then
the longest bucket of that aspect it can fill. It is resized to cover the bucket and
centre-cropped: the subject of a shot is usually framed near the centre, and a crop
at a random offset would move it between epochs without adding views the flips and
windows do not. Images (1-frame records) go to 1-frame buckets only; videos to the others.

A global batch holds one bucket (one array shape for the whole mesh). Which one is a
pure function of ``(seed, step)`` (:class:`BucketSchedule`), weighted by the share of
the data each bucket holds, so every host and every grain worker computes it alone.

Frames are whole source frames at an integer stride (:func:`frame_stride`): a clip
keeps its real timing (no blended or repeated frames), and each frame's time in
seconds, ``i * stride / source_fps``, goes into the transformer's temporal RoPE.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence

import numpy as np

# Skip reasons of clips no bucket takes.
TOO_SHORT = "shorter_than_its_buckets"
NO_IMAGE_BUCKET = "image_without_image_bucket"
NO_VIDEO_BUCKET = "video_without_video_bucket"


@dataclasses.dataclass(frozen=True, order=True)
class Bucket:
    """One training shape: ``height`` x ``width`` pixels, ``frames`` frames (1 = images)."""

    height: int
    width: int
    frames: int

    @property
    def name(self) -> str:
        return f"{self.height}x{self.width}x{self.frames}"

    @property
    def aspect(self) -> float:
        return self.width / self.height

    @property
    def is_image(self) -> bool:
        return self.frames == 1

    def tokens(self, strides: Strides) -> int:
        """Transformer video tokens of one clip of this bucket."""
        s, (pt, ph, pw) = strides.spatial_down, strides.patch
        lt = strides.latent_frames(self.frames)
        return (lt // pt) * (self.height // s // ph) * (self.width // s // pw)


@dataclasses.dataclass(frozen=True)
class Strides:
    """What a bucket's shape must divide by: the VAE's and the patch's strides."""

    spatial_down: int
    temporal_down: int
    patch: tuple[int, int, int]

    @classmethod
    def from_config(cls, config) -> Strides:
        return cls(
            int(config.vae.spatial_down),
            int(config.vae.temporal_down),
            tuple(int(p) for p in config.model.patch),
        )

    def latent_frames(self, frames: int) -> int:
        """Latent frames of ``frames`` frames through the causal VAE: ``1 + ceil((T - 1) / td)``
        (``vdiff.models.video_vae.latent_frames``, without importing the model)."""
        return 1 + math.ceil((frames - 1) / self.temporal_down)

    def problem(self, b: Bucket) -> tuple[str, Bucket] | None:
        """(what is wrong, the nearest valid bucket) or None if ``b`` is valid."""
        sh, sw = self.spatial_down * self.patch[1], self.spatial_down * self.patch[2]
        td, pt = self.temporal_down, self.patch[0]
        lt = self.latent_frames(b.frames)
        bad = []
        if b.height % sh or b.width % sw:
            bad.append(f"height/width must be multiples of {sh}/{sw} (vae.spatial_down x patch)")
        if lt % pt:
            bad.append(f"its {lt} latent frames must be a multiple of model.patch[0]={pt}")
        if not bad:
            return None
        h = max(sh, round(b.height / sh) * sh)
        w = max(sw, round(b.width / sw) * sw)
        # Latent frame counts that are multiples of pt; frames = 1 + (lt - 1) * td.
        t = b.frames
        if lt % pt:
            options = [1 + (k * pt - 1) * td for k in range(1, max(2, lt // pt + 2))]
            t = min(options, key=lambda f: (abs(f - b.frames), f))
        return "; ".join(bad), Bucket(h, w, t)


def check_buckets(
    buckets: Sequence[Sequence[int]], strides: Strides | None = None
) -> tuple[Bucket, ...]:
    """Validates ``config.data.buckets``: a non-empty list of distinct (height, width, frames).

    Args:
        buckets: The config's buckets.
        strides: When given, every bucket must also divide by them.

    Raises:
        ValueError: Naming the bad bucket and, for stride errors, the nearest valid one.
    """
    out = []
    for b in buckets:
        if len(b) != 3 or any(int(x) != x or x <= 0 for x in b):
            raise ValueError(
                f"data.buckets entry {tuple(b)} must be three positive integers "
                "(height, width, frames)"
            )
        bucket = Bucket(int(b[0]), int(b[1]), int(b[2]))
        if strides is not None and (p := strides.problem(bucket)) is not None:
            what, near = p
            raise ValueError(
                f"data.buckets entry {tuple(b)}: {what}; the nearest valid bucket is "
                f"({near.height}, {near.width}, {near.frames})"
            )
        if bucket in out:
            raise ValueError(f"data.buckets lists {tuple(b)} twice")
        out.append(bucket)
    if not out:
        raise ValueError("data.buckets is empty; give at least one (height, width, frames)")
    return tuple(out)


# --------------------------------------------------------------------------- one clip


def frame_stride(source_fps: float, fps: float) -> int:
    """Source frames per training frame: the integer stride whose rate is nearest ``fps``
    (a 30 fps clip at ``fps=12`` takes every 2nd frame, 15 fps; a 12 fps clip every frame)."""
    if source_fps <= 0:
        return 1
    return max(1, round(source_fps / fps))


def is_image(num_frames: int) -> bool:
    return num_frames <= 1


def frames_available(num_frames: int, source_fps: float, fps: float) -> int:
    """Training frames a clip holds at its stride."""
    return -(-num_frames // frame_stride(source_fps, fps))


def assign(
    buckets: Sequence[Bucket],
    *,
    width: int,
    height: int,
    num_frames: int,
    source_fps: float,
    fps: float,
) -> int | str:
    """The index of the bucket a clip trains in, or the reason no bucket takes it.

    Nearest aspect ratio first (on a log scale: 2:1 and 1:2 are equally far from 1:1),
    among buckets of its kind (images: 1-frame buckets; videos: the others); then, among
    the buckets of that aspect, the longest it can fill; ties go to the largest bucket
    that needs no upscaling, else the smallest.
    """
    image = is_image(num_frames)
    mine = [i for i, b in enumerate(buckets) if b.is_image == image]
    if not mine:
        return NO_IMAGE_BUCKET if image else NO_VIDEO_BUCKET
    log_aspect = math.log(width / height)
    dist = {i: abs(math.log(buckets[i].aspect) - log_aspect) for i in mine}
    nearest = min(dist.values())
    same = [i for i in mine if dist[i] <= nearest + 1e-9]
    have = 1 if image else frames_available(num_frames, source_fps, fps)
    fits = [i for i in same if buckets[i].frames <= have]
    if not fits:
        return TOO_SHORT

    def rank(i):
        b = buckets[i]
        no_upscale = b.height <= height and b.width <= width
        area = b.height * b.width
        return (b.frames, no_upscale, area if no_upscale else -area, -i)

    return max(fits, key=rank)


def window_start(
    seed: int, epoch: int, record: int, *, num_frames: int, stride: int, frames: int
) -> int:
    """The first source frame of a clip's training window: drawn from
    ``(seed, epoch, record)``, uniform over the starts whose window fits."""
    starts = num_frames - (frames - 1) * stride
    if starts <= 1:
        return 0
    return int(np.random.default_rng([seed, epoch, record, 0x57A27]).integers(starts))


# --------------------------------------------------------------------------- batches and steps


def batch_sizes(
    buckets: Sequence[Bucket],
    base_batch: int,
    strides: Strides,
    *,
    divisor: int = 1,
    explicit: Sequence[int] = (),
) -> tuple[int, ...]:
    """Global batch per bucket: ``explicit`` when given, else the one that keeps a
    step's tokens near ``base_batch`` clips of the first bucket (the token budget),
    rounded down to a multiple of ``divisor`` (the devices and processes a batch is
    split over), at least ``divisor``.

    Raises:
        ValueError: If ``explicit`` does not give one size per bucket, each a positive
            multiple of ``divisor``.
    """
    if explicit:
        if len(explicit) != len(buckets) or any(int(b) <= 0 or int(b) % divisor for b in explicit):
            raise ValueError(
                f"data.bucket_batch={tuple(explicit)} must give one batch per bucket "
                f"({len(buckets)}), each a positive multiple of {divisor}"
            )
        return tuple(int(b) for b in explicit)
    budget = base_batch * buckets[0].tokens(strides)
    out = []
    for b in buckets:
        n = budget // b.tokens(strides)
        out.append(max(divisor, n // divisor * divisor))
    return tuple(out)


class BucketSchedule:
    """Which bucket global step ``step`` trains: a pure function of ``(seed, step)``.

    Steps are drawn with probability proportional to ``weights`` (e.g. each bucket's
    steps per epoch: its clips over its batch, so every clip is seen about equally
    often), by inverse CDF on a blake2b hash: the same on every host and in every worker
    process, independent of Python's hash seed and numpy's version.
    """

    def __init__(self, weights: Sequence[float], seed: int):
        w = np.asarray(weights, np.float64)
        if w.ndim != 1 or not len(w) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"bucket weights must be non-negative with a positive sum: {weights}")
        self.cdf = np.cumsum(w / w.sum())
        self.seed = seed

    def __call__(self, step: int) -> int:
        if len(self.cdf) == 1:
            return 0
        digest = hashlib.blake2b(f"vdiff-bucket:{self.seed}:{step}".encode(), digest_size=8)
        u = int.from_bytes(digest.digest(), "little") / 2.0**64
        return min(int(np.searchsorted(self.cdf, u, side="right")), len(self.cdf) - 1)


def step_weights(
    weights: Sequence[float], images: Sequence[bool], image_share: float
) -> list[float]:
    """Each bucket's share of the steps (``weights``, e.g. its steps per epoch), with the
    image buckets together scaled to ``image_share`` of the steps when it is >= 0."""
    w = list(weights)
    if image_share < 0:
        return w
    if image_share > 1:
        raise ValueError(f"data.image_share={image_share} must be in [0, 1] (or -1: by data)")
    img = sum(x for x, i in zip(w, images, strict=True) if i)
    vid = sum(x for x, i in zip(w, images, strict=True) if not i)
    if img == 0 or vid == 0:
        return w
    return [x * (image_share / img if i else (1 - image_share) / vid) for x, i in zip(w, images)]


def bucket_seed(seed: int, bucket: int) -> int:
    """The shuffle seed of bucket ``bucket``'s stream (bucket 0 keeps ``seed``)."""
    if bucket == 0:
        return seed
    digest = hashlib.blake2b(f"vdiff-bucket-seed:{seed}:{bucket}".encode(), digest_size=4)
    return int.from_bytes(digest.digest(), "little") >> 1
