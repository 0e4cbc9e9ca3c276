"""What an eval sweep is: its SPEC, its cells, and its long-format results on disk.

A spec (``vdiff eval --sweep SPEC``) is inline JSON, a path to a JSON file, or the compact
``key=v1,v2;key=...``. Keys: ``checkpoints`` (``all``, ``follow`` or steps), ``cfg``,
``steps``, ``seeds``, ``prompts`` (N = the first N val prompts, or the prompts themselves),
``sampler`` and ``name`` (the folder under ``WORKDIR/eval``). A bad key or value raises a
:class:`~vdiff.errors.UserError` naming it and the fix.

The grid is checkpoints x cfg x steps x sampler x seeds x prompts, one :class:`Cell` (one
clip) each. Results are rows of :data:`COLUMNS`; :class:`ResultsStore` appends them to
per-process shards and merges those into ``results.jsonl`` and ``results.csv``.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import io
import json
import logging
import math
import os
import re
from pathlib import Path

import numpy as np

from vdiff.diffusion.samplers import SAMPLERS
from vdiff.errors import UserError
from vdiff.manifest import atomic_write_text

log = logging.getLogger(__name__)

SPEC_KEYS = ("checkpoints", "cfg", "steps", "seeds", "prompts", "sampler", "name")
_EXAMPLE = "checkpoints=all;cfg=1,4;steps=10,25;seeds=0,1;prompts=8"
COLUMNS = (
    "checkpoint", "cfg", "steps", "sampler", "prompt", "seed", "metric", "value", "nfe", "seconds"
)  # fmt: skip
KEY_COLUMNS = COLUMNS[:7]  # a row's identity; the merge keeps the newest row per key
DONE_METRIC = "flicker"  # the last row a cell writes
SYNC_METRICS = ("sync_f1", "sync_precision", "sync_recall")
SHOWN_PROMPTS = 8  # prompts (of the first seed) whose clips are saved for the HTML page


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """What to sweep; ``None`` means the workdir config's ``sample.*`` default."""

    checkpoints: str | tuple[int, ...] = "all"  # "all", "follow" or steps
    cfg: tuple[float, ...] | None = None
    steps: tuple[int, ...] | None = None
    seeds: tuple[int, ...] | None = None
    prompts: int | tuple[str, ...] | None = None  # first N val prompts, or the prompts
    sampler: tuple[str, ...] | None = None
    name: str = "sweep"


def parse_spec(text: str | None) -> SweepSpec:
    """Reads a sweep spec: inline JSON, a path to a JSON file, or ``key=v1,v2;key=...``.

    Raises:
        UserError: naming the bad key or value and the fix.
    """
    text = (text or "").strip()
    if not text:
        return SweepSpec()
    if text.startswith("{"):
        return _spec_from_dict(_json_object(text, "inline --sweep JSON"))
    path = Path(text)
    if text.endswith(".json") or path.is_file():
        if not path.is_file():
            raise UserError(f"sweep spec file {text} does not exist; pass an existing JSON file")
        return _spec_from_dict(_json_object(path.read_text(), f"sweep spec file {text}"))
    raw: dict = {}
    for item in filter(None, (s.strip() for s in text.split(";"))):
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"sweep spec item '{item}' is not KEY=VALUES; write e.g. '{_EXAMPLE}'")
        items = [v.strip() for v in value.split(",") if v.strip()]
        raw[key.strip()] = items[0] if len(items) == 1 else items
    return _spec_from_dict(raw)


