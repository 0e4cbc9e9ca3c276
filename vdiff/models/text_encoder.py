"""Small bidirectional text encoder trained jointly with the diffusion transformer.

Token embedding -> ``depth`` pre-norm transformer blocks with 1D RoPE -> RMS norm,
giving per-token features ``(B, L, text_width)`` and a pooled vector
``(B, text_width)`` (mean over the tokens where ``mask`` is True).

An empty caption (``mask`` all False) is the unconditional input for
classifier-free guidance, so there is no learned "null" embedding. That path is
numerically safe: attention rows with no valid key return zeros (see
:mod:`vdiff.models.attention`) and the pooled mean divides by ``max(count, 1)``,
giving a zero vector. Token ids under a False mask never reach the outputs that the
diffusion transformer reads (masked features are ignored, the pooled vector skips
them), so the pad id does not matter.

``model.freeze_text``: the encoder is part of the DiT's parameters; freezing is the
train step's job (the Engine's ``frozen``: no gradient into the ``text_encoder``
sub-tree and no update of it), not something this module does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import vdiff.parallel.sharding as sharding
from vdiff.models.layers import MLP, RMSNorm, SelfAttention, masked_mean
from vdiff.models.rope import apply_rope, rope_angles_1d

# Token id used for empty captions; any id works since masked tokens never reach the outputs.
PAD_ID = 0


class TextBlock(nnx.Module):
    def __init__(self, width, heads, mlp_ratio, *, rngs, backend, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = RMSNorm(width, "embed", rngs=rngs, param_dtype=param_dtype)
        self.attn = SelfAttention(width, heads, qk_norm=True, backend=backend, **kw)
        self.norm2 = RMSNorm(width, "embed", rngs=rngs, param_dtype=param_dtype)
        self.mlp = MLP(width, int(width * mlp_ratio), **kw)

    def __call__(self, x, mask, angles):
        x = x + self.attn(self.norm1(x), mask, lambda y: apply_rope(y, angles))
        x = sharding.constrain(x, ("batch", "tokens", "embed"))
        return x + self.mlp(self.norm2(x))


class TextEncoder(nnx.Module):
    """Bidirectional transformer over caption tokens.

    Args:
        vocab_size: token vocabulary (``data.vocab_size``).
        width: feature width (``model.text_width``).
        depth: number of blocks (``model.text_depth``).
        heads: attention heads (``model.text_heads``).
        rngs: random streams.
        mlp_ratio: MLP hidden / width.
        backend: attention backend.
        dtype: compute dtype.
        param_dtype: parameter dtype.
    """

    def __init__(
        self, vocab_size, width, depth, heads, *, rngs, mlp_ratio=4.0, backend="auto",
        dtype=jnp.float32, param_dtype=jnp.float32,
    ):  # fmt: skip
        if width % heads:
            raise ValueError(
                f"model.text_width={width} is not divisible by model.text_heads={heads}"
            )
        self.vocab_size = vocab_size
        self.head_dim = width // heads
        self.embed = sharding.logical_param(
            nnx.initializers.normal(0.02)(rngs.params(), (vocab_size, width), param_dtype),
            ("vocab", "embed"),
        )
        self.blocks = nnx.List(
            [
                TextBlock(
                    width,
                    heads,
                    mlp_ratio,
                    rngs=rngs,
                    backend=backend,
                    dtype=dtype,
                    param_dtype=param_dtype,
                )
                for _ in range(depth)
            ]
        )
        self.norm = RMSNorm(width, "embed", rngs=rngs, param_dtype=param_dtype)
        self.dtype = dtype

    def __call__(self, tokens: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Encodes ``tokens (B, L)`` int with ``mask (B, L)`` bool.

        Returns:
            ``(features (B, L, width), pooled (B, width))``.
        """
        if tokens.ndim != 2 or mask.shape != tokens.shape:
            raise ValueError(
                f"text tokens and mask must both be (B, L), got {tokens.shape}, {mask.shape}"
            )
        mask = mask.astype(bool)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)
        x = sharding.constrain(x, ("batch", "tokens", "embed"))
        angles = rope_angles_1d(tokens.shape[1], self.head_dim)
        for block in self.blocks:
            x = block(x, mask, angles)
        x = self.norm(x)
        return x, masked_mean(x, mask)
