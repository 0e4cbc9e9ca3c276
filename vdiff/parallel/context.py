"""Context parallelism: attention with the sequence sharded over a mesh axis.

:func:`ring_attention` shards queries, keys and values along the sequence over the
mesh axis that the logical axis ``tokens`` maps to (``context`` in the default
rules). Each device keeps its block of queries and passes its key/value block
around the ring with ``jax.lax.ppermute``; after ``n`` steps every query block has
seen every key block. Partial results are merged with the online softmax (running
max, normaliser and weighted sum, all float32), so the result equals full
attention up to float reordering.

Why a ring rather than the all-to-all (sequence <-> heads) swap:

- the all-to-all needs ``heads`` divisible by ``context x tensor`` (DiT-S has 6
  heads: no context=4 there); the ring works for any head count and composes with
  heads sharded on ``tensor``;
- each device works on ``L / n`` keys and values at a time and, in training, keeps
  the logits of one ``(L/n) x (L/n)`` block alive (each ring step is rematerialised
  in the backward pass), which is what long video sequences need; the all-to-all
  holds full-length K/V and ``L x L / n`` logits per device;
- the transfer of the next block can overlap the current block's matmuls.
  The price is ``n`` sequential steps of ``(L/n)^2`` work each; at small sizes the
  all-to-all would have lower latency. Each block runs as plain einsums in float32
  (no cuDNN flash kernel inside the ring yet).

Only the mesh axis named by ``tokens`` is manual inside the ``jax.shard_map``
(``axis_names``); batch and heads stay under automatic sharding, so whatever the
rules say for ``batch`` and ``heads`` keeps working.

Sequence lengths: the joint DiT sequence (video + audio + text tokens) need not
divide the ring size. Queries and keys are padded at the end to a multiple of it;
padded keys are masked out and padded query rows are cut off afterwards, so any
length works (the padding costs at most ``n - 1`` rows of work).

Masks: boolean, True = attend, ``(B, Lk)`` key padding or 4-D broadcastable to
``(B, heads, Lq, Lk)``, as in :func:`vdiff.models.attention.attention`. Each
device keeps the mask rows of its queries (all key columns) and slices the
columns of the key block it holds at each step. A key block whose entries are all
masked for some row contributes nothing; a row with no valid key at all returns
zeros (no NaN forward or backward), matching the other attention backends.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vdiff.models.blockwise import local_backend, merge_block, normalised, softmax_carry
from vdiff.models.token_mask import TokenMask
from vdiff.parallel import sharding as shd

TOKENS = "tokens"


def context_axis() -> str | tuple[str, ...] | None:
    """The mesh axis (or axes) of logical ``tokens`` when it splits the sequence.

    Returns None without an active mesh and rules, or when ``tokens`` maps to no
    mesh axis of size > 1 (then attention runs unsharded along the sequence).
    """
    mesh, rules = shd.active_mesh(), shd.current_rules()
    if mesh is None or rules is None:
        return None
    target = shd.logical_to_mesh((TOKENS,), rules)[0]
    if target is None:
        return None
    axes = (target,) if isinstance(target, str) else tuple(target)
    axes = tuple(a for a in axes if a in mesh.shape)
    if math.prod(mesh.shape[a] for a in axes) <= 1:
        return None
    return axes[0] if len(axes) == 1 else axes


def context_size(axis: str | tuple[str, ...]) -> int:
    mesh = shd.active_mesh()
    axes = (axis,) if isinstance(axis, str) else axis
    return math.prod(mesh.shape[a] for a in axes)


def _pad_to(x: jax.Array, axis: int, length: int, value=0) -> jax.Array:
    extra = length - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _full_mask(mask, b: int, lq: int, lk: int) -> jax.Array:
    """Any accepted mask -> boolean ``(B, H|1, Lq|1, Lk)`` (None -> all True keys)."""
    if mask is None:
        return jnp.ones((b, 1, 1, lk), bool)
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise ValueError(f"attention mask must be boolean (True = attend), got {mask.dtype}")
    if mask.ndim == 2:
        mask = mask[:, None, None, :]
    if mask.ndim != 4 or mask.shape[-1] != lk or mask.shape[-2] not in (1, lq):
        raise ValueError(
            f"attention mask {mask.shape} does not fit (B, heads, Lq={lq}, Lk={lk}) or (B, Lk)"
        )
    return jnp.broadcast_to(mask, (b, *mask.shape[1:]))


# Recomputed in the backward pass: training keeps one block's logits alive at a time
# (O((L/n)^2) per device) instead of all n blocks' (O(L^2/n)).
_merge_block_remat = jax.checkpoint(merge_block)


def _ring_loop(q, k, v, block_mask, *, axis, perm, steps: int, scale: float):
    """Online softmax over ``steps`` K/V blocks passed along ``perm``; ``block_mask(step)`` is
    the mask of the block this device holds at that step. ``q (B, lq, H, D)`` stays put."""
    b, lq, h, _ = q.shape
    dtype = v.dtype
    # Head-major (B, H, L, D) for the loop: merge_block's products are then batched matrix
    # products with no per-step transposes.
    qf = jnp.swapaxes(q.astype(jnp.float32) * scale, 1, 2)
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    carry = softmax_carry(b, h, lq, v.shape[-1])
    for step in range(steps):
        carry = _merge_block_remat(carry, qf, k, v, block_mask(step))
        if step < steps - 1:
            k, v = (jax.lax.ppermute(t, axis, perm) for t in (k, v))
    _, l_sum, acc = carry
    return jnp.swapaxes(normalised(l_sum, acc), 1, 2).astype(dtype)


def _ids_block_mask(mask: TokenMask, q_start, lq: int, lk: int, source):
    """``block_mask(step)`` of a ring from a mask's ids (every device holds all of them, O(L)):
    this device's ``lq`` query ids from ``q_start`` against the ``lk`` key ids of the block
    ``source(step)`` it holds at that step."""
    q_ids = jax.lax.dynamic_slice_in_dim(mask.q_groups, q_start, lq, axis=1)

    def block_mask(step):
        k_ids = jax.lax.dynamic_slice_in_dim(mask.k_groups, source(step) * lk, lk, axis=1)
        return mask.block(q_ids, k_ids)[:, None]

    return block_mask


def _ring_body(q, k, v, mask, *, axis, n: int, scale: float):
    """Per-device ring loop: ``q (B, lq, H, D)``, ``k/v (B, lk, H, D)`` local blocks.

    ``mask`` is a :class:`TokenMask` (every device holds all ids), or dense
    ``(B, H|1, lq|1, n * lk)``: this device's query rows, all key columns.
    """
    lq, lk = q.shape[1], k.shape[1]
    me = jax.lax.axis_index(axis)
    source = lambda step: (me - step) % n  # noqa: E731  (whose K/V block we hold now)
    if isinstance(mask, TokenMask):
        block_mask = _ids_block_mask(mask, me * lq, lq, lk, source)
    else:

        def block_mask(step):
            return jax.lax.dynamic_slice_in_dim(mask, source(step) * lk, lk, axis=3)

    perm = [(i, (i + 1) % n) for i in range(n)]
    return _ring_loop(q, k, v, block_mask, axis=axis, perm=perm, steps=n, scale=scale)


def _require_axis(axis, what: str):
    """``axis``, or the active mesh's context axis; raises without one."""
    axis = context_axis() if axis is None else axis
    if axis is None:
        raise ValueError(
            f"{what} attention needs an active mesh whose `tokens` axis (mesh.rules) has size > 1"
        )
    return axis


