"""Pretrained caption encoder: embedding throughput and sharded parameter bytes per device.

    python benchmarks/text_encoder.py [--layers 12 --d-model 768 --heads 12 --d-ff 2048]
                                      [--max-len 128 --batch 32 --captions 256]

Writes a random T5 v1.1 encoder of the given sizes (default: T5 v1.1 base, 32128 ids) as a
Hugging Face folder (config.json, model.safetensors, spiece.model) into a temporary
folder, then:

1. loads it with ``vdiff.caption_encoder.CaptionEncoder`` on one device and prints the
   load time and the caption embeddings per second at ``--max-len`` tokens, in bfloat16
   and float32 (the throughput of the latent-cache step's text part);
2. in a second process with 8 fake CPU devices, loads it sharded ``fsdp=8`` and prints
   the parameter bytes each device holds against the whole encoder (the loader places
   each tensor's slices straight into their devices; the target is <= 1.15 x 1/8).

Random weights time the same as trained ones; the captions are random words.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_folder(args, folder: Path) -> None:
    """A random encoder and a sentencepiece model in a Hugging Face layout."""
    import io

    import jax.numpy as jnp
    import sentencepiece as spm
    from flax import nnx

    from vdiff.models.t5 import T5Encoder, T5Spec
    from vdiff.models.t5_weights import save_t5

    spec = T5Spec(
        "t5", args.vocab, args.d_model, args.d_model // args.heads, args.d_ff, args.layers,
        args.heads, 32, 128, 1e-6,
    )  # fmt: skip
    save_t5(T5Encoder(spec, rngs=nnx.Rngs(0), dtype=jnp.float32), folder)
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 6)) for _ in range(3000)]
    texts = [" ".join(rng.choice(words, 12)) for _ in range(4000)]
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=proto, vocab_size=3000, pad_id=0, eos_id=1,
        unk_id=2, bos_id=-1, minloglevel=2,
    )  # fmt: skip
    (folder / "spiece.model").write_bytes(proto.getvalue())


def captions(n: int, seed: int = 1) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["red", "ball", "rolls", "slowly", "across", "a", "wooden", "table", "camera",
             "pans", "left", "over", "the", "sea", "at", "dusk", "two", "dogs", "run"]  # fmt: skip
    return [" ".join(rng.choice(words, rng.integers(20, 60))) for _ in range(n)]


def throughput(args, folder: Path) -> None:
    import jax
    import jax.numpy as jnp

    from vdiff.caption_encoder import CaptionEncoder

    print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} cpus, jax {jax.__version__}")
    texts = captions(args.captions)
    for dtype in (jnp.bfloat16, jnp.float32):
        t0 = time.perf_counter()
        enc = CaptionEncoder(folder, max_len=args.max_len, batch_size=args.batch, dtype=dtype)
        load_s = time.perf_counter() - t0
        enc.encode(texts[: args.batch])  # compile
        t0 = time.perf_counter()
        _, mask = enc.encode(texts)
        dt = time.perf_counter() - t0
        name = jnp.dtype(dtype).name
        print(
            f"{name:8} load {load_s:6.2f} s  {len(texts) / dt:8.1f} captions/s  "
            f"({mask.sum() / dt:8.0f} tokens/s; max_len {args.max_len}, batch {args.batch}, "
            f"{mask.sum(1).mean():.0f} real tokens a caption)"
        )


def sharded_bytes(folder: Path) -> None:
    import jax
    import jax.numpy as jnp

    from vdiff.caption_encoder import CaptionEncoder, local_mesh
    from vdiff.config import base_config

    rules = base_config().mesh.rules
    one = CaptionEncoder(folder, max_len=8, batch_size=8, dtype=jnp.bfloat16,
                         mesh=local_mesh(jax.devices()[:1]), rules=rules)  # fmt: skip
    t0 = time.perf_counter()
    eight = CaptionEncoder(folder, max_len=8, batch_size=8, dtype=jnp.bfloat16, rules=rules)
    load_s = time.perf_counter() - t0
    total = one.total_param_bytes()
    per = eight.param_bytes_per_device()
    worst = max(per.values())
    print(
        f"fsdp={len(per)}: whole encoder {total / 2**20:.1f} MiB bfloat16 on one device; "
        f"per device {min(per.values()) / 2**20:.2f}-{worst / 2**20:.2f} MiB = "
        f"{worst / total * len(per):.3f} x 1/{len(per)} (loaded in {load_s:.2f} s)"
    )
    print(json.dumps({"total_bytes": total, "per_device_bytes": per}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--d-ff", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32128)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--captions", type=int, default=256)
    p.add_argument("--folder", default="", help="(internal) an encoder folder to shard")
    args = p.parse_args()
    if args.folder:
        sharded_bytes(Path(args.folder))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        make_folder(args, folder)
        size = sum(f.stat().st_size for f in folder.iterdir())
        print(f"random T5 v1.1 encoder: {args.layers} layers, d_model {args.d_model}, "
              f"{size / 2**20:.0f} MiB of files, written in {time.perf_counter() - t0:.1f} s")  # fmt: skip
        throughput(args, folder)
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        env["XLA_FLAGS"] = (
            env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
        ).strip()
        subprocess.run([sys.executable, __file__, "--folder", str(folder)], env=env, check=True)


if __name__ == "__main__":
    main()
