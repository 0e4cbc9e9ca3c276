"""Memory-efficient attention in pure JAX: query and key/value blocks with an online softmax.

The forward pass walks the key/value blocks for each query block, keeping a running max,
normaliser and weighted sum in float32 (the same merge as ring attention's), so no
``Lq x Lk`` logits exist at once: one ``(block_q x block_k)`` tile per head. It returns
the output and each row's log-sum-exp. The backward pass is a custom VJP in the
FlashAttention-2 manner: it recomputes each tile's probabilities from the saved
log-sum-exp and accumulates ``dq``, ``dk``, ``dv`` tile by tile, so training memory is
O(L) too (the output, the log-sum-exp and the gradients), not the O(L^2) that
differentiating through the loops would save.

Masks come as :class:`~vdiff.models.token_mask.TokenMask` ids and are built per tile
(None: nothing masked, no tile masks). A row with no valid key returns zeros and passes no
gradient, as on every backend.

Layout, for speed on CPU (measured in docs/experiments.md): the tiles are head-major, and
the (example, head) pairs are processed in groups whose tiles fit a few MiB, one group at
a time, so they stay in cache; the backward pass computes tiles key-major and accumulates
``dq`` transposed, so no tile product has a transposed operand.
Sequence lengths need not divide the blocks: queries and keys are padded at the end, padded
keys masked, padded rows cut off.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from vdiff.models.token_mask import TokenMask
from vdiff.parallel.sharding import active_mesh

_NEG = -jnp.inf
BLOCK = 512  # default tile (queries and keys): 512 x 512 float32 logits per head, 1 MiB


def local_backend(lq: int, lk: int) -> str:
    """Attention on one device: blockwise once one head's logits outgrow a tile
    (``BLOCK x BLOCK``), the einsum ("xla") below that: the same computation without the
    loop, e.g. a thousand video queries reading a short caption."""
    return "blockwise" if lq * lk > BLOCK * BLOCK else "xla"


def softmax_carry(b: int, h: int, lq: int, d: int):
    """The online softmax's start: running max, normaliser and weighted sum of values."""
    return (
        jnp.full((b, h, lq), _NEG, jnp.float32),
        jnp.zeros((b, h, lq), jnp.float32),
        jnp.zeros((b, h, lq, d), jnp.float32),
    )


def merge_block(carry, qf, k, v, block_mask):
    """Online-softmax update of ``(max, normaliser, weighted sum)`` with one K/V block:
    ``qf (..., lq, D)`` float32 queries (scaled), ``k``, ``v (..., lk, D)`` with the same
    leading (batch, head) axes, ``block_mask`` broadcastable to ``(..., lq, lk)`` or None
    (all valid). Shared with ring attention."""
    m, l_sum, acc = carry
    logits = jnp.einsum("...qd,...kd->...qk", qf, k.astype(jnp.float32))
    if block_mask is not None:
        logits = jnp.where(block_mask, logits, _NEG)
    # The softmax is invariant to the shift, so the max carries no gradient; a row with
    # nothing valid so far keeps shift 0 (exp(-inf - 0) = 0, no NaN).
    new_m = jax.lax.stop_gradient(jnp.maximum(m, jnp.max(logits, axis=-1)))
    safe_m = jnp.where(jnp.isfinite(new_m), new_m, 0.0)
    p = jnp.exp(logits - safe_m[..., None])
    correction = jnp.exp(m - safe_m)
    l_sum = l_sum * correction + jnp.sum(p, axis=-1)
    acc = acc * correction[..., None] + jnp.einsum("...qk,...kd->...qd", p, v.astype(jnp.float32))
    return new_m, l_sum, acc


def normalised(l_sum: jax.Array, acc: jax.Array) -> jax.Array:
    """``acc / l_sum`` ``(..., lq, D)``; 0 for a row that saw no valid key."""
    valid = l_sum > 0
    return jnp.where(valid[..., None], acc / jnp.where(valid, l_sum, 1.0)[..., None], 0.0)


