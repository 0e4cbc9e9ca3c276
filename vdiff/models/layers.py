"""Building blocks shared by the diffusion transformer and the text encoder.

Every parameter carries logical axis names (``embed``, ``mlp``, ``heads``, ``kv``,
``vocab``) through :func:`vdiff.parallel.sharding.logical_param`, and activations go
through :func:`vdiff.parallel.sharding.constrain`, so the same code runs on one CPU
and on a sharded mesh. Parameters are stored in ``param_dtype`` and cast to the
compute ``dtype`` at use; norms and softmax run in float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

import vdiff.parallel.sharding as sharding
from vdiff.models.attention import attention

constrain = sharding.constrain
Initializer = nnx.initializers.Initializer

_DEFAULT_INIT = nnx.initializers.xavier_uniform()


def _param(
    rngs: nnx.Rngs, init, shape: Sequence[int], names: Sequence[str | None], dtype
) -> nnx.Param:
    return sharding.logical_param(init(rngs.params(), tuple(shape), dtype), names)


class Dense(nnx.Module):
    """``y = x @ W (+ b)`` over the last axis, with named parameter axes.

    Args:
        din: input features.
        dout: output features.
        names: logical names of the kernel axes ``(in, out)``; the bias takes ``out``.
        rngs: random streams.
        use_bias: add a bias.
        kernel_init: initialiser of the kernel (``nnx.initializers.zeros`` for the
            zero-initialised adaLN and output layers).
        dtype: compute dtype.
        param_dtype: storage dtype.
    """

    def __init__(
        self,
        din: int,
        dout: int,
        names: tuple[str | None, str | None],
        *,
        rngs: nnx.Rngs,
        use_bias: bool = True,
        kernel_init: Initializer = _DEFAULT_INIT,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        self.kernel = _param(rngs, kernel_init, (din, dout), names, param_dtype)
        self.bias = (
            _param(rngs, nnx.initializers.zeros, (dout,), names[1:], param_dtype)
            if use_bias
            else None
        )
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("...d,df->...f", x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class HeadsProj(nnx.Module):
    """Projects ``(..., embed)`` to ``(..., heads, head_dim)`` (q, k or v)."""

    def __init__(self, din, heads, head_dim, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        init = nnx.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=(1, 2)
        )
        self.kernel = _param(
            rngs, init, (din, heads, head_dim), ("embed", "heads", "kv"), param_dtype
        )
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.einsum(
            "btd,dhk->bthk", x.astype(self.dtype), self.kernel[...].astype(self.dtype)
        )


class OutProj(nnx.Module):
    """Projects ``(..., heads, head_dim)`` back to ``(..., embed)``."""

    def __init__(self, heads, head_dim, dout, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        init = nnx.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2
        )
        self.kernel = _param(
            rngs, init, (heads, head_dim, dout), ("heads", "kv", "embed"), param_dtype
        )
        self.bias = _param(rngs, nnx.initializers.zeros, (dout,), ("embed",), param_dtype)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("bthk,hkd->btd", x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        return y + self.bias[...].astype(self.dtype)


class RMSNorm(nnx.Module):
    """RMS norm in float32 with a learned scale (used for q/k and the text encoder)."""

    def __init__(
        self, dim: int, name: str, *, rngs: nnx.Rngs, eps: float = 1e-6, param_dtype=jnp.float32
    ):
        self.scale = _param(rngs, nnx.initializers.ones, (dim,), (name,), param_dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Affine-free layer norm (the affine part comes from adaLN), in float32."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``x (B, L, D)`` over the tokens where ``mask (B, L)`` is True, in float32,
    returned in ``x``'s dtype; an all-False row gives zeros (its count is taken as 1)."""
    m = mask[..., None].astype(jnp.float32)
    total = jnp.sum(x.astype(jnp.float32) * m, axis=1)
    return (total / jnp.maximum(jnp.sum(m, axis=1), 1.0)).astype(x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN: ``x * (1 + scale) + shift`` with per-example ``(B, D)`` shift/scale."""
    return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


class MLP(nnx.Module):
    """Two-layer GELU(tanh) MLP, hidden axis named ``mlp``."""

    def __init__(self, width, hidden, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc1 = Dense(width, hidden, ("embed", "mlp"), **kw)
        self.fc2 = Dense(hidden, width, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.gelu(self.fc1(x), approximate=True)
        h = constrain(h, ("batch", "tokens", "mlp"))
        return self.fc2(h)


class AdaLN(nnx.Module):
    """Zero-initialised projection of the conditioning vector to ``n`` modulation chunks.

    Zero init makes every residual branch start as the identity (adaLN-Zero), which
    keeps the deep stack stable at the start of training.
    """

    def __init__(self, width, n, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.n = n
        self.proj = Dense(
            width, n * width, ("embed", "mlp"), rngs=rngs, kernel_init=nnx.initializers.zeros,
            dtype=dtype, param_dtype=param_dtype,
        )  # fmt: skip

    def __call__(self, c_act: jax.Array) -> list[jax.Array]:
        """``c_act``: SiLU of the conditioning vector, ``(B, width)``."""
        return jnp.split(self.proj(c_act), self.n, axis=-1)


def timestep_features(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal features of ``t`` in [0, 1] (scaled by 1000 so low frequencies resolve it)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = (t.astype(jnp.float32) * 1000.0)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedder(nnx.Module):
    """``t (B,)`` -> sinusoidal features -> MLP -> ``(B, width)``."""

    def __init__(self, width, *, rngs, freq_dim=256, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.freq_dim = freq_dim
        self.fc1 = Dense(freq_dim, width, (None, "embed"), **kw)
        self.fc2 = Dense(width, width, ("embed", "mlp"), **kw)

    def __call__(self, t: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.silu(self.fc1(timestep_features(t, self.freq_dim))))


class SelfAttention(nnx.Module):
    """Pre-projected multi-head self-attention with optional QK RMS norm (text encoder)."""

    def __init__(
        self,
        width,
        heads,
        *,
        rngs,
        qk_norm=True,
        backend="auto",
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        hd = width // heads
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q = HeadsProj(width, heads, hd, **kw)
        self.k = HeadsProj(width, heads, hd, **kw)
        self.v = HeadsProj(width, heads, hd, **kw)
        self.out = OutProj(heads, hd, width, **kw)
        self.q_norm = RMSNorm(hd, "kv", rngs=rngs, param_dtype=param_dtype) if qk_norm else None
        self.k_norm = RMSNorm(hd, "kv", rngs=rngs, param_dtype=param_dtype) if qk_norm else None
        self.backend = backend

    def __call__(self, x, mask, rope_fn=None):
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope_fn is not None:
            q, k = rope_fn(q), rope_fn(k)
        o = attention(q, k, v, mask, self.backend)
        return self.out(o)
