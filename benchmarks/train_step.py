"""Transformer train-step speed: compile time, step time, tokens/s, TFLOP/s and MFU, per
config and shape bucket.

For each config and each of its buckets (``data.buckets``, with the batch the training
run gives that bucket: ``data.bucket_batch`` or the token budget) the DiT train step
(the shared Engine, cached-latent batches of random numbers with the bucket's shapes)
is compiled (timed: what the warm-up before step 1 costs), run ``--warmup`` times, then
timed ``--steps`` times (each step synchronised); the median is reported. Model
FLOPs come from the analytic count in :mod:`vdiff.models.flops` (matmuls only, no
remat); MFU divides the achieved model FLOP/s by the dense-matmul peak that *this
process* reaches on the same devices, timed on a large ``jnp.dot`` in the step's
compute dtype (per device, times the device count). Per-device memory comes from the
compiled step's ``memory_analysis()``.

    python benchmarks/train_step.py                      # CPU: tiny and a shrunk dit_s
    python benchmarks/train_step.py --configs dit_b dit_l  # on a GPU
    python benchmarks/train_step.py --configs dit_s:128    # its three 128-pixel buckets

``--caption-embeddings D`` trains on a pretrained encoder's cached embeddings of width
``D`` (as ``text.encoder="t5"`` does) instead of token ids through the internal text
encoder: the transformer alone, as the PyTorch reference
(``benchmarks/torch_reference_step.py``) takes its text.

On CPU, ``dit_s`` is shrunk to 8 frames at 64 pixels (``dit_s:128``'s buckets to half
size) and batch 4 (``--cpu-shrink``, on by default there) so the run takes minutes; the shapes used are printed and saved. Writes
``train_step_<platform>.json`` under ``--out`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

CPU_SHRINK = {
    "dit_s": {"data.buckets": "((64,64,8),)", "train.batch_size": 4},
    # Square, landscape and portrait: the three 128-pixel buckets at half size.
    "dit_s:128": {"data.buckets": "((64,64,8),(48,64,8),(64,48,8))", "train.batch_size": 4},
}


def machine() -> dict:
    dev = jax.devices()[0]
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
    }


def save_results(out: str, name: str, payload: dict) -> Path:
    """Writes ``payload`` to ``out/<name>_<platform>.json`` and says where."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}_{jax.default_backend()}.json"
    path.write_text(json.dumps(payload, indent=1))
    print(f"wrote {path}")
    return path