def _blocks(x: jax.Array, size: int, axis: int) -> jax.Array:
    """Split ``axis`` (a multiple of ``size``) into blocks, the block index leading:
    e.g. ``(B, H, L, D)`` -> ``(L/size, B, H, size, D)`` for ``axis=2``."""
    n = x.shape[axis]
    split = x.reshape(*x.shape[:axis], n // size, size, *x.shape[axis + 1 :])
    return jnp.moveaxis(split, axis, 0)


def _unblocks(x: jax.Array, axis: int) -> jax.Array:
    """Inverse of :func:`_blocks`."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2 :])


def _tile_mask(mask: TokenMask | None, q_ids, k_ids):
    """``(B, 1, bq, bk)`` for one tile, or None when nothing is masked."""
    return None if mask is None else mask.block(q_ids, k_ids)[:, None]


def _ids(mask: TokenMask | None, size: int, queries: bool):
    """A mask's query or key ids in blocks ``(n, B, size)``; None without a mask."""
    if mask is None:
        return None
    return _blocks(mask.q_groups if queries else mask.k_groups, size, axis=1)


def _group_forward(q, k, v, mask, scale, block_q, block_k):
    """One group: head-major ``q (B, H, Lq, D)``, ``k``, ``v (B, H, Lk, D)`` padded to the
    blocks -> ``(out (B, H, Lq, D) float32, lse (B, H, Lq) float32)``."""
    kb, vb = _blocks(k, block_k, axis=2), _blocks(v, block_k, axis=2)
    kgb = _ids(mask, block_k, queries=False)

    def one_query_block(args):
        qi, qgi = args
        qf = qi.astype(jnp.float32) * scale
        b, h, bq, d = qi.shape

        def step(carry, kv):
            kj, vj, kgj = kv
            return merge_block(carry, qf, kj, vj, _tile_mask(mask, qgi, kgj)), None

        (m, l_sum, acc), _ = jax.lax.scan(step, softmax_carry(b, h, bq, d), (kb, vb, kgb))
        out = normalised(l_sum, acc)
        valid = l_sum > 0
        # +inf for a row with no valid key: exp(s - lse) = 0 in the backward pass.
        lse = jnp.where(valid, jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(l_sum), jnp.inf)
        return out, lse

    qb, qgb = _blocks(q, block_q, axis=2), _ids(mask, block_q, queries=True)
    out, lse = jax.lax.map(one_query_block, (qb, qgb))
    return _unblocks(out, axis=2), _unblocks(lse, axis=2)


def _group_backward(q, k, v, mask, out, lse, dout, scale, block_q, block_k):
    """One group's ``(dq, dk, dv)``, tile by tile from the saved output and log-sum-exp.

    Tiles are computed key-major (``s^T = k q^T``, ``(bk, bq)`` per head), so ``dv`` and
    ``dk`` accumulate by plain matrix products, and ``dq`` is accumulated transposed
    (``dq^T += k^T ds^T``, with ``k^T`` made once per key block): no tile product has a
    transposed operand, which XLA:CPU would hand to a slower matmul (measured 2.2x on a
    512 x 512 x 64 tile)."""
    f32 = jnp.float32
    do = dout.astype(f32)
    delta = jnp.einsum("bhqd,bhqd->bhq", do, out)  # rowsum(dO * O)
    qb, dob = _blocks(q, block_q, axis=2), _blocks(do, block_q, axis=2)
    lse_b, delta_b = _blocks(lse, block_q, axis=2), _blocks(delta, block_q, axis=2)
    qgb = _ids(mask, block_q, queries=True)

    def one_key_block(dqt, kv):
        kj, vj, kgj = kv
        kf, vf = kj.astype(f32), vj.astype(f32)
        kft = jnp.swapaxes(kf, -1, -2)  # (B, H, D, bk), once per key block

        def step(carry, qs):
            dk, dv = carry
            qi, doi, qgi, lse_i, delta_i = qs
            qf = qi.astype(f32)
            pt = jnp.exp(jnp.einsum("bhkd,bhqd->bhkq", kf, qf) * scale - lse_i[..., None, :])
            tile = _tile_mask(mask, qgi, kgj)
            if tile is not None:
                pt = jnp.where(jnp.swapaxes(tile, -1, -2), pt, 0.0)
            dv = dv + jnp.einsum("bhkq,bhqd->bhkd", pt, doi)
            dpt = jnp.einsum("bhkd,bhqd->bhkq", vf, doi)
            dst = pt * (dpt - delta_i[..., None, :]) * scale
            dk = dk + jnp.einsum("bhkq,bhqd->bhkd", dst, qf)
            return (dk, dv), jnp.einsum("bhdk,bhkq->bhdq", kft, dst)

        init = (jnp.zeros(kj.shape, f32), jnp.zeros(vj.shape, f32))
        (dk, dv), dqt_parts = jax.lax.scan(step, init, (qb, dob, qgb, lse_b, delta_b))
        return dqt + dqt_parts, (dk, dv)

    kb, vb = _blocks(k, block_k, axis=2), _blocks(v, block_k, axis=2)
    kgb = _ids(mask, block_k, queries=False)
    dqt = jnp.zeros(jnp.swapaxes(qb, -1, -2).shape, f32)  # dq transposed, (nq, B, H, D, bq)
    dqt, (dk, dv) = jax.lax.scan(one_key_block, dqt, (kb, vb, kgb))
    dq = jnp.swapaxes(dqt, -1, -2)
    return _unblocks(dq, axis=2), _unblocks(dk, axis=2), _unblocks(dv, axis=2)


def _by_group(fn, *args):
    """``fn`` over the leading group axis of ``args`` (``(n, ...)`` each), one group at a
    time: one group's tiles are what is live, so they stay small enough for the caches."""
    return jax.lax.map(lambda a: fn(*a), args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention(q, k, v, mask, scale, block_q, block_k):
    out, _ = _attention_fwd(q, k, v, mask, scale, block_q, block_k)
    return out


def _attention_fwd(q, k, v, mask, scale, block_q, block_k):
    fwd = functools.partial(_group_forward, scale=scale, block_q=block_q, block_k=block_k)
    out, lse = _by_group(fwd, q, k, v, mask)
    # Named, so a remat policy can keep them rather than rerun the forward pass.
    out, lse = checkpoint_name(out, "attention_out"), checkpoint_name(lse, "attention_lse")
    return out, (q, k, v, mask, out, lse)


def _attention_bwd(scale, block_q, block_k, res, dout):
    q, k, v, mask, out, lse = res
    bwd = functools.partial(_group_backward, scale=scale, block_q=block_q, block_k=block_k)
    dq, dk, dv = _by_group(bwd, q, k, v, mask, out, lse, dout)
    zero_ids = jax.tree.map(lambda x: None, mask)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), zero_ids


_attention.defvjp(_attention_fwd, _attention_bwd)

# A group's float32 tiles (examples x heads x block_q x block_k) are at most this many
# bytes. On a 2-core AVX-512 CPU the attention of batch 8 x 6 heads x 1,024 tokens ran
# ~1.4x slower with every head's tiles at once (48 MiB) than in groups of 4 MiB
# (docs/experiments.md).
GROUP_TILE_BYTES = 4 * 2**20


def _split(b: int, h: int, block_q: int, block_k: int) -> tuple[int, int]:
    """``(examples, heads)`` per group: divisors of ``b`` and ``h`` whose tiles fit
    :data:`GROUP_TILE_BYTES`, the largest such group (at least one example x one head).

    Groups need a loop over a split of the batch and head axes, which a sharded array would
    have to gather, so under a mesh of several devices everything is one group."""
    mesh = active_mesh()
    if mesh is not None and mesh.size > 1:
        return b, h
    cap = max(1, GROUP_TILE_BYTES // (4 * block_q * block_k))
    pairs = [(gb, gh) for gb in _divisors(b) for gh in _divisors(h) if gb * gh <= cap]
    return max(pairs, key=lambda p: (p[0] * p[1], p[1]))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _pad(x: jax.Array, length: int) -> jax.Array:
    return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def _grouped(x: jax.Array, length: int, gb: int, gh: int) -> jax.Array:
    """``(B, L, H, D)`` -> padded, head-major groups ``(n, gb, gh, length, D)``."""
    b, _, h, d = x.shape
    x = jnp.swapaxes(_pad(x, length), 1, 2).reshape(b // gb, gb, h // gh, gh, length, d)
    return jnp.swapaxes(x, 1, 2).reshape(-1, gb, gh, length, d)


def _grouped_mask(mask: TokenMask, gb: int, heads_split: int) -> TokenMask:
    """A mask per example -> per group (:func:`_grouped`'s order: example block, then head
    block), each group holding its ``gb`` examples' ids."""

    def per_group(x):
        x = x.reshape(-1, gb, *x.shape[1:])
        return jnp.repeat(x, heads_split, axis=0)

    return TokenMask(per_group(mask.q_groups), per_group(mask.k_groups), per_group(mask.table))


def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: TokenMask | None,
    *,
    scale: float,
    block_q: int = BLOCK,
    block_k: int = BLOCK,
) -> jax.Array:
    """Attention of ``q (B, Lq, H, D)`` over ``k``, ``v (B, Lk, H, D)`` where ``mask`` allows
    (None: every key), in O(L) memory forward and backward; the result in ``v``'s dtype."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    block_q, block_k = min(block_q, lq), min(block_k, lk)
    lq_pad, lk_pad = -(-lq // block_q) * block_q, -(-lk // block_k) * block_k
    if mask is None and lk_pad != lk:  # padded keys must be masked
        mask = TokenMask.key_padding(jnp.ones((b, lk), bool), lq)
    gb, gh = _split(b, h, block_q, block_k)
    groups = None if mask is None else _grouped_mask(mask.pad(lq_pad, lk_pad), gb, h // gh)
    # Head-major inside, so every tile product is a batched matrix product over (B, H)
    # with no per-tile transposes of q, k, v or the outputs.
    out = _attention(
        _grouped(q, lq_pad, gb, gh),
        _grouped(k, lk_pad, gb, gh),
        _grouped(v, lk_pad, gb, gh),
        groups,
        scale,
        block_q,
        block_k,
    )
    out = out.reshape(b // gb, h // gh, gb, gh, lq_pad, d)
    out = jnp.transpose(out, (0, 2, 4, 1, 3, 5)).reshape(b, lq_pad, h, d)
    return out[:, :lq].astype(v.dtype)
