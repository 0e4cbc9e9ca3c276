"""TPU splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``) behind the
attention interface, with key padding as segment ids.

Splash takes per-example segment ids and attends where the query's id equals the key's.
vdiff's masks reach it as a :class:`~vdiff.models.token_mask.TokenMask` whose query groups
all read the same keys (``same_rows``: key padding, the streams' joint attention): every
query gets id 0, every valid key 0 and every padded key 1. The cross-modal ablation's
masks are not equalities of ids, so ``"auto"`` on TPU takes the blockwise path for them.

The kernel wants ``(heads, L, head_dim)`` per example and multiples of its tiles, so the
batch is vmapped, lengths are padded to the tile (padded keys get id 1) and queries are
pre-scaled (splash applies no scale). A row with no valid key gets one dummy key and its
output is zeroed, as on every backend. ``interpret=True`` runs the Pallas kernels in the
interpreter: how the tests check it on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vdiff.models.token_mask import TokenMask

TILE = 128  # the kernel's block size for queries and keys (forward and backward)


@functools.lru_cache(maxsize=32)
def _kernel(heads: int, lq: int, lk: int, tile: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    blocks = sa.BlockSizes(
        block_q=tile, block_kv=tile, block_kv_compute=tile, block_q_dkv=tile, block_kv_dkv=tile,
        block_kv_dkv_compute=tile, block_q_dq=tile, block_kv_dq=tile,
    )  # fmt: skip
    mask = sa.MultiHeadMask([sa.FullMask((lq, lk))] * heads)
    kernel = sa.make_splash_mha(
        mask, head_shards=1, q_seq_shards=1, block_sizes=blocks, interpret=interpret
    )
    return kernel, sa.SegmentIds


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: TokenMask | None,
    *,
    scale: float,
    interpret: bool = False,
    tile: int = TILE,
) -> jax.Array:
    """``q (B, Lq, H, D)`` over ``k``, ``v (B, Lk, H, D)``; the result in ``v``'s dtype.

    Raises:
        ValueError: if ``mask`` is not key padding (``same_rows``).
    """
    b, lq, heads, _ = q.shape
    lk = k.shape[1]
    if mask is None:
        valid = jnp.ones((b, lk), bool)
    elif mask.same_rows:
        valid = mask.key_valid()
    else:
        raise ValueError(
            "splash attention takes key-padding masks; the cross-modal ablation "
            "(cross_modal=False, diffusion.p_no_cross_modal > 0) needs model.attention="
            "'blockwise' (or 'auto', which picks it)"
        )
    lq_pad, lk_pad = -(-lq // tile) * tile, -(-lk // tile) * tile
    any_valid = jnp.any(valid, axis=1)
    valid = valid.at[:, 0].set(valid[:, 0] | ~any_valid)  # a dummy key for empty rows
    kv_ids = jnp.pad(jnp.where(valid, 0, 1), ((0, 0), (0, lk_pad - lk)), constant_values=1)
    q_ids = jnp.zeros((b, lq_pad), jnp.int32)

    def heads_first(x, length):
        x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))
        return jnp.transpose(x, (0, 2, 1, 3))

    kernel, segment_ids = _kernel(heads, lq_pad, lk_pad, tile, interpret)

    def one(qe, ke, ve, qi, ki):
        return kernel(qe, ke, ve, segment_ids=segment_ids(q=qi, kv=ki.astype(jnp.int32)))

    out = jax.vmap(one)(
        heads_first(q * jnp.asarray(scale, q.dtype), lq_pad),
        heads_first(k, lk_pad),
        heads_first(v, lk_pad),
        q_ids,
        kv_ids,
    )
    out = jnp.transpose(out, (0, 2, 1, 3))[:, :lq]
    return (out * any_valid[:, None, None, None].astype(out.dtype)).astype(v.dtype)
