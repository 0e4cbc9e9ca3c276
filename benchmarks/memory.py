"""Peak memory of the training stages against the dataset's size.

Trains the tiny recipe's video VAE stage (reading the decoded-frames cache, and reading
the mp4 records with ``data.decode=stream``) and its transformer stage (``latents`` and
``clips`` modes) for the same few steps on shapes datasets of each size, each stage in a
fresh ``vdiff train`` process, and prints every process's peak RSS. A data path whose
memory is bounded by the batch gives the same peak at every size; one that holds the
dataset grows with it.

    python benchmarks/memory.py [--sizes 512,16384] [--steps 20] [--root DIR] [--out benchmarks/results]

Each size's data (shapes render, ArrayRecord shards, tokenizer, frames cache) is made
once under ``ROOT/data_N`` by an unmeasured VAE run; the measured runs then reuse it. The transformer
runs start from a copy of that VAE run's workdir, so they train no VAE step (they restore
it, build the latent cache in ``latents`` mode, and train the transformer). Writes
``memory.json`` with the machine's description.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = {  # name -> (train.stages, extra overrides)
    "vae": ("('vae',)", []),
    "vae_mp4_stream": ("('vae',)", ["--config.data.decode=stream"]),
    "dit_latents": ("('vae', 'dit')", ["--config.data.dit_input=latents"]),
    "dit_clips": ("('vae', 'dit')", ["--config.data.dit_input=clips"]),
}


def _train(workdir: Path, data_root: Path, size: int, steps: int, stages: str, extra) -> dict:
    """One ``vdiff train`` process; returns its wall time and peak RSS (its own and its
    children's, from ``wait4``)."""
    args = [
        sys.executable, "-m", "vdiff.cli", "train", "--config", "tiny", "--workdir", str(workdir),
        "--no-report", f"--config.data.root={data_root}", f"--config.data.num_train={size}",
        "--config.data.num_val=64", f"--config.vae.steps={steps}",
        f"--config.audio_ae.steps={steps}", f"--config.train.steps={steps}",
        f"--config.train.stages={stages}", "--config.train.log_every=10", *extra,
    ]  # fmt: skip
    t0 = time.time()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"vdiff train failed ({proc.returncode}):\n{err[-3000:]}")
    return {"wall_s": round(time.time() - t0, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="512,16384", help="train clips per dataset, comma-separated")
    ap.add_argument("--steps", type=int, default=20, help="steps of every stage")
    ap.add_argument("--root", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    root = Path(args.root or tempfile.mkdtemp(prefix="vdiff_memory_"))
    rows = []
    for size in sizes:
        data = root / f"data_{size}"
        base = root / f"vae_{size}"
        t0 = time.time()
        _train(base, data, size, args.steps, STAGES["vae"][0], [])  # makes the data once
        print(f"{size} clips: data and VAE ready in {time.time() - t0:.0f} s", flush=True)
        for name, (stages, extra) in STAGES.items():
            workdir = root / f"{name}_{size}"
            if name.startswith("dit"):
                shutil.copytree(base, workdir)
            row = {
                "clips": size,
                "stage": name,
                **_train(workdir, data, size, args.steps, stages, extra),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'stage':<12} " + " ".join(f"{s:>10}" for s in sizes) + "   (peak RSS, MB)")
    for name in STAGES:
        peaks = {r["clips"]: r["peak_rss_mb"] for r in rows if r["stage"] == name}
        growth = peaks[sizes[-1]] / peaks[sizes[0]]
        print(f"{name:<12} " + " ".join(f"{peaks[s]:>10}" for s in sizes) + f"   x{growth:.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = {"platform": platform.platform(), "cpu_count": os.cpu_count()}
    (out / "memory.json").write_text(
        json.dumps({"machine": machine, "steps": args.steps, "results": rows}, indent=1)
    )
    if args.root is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