def _json_object(text: str, what: str) -> dict:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(
            f"{what} is not valid JSON ({e.msg} at char {e.pos}); fix the JSON"
        ) from None
    if not isinstance(obj, dict):
        raise UserError(f'{what} must be a JSON object like {{"cfg": [1, 4]}}')
    return obj


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _numbers(key: str, value, kind, minimum, example: str) -> tuple:
    out = []
    for v in _as_list(value):
        try:
            if isinstance(v, bool) or (kind is int and isinstance(v, float) and not v.is_integer()):
                raise ValueError
            x = kind(v)
        except (TypeError, ValueError):
            raise UserError(
                f"sweep spec {key}={v!r} is not a number; write e.g. {example}"
            ) from None
        if not math.isfinite(x) or x < minimum:
            raise UserError(f"sweep spec {key}={v!r} must be >= {minimum}; write e.g. {example}")
        if x not in out:
            out.append(x)
    if not out:
        raise UserError(f"sweep spec {key} is empty; write e.g. {example}")
    return tuple(out)


def _spec_from_dict(raw: dict) -> SweepSpec:
    for key in raw:
        if key not in SPEC_KEYS:
            close = difflib.get_close_matches(str(key), SPEC_KEYS, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise UserError(
                f"sweep spec has unknown key '{key}'; {hint}valid keys: {', '.join(SPEC_KEYS)}"
            )
    kw: dict = {}
    if "checkpoints" in raw:
        v = raw["checkpoints"]
        kw["checkpoints"] = (
            v
            if v in ("all", "follow")
            else _numbers("checkpoints", v, int, 0, "checkpoints=all, =follow or =1000,2000")
        )
    if "cfg" in raw:
        kw["cfg"] = _numbers("cfg", raw["cfg"], float, 0.0, "cfg=1,4")
    if "steps" in raw:
        kw["steps"] = _numbers("steps", raw["steps"], int, 1, "steps=10,25")
    if "seeds" in raw:
        kw["seeds"] = _numbers("seeds", raw["seeds"], int, 0, "seeds=0,1")
    if "sampler" in raw:
        samplers = tuple(dict.fromkeys(str(s) for s in _as_list(raw["sampler"])))
        bad = [s for s in samplers if s not in SAMPLERS]
        if bad or not samplers:
            raise UserError(f"sweep spec sampler={bad or '[]'} is not one of {SAMPLERS}")
        kw["sampler"] = samplers
    if "prompts" in raw:
        kw["prompts"] = _prompts(raw["prompts"])
    if "name" in raw:
        name = raw["name"]
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise UserError(
                f"sweep spec name={name!r} must be a folder name of letters, digits, '.', '_' "
                "or '-' (e.g. name=cfg_sweep)"
            )
        kw["name"] = name
    return SweepSpec(**kw)


def _prompts(value) -> int | tuple[str, ...]:
    items = _as_list(value)
    if len(items) == 1 and not isinstance(items[0], bool):
        v = items[0]
        if isinstance(v, int) or (isinstance(v, str) and v.strip().isdigit()):
            n = int(v)
            if n < 1:
                raise UserError("sweep spec prompts=0 gives no cells; pass prompts=N with N >= 1")
            return n
    if not all(isinstance(p, str) and p.strip() for p in items) or not items:
        raise UserError(
            "sweep spec prompts must be a count (prompts=8: the first 8 val prompts) or a list "
            'of non-empty strings (JSON: {"prompts": ["a red circle ...", ...]})'
        )
    return tuple(dict.fromkeys(p.strip() for p in items))


# ----------------------------------------------------------------------------- the grid
@dataclasses.dataclass(frozen=True)
class Cell:
    checkpoint: int
    cfg: float
    steps: int
    sampler: str
    seed: int
    prompt_index: int  # position in the sweep's prompt list: keys the starting noise
    prompt: str

    @property
    def key(self) -> tuple:
        return (self.checkpoint, self.cfg, self.steps, self.sampler, self.prompt, self.seed)

    @property
    def group(self) -> tuple:
        return (self.checkpoint, self.cfg, self.steps, self.sampler)

    @property
    def clip_name(self) -> str:
        return (
            f"ckpt{self.checkpoint}_cfg{self.cfg:g}_steps{self.steps}_{self.sampler}"
            f"_seed{self.seed}_p{self.prompt_index:03d}"
        )


def grid_cells(checkpoints, cfgs, steps, samplers, seeds, prompts) -> list[Cell]:
    """Every cell, checkpoint-major (so a process restores each checkpoint once)."""
    return [
        Cell(int(ck), float(c), int(s), sm, int(sd), i, p)
        for ck in checkpoints
        for c in cfgs
        for s in steps
        for sm in samplers
        for sd in seeds
        for i, p in enumerate(prompts)
    ]


def assign(cells: list, process_index: int, process_count: int) -> list:
    """Cell i of the (pending) list goes to process ``i % process_count``."""
    return cells[process_index::process_count]


def row(metric: str, value, *, cell: Cell | None = None, group=None, checkpoint=None, **extra):
    """One long-format row; NaN becomes None (null in JSON, empty in CSV)."""
    ck, cfg, steps, sampler = cell.group if cell else (group or (checkpoint, None, None, None))
    value = None if value is None or (isinstance(value, float) and math.isnan(value)) else value
    return {
        "checkpoint": ck, "cfg": cfg, "steps": steps, "sampler": sampler,
        "prompt": cell.prompt if cell else None, "seed": cell.seed if cell else None,
        "metric": metric, "value": value, "nfe": extra.get("nfe"), "seconds": extra.get("seconds"),
    }  # fmt: skip


def row_key(r: dict) -> tuple:
    return tuple(r[c] for c in KEY_COLUMNS)


# -------------------------------------------------------------------- results on disk
class ResultsStore:
    """Per-process shards under ``OUT/shards`` and the merged table in ``OUT``.

    ``rows.P.jsonl`` holds process P's rows, ``features.P.jsonl`` the VAE features of
    its generated clips (for the Fréchet distance). Lines are appended and flushed as
    cells finish; a line cut short by a crash is ignored when read back.
    """

    def __init__(self, out_dir: Path, process_index: int = 0):
        self.out = Path(out_dir)
        self.shards = self.out / "shards"
        self.shards.mkdir(parents=True, exist_ok=True)
        self.rows_path = self.shards / f"rows.{process_index}.jsonl"
        self.features_path = self.shards / f"features.{process_index}.jsonl"

    @staticmethod
    def _read_lines(paths) -> list[dict]:
        out = []
        for path in sorted(paths):
            for line in path.read_text().splitlines():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    log.warning("ignoring a cut-off line in %s", path.name)
        return out

    @staticmethod
    def _append(path: Path, objs: list[dict]) -> None:
        if not objs:
            return
        with path.open("a") as f:
            f.write("".join(json.dumps(o) + "\n" for o in objs))
            f.flush()
            os.fsync(f.fileno())

    def read_rows(self) -> list[dict]:
        """Every shard's rows, newest last (later lines win in :meth:`merge`)."""
        return self._read_lines(self.shards.glob("rows.*.jsonl"))

    def append_rows(self, rows: list[dict]) -> None:
        self._append(self.rows_path, rows)

    def read_features(self) -> dict[tuple, np.ndarray]:
        return {
            tuple(d["key"]): np.asarray(d["features"], np.float64)
            for d in self._read_lines(self.shards.glob("features.*.jsonl"))
        }

    def append_features(self, cell: Cell, features: np.ndarray) -> None:
        self._append(
            self.features_path, [{"key": list(cell.key), "features": [float(x) for x in features]}]
        )

    def merge(self) -> list[dict]:
        """Writes ``results.jsonl`` and ``results.csv`` (one row per key, newest wins)."""
        merged = {row_key(r): r for r in self.read_rows()}
        rows = sorted(merged.values(), key=sort_key)
        atomic_write_text(self.out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: ("" if r[k] is None else r[k]) for k in COLUMNS} for r in rows)
        atomic_write_text(self.out / "results.csv", buf.getvalue())
        return rows


def sort_key(r: dict) -> tuple:
    def k(v):  # None first, then numbers / strings
        return (0, 0, "") if v is None else (1, v, "") if not isinstance(v, str) else (1, 0, v)

    return tuple(k(r[c]) for c in KEY_COLUMNS)
