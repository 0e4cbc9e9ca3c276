"""Shape buckets: which (height, width, frames) each training step uses.

Every host must stack the same shape at the same step (the per-process batches become one
global array), and grain worker processes decode batches out of order, so the bucket is a
pure function of ``(seed, step)``: any host or worker computes it alone, nothing is shared.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

Bucket = tuple[int, int, int]


def check_buckets(buckets: Sequence[Sequence[int]]) -> tuple[Bucket, ...]:
    """Validates ``config.data.buckets``: a non-empty list of (height, width, frames).

    Raises:
        ValueError: Naming the bad entry.
    """
    out = []
    for b in buckets:
        if len(b) != 3 or any(int(x) != x or x <= 0 for x in b):
            raise ValueError(
                f"data.buckets entry {tuple(b)} must be three positive integers "
                "(height, width, frames)"
            )
        out.append((int(b[0]), int(b[1]), int(b[2])))
    if not out:
        raise ValueError("data.buckets is empty; give at least one (height, width, frames)")
    return tuple(out)


def bucket_for_step(buckets: Sequence[Bucket], seed: int, step: int) -> Bucket:
    """The (height, width, frames) bucket of training step ``step``.

    A blake2b hash of ``(seed, step)`` picks it, so the choice is the same on every host and
    in every worker process, and independent of Python's hash seed and numpy's version.
    """
    if len(buckets) == 1:
        return tuple(buckets[0])
    digest = hashlib.blake2b(f"vdiff-bucket:{seed}:{step}".encode(), digest_size=8).digest()
    return tuple(buckets[int.from_bytes(digest, "little") % len(buckets)])
