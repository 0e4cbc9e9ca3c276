"""Parameter counts of every config's transformer (+ internal text encoder) and video VAE.

    python benchmarks/param_counts.py

Counts come from ``nnx.eval_shape`` (no memory is allocated), so the big configs are
cheap to count on a laptop.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
from flax import nnx

from vdiff.config import REPO_CONFIGS, load_config
from vdiff.models.dit import DiT
from vdiff.models.video_vae import VideoVAE
from vdiff.train.stages import dit_sizes


def count(make) -> int:
    abstract = nnx.eval_shape(lambda: make(nnx.Rngs(0)))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def main() -> None:
    names = sorted(p.stem for p in REPO_CONFIGS.glob("*.py") if p.stem not in ("__init__", "base"))
    print(f"{'config':8} {'width':>5} {'depth':>5} {'heads':>5} {'DiT+text':>12} {'video VAE':>10}")
    for name in names:
        c = load_config(name)
        if c.text.encoder != "internal" and not (Path(c.text.path) / "config.json").is_file():
            print(f"{name:8} (needs its text encoder folder, text.path={c.text.path})")
            continue
        dit = count(lambda rngs, c=c: DiT.from_config(c.model, dit_sizes(c), rngs))
        vae = count(lambda rngs, c=c: VideoVAE.from_config(c.vae, rngs))
        print(
            f"{name:8} {c.model.width:5d} {c.model.depth:5d} {c.model.heads:5d} {dit / 1e6:11.2f}M {vae / 1e6:9.2f}M"
        )


if __name__ == "__main__":
    main()
