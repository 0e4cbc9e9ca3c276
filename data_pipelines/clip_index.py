"""Each record's shape facts, and which bucket each record of a split trains in.

Bucketing needs a clip's width, height, frame count and frame rate before it is
decoded (every host must agree on the members of every bucket). Records carry them
(:data:`data_pipelines.records.FIELDS`); :func:`read_facts` reads them for a run of
records, and :class:`SplitBuckets` turns one split's facts into bucket members and
per-reason skip counts with :func:`data_pipelines.buckets.assign`.

Facts are saved as ``.npz`` of plain numeric arrays (loaded with
``allow_pickle=False``), so a split is scanned once, by every process for its own run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data_pipelines import buckets as bk
from data_pipelines import records

FACTS = ("width", "height", "num_frames", "fps", "duration", "has_audio")
_DTYPES = {"width": np.int32, "height": np.int32, "num_frames": np.int64, "has_audio": bool}


def read_facts(source, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """The :data:`FACTS` of records ``indices`` of ``source`` (record bytes by index);
    a record that does not unpack gets width 0 (skipped as ``bad_record``)."""
    rows = {k: [] for k in FACTS}
    for i in indices:
        try:
            rec = records.decode_record(source[int(i)])
        except records.RecordError:
            rec = {
                "width": 0,
                "height": 0,
                "num_frames": 0,
                "fps": 0.0,
                "duration": 0.0,
                "has_audio": False,
            }
        for k in FACTS:
            rows[k].append(rec[k])
    return {k: np.asarray(v, _DTYPES.get(k, np.float64)) for k, v in rows.items()}


def save_facts(path: Path, facts: dict[str, np.ndarray]) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".partial.npz")
    np.savez(tmp, **facts)
    tmp.replace(path)


def load_facts(paths: Sequence[Path]) -> dict[str, np.ndarray]:
    """Concatenates facts files (in order) into one split's facts."""
    parts = []
    for p in paths:
        with np.load(p, allow_pickle=False) as z:
            parts.append({k: z[k] for k in FACTS})
    return {k: np.concatenate([p[k] for p in parts]) for k in FACTS}


BAD_RECORD = "bad_record"


@dataclasses.dataclass
class SplitBuckets:
    """One split's records by bucket.

    Attributes:
        buckets: The buckets, in config order.
        members: Per bucket, the record indices that train in it (ascending).
        skipped: Records no bucket takes, by reason.
    """

    buckets: tuple[bk.Bucket, ...]
    members: list[np.ndarray]
    skipped: dict[str, int]

    @classmethod
    def assign(cls, facts: dict[str, np.ndarray], buckets: Sequence[bk.Bucket], fps: float):
        members: list[list[int]] = [[] for _ in buckets]
        skipped: dict[str, int] = {}
        for i in range(len(facts["width"])):
            w, h = int(facts["width"][i]), int(facts["height"][i])
            if w <= 0 or h <= 0:
                where: int | str = BAD_RECORD
            else:
                where = bk.assign(
                    buckets,
                    width=w,
                    height=h,
                    num_frames=int(facts["num_frames"][i]),
                    source_fps=float(facts["fps"][i]),
                    fps=fps,
                )
            if isinstance(where, str):
                skipped[where] = skipped.get(where, 0) + 1
            else:
                members[where].append(i)
        return cls(tuple(buckets), [np.asarray(m, np.int64) for m in members], skipped)

    def counts(self) -> dict[str, int]:
        return {b.name: len(m) for b, m in zip(self.buckets, self.members, strict=True)}
