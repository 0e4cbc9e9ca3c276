"""Memory-efficient attention in pure JAX: query and key/value blocks with an online softmax.

The forward pass walks the key/value blocks for each query block, keeping a running max,
normaliser and weighted sum in float32 (the same merge as ring attention's), so no
``Lq x Lk`` logits exist at once: one ``(block_q x block_k)`` tile per head. It returns
the output and each row's log-sum-exp. The backward pass is a custom VJP in the
FlashAttention-2 manner: it recomputes each tile's probabilities from the saved
log-sum-exp and accumulates ``dq``, ``dk``, ``dv`` tile by tile, so training memory is
O(L) too (the output, the log-sum-exp and the gradients), not the O(L^2) that
differentiating through the loops would save.

Masks come as :class:`~vdiff.models.token_mask.TokenMask` ids and are built per tile. A
row with no valid key returns zeros and passes no gradient, as on every backend.
Sequence lengths need not divide the blocks: queries and keys are padded at the end, padded
keys masked, padded rows cut off.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vdiff.models.token_mask import TokenMask

_NEG = -jnp.inf
BLOCK = 512  # default tile (queries and keys): 512 x 512 float32 logits per head, 1 MiB


def local_backend(lq: int, lk: int) -> str:
    """Attention on one device: blockwise once a sequence spans more than one tile, the
    einsum ("xla") below that (the same computation without the loop)."""
    return "blockwise" if max(lq, lk) > BLOCK else "xla"


def softmax_carry(b: int, h: int, lq: int, d: int):
    """The online softmax's start: running max, normaliser and weighted sum of values."""
    return (
        jnp.full((b, h, lq), _NEG, jnp.float32),
        jnp.zeros((b, h, lq), jnp.float32),
        jnp.zeros((b, h, lq, d), jnp.float32),
    )


def merge_block(carry, qf, k, v, block_mask):
    """Online-softmax update of ``(max, normaliser, weighted sum)`` with one K/V block:
    ``qf (B, lq, H, D)`` float32 queries (scaled), ``k``, ``v (B, lk, H, D)``, ``block_mask``
    broadcastable to ``(B, H, lq, lk)``. Shared with ring attention."""
    m, l_sum, acc = carry
    logits = jnp.einsum("bqhd,bkhd->bhqk", qf, k.astype(jnp.float32))
    logits = jnp.where(block_mask, logits, _NEG)
    # The softmax is invariant to the shift, so the max carries no gradient; a row with
    # nothing valid so far keeps shift 0 (exp(-inf - 0) = 0, no NaN).
    new_m = jax.lax.stop_gradient(jnp.maximum(m, jnp.max(logits, axis=-1)))
    safe_m = jnp.where(jnp.isfinite(new_m), new_m, 0.0)
    p = jnp.exp(logits - safe_m[..., None])
    correction = jnp.exp(m - safe_m)
    l_sum = l_sum * correction + jnp.sum(p, axis=-1)
    acc = acc * correction[..., None] + jnp.einsum("bhqk,bkhd->bhqd", p, v.astype(jnp.float32))
    return new_m, l_sum, acc


def normalised(l_sum: jax.Array, acc: jax.Array) -> jax.Array:
    """``acc / l_sum`` ``(B, H, lq, D)``; 0 for a row that saw no valid key."""
    valid = l_sum > 0
    return jnp.where(valid[..., None], acc / jnp.where(valid, l_sum, 1.0)[..., None], 0.0)


def _blocks(x: jax.Array, size: int) -> jax.Array:
    """``(B, L, ...)`` with ``L`` a multiple of ``size`` -> ``(L/size, B, size, ...)``."""
    b, n = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, n // size, size, *x.shape[2:]), 1, 0)


def _unblocks(x: jax.Array) -> jax.Array:
    """Inverse of :func:`_blocks`."""
    n, b, size = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape(b, n * size, *x.shape[3:])


def _forward(q, k, v, mask: TokenMask, scale, block_q, block_k):
    """``(out (B, Lq, H, D) float32, lse (B, H, Lq) float32)`` on padded inputs."""
    kb, vb, kgb = _blocks(k, block_k), _blocks(v, block_k), _blocks(mask.k_groups, block_k)

    def one_query_block(args):
        qi, qgi = args
        qf = qi.astype(jnp.float32) * scale
        b, bq, h, d = qi.shape

        def step(carry, kv):
            kj, vj, kgj = kv
            return merge_block(carry, qf, kj, vj, mask.block(qgi, kgj)[:, None]), None

        (m, l_sum, acc), _ = jax.lax.scan(step, softmax_carry(b, h, bq, d), (kb, vb, kgb))
        out = normalised(l_sum, acc)
        valid = l_sum > 0
        # +inf for a row with no valid key: exp(s - lse) = 0 in the backward pass.
        lse = jnp.where(valid, jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(l_sum), jnp.inf)
        return jnp.transpose(out, (0, 2, 1, 3)), lse

    out, lse = jax.lax.map(one_query_block, (_blocks(q, block_q), _blocks(mask.q_groups, block_q)))
    # lse blocks: (nq, B, H, bq) -> (B, H, Lq)
    lse = jnp.moveaxis(lse, 0, 2).reshape(lse.shape[1], lse.shape[2], -1)
    return _unblocks(out), lse


