"""Training metrics on disk: ``metrics.jsonl`` and TensorBoard events, from process 0."""

from __future__ import annotations

import json
from pathlib import Path

import jax
from tensorboardX import SummaryWriter


class MetricWriter:
    """metrics.jsonl + TensorBoard events under WORKDIR/metrics/STAGE (process 0 only)."""

    def __init__(self, directory: Path):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        directory.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(directory / "metrics.jsonl", "a")  # noqa: SIM115 - open for the stage's life
        self.tb = SummaryWriter(str(directory))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()
