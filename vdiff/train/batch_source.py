"""Where a training stage's batches come from: a source with a checkpointable position.

A stage asks its source for this process's rows of the next global batch; the train
loop stores every process's ``get_state()`` in every checkpoint and gives each process
its own back through ``set_state`` on resume, so a resumed run sees exactly the batches
an uninterrupted one would have seen. The sources are streams over ArrayRecord shards
(:class:`data_pipelines.stream.BatchStream`): decoded frames, latents or mp4 clips.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np


class BatchSource(Protocol):
    """Process-local batches with a checkpointable position."""

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]: ...

    def __next__(self) -> dict[str, np.ndarray]: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...
