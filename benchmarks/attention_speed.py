"""Attention forward and forward+backward time: vdiff's backends, or PyTorch's fused SDPA.

Times ``sum(attention(q, k, v) * v)`` and its gradient with respect to q, k and v, float32,
no mask, head dim 64, at each ``--shape B,L,H`` (batch, tokens, heads); the median of
``--repeats`` timed calls after one warm-up call, in milliseconds.

    python benchmarks/attention_speed.py                       # blockwise and the einsum
    python benchmarks/attention_speed.py --backends blockwise --shape 8,1024,6
    /work/refenv/bin/python benchmarks/attention_speed.py --torch  # PyTorch's SDPA

``--torch`` runs ``torch.nn.functional.scaled_dot_product_attention`` (its fused CPU flash
kernel) on ``--threads`` threads with the same shapes and loss, and imports no JAX, so it
runs in the PyTorch reference environment of ``benchmarks/torch_reference_step.py``. The
default shapes are the attention of the two dimensions that script is compared at:
batch 1 x 2,048 tokens x 4 heads (width 256) and batch 8 x 1,024 tokens x 6 heads (384).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

HEAD_DIM = 64


def median_ms(fn, args, repeats: int) -> float:
    """Median milliseconds of ``fn(*args)`` after one untimed call."""
    fn(*args)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def jax_rows(shapes, backends, repeats: int) -> list[str]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from vdiff.models.attention import attention

    rows = []
    for b, length, heads in shapes:
        rng = np.random.default_rng(0)
        q, k, v = (
            jnp.asarray(rng.standard_normal((b, length, heads, HEAD_DIM)), jnp.float32)
            for _ in range(3)
        )
        for backend in backends:
            fwd = jax.jit(functools.partial(attention, mask=None, backend=backend))
            both = jax.jit(jax.grad(lambda q, k, v, f=fwd: jnp.sum(f(q, k, v) * v), (0, 1, 2)))
            f_ms = median_ms(lambda *a, f=fwd: jax.block_until_ready(f(*a)), (q, k, v), repeats)
            fb_ms = median_ms(lambda *a, g=both: jax.block_until_ready(g(*a)), (q, k, v), repeats)
            rows.append(f"{b:>5} {length:>6} {heads:>5} {backend:>10} {f_ms:9.1f} {fb_ms:12.1f}")
    return rows


def torch_rows(shapes, threads: int, repeats: int) -> list[str]:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    rows = []
    for b, length, heads in shapes:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (
            torch.randn(b, heads, length, HEAD_DIM, generator=gen, requires_grad=True)
            for _ in range(3)
        )

        def fwd(q, k, v):
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v)

        def both(q, k, v):
            (F.scaled_dot_product_attention(q, k, v) * v).sum().backward()

        f_ms, fb_ms = median_ms(fwd, (q, k, v), repeats), median_ms(both, (q, k, v), repeats)
        rows.append(f"{b:>5} {length:>6} {heads:>5} {'torch sdpa':>10} {f_ms:9.1f} {fb_ms:12.1f}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", nargs="+", default=["1,2048,4", "8,1024,6"], help="B,L,H")
    p.add_argument("--backends", nargs="+", default=["blockwise", "xla"])
    p.add_argument("--torch", action="store_true", help="PyTorch SDPA instead of vdiff")
    p.add_argument("--threads", type=int, default=2, help="torch threads (with --torch)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shape]
    if args.torch:
        rows = torch_rows(shapes, args.threads, args.repeats)
    else:
        rows = jax_rows(shapes, args.backends, args.repeats)
    print(
        f"{'batch':>5} {'tokens':>6} {'heads':>5} {'backend':>10} {'fwd ms':>9} {'fwd+bwd ms':>12}"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
