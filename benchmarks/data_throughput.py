"""Training-data throughput: clips/s of each training stream beside the train step's use.

For ``tiny`` and ``dit_s`` (shrunk on CPU as ``benchmarks/train_step.py`` shrinks it),
renders shapes clips at the config's bucket, ingests them into ArrayRecord shards, and
times, with 0, 1 and 2 grain worker processes:

- ``mp4 stream``: ``data.decode="stream"``, PyAV decode + resize + log-mel + tokenize at
  every step (what the autoencoders and ``clips`` mode read without a frames cache);
- ``frames cache``: ``data.decode="cache"``, the decoded-frames shards streamed (what the
  main job's autoencoders and ``clips`` mode read);
- ``latents``: latent shards of the config's latent shape streamed and normalised (what
  the transformer reads in ``latents`` mode);

then the transformer's train step on cached latents, as clips/s consumed, and prints
each stream's rate as a multiple of it. Each stream is the one the stages build
(:meth:`vdiff.train.data.Data.stream`, :func:`vdiff.train.stages.dit_latent_stream`).

    python benchmarks/data_throughput.py [--clips 96] [--batches 6] [--out benchmarks/results]

Prints a table and writes ``data_throughput.json`` (with the machine's description).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import CPU_SHRINK, bench, machine


def _config(name: str, shrink: bool, clips: int, workers: int, decode: str):
    from vdiff.config import load_config

    overrides = dict(CPU_SHRINK.get(name, {})) if shrink else {}
    cfg = load_config(name, [f"{k}={v}" for k, v in overrides.items()])
    d = cfg.data
    d.buckets = ((d.resolution, d.resolution, d.frames),)
    d.num_train, d.num_val, d.num_workers, d.decode = clips, 16, workers, decode
    return cfg, overrides


def _data(cfg, root: Path):
    from vdiff.train.data import prepare_data

    cfg.data.root = str(root)
    return prepare_data(cfg, root)


def _rate(stream, batches: int, per_batch: int) -> float:
    try:
        next(stream)  # start-up (worker spawn, first reads) is not throughput
        t = time.perf_counter()
        for _ in range(batches):
            next(stream)
        return batches * per_batch / (time.perf_counter() - t)
    finally:
        stream.close()


def _latent_cache(cfg, data, out: Path):
    """Random latents of the config's shape for every train clip, written as the latent
    cache stage writes them (the stream's cost does not depend on the values)."""
    import numpy as np
    from train_step import shapes

    from data_pipelines import latents as lc
    from vdiff.train.trained import LatentCache

    shp = shapes(cfg)
    rng = np.random.default_rng(0)
    lc.clear_cache(out)
    writer = lc.PartWriter(out, "train")
    src = data.source("train")
    for i in range(len(src)):
        rec = src.read([i])
        writer.write(
            {
                "key": rec["key"][0], "index": i,
                "video": rng.standard_normal(shp["video_latents"]).astype(np.float32),
                "audio": rng.standard_normal(shp["audio_latents"]).astype(np.float32)
                if shp["audio_latents"] else None,
                "has_audio": True, "tokens": rec["tokens"][0], "mask": rec["mask"][0],
                "caption": rec["caption"][0],
            }
        )  # fmt: skip
    writer.close()
    entry, _ = lc.merge_parts(out, "train", 1)
    ones = {"shift": np.zeros(1, np.float32), "scale": np.ones(1, np.float32)}
    stats = {"video": ones, **({"audio": ones} if shp["audio_latents"] else {})}
    meta = lc.write_meta(out, {"benchmark": True}, {"train": entry}, stats)
    return LatentCache(out, lc.load_stats(out), meta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "dit_s"])
    parser.add_argument("--clips", type=int, default=96)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--cpu-shrink", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    from vdiff.train import stages

    rows, steps = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            root = Path(tmp) / name
            cfg, overrides = _config(name, args.cpu_shrink, args.clips, 0, "cache")
            data = _data(cfg, root)  # renders, ingests, decodes the frames cache once
            step = bench(name, overrides, steps=3, warmup=1, peak_n=256)
            consume = step["batch_size"] / step["step_s_median"]
            steps[name] = {
                "clips_per_s": consume,
                **{k: step[k] for k in ("batch_size", "step_s_median", "shapes")},
            }
            print(f"{name}: the transformer's train step consumes {consume:.1f} clips/s "
                  f"(batch {step['batch_size']}, {step['step_s_median']:.2f} s/step)", flush=True)  # fmt: skip
            latents = _latent_cache(cfg, data, root / "latents")
            b = cfg.train.batch_size
            for workers in (int(w) for w in args.workers.split(",")):
                for stream_name, decode in (("mp4 stream", "stream"), ("frames cache", "cache")):
                    c, _ = _config(name, args.cpu_shrink, args.clips, workers, decode)
                    d = _data(c, root)
                    fields = stages.dit_clip_fields(c, {"audio": None})
                    sizes = {
                        x.name: b for x in d.buckets
                    }  # the benchmark's configs have one bucket
                    rate = _rate(
                        d.stream("train", fields, batch_sizes=sizes, seed=0), args.batches, b
                    )
                    rows.append((name, stream_name, workers, rate))
                c, _ = _config(name, args.cpu_shrink, args.clips, workers, "cache")
                stream = stages.dit_latent_stream(c, d, latents)({x.name: b for x in d.buckets}, 0)
                rows.append((name, "latents", workers, _rate(stream, args.batches, b)))
                for r in rows[-3:]:
                    print(f"{r[0]:>6} {r[1]:>13}  workers={r[2]}  {r[3]:8.1f} clips/s  "
                          f"x{r[3] / consume:.1f} the step's use", flush=True)  # fmt: skip
    result = {
        "machine": machine(),
        "clips": args.clips,
        "train_step": steps,
        "streams": [
            {
                "config": c,
                "stream": s,
                "workers": w,
                "clips_per_s": r,
                "x_step": r / steps[c]["clips_per_s"],
            }
            for c, s, w, r in rows
        ],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_throughput.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'data_throughput.json'}")


if __name__ == "__main__":
    main()
