"""The encoder half of T5 v1.1 / mT5 / UMT5 in Flax NNX, for pretrained caption encoders.

Same computation as the Hugging Face ``T5EncoderModel`` / ``UMT5EncoderModel`` (the
parity fixtures in ``tests/fixtures/text_encoders`` hold its outputs):

- token embedding (no scaling), then ``num_layers`` pre-norm blocks, then a final norm;
- norms are T5's RMS norm: no mean subtraction, no bias, float32 statistics;
- attention has no ``1/sqrt(d)`` scaling (it is folded into the trained weights) and no
  projection biases; a learned bias per (relative position bucket, head) is added to the
  logits: T5 and mT5 learn one table in the first block and every block reuses it, UMT5
  learns a table per block;
- the feed-forward is gated-GELU: ``wo(gelu_tanh(wi_0 x) * wi_1 x)``.

Parameters carry logical axis names (``vocab``, ``embed``, ``heads``, ``kv``, ``mlp``), so the
mesh rules that shard the diffusion transformer shard the encoder too (``fsdp`` splits
``embed``, ``tensor`` splits heads and the feed-forward). Compute runs in ``dtype``
(bfloat16 for production encoders); norms, logits and softmax stay float32, as in the
reference. The weights come from a Hugging Face checkpoint through
:mod:`vdiff.models.t5_weights`; this module only defines the computation.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import vdiff.parallel.sharding as sharding
from vdiff.errors import UserError
from vdiff.models.layers import Dense, RMSNorm

# config.json model_type -> whether every block learns its own relative position bias.
MODEL_TYPES = {"t5": False, "mt5": False, "umt5": True}


@dataclasses.dataclass(frozen=True)
class T5Spec:
    """The encoder's sizes, read from a Hugging Face ``config.json``."""

    model_type: str
    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    num_buckets: int
    max_distance: int
    eps: float

    @property
    def bias_per_layer(self) -> bool:
        return MODEL_TYPES[self.model_type]

    @classmethod
    def from_config_json(cls, path: Path) -> T5Spec:
        """Reads ``config.json``; an unsupported model is one line naming the key."""
        path = Path(path)
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(
                f"{path} is missing; text.path must hold a Hugging Face T5 folder "
                "(config.json, model.safetensors, spiece.model)"
            ) from None
        except ValueError as e:
            raise UserError(f"{path} is not JSON ({e})") from None
        kind = cfg.get("model_type")
        if kind not in MODEL_TYPES:
            raise UserError(
                f"{path}: model_type={kind!r} is not a T5 encoder; vdiff loads "
                f"{sorted(MODEL_TYPES)}"
            )
        ff = cfg.get("feed_forward_proj", "relu")
        if ff != "gated-gelu":
            raise UserError(
                f"{path}: feed_forward_proj={ff!r}; vdiff loads the gated-gelu "
                "encoders (T5 v1.1, mT5, UMT5)"
            )
        try:
            return cls(
                model_type=kind, vocab_size=int(cfg["vocab_size"]), d_model=int(cfg["d_model"]),
                d_kv=int(cfg["d_kv"]), d_ff=int(cfg["d_ff"]), num_layers=int(cfg["num_layers"]),
                num_heads=int(cfg["num_heads"]),
                num_buckets=int(cfg.get("relative_attention_num_buckets", 32)),
                max_distance=int(cfg.get("relative_attention_max_distance", 128)),
                eps=float(cfg.get("layer_norm_epsilon", 1e-6)),
            )  # fmt: skip
        except KeyError as e:
            raise UserError(f"{path} has no {e.args[0]!r}") from None


def pretrained_width(text_cfg) -> int | None:
    """The width of ``text.encoder="t5"``'s embeddings (its ``d_model``); None for the
    internal encoder."""
    if text_cfg.encoder == "internal":
        return None
    return T5Spec.from_config_json(Path(text_cfg.path) / "config.json").d_model


def relative_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """``(length, length)`` int32 bucket of key position minus query position, bidirectional.

    Half of the buckets are for keys after the query; within each half, distances below a
    quarter of the buckets get a bucket each and longer ones share log-spaced buckets up to
    ``max_distance``. Computed in float32 like the reference, so boundary cases agree.
    """
    pos = np.arange(length)
    rel = pos[None, :] - pos[:, None]
    half = num_buckets // 2
    out = (rel > 0).astype(np.int64) * half
    dist = np.abs(rel)
    exact = half // 2
    with np.errstate(divide="ignore"):
        ratio = np.log(np.maximum(dist, 1).astype(np.float32) / np.float32(exact))
        large = exact + (
            ratio / np.float32(math.log(max_distance / exact)) * np.float32(half - exact)
        ).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (out + np.where(dist < exact, dist, large)).astype(np.int32)


_INIT = nnx.initializers.normal(0.02)  # placeholder values: a checkpoint replaces them


