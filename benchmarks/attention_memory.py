"""Per-device temporary memory of the compiled DiT train step against the video token count,
for the einsum reference attention ("xla") and the blockwise one.

    python benchmarks/attention_memory.py [--tokens 1024 4096 16384] [--backends xla blockwise]

The step is ``dit_s``'s transformer (width 384, 12 layers, 6 heads; bfloat16 compute and
``save_dots`` remat, as the config trains) with cross-attention to the text, no audio,
batch 1, on one device; clips of 61 frames (16 latent
frames) at 64, 128 and 256 pixels give 1,024, 4,096 and 16,384 video tokens (patch 1x2x2
over a 4x spatially downsampled latent). Each step is lowered and compiled, never run, and
``memory_analysis()`` of the compiled step reports the temporary bytes XLA plans for it
(activations kept for the backward pass, attention logits, workspace) besides the
arguments (parameters, optimiser state, batch). Writes
``attention_memory_<platform>.json`` under ``--out`` and prints a table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import machine, save_results, shapes, synthetic_batch

SIDE = {1024: 64, 4096: 128, 16384: 256}  # video tokens -> clip side at 61 frames


def compiled_memory(tokens: int, backend: str) -> dict:
    from vdiff.config import load_config
    from vdiff.parallel.mesh import make_mesh
    from vdiff.train.stages import dit_engine

    side = SIDE[tokens]
    overrides = [
        f"data.buckets=(({side},{side},61),)", "data.audio=False", "train.batch_size=1",
        "model.text_attention=cross", f"model.attention={backend}", "mesh.shape.data=1",
        "mesh.shape.fsdp=1",
    ]  # fmt: skip
    cfg = load_config("dit_s", overrides)
    engine = dit_engine(cfg, make_mesh(cfg))
    shp = shapes(cfg, cfg.data.buckets[0])
    assert shp["video_tokens"] == tokens, shp
    state = engine.abstract_state  # shapes only: nothing is allocated
    batch = synthetic_batch(cfg, shp, 1)
    t = time.perf_counter()
    compiled = engine.lower(state, batch).compile()
    mem = compiled.memory_analysis()
    return {
        "video_tokens": tokens,
        "backend": backend,
        "clip": [side, side, 61],
        "compile_s": time.perf_counter() - t,
        "temp_bytes": mem.temp_size_in_bytes,
        "argument_bytes": mem.argument_size_in_bytes,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--backends", nargs="+", default=["xla", "blockwise"])
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    rows = []
    print(f"{'backend':>10} {'tokens':>7} {'temp GiB':>9} {'args GiB':>9} {'compile s':>9}")
    for backend in args.backends:
        for tokens in args.tokens:
            r = compiled_memory(tokens, backend)
            rows.append(r)
            print(
                f"{backend:>10} {tokens:7d} {r['temp_bytes'] / 2**30:9.3f} "
                f"{r['argument_bytes'] / 2**30:9.3f} {r['compile_s']:9.1f}",
                flush=True,
            )
    save_results(args.out, "attention_memory", {"machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()
