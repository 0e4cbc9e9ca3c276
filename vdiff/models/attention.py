"""Scaled dot-product attention behind one function, with selectable backends.

``attention(q, k, v, mask, backend)`` takes ``(B, L, heads, head_dim)`` arrays and a
boolean mask (True = attend) broadcastable to ``(B, heads, Lq, Lk)``.

Backends (``model.attention``):
- ``"xla"``: reference einsum + softmax; logits and softmax in float32 whatever the
  input dtype.
- ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (flash
  attention on NVIDIA GPUs; needs bfloat16/float16 inputs).
- ``"ring"``: context parallelism (:mod:`vdiff.parallel.context`): the sequence stays
  sharded over the mesh axis of logical ``tokens`` and key/value blocks travel
  around a ring with an online softmax. Without such an axis (one device, or
  ``context=1``) it computes the same thing with the local ``"xla"`` path.
- ``"auto"``: ring when the active mesh splits ``tokens`` (``context > 1``); else
  cudnn when on GPU with a dtype and head size it supports; else xla.
- ``"splash"``: TPU splash attention, not implemented yet (raises).

A query row whose keys are all masked (e.g. an empty caption in a text-only
attention) returns zeros instead of NaN on every backend: such rows are given one
dummy key internally and their output is zeroed afterwards, so neither the forward
nor the backward pass sees ``softmax`` of an all ``-inf`` row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vdiff.parallel.context import check_qkv, context_axis, ring_attention

BACKENDS = ("auto", "xla", "cudnn", "ring", "splash")
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def resolve_backend(backend: str, dtype, head_dim: int) -> str:
    """Turns ``"auto"`` into a concrete backend and checks the explicit ones."""
    if backend not in BACKENDS:
        raise ValueError(f"model.attention={backend!r} is not one of {BACKENDS}")
    on_gpu = jax.default_backend() == "gpu"
    cudnn_ok = (
        jnp.dtype(dtype) in [jnp.dtype(d) for d in _CUDNN_DTYPES]
        and head_dim % 8 == 0
        and head_dim <= 128
    )
    if backend in ("auto", "ring") and context_axis() is not None:
        return "ring"
    if backend == "ring":
        return "xla"
    if backend == "auto":
        return "cudnn" if (on_gpu and cudnn_ok) else "xla"
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
    if backend == "splash":
        raise NotImplementedError(
            "model.attention='splash' (TPU splash attention) is not implemented yet; use 'auto' or 'xla'"
        )
    return backend


def _as_4d_mask(mask: jax.Array | None, q: jax.Array, k: jax.Array) -> jax.Array | None:
    if mask is None:
        return None
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
        mask: boolean, True where a query may attend to a key; ``(B, Lk)`` key
            padding or 4-D broadcastable to ``(B, heads, Lq, Lk)``. None = all.
        backend: one of :data:`BACKENDS` (see the module docstring).
        scale: logit scale; default ``head_dim ** -0.5``.

    Returns:
        ``(B, Lq, heads, head_dim)`` in the dtype of ``v``; rows with no valid key are 0.
    """
    check_qkv(q, k, v)
    head_dim = q.shape[-1]
    scale = head_dim**-0.5 if scale is None else scale
    impl = resolve_backend(backend, q.dtype, head_dim)
    mask = _as_4d_mask(mask, q, k)
    if impl == "ring":  # handles masks, all-masked rows and padding itself
        return ring_attention(q, k, v, mask, scale=scale)
    row_valid = None
    if mask is not None:
        row_valid = jnp.any(mask, axis=-1, keepdims=True)  # (B, H|1, Lq|1, 1)
        first_key = jnp.arange(k.shape[1]) == 0
        mask = mask | (~row_valid & first_key)
    if impl == "xla":
        out = _xla_attention(q, k, v, mask, scale)
    else:
        if mask is not None:
            mask = jnp.broadcast_to(mask, (q.shape[0], mask.shape[1], q.shape[1], k.shape[1]))
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
    if row_valid is not None:
        # (B, H|1, Lq|1, 1) -> (B, Lq|1, H|1, 1) to match the output layout.
        out = out * jnp.transpose(row_valid, (0, 2, 1, 3)).astype(out.dtype)
    return out
