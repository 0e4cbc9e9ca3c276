"""PyTorch reference train step: one AdamW step of diffusers' ``WanTransformer3DModel`` on CPU.

Measures the wall time of one full training step (zero_grad, forward, MSE loss, backward,
``AdamW.step``) of the Wan 2.1 diffusion transformer as diffusers implements it, built at
the width, depth and latent shape given on the command line, so that vdiff's own JAX train
step (``benchmarks/train_step.py``) can be compared to a widely used implementation at equal
dimensions. Reports the median, min and max seconds per step over ``--steps`` timed steps
(after ``--warmup`` untimed ones), the tokens per example and tokens/s.

It needs torch and diffusers, not vdiff's own dependencies (JAX is not imported). Run it
with the reference environment's python, e.g.::

    /work/refenv/bin/python benchmarks/torch_reference_step.py --width 384 --layers 12 \\
        --batch 8 --latent 4 32 32 8 --patch 1 2 2
    /work/refenv/bin/python benchmarks/torch_reference_step.py --width 256 --layers 6 \\
        --batch 1 --latent 8 32 32 8 --json /tmp/torch_ref.json

How the comparison is kept fair:

- Same transformer size: hidden width = heads x 64 (head dim 64), ``--layers`` blocks,
  MLP width ``--ffn-ratio`` x width, patch ``--patch`` over a (T, H, W, C) latent, so both
  sides see the same number of video tokens ((T/pt) x (H/ph) x (W/pw) per example).
- The text embeddings come in at the model width (``--text-dim`` defaults to ``--width``),
  so Wan's caption projection is width -> width rather than 4096 -> width, which would add
  a large matmul that vdiff's step (given cached embeddings) does not have. ``--text-len``
  caption tokens are attended by cross-attention, as in vdiff with
  ``model.text_attention="cross"``; Wan has no audio tokens, so compare with vdiff's video
  tokens/s, or run vdiff without audio (``data.audio=False``).
- Same arithmetic: float32 weights and compute, no gradient checkpointing (compare with
  vdiff's float32 compute and ``remat="none"``), AdamW (lr 1e-4) on every parameter. The
  reference runs eagerly (no ``torch.compile``), as diffusers trains by default; vdiff's step
  is jit-compiled, and its compile time is reported apart from its step time.
- Same machine and threads: ``--threads`` sets torch's intra- and inter-op threads (default
  2, the CPU count of the machine the vdiff records come from). Run both benchmarks on the
  same machine, one at a time, and compare the load averages they record.
- Inputs are random, fixed by ``--seed``: latents (B, C, T, H, W) (diffusers is channels
  first), integer timesteps in [0, 1000), caption embeddings (B, text_len, text_dim) and a
  random target of the output's shape; the loss is their MSE. The data is made once before
  the timed loop, so the timings hold the step only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HEAD_DIM = 64


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=384, help="hidden size = heads x 64")
    p.add_argument("--layers", type=int, default=12, help="transformer blocks")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument(
        "--latent",
        type=int,
        nargs=4,
        default=[4, 32, 32, 8],
        metavar=("T", "H", "W", "C"),
        help="latent frames, height, width, channels",
    )
    p.add_argument("--patch", type=int, nargs=3, default=[1, 2, 2], metavar=("PT", "PH", "PW"))
    p.add_argument("--text-len", type=int, default=32, help="caption tokens")
    p.add_argument("--text-dim", type=int, default=None, help="caption width (default: --width)")
    p.add_argument("--ffn-ratio", type=float, default=4.0, help="ffn_dim = ratio x width")
    p.add_argument("--threads", type=int, default=2, help="torch intra- and inter-op threads")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    args = p.parse_args(argv)
    if args.text_dim is None:
        args.text_dim = args.width
    if args.width % HEAD_DIM:
        p.error(f"--width must be a multiple of the head dim {HEAD_DIM}, got {args.width}")
    for n, k, name in zip(args.latent[:3], args.patch, "THW"):
        if n % k:
            p.error(f"latent {name}={n} is not a multiple of its patch size {k}")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def model_kwargs(args) -> dict:
    """Constructor arguments of ``WanTransformer3DModel`` for these dimensions."""
    channels = args.latent[3]
    return dict(
        patch_size=tuple(args.patch),
        num_attention_heads=args.width // HEAD_DIM,
        attention_head_dim=HEAD_DIM,
        in_channels=channels,
        out_channels=channels,
        text_dim=args.text_dim,
        freq_dim=256,
        ffn_dim=int(args.ffn_ratio * args.width),
        num_layers=args.layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=None,
        rope_max_seq_len=1024,
    )


def machine(threads: int) -> dict:
    import diffusers

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "intra_op_threads": torch.get_num_threads(),
        "inter_op_threads": torch.get_num_interop_threads(),
        "threads_requested": threads,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(args.threads)
    torch.manual_seed(args.seed)
    from diffusers import WanTransformer3DModel

    info = machine(args.threads)
    print(
        f"machine: torch {info['torch']}, diffusers {info['diffusers']}, "
        f"threads {info['intra_op_threads']} intra / {info['inter_op_threads']} inter-op, "
        f"cpu_count {info['cpu_count']}, load {info['load_average_1m']:.2f}, "
        f"{info['processor']}",
        flush=True,
    )

    kwargs = model_kwargs(args)
    model = WanTransformer3DModel(**kwargs)  # float32: torch's default dtype
    assert all(p.dtype == torch.float32 for p in model.parameters())
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"parameters: {n_params:,} ({n_trainable:,} trainable)", flush=True)

    t, h, w, c = args.latent
    pt, ph, pw = args.patch
    tokens = (t // pt) * (h // ph) * (w // pw)
    b = args.batch
    gen = torch.Generator().manual_seed(args.seed)
    latents = torch.randn(b, c, t, h, w, generator=gen, dtype=torch.float32)
    timestep = torch.randint(0, 1000, (b,), generator=gen)
    text = torch.randn(b, args.text_len, args.text_dim, generator=gen, dtype=torch.float32)
    target = torch.randn(b, c, t, h, w, generator=gen, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        out = model(
            hidden_states=latents,
            timestep=timestep,
            encoder_hidden_states=text,
            return_dict=False,
        )[0]
        loss = F.mse_loss(out, target)
        loss.backward()
        opt.step()
        return float(loss.detach())

    for _ in range(args.warmup):
        loss = step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)

    median = statistics.median(times)
    result = {
        "width": args.width,
        "layers": args.layers,
        "heads": args.width // HEAD_DIM,
        "head_dim": HEAD_DIM,
        "ffn_dim": kwargs["ffn_dim"],
        "batch": b,
        "latent_thwc": list(args.latent),
        "patch": list(args.patch),
        "text_len": args.text_len,
        "text_dim": args.text_dim,
        "dtype": "float32",
        "parameters": n_params,
        "tokens_per_example": tokens,
        "step_s_median": median,
        "step_s_min": min(times),
        "step_s_max": max(times),
        "step_s_all": times,
        "tokens_per_s": b * tokens / median,
        "warmup": args.warmup,
        "steps": args.steps,
        "seed": args.seed,
        "final_loss": loss,
        "model_kwargs": {**kwargs, "patch_size": list(kwargs["patch_size"])},
    }
    print(
        f"wan width={args.width} layers={args.layers} heads={result['heads']} "
        f"ffn={kwargs['ffn_dim']} batch={b} latent={t}x{h}x{w}x{c} "
        f"patch={pt}x{ph}x{pw} text={args.text_len}x{args.text_dim} "
        f"params={n_params / 1e6:.2f}M tokens/example={tokens} | "
        f"step median {median:.3f} s (min {min(times):.3f}, max {max(times):.3f}, "
        f"n={args.steps}) | {result['tokens_per_s']:.0f} tokens/s | loss {loss:.4f}",
        flush=True,
    )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": info, "results": [result]}, indent=1) + "\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
