"""Data pipeline throughput: clips/s per grain worker, beside the train step's consumption.

Renders shapes clips (tiny 32x32x16 and 256x256 with 16-frame windows), ingests them into
ArrayRecord shards, and times the grain pipeline (PyAV decode + resize + log-mel +
tokenize + batch) with 0, 1 and 2 worker processes. Then times the tiny transformer's
train step and prints how many clips/s it consumes, so the two can be compared.

    python benchmarks/data_throughput.py [--clips 128] [--batches 6] [--out benchmarks/results]

Prints a table and writes ``data_throughput.json`` (with the machine's description).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def _machine() -> dict:
    import jax

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax_backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
    }


def _dataset(root: Path, resolution: int, frames: int, clips: int) -> Path:
    from data_pipelines.ingest import ingest
    from data_pipelines.shapes.synth import synth_dataset

    synth_dataset(
        root / "raw",
        clips,
        seed=0,
        resolution=resolution,
        frames=frames,
        split="train",
        workers=2,
        progress=False,
    )
    ingest(root / "raw", root / "records", split="train", workers=2, progress=False)
    return root / "records"


def _time_pipeline(
    config, records: Path, tokenizer, workers: int, batches: int, batch_size: int
) -> float:
    from data_pipelines.pipeline import make_pipeline

    it = make_pipeline(
        config,
        records,
        tokenizer=tokenizer,
        batch_size=batch_size,
        process_index=0,
        process_count=1,
        seed=0,
        worker_count=workers,
    )
    try:
        next(it)  # start-up (worker spawn, first decode) is not throughput
        t = time.perf_counter()
        for _ in range(batches):
            next(it)
        return batches * batch_size / (time.perf_counter() - t)
    finally:
        it.close()


def _train_step_rate(config) -> float:
    import jax
    import numpy as np

    from vdiff.parallel.mesh import make_mesh
    from vdiff.train import stages

    mesh = make_mesh(config)
    engine = stages.dit_engine(config, mesh)
    b = config.train.batch_size
    lt = 1 + (config.data.frames - 1 + config.vae.temporal_down - 1) // config.vae.temporal_down
    s = config.data.resolution // config.vae.spatial_down
    ta = round(config.data.frames / config.data.fps * 25)
    rng = np.random.default_rng(0)
    batch = {
        "video_latents": rng.standard_normal((b, lt, s, s, config.vae.latent_channels), np.float32),
        "audio_latents": rng.standard_normal((b, ta, config.audio_ae.latent_channels), np.float32),
        "tokens": rng.integers(4, 300, (b, config.data.caption_len)).astype(np.int32),
        "mask": np.ones((b, config.data.caption_len), bool),
        "has_audio": np.ones((b,), bool),
    }
    state = engine.init(0)
    state, m = engine.step(state, batch)
    jax.block_until_ready(m)
    t = time.perf_counter()
    n = 5
    for _ in range(n):
        state, m = engine.step(state, batch)
    jax.block_until_ready(m)
    return n * b / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=128)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    from data_pipelines.tokenizer import Tokenizer, train_tokenizer
    from vdiff.config import load_config

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, res, frames, clips in (
            ("tiny 32x32x16", 32, 16, args.clips),
            ("256x256x16", 256, 16, max(32, args.clips // 4)),
        ):
            config = load_config(
                "tiny",
                [
                    f"data.resolution={res}",
                    f"data.buckets=(({res},{res},{frames}),)",
                    f"data.frames={frames}",
                ],
            )
            records = _dataset(tmp / name.split()[0], res, frames, clips)
            tok = Tokenizer(
                train_tokenizer(
                    ["a red circle moves left on a blue background"] * 50 + ["a green square"] * 50,
                    str(tmp / "tok"),
                    vocab_size=300,
                )
            )
            for workers in (0, 1, 2):
                rate = _time_pipeline(config, records, tok, workers, args.batches, args.batch_size)
                rows.append(
                    {
                        "clips": name,
                        "workers": workers,
                        "clips_per_s": rate,
                        "clips_per_s_per_worker": rate / max(workers, 1),
                    }
                )
                print(
                    f"{name:>14}  workers={workers}  {rate:7.1f} clips/s  ({rate / max(workers, 1):.1f} per worker)",
                    flush=True,
                )
    config = load_config("tiny")
    consume = _train_step_rate(config)
    print(
        f"tiny transformer train step consumes {consume:.1f} clips/s (batch {config.train.batch_size}, cached latents)"
    )
    result = {
        "machine": _machine(),
        "pipeline": rows,
        "train_step_clips_per_s": consume,
        "batch_size": args.batch_size,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_throughput.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'data_throughput.json'}")


if __name__ == "__main__":
    main()
