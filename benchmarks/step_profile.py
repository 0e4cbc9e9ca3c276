"""Where the transformer train step's time goes, op by op, from an XLA profiler trace.

Builds the DiT train step exactly as ``benchmarks/train_step.py`` does (same configs,
``--set`` overrides and ``--caption-embeddings``; the first bucket), compiles it, runs
``--warmup`` steps, then traces ``--steps`` steps with ``jax.profiler`` and reads the
Perfetto trace back. Every XLA thunk on the compute threads is charged its wall time,
split evenly among the thunks running at the same moment, so the rows add up to the
traced wall time. Rows are grouped by the JAX operation each thunk comes from (the
``op_name`` of its HLO instruction: ``jvp()`` is the forward pass, ``transpose(jvp())`` the
backward, ``while/body`` a scan or loop body) and, coarser, by kind: matrix products,
slices and copies, elementwise fusions.

Time with no traced thunk is reported as "untraced": on XLA:CPU that is mostly work that
a thunk hands to the thread pool after its own trace event ends (the Eigen matrix
products that YNNPACK does not take), plus scheduling.

    python benchmarks/step_profile.py --configs dit_s --no-cpu-shrink --set model.depth=4 ...
    python benchmarks/step_profile.py --top 40 --by kind

The comparison method and the figures it gave are in docs/experiments.md ("the
transformer's CPU step against the PyTorch Wan reference").
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from train_step import CPU_SHRINK, caption_embeddings, make_engine, shapes, synthetic_batch

# Trace events that are bookkeeping, not work: thunk executor spans, pool markers, loops
# (a while thunk's span covers its body's thunks, which are traced themselves).
_SKIP = ("ThunkExecutor", "SlinkyThreadPool", "ThreadpoolListener", "end: ", "while")


def op_names(hlo: str) -> dict[str, str]:
    """HLO instruction name -> the JAX op_name of its metadata."""
    pattern = r"^\s*(?:ROOT )?%([\w.\-]+) = [^\n]*?op_name=\"([^\"]*)\""
    return {m.group(1): m.group(2) for m in re.finditer(pattern, hlo, re.M)}


def kind_of(op: str, instruction: str) -> str:
    """A coarse category from the JAX op name and the HLO instruction name."""
    last = op.rsplit("/", 1)[-1]
    if last == "dot_general" or (instruction.startswith(("dot", "ynn_fusion")) and "->" in op):
        return "matrix products"
    if "dynamic_slice" in op or "dynamic_update_slice" in op or instruction.startswith("copy"):
        return "slices, stacking and copies"
    if last in ("transpose", "concatenate", "broadcast_in_dim", "pad", "reshape"):
        return "layout (transpose, concatenate, pad)"
    if last.startswith("reduce"):
        return "reductions"
    return "elementwise"


def wall_shares(trace_file: Path, hlo: str, by: str) -> tuple[dict[str, float], float, float]:
    """``(seconds per row, traced span, untraced seconds)`` of a Perfetto trace."""
    with gzip.open(trace_file) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    threads = {
        (e["pid"], e["tid"]): e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name"
    }
    thunks = [
        e
        for e in events
        if e.get("ph") == "X"
        and threads.get((e["pid"], e["tid"]), "").startswith("tf_XLAEigen")
        and not e["name"].startswith(_SKIP)
    ]
    names = op_names(hlo)

    def row(instruction: str) -> str:
        op = names.get(instruction, "?").replace("jit(_step_fn)/", "")
        if by == "kind":
            return kind_of(op, instruction)
        return re.sub(r"(closed_call/)+", "", op)

    points = sorted(
        p for e in thunks for p in ((e["ts"], 1, e["name"]), (e["ts"] + e["dur"], -1, e["name"]))
    )
    active: collections.Counter = collections.Counter()
    shares: dict[str, float] = collections.defaultdict(float)
    untraced, last = 0.0, None
    for t, delta, name in points:
        if last is not None and t > last:
            running = sum(active.values())
            if running == 0:
                untraced += t - last
            for n, count in active.items():
                shares[row(n)] += (t - last) * count / running
        last = t
        active[name] += delta
        if active[name] == 0:
            del active[name]
    span = (points[-1][0] - points[0][0]) if points else 0.0
    return {k: v / 1e6 for k, v in shares.items()}, span / 1e6, untraced / 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="dit_s", help="one config name (train_step.py's)")
    p.add_argument("--set", nargs="*", default=[], help="KEY=VALUE overrides")
    p.add_argument("--cpu-shrink", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--caption-embeddings", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=1, help="traced steps")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--by", choices=("op", "kind"), default="op")
    args = p.parse_args()

    name = args.configs
    overrides = dict(CPU_SHRINK.get(name, {})) if args.cpu_shrink else {}
    overrides.update(kv.split("=", 1) for kv in args.set)
    if args.caption_embeddings:
        folder = Path(tempfile.mkdtemp()) / "caption_encoder_config"
        overrides.update(caption_embeddings(args.caption_embeddings, folder))
    cfg, _, engine, sizes = make_engine(name, overrides)
    bucket = cfg.data.buckets[0]
    b = sizes["x".join(str(int(x)) for x in bucket)] * jax.process_count()
    batch = synthetic_batch(cfg, shapes(cfg, bucket), b)
    state = engine.init(0)
    hlo = engine.lower(state, batch).compile().as_text()
    times = []
    for _ in range(args.warmup + 1):
        t = time.perf_counter()
        state, metrics = engine.step(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t)
    folder = Path(tempfile.mkdtemp())
    jax.profiler.start_trace(str(folder), create_perfetto_trace=True)
    for _ in range(args.steps):
        state, metrics = engine.step(state, batch)
        jax.block_until_ready((state, metrics))
    jax.profiler.stop_trace()
    trace = next(folder.rglob("perfetto_trace.json.gz"))
    shares, span, untraced = wall_shares(trace, hlo, args.by)

    n = args.steps
    print(f"{name} {overrides}: batch {b}, untraced step {np.median(times[1:] or times):.3f} s")
    print(f"traced: {span / n:.3f} s a step; no thunk running: {untraced / n:.3f} s")
    print(f"{'s/step':>8} {'share':>6}  {'op' if args.by == 'op' else 'kind'}")
    for key, sec in sorted(shares.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"{sec / n:8.3f} {sec / span:6.1%}  {key}")


if __name__ == "__main__":
    main()