def _param(rngs, shape, names, dtype):
    return sharding.logical_param(_INIT(rngs.params(), shape, dtype), names)


class T5Attention(nnx.Module):
    """Unscaled multi-head self-attention with an additive position bias; no biases."""

    def __init__(self, spec: T5Spec, *, has_bias: bool, rngs, dtype, param_dtype):
        h, d, k = spec.num_heads, spec.d_model, spec.d_kv
        self.q = _param(rngs, (d, h, k), ("embed", "heads", "kv"), param_dtype)
        self.k = _param(rngs, (d, h, k), ("embed", "heads", "kv"), param_dtype)
        self.v = _param(rngs, (d, h, k), ("embed", "heads", "kv"), param_dtype)
        self.o = _param(rngs, (h, k, d), ("heads", "kv", "embed"), param_dtype)
        self.relative_bias = (
            _param(rngs, (spec.num_buckets, h), (None, "heads"), param_dtype) if has_bias else None
        )
        self.dtype = dtype

    def position_bias(self, buckets: np.ndarray) -> jax.Array:
        """``(1, heads, L, L)`` float32 bias from a ``(L, L)`` bucket table."""
        bias = jnp.take(self.relative_bias[...].astype(jnp.float32), buckets, axis=0)
        return jnp.transpose(bias, (2, 0, 1))[None]

    def __call__(self, x, bias, key_mask):
        cast = lambda p: p[...].astype(self.dtype)  # noqa: E731
        q = jnp.einsum("bld,dhk->blhk", x, cast(self.q))
        k = jnp.einsum("bld,dhk->blhk", x, cast(self.k))
        v = jnp.einsum("bld,dhk->blhk", x, cast(self.v))
        logits = jnp.einsum("bqhk,bmhk->bhqm", q, k, preferred_element_type=jnp.float32)
        logits = jnp.where(key_mask[:, None, None, :], logits + bias, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqm,bmhk->bqhk", probs, v)
        return jnp.einsum("bqhk,hkd->bqd", out, cast(self.o))


class T5Block(nnx.Module):
    def __init__(self, spec: T5Spec, *, has_bias: bool, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        norm = dict(rngs=rngs, eps=spec.eps, param_dtype=param_dtype)
        self.attn_norm = RMSNorm(spec.d_model, "embed", **norm)
        self.attn = T5Attention(spec, has_bias=has_bias, **kw)
        self.ff_norm = RMSNorm(spec.d_model, "embed", **norm)
        self.wi_0 = Dense(spec.d_model, spec.d_ff, ("embed", "mlp"), use_bias=False, **kw)
        self.wi_1 = Dense(spec.d_model, spec.d_ff, ("embed", "mlp"), use_bias=False, **kw)
        self.wo = Dense(spec.d_ff, spec.d_model, ("mlp", "embed"), use_bias=False, **kw)

    def __call__(self, x, bias, key_mask):
        x = x + self.attn(self.attn_norm(x), bias, key_mask)
        x = sharding.constrain(x, ("batch", "tokens", "embed"))
        h = self.ff_norm(x)
        gated = jax.nn.gelu(self.wi_0(h), approximate=True) * self.wi_1(h)
        gated = sharding.constrain(gated, ("batch", "tokens", "mlp"))
        return x + self.wo(gated)


class T5Encoder(nnx.Module):
    """``(ids (B, L) int, mask (B, L) bool) -> hidden states (B, L, d_model)``.

    Build the structure with random weights here, then load a checkpoint into it with
    :func:`vdiff.models.t5_weights.load_t5`.
    """

    def __init__(self, spec: T5Spec, *, rngs: nnx.Rngs, dtype=jnp.bfloat16, param_dtype=None):
        param_dtype = dtype if param_dtype is None else param_dtype
        self.spec = spec
        self.embed = _param(rngs, (spec.vocab_size, spec.d_model), ("vocab", "embed"), param_dtype)
        self.blocks = nnx.List(
            [
                T5Block(
                    spec,
                    has_bias=spec.bias_per_layer or i == 0,
                    rngs=rngs,
                    dtype=dtype,
                    param_dtype=param_dtype,
                )
                for i in range(spec.num_layers)
            ]
        )
        self.final_norm = RMSNorm(
            spec.d_model, "embed", rngs=rngs, eps=spec.eps, param_dtype=param_dtype
        )
        self.dtype = dtype

    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise ValueError(f"ids and mask must both be (B, L), got {ids.shape}, {mask.shape}")
        s = self.spec
        buckets = relative_buckets(ids.shape[1], s.num_buckets, s.max_distance)
        key_mask = mask.astype(bool)
        x = jnp.take(self.embed[...], ids, axis=0).astype(self.dtype)
        x = sharding.constrain(x, ("batch", "tokens", "embed"))
        bias = None
        for block in self.blocks:
            if block.attn.relative_bias is not None:
                bias = block.attn.position_bias(buckets)
            x = block(x, bias, key_mask)
        return self.final_norm(x)