def matmul_peak(dtype, n: int, repeats: int = 5) -> float:
    """Dense matmul FLOP/s of one device in ``dtype`` (median of ``repeats``)."""
    a = jnp.ones((n, n), dtype)
    b = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=dtype))
    f(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2.0 * n**3 / statistics.median(times)


def shapes(cfg, bucket) -> dict:
    """Latent and token counts of one training example of ``bucket`` (h, w, frames)."""
    from data_pipelines.buckets import Bucket, Strides
    from data_pipelines.pipeline import audio_frame_multiple, mel_frames

    d = cfg.data
    strides = Strides.from_config(cfg)
    b = Bucket(*(int(x) for x in bucket))
    lt, sd = strides.latent_frames(b.frames), strides.spatial_down
    mel = mel_frames(b.frames, d.fps, d.sample_rate, d.hop, audio_frame_multiple(cfg))
    ta = mel // cfg.audio_ae.time_down if d.audio else 0
    return {
        "video_latents": (lt, b.height // sd, b.width // sd, cfg.vae.latent_channels),
        "audio_latents": (ta, cfg.audio_ae.latent_channels) if ta else None,
        "video_tokens": b.tokens(strides),
        "audio_tokens": ta // cfg.model.audio_patch,
        "text_tokens": cfg.text.max_len,
    }


def synthetic_batch(cfg, shp: dict, b: int) -> dict:
    from vdiff.models.t5 import pretrained_width

    rng = np.random.default_rng(0)
    length = cfg.text.max_len
    width = pretrained_width(cfg.text)
    if width is None:  # the internal encoder reads token ids
        caption = {"tokens": rng.integers(4, cfg.data.vocab_size, (b, length)).astype(np.int32)}
    else:  # a pretrained encoder's cached embeddings (bfloat16, as the latent records hold)
        caption = {"text": rng.standard_normal((b, length, width)).astype(jnp.bfloat16)}
    batch = {
        "video_latents": rng.standard_normal((b, *shp["video_latents"])).astype(np.float32),
        **caption,
        "mask": np.arange(length)[None] < rng.integers(4, 33, (b, 1)),
        "fps": np.full((b,), cfg.data.fps, np.float32),  # each clip's frame rate, as in training
    }
    if shp["audio_latents"]:
        batch["audio_latents"] = rng.standard_normal((b, *shp["audio_latents"])).astype(np.float32)
        batch["has_audio"] = np.ones((b,), bool)
    return batch


def caption_embeddings(width: int, folder: Path) -> dict:
    """Overrides that train on a pretrained encoder's cached embeddings of ``width``: the
    train step needs only the encoder's config.json (it never runs the encoder)."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = {"model_type": "t5", "vocab_size": 32128, "d_model": width, "d_kv": 64, "d_ff": 4 * width,
            "num_layers": 1, "num_heads": max(1, width // 64), "feed_forward_proj": "gated-gelu"}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(spec))
    return {"text.encoder": "t5", "text.path": str(folder)}


def make_engine(name: str, overrides: dict):
    """``(cfg, mesh, engine, batch sizes per bucket)`` of the DiT train step of a config."""
    from vdiff.config import load_config
    from vdiff.models.t5 import pretrained_width
    from vdiff.parallel.mesh import make_mesh
    from vdiff.train.stages import dit_engine, stage_batches

    cfg = load_config(name, [f"{k}={v}" for k, v in overrides.items()])
    mesh = make_mesh(cfg)
    width = pretrained_width(cfg.text)
    empty = None
    if width is not None:  # the empty caption: its end token's embedding (random here)
        empty = (np.zeros((cfg.text.max_len, width), jnp.bfloat16), np.arange(cfg.text.max_len) < 1)
    engine = dit_engine(cfg, mesh, empty_caption=empty)
    sizes = stage_batches(cfg, engine, cfg.train.batch_size, tuple(cfg.data.bucket_batch))
    return cfg, mesh, engine, sizes


def bench(name: str, overrides: dict, steps: int, warmup: int, peak_n: int) -> list[dict]:
    from vdiff.models.flops import train_flops_per_example

    cfg, mesh, engine, sizes = make_engine(name, overrides)
    state = engine.init(0)
    dtype = jnp.dtype(cfg.train.compute_dtype)
    peak = matmul_peak(dtype, peak_n) * jax.device_count()
    rows = []
    for bucket in cfg.data.buckets:
        bname = "x".join(str(int(x)) for x in bucket)
        b = sizes[bname] * jax.process_count()
        shp = shapes(cfg, bucket)
        batch = synthetic_batch(cfg, shp, b)
        t = time.perf_counter()
        compiled = engine.lower(state, batch).compile()
        compile_s = time.perf_counter() - t
        mem = compiled.memory_analysis()
        times = []
        for i in range(warmup + steps):
            t = time.perf_counter()
            state, metrics = engine.step(state, batch)
            jax.block_until_ready((state, metrics))
            if i >= warmup:
                times.append(time.perf_counter() - t)
        step_s = statistics.median(times)
        lt, hl, wl, _ = shp["video_latents"]
        flops = b * train_flops_per_example(
            cfg, (lt, hl, wl), shp["audio_latents"] and shp["audio_latents"][0], shp["text_tokens"]
        )
        joint = shp["video_tokens"] + shp["audio_tokens"] + shp["text_tokens"]
        rows.append({
            "config": name,
            "bucket": bname,
            "overrides": overrides,
            "mesh": dict(mesh.shape),
            "batch_size": b,
            "compute_dtype": dtype.name,
            "remat": cfg.train.remat,
            "shapes": shp,
            "joint_tokens_per_example": joint,
            "step_s_median": step_s,
            "step_s_all": times,
            "compile_s": compile_s,
            "tokens_per_s": b * joint / step_s,
            "video_tokens_per_s": b * shp["video_tokens"] / step_s,
            "model_tflop_per_step": flops / 1e12,
            "model_tflop_per_s": flops / step_s / 1e12,
            "matmul_peak_tflop_per_s": peak / 1e12,
            "mfu": flops / step_s / peak,
            "per_device_bytes": {
                "arguments": mem.argument_size_in_bytes,
                "outputs": mem.output_size_in_bytes,
                "temp": mem.temp_size_in_bytes,
            },
            "final_loss": float(metrics["loss"]),
        })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    on_gpu = jax.default_backend() == "gpu"
    parser.add_argument(
        "--configs", nargs="+", default=["dit_b", "dit_l"] if on_gpu else ["tiny", "dit_s"]
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    parser.add_argument("--peak-n", type=int, default=8192 if on_gpu else 2048, help="matmul size")
    parser.add_argument("--cpu-shrink", action=argparse.BooleanOptionalAction, default=not on_gpu)
    parser.add_argument(
        "--set", nargs="*", default=[], help="extra KEY=VALUE overrides for every config"
    )
    parser.add_argument(
        "--caption-embeddings",
        type=int,
        default=0,
        help="train on cached caption embeddings of this width (text.encoder=t5) instead of "
        "token ids through the internal text encoder",
    )
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    rows = []
    for name in args.configs:
        overrides = dict(CPU_SHRINK.get(name, {})) if args.cpu_shrink else {}
        overrides.update(kv.split("=", 1) for kv in args.set)
        if args.caption_embeddings:
            folder = Path(args.out) / "caption_encoder_config"
            overrides.update(caption_embeddings(args.caption_embeddings, folder))
        print(f"{name}: {overrides or 'config as is'} ...", flush=True)
        rows.extend(bench(name, overrides, args.steps, args.warmup, args.peak_n))
    info = machine()
    print(
        f"\n{info['device_kind']} x{info['device_count']} ({info['backend']}, jax {info['jax']}), load {info['load_average_1m']:.1f}"
    )
    head = f"{'config':>8} {'bucket':>11} {'batch':>5} {'tokens':>6} {'dtype':>8} {'compile s':>9} {'step s':>7} {'tok/s':>8} {'TFLOP/s':>8} {'peak':>7} {'MFU':>6} {'args MB':>8} {'temp MB':>8}"
    print(head)
    for r in rows:
        mb = {k: v / 2**20 for k, v in r["per_device_bytes"].items()}
        print(
            f"{r['config']:>8} {r['bucket']:>11} {r['batch_size']:>5} {r['joint_tokens_per_example']:>6} {r['compute_dtype']:>8} "
            f"{r['compile_s']:9.1f} {r['step_s_median']:7.3f} {r['tokens_per_s']:8.0f} {r['model_tflop_per_s']:8.3f} "
            f"{r['matmul_peak_tflop_per_s']:7.3f} {r['mfu']:6.1%} {mb['arguments']:8.1f} {mb['temp']:8.1f}"
        )
    save_results(args.out, "train_step", {"machine": info, "results": rows})


if __name__ == "__main__":
    main()