def _backward(q, k, v, mask, out, lse, dout, scale, block_q, block_k):
    """``(dq, dk, dv)`` tile by tile from the saved output and log-sum-exp."""
    f32 = jnp.float32
    do = dout.astype(f32)
    delta = jnp.einsum("bqhd,bqhd->bhq", do, out)  # rowsum(dO * O), (B, H, Lq)
    qb, dob, qgb = _blocks(q, block_q), _blocks(do, block_q), _blocks(mask.q_groups, block_q)
    lse_b = jnp.moveaxis(lse.reshape(lse.shape[0], lse.shape[1], -1, block_q), 2, 0)
    delta_b = jnp.moveaxis(delta.reshape(delta.shape[0], delta.shape[1], -1, block_q), 2, 0)

    def one_key_block(dq, kv):
        kj, vj, kgj = kv
        kf, vf = kj.astype(f32), vj.astype(f32)

        def step(carry, qs):
            dk, dv = carry
            qi, doi, qgi, lse_i, delta_i = qs
            qf = qi.astype(f32)
            s = jnp.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
            p = jnp.where(mask.block(qgi, kgj)[:, None], jnp.exp(s - lse_i[..., None]), 0.0)
            dv = dv + jnp.einsum("bhqk,bqhd->bkhd", p, doi)
            dp = jnp.einsum("bqhd,bkhd->bhqk", doi, vf)
            ds = p * (dp - delta_i[..., None]) * scale
            dk = dk + jnp.einsum("bhqk,bqhd->bkhd", ds, qf)
            return (dk, dv), jnp.einsum("bhqk,bkhd->bqhd", ds, kf)

        init = (jnp.zeros(kj.shape, f32), jnp.zeros(vj.shape, f32))
        (dk, dv), dq_parts = jax.lax.scan(step, init, (qb, dob, qgb, lse_b, delta_b))
        return dq + dq_parts, (dk, dv)

    kb, vb, kgb = _blocks(k, block_k), _blocks(v, block_k), _blocks(mask.k_groups, block_k)
    dq, (dk, dv) = jax.lax.scan(one_key_block, jnp.zeros(qb.shape, f32), (kb, vb, kgb))
    return _unblocks(dq), _unblocks(dk), _unblocks(dv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention(q, k, v, mask, scale, block_q, block_k):
    out, _ = _forward(q, k, v, mask, scale, block_q, block_k)
    return out


def _attention_fwd(q, k, v, mask, scale, block_q, block_k):
    out, lse = _forward(q, k, v, mask, scale, block_q, block_k)
    return out, (q, k, v, mask, out, lse)


def _attention_bwd(scale, block_q, block_k, res, dout):
    q, k, v, mask, out, lse = res
    dq, dk, dv = _backward(q, k, v, mask, out, lse, dout, scale, block_q, block_k)
    zero_ids = jax.tree.map(lambda x: None, mask)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), zero_ids


_attention.defvjp(_attention_fwd, _attention_bwd)


def _pad(x: jax.Array, length: int) -> jax.Array:
    return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: TokenMask,
    *,
    scale: float,
    block_q: int = BLOCK,
    block_k: int = BLOCK,
) -> jax.Array:
    """Attention of ``q (B, Lq, H, D)`` over ``k``, ``v (B, Lk, H, D)`` where ``mask`` allows,
    in O(L) memory forward and backward; the result in ``v``'s dtype."""
    lq, lk = q.shape[1], k.shape[1]
    block_q, block_k = min(block_q, lq), min(block_k, lk)
    lq_pad, lk_pad = -(-lq // block_q) * block_q, -(-lk // block_k) * block_k
    padded = mask.pad(lq_pad, lk_pad)
    out = _attention(
        _pad(q, lq_pad), _pad(k, lk_pad), _pad(v, lk_pad), padded, scale, block_q, block_k
    )
    return out[:, :lq].astype(v.dtype)
