"""Scaled dot-product attention behind one function, with selectable backends.

``attention(q, k, v, mask, backend)`` takes ``(B, L, heads, head_dim)`` arrays and a mask:
a :class:`~vdiff.models.token_mask.TokenMask` (per-token ids, O(L) memory: what the models
pass), ``(B, Lk)`` boolean key padding, or a dense boolean (True = attend) broadcastable to
``(B, heads, Lq, Lk)``.

Backends (``model.attention``):
- ``"xla"``: reference einsum + softmax; logits and softmax in float32 whatever the
  input dtype. Materialises the ``(B, heads, Lq, Lk)`` logits.
- ``"blockwise"``: :mod:`vdiff.models.blockwise`, query and key/value tiles with an online
  softmax and a recomputing backward pass: O(L) memory in training, any platform.
- ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (flash
  attention on NVIDIA GPUs; needs bfloat16/float16 inputs). Key padding goes in as
  ``key_value_seq_lengths`` (valid keys moved to the front, :func:`fused_attention`), so
  no ``Lq x Lk`` mask exists; only the cross-modal ablation's mask goes in dense.
- ``"ring"``: context parallelism (:mod:`vdiff.parallel.context`): the sequence stays
  sharded over the mesh axis of logical ``tokens`` and key/value blocks travel
  around a ring with an online softmax. Without such an axis (one device, or
  ``context=1``) it computes the same thing on the device (as ``"auto"`` there).
- ``"ulysses"``: context parallelism by all-to-all over heads (heads must divide by the
  context size; a clear error otherwise); ``"ulysses_ring"``: all-to-all inside groups of
  the context devices (the largest group size that divides the heads) and a ring across
  the groups, for context meshes larger than the head count. Both are self-attention;
  cross-attention on a context mesh takes the ring.
- ``"auto"``: on a mesh that splits ``tokens`` (``context > 1``): Ulysses when the heads
  divide by the context size, else ring (cross-attention: ring); else
  cudnn when on GPU with a dtype and head size it supports; on TPU splash for key-padding
  masks (blockwise for the cross-modal ablation's); else blockwise when the
  sequence spans more than one tile (:data:`BLOCK`) and xla when it fits in one (the
  same computation, without the loop).
- ``"splash"``: TPU splash attention (:mod:`vdiff.models.splash`, Pallas), key padding
  as segment ids; TPU only. Its correctness is checked on CPU in Pallas interpret mode;
  the kernel has not been run on a TPU by vdiff's tests.

A query row whose keys are all masked (e.g. an empty caption in a text-only
attention) returns zeros instead of NaN on every backend: such rows are given one
dummy key internally and their output is zeroed afterwards, so neither the forward
nor the backward pass sees ``softmax`` of an all ``-inf`` row.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vdiff.models.blockwise import BLOCK, blockwise_attention, local_backend
from vdiff.models.splash import splash_attention
from vdiff.models.token_mask import TokenMask
from vdiff.parallel.context import (
    check_qkv,
    context_axis,
    context_size,
    ring_attention,
    ulysses_attention,
    ulysses_group,
)

BACKENDS = ("auto", "xla", "blockwise", "cudnn", "ring", "ulysses", "ulysses_ring", "splash")
CONTEXT_BACKENDS = ("ring", "ulysses", "ulysses_ring")
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def resolve_backend(backend: str, dtype, head_dim: int, lengths=(0, 0), heads: int = 1) -> str:
    """Turns ``"auto"`` into a concrete backend and checks the explicit ones (``lengths``:
    the query and key lengths, for auto's blockwise-or-xla choice and Ulysses, which is
    self-attention only; ``heads``: Ulysses needs them to divide by the context size)."""
    if backend not in BACKENDS:
        raise ValueError(f"model.attention={backend!r} is not one of {BACKENDS}")
    on_gpu = jax.default_backend() == "gpu"
    cudnn_ok = (
        jnp.dtype(dtype) in [jnp.dtype(d) for d in _CUDNN_DTYPES]
        and head_dim % 8 == 0
        and head_dim <= 128
    )
    axis = context_axis()
    if axis is not None and (backend == "auto" or backend in CONTEXT_BACKENDS):
        n = context_size(axis)
        if backend == "ring" or lengths[0] != lengths[1]:
            return "ring"  # cross-attention: the ring handles any Lq vs Lk
        if backend == "auto":
            return "ulysses" if heads % n == 0 else "ring"
        return backend
    if backend in CONTEXT_BACKENDS:  # no context axis: attention on this device
        backend = "auto"
    if backend == "auto":
        if on_gpu and cudnn_ok:
            return "cudnn"
        if jax.default_backend() == "tpu":
            return "splash"  # attention() takes blockwise where the mask needs it
        return local_backend(*lengths)
    if backend == "cudnn":
        if not on_gpu:
            raise ValueError(
                "model.attention='cudnn' needs a GPU; use 'auto' or 'xla' on this platform"
            )
        if not cudnn_ok:
            raise ValueError(
                f"model.attention='cudnn' needs bfloat16/float16 inputs and head_dim % 8 == 0, <= 128 "
                f"(got {jnp.dtype(dtype).name}, head_dim={head_dim}); set train.compute_dtype=bfloat16 "
                "or use model.attention='xla'"
            )
    if backend == "splash" and jax.default_backend() != "tpu":
        raise ValueError(
            "model.attention='splash' is TPU splash attention; use 'auto' or 'blockwise' on "
            f"this {jax.default_backend()} platform"
        )
    return backend


def _as_4d_mask(mask, q: jax.Array, k: jax.Array) -> jax.Array | None:
    if mask is None:
        return None
    if isinstance(mask, TokenMask):
        return mask.dense()
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise ValueError(f"attention mask must be boolean (True = attend), got {mask.dtype}")
    if mask.ndim == 2:  # (B, Lk) key padding
        mask = mask[:, None, None, :]
    if mask.ndim != 4:
        raise ValueError(
            f"attention mask must be (B, Lk) or 4-D (B, heads, Lq, Lk), got shape {mask.shape}"
        )
    if mask.shape[-1] != k.shape[1] or mask.shape[-2] not in (1, q.shape[1]):
        raise ValueError(
            f"attention mask {mask.shape} does not fit Lq={q.shape[1]}, Lk={k.shape[1]}"
        )
    return mask


def _as_token_mask(mask, q: jax.Array, k: jax.Array) -> TokenMask:
    """A mask as ids for the blockwise path: TokenMask as is, key padding or None converted;
    a dense mask cannot be (it is already the O(L^2) array blockwise exists to avoid)."""
    if isinstance(mask, TokenMask):
        return mask
    b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    if mask is None:
        return TokenMask.key_padding(jnp.ones((b, lk), bool), lq)
    mask = jnp.asarray(mask)
    if mask.ndim == 2 and mask.dtype == jnp.bool_ and mask.shape == (b, lk):
        return TokenMask.key_padding(mask, lq)
    raise ValueError(
        f"model.attention='blockwise' takes a TokenMask or (B, Lk) key padding, got a {mask.shape} "
        "mask; build masks with vdiff.models.token_mask"
    )


def _xla_attention(q, k, v, mask, scale):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    backend: str = "auto",
    scale: float | None = None,
) -> jax.Array:
    """Multi-head attention.

    Args:
        q: queries ``(B, Lq, heads, head_dim)``.
        k: keys ``(B, Lk, heads, head_dim)``.
        v: values ``(B, Lk, heads, head_dim)``.
        mask: a :class:`TokenMask`, or boolean (True where a query may attend to a key)
            ``(B, Lk)`` key padding or 4-D broadcastable to ``(B, heads, Lq, Lk)``.
            None = all.
        backend: one of :data:`BACKENDS` (see the module docstring).
        scale: logit scale; default ``head_dim ** -0.5``.

    Returns:
        ``(B, Lq, heads, head_dim)`` in the dtype of ``v``; rows with no valid key are 0.
    """
    check_qkv(q, k, v)
    head_dim = q.shape[-1]
    scale = head_dim**-0.5 if scale is None else scale
    impl = resolve_backend(backend, q.dtype, head_dim, (q.shape[1], k.shape[1]), q.shape[2])
    if impl in ("ulysses", "ulysses_ring"):
        n = context_size(context_axis())
        group = n if impl == "ulysses" else ulysses_group(q.shape[2], n)
        return ulysses_attention(q, k, v, _as_token_mask(mask, q, k), scale=scale, group=group)
    if impl == "splash":
        tm = None if mask is None else _as_token_mask(mask, q, k)
        if backend == "splash" or tm is None or tm.same_rows:  # splash refuses other masks
            return splash_attention(q, k, v, tm, scale=scale)
        impl = "blockwise"  # "auto": the masks splash cannot express
    if impl == "blockwise":
        tm = None if mask is None else _as_token_mask(mask, q, k)  # None: no per-tile masking
        return blockwise_attention(q, k, v, tm, scale=scale, block_q=BLOCK, block_k=BLOCK)
    if impl == "cudnn":
        return fused_attention(q, k, v, mask, scale=scale, implementation="cudnn")
    if impl == "ring":  # handles masks (ids as ids), all-masked rows and padding itself
        ring_mask = mask if isinstance(mask, TokenMask) else _as_4d_mask(mask, q, k)
        return ring_attention(q, k, v, ring_mask, scale=scale)
    mask = _as_4d_mask(mask, q, k)
    dense, row_valid = _with_dummy_keys(mask, k)
    return _zero_invalid_rows(_xla_attention(q, k, v, dense, scale), row_valid)


def _with_dummy_keys(mask, k):
    """``(mask, row_valid)``: rows with no valid key get key 0, to be zeroed afterwards."""
    if mask is None:
        return None, None
    row_valid = jnp.any(mask, axis=-1, keepdims=True)  # (B, H|1, Lq|1, 1)
    first_key = jnp.arange(k.shape[1]) == 0
    return mask | (~row_valid & first_key), row_valid


def _zero_invalid_rows(out, row_valid):
    """Zeroes the rows :func:`_with_dummy_keys` gave a dummy key: ``row_valid``
    ``(B, H|1, Lq|1, 1)`` against ``out (B, Lq, H, D)``."""
    if row_valid is None:
        return out
    return out * jnp.transpose(row_valid, (0, 2, 1, 3)).astype(out.dtype)


def _key_padding(mask, b: int, lk: int) -> jax.Array | None:
    """``(B, Lk)`` valid keys when ``mask`` only pads keys (every query reads the same keys),
    else None."""
    if isinstance(mask, TokenMask):
        return mask.key_valid() if mask.same_rows else None
    mask = jnp.asarray(mask)
    return mask if mask.ndim == 2 and mask.shape == (b, lk) else None


def fused_attention(q, k, v, mask, *, scale: float, implementation: str) -> jax.Array:
    """``jax.nn.dot_product_attention`` (cuDNN flash attention on GPU) without an O(L^2)
    mask where the mask is key padding: the valid keys move to the front of each example
    (attention does not depend on the keys' order) and ``key_value_seq_lengths`` counts
    them. Other masks (the cross-modal ablation's) go in dense. ``implementation="xla"``
    runs the same path on any platform, which is how the tests check it."""
    b, lk = k.shape[0], k.shape[1]
    run = functools.partial(
        jax.nn.dot_product_attention, scale=scale, implementation=implementation
    )
    if mask is None:
        return run(q, k, v)
    valid = _key_padding(mask, b, lk)
    if valid is None:
        dense, row_valid = _with_dummy_keys(_as_4d_mask(mask, q, k), k)
        dense = jnp.broadcast_to(dense, (b, dense.shape[1], q.shape[1], lk))
        return _zero_invalid_rows(run(q, k, v, mask=dense), row_valid)
    order = jnp.argsort(~valid, axis=1, stable=True)[:, :, None, None]  # valid keys first
    k, v = (jnp.take_along_axis(x, order, axis=1) for x in (k, v))
    count = jnp.sum(valid, axis=1, dtype=jnp.int32)
    out = run(q, k, v, key_value_seq_lengths=jnp.maximum(count, 1))  # 0 keys: one, zeroed
    return out * (count > 0)[:, None, None, None].astype(out.dtype)