def check_qkv(q, k, v) -> None:
    """Raises unless q/k/v are ``(B, L, heads, head_dim)`` with matching k/v (any Lq vs Lk)."""
    if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"attention expects (B, L, heads, head_dim) q/k/v, got {q.shape}, {k.shape}, {v.shape}"
        )


def ring_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    *,
    axis: str | tuple[str, ...] | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Attention with the sequence sharded over ``axis`` (default: where ``tokens`` maps).

    Must run under an active mesh (``jax.set_mesh``) that has ``axis``.

    Args:
        q: queries ``(B, Lq, heads, head_dim)``.
        k: keys ``(B, Lk, heads, head_dim)``.
        v: values ``(B, Lk, heads, head_dim)``.
        mask: a :class:`TokenMask` (ids: no ``Lq x Lk`` array is built), or boolean,
            True = attend, ``(B, Lk)`` or broadcastable to ``(B, heads, Lq, Lk)``.
        axis: mesh axis name(s) of the ring; default :func:`context_axis`.
        scale: logit scale; default ``head_dim ** -0.5``.

    Returns:
        ``(B, Lq, heads, head_dim)`` in the dtype of ``v``; rows with no valid key are 0.
    """
    check_qkv(q, k, v)
    axis = _require_axis(axis, "ring")
    n = context_size(axis)
    b, lq, _, hd = q.shape
    lk = k.shape[1]
    scale = hd**-0.5 if scale is None else scale
    lq_pad, lk_pad = -(-lq // n) * n, -(-lk // n) * n
    q, k, v = _pad_to(q, 1, lq_pad), _pad_to(k, 1, lk_pad), _pad_to(v, 1, lk_pad)
    if isinstance(mask, TokenMask):  # ids, O(L): replicated, each block's mask built from them
        mask = mask.pad(lq_pad, lk_pad)
        mask_spec = jax.tree.map(lambda _: P(), mask)
    else:
        mask = _pad_to(_full_mask(mask, b, lq, lk), 3, lk_pad, False)
        row_sharded = mask.shape[2] != 1
        if row_sharded:
            mask = _pad_to(mask, 2, lq_pad, False)
        mask_spec = P(None, None, axis, None) if row_sharded else P()
    seq = P(None, axis, None, None)

    def body(q, k, v, mask):
        return _ring_body(q, k, v, mask, axis=axis, n=n, scale=scale)

    axes = {axis} if isinstance(axis, str) else set(axis)
    out = jax.shard_map(body, in_specs=(seq, seq, seq, mask_spec), out_specs=seq, axis_names=axes)(
        q, k, v, mask
    )
    return out[:, :lq]


def ulysses_group(heads: int, n: int) -> int:
    """Devices per all-to-all in the Ulysses x ring layout: the largest divisor of the
    context size ``n`` that divides the heads (``n``: pure Ulysses; 1: a plain ring)."""
    return max(d for d in range(1, n + 1) if n % d == 0 and heads % d == 0)


def ulysses_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: TokenMask | None = None,
    *,
    axis: str | tuple[str, ...] | None = None,
    scale: float | None = None,
    group: int | None = None,
) -> jax.Array:
    """Attention with the sequence sharded over ``axis``, by all-to-all over heads (Ulysses).

    Each device starts with ``L/n`` tokens of every head; an all-to-all inside each group of
    ``group`` consecutive devices swaps that for ``group * L/n`` tokens of ``H/group`` heads,
    attention runs there, and a second all-to-all swaps back. With ``group = n`` (pure
    Ulysses, the default) each device then holds the whole sequence for its heads and
    attends locally (blockwise: O(L) memory). With ``group < n`` the ``n / group`` groups
    form a ring over their sequence segments (Ulysses x ring): each device passes its
    key/value segment to the same head slice of the next group, merging with the online
    softmax, so heads need only divide ``group``.

    Args:
        q, k, v: ``(B, L, heads, head_dim)`` (self-attention: the same length).
        mask: a :class:`~vdiff.models.token_mask.TokenMask` or None; its ids are O(L) and
            every device keeps all of them, building each block's mask from them.
        axis: mesh axis name(s) of the context; default :func:`context_axis`.
        scale: logit scale; default ``head_dim ** -0.5``.
        group: devices per all-to-all; default the context size.

    Raises:
        ValueError: if the heads do not divide by ``group``, or ``group`` does not divide
            the context size.
    """
    check_qkv(q, k, v)
    axis = _require_axis(axis, "Ulysses")
    n = context_size(axis)
    b, length, heads, hd = q.shape
    if k.shape[1] != length:
        raise ValueError(f"Ulysses attention is self-attention; got Lq={length}, Lk={k.shape[1]}")
    group = n if group is None else group
    if n % group or heads % group:
        raise ValueError(
            f"Ulysses context parallelism splits {heads} heads over {group} of the {n} context "
            "devices: the heads must divide by it and it must divide the context size; use "
            "model.attention='ring' or 'ulysses_ring' (which picks a group that divides)"
        )
    rings = n // group
    scale = hd**-0.5 if scale is None else scale
    padded = -(-length // n) * n
    if mask is None:
        mask = TokenMask.key_padding(jnp.ones((b, length), bool), length)
    mask = mask.pad(padded, padded)
    q, k, v = (_pad_to(t, 1, padded) for t in (q, k, v))
    groups = None if group == n else [[g * group + j for j in range(group)] for g in range(rings)]
    seg = padded // rings  # tokens per group after the all-to-all

    def body(q, k, v, mask):
        def to_heads(t):  # (B, L/n, H, D) -> (B, L*group/n, H/group, D)
            return jax.lax.all_to_all(
                t, axis, split_axis=2, concat_axis=1, tiled=True, axis_index_groups=groups
            )

        q, k, v = to_heads(q), to_heads(k), to_heads(v)
        if rings == 1:
            out = local_attention(q, k, v, mask, scale)
        else:
            g = jax.lax.axis_index(axis) // group
            source = lambda step: (g - step) % rings  # noqa: E731  (the K/V segment held)
            block_mask = _ids_block_mask(mask, g * seg, seg, seg, source)
            perm = [(i, ((i // group + 1) % rings) * group + i % group) for i in range(n)]
            out = _ring_loop(q, k, v, block_mask, axis=axis, perm=perm, steps=rings, scale=scale)
        return jax.lax.all_to_all(
            out, axis, split_axis=1, concat_axis=2, tiled=True, axis_index_groups=groups
        )

    seq = P(None, axis, None, None)
    ids = jax.tree.map(lambda _: P(), mask)
    axes = {axis} if isinstance(axis, str) else set(axis)
    out = jax.shard_map(body, in_specs=(seq, seq, seq, ids), out_specs=seq, axis_names=axes)(
        q, k, v, mask
    )
    return out[:, :length]


def local_attention(q, k, v, mask: TokenMask, scale: float) -> jax.Array:
    """Attention on one device with a TokenMask: blockwise past one tile, else the einsum."""
    from vdiff.models.attention import attention  # it imports this module

    backend = local_backend(q.shape[1], k.shape[1])
    return attention(q, k, v, mask, backend=backend, scale=scale)
