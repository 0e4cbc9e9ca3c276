"""Spacetime-patch diffusion transformer over video latents and an optional audio stream.

Tokens:
- video latents ``(B, T', H', W', C)`` are cut into ``model.patch = (pt, ph, pw)``
  patches, embedded linearly, plus a learned video modality vector;
- audio latents ``(B, Ta, Ca)`` are cut into ``model.audio_patch`` frames per token
  with their own embedding and modality vector;
- captions: either tokens that the jointly trained :class:`TextEncoder` encodes
  (``text.encoder="internal"``), or the per-token embeddings of a frozen pretrained
  encoder (``text.encoder="t5"``, cached with the latents), brought to the transformer's
  width by a two-layer GELU MLP as in Wan. Either way the pooled text vector is the mean
  of the caption's features over its tokens.

Every video/audio token carries its physical time in seconds (3D RoPE, see
:mod:`vdiff.models.rope`), so video and audio line up in attention by time.

Blocks are MMDiT-style: each stream (video, audio, text) has its own adaLN-Zero
modulation, q/k/v/out projections, QK RMS norms and MLP, and attention runs over the
concatenation of all streams. Why joint text attention is the default
(``model.text_attention="joint"``): the text tokens are refined layer by layer in
the context of the clip, one attention call serves text, video and audio (fewer,
larger kernels than self- plus cross-attention), and video/audio tokens can weigh
text against each other in one softmax. ``"cross"`` keeps the text features fixed
and adds a cross-attention per block (PixArt-style). The tiny CPU recipe uses
``"cross"``: on ~1500 updates it learned the caption far faster there (docs/experiments.md,
"cross vs joint text attention on the tiny budget"); video and audio still attend to each
other jointly.

Conditioning vector per stream: timestep embedding of that modality's ``t`` plus an
MLP of the pooled text vector; the text stream uses the video one.
``cross_modal=False`` (an ablation) masks audio<->video attention and, when audio
tokens are present, makes text tokens attend to text only, since text tokens that read
both modalities would carry information from one to the other in the next block.
Without audio tokens the flag changes nothing.

Layers are stored stacked (leading ``layers`` axis) whether or not they are scanned:
``model.scan_layers`` only chooses ``nnx.scan`` versus an unrolled Python loop, so
checkpoints are interchangeable between the two.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import einops
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import vdiff.parallel.sharding as sharding
from vdiff.models.attention import attention
from vdiff.models.layers import (
    MLP,
    AdaLN,
    Dense,
    HeadsProj,
    OutProj,
    RMSNorm,
    TimestepEmbedder,
    layer_norm,
    masked_mean,
    modulate,
)
from vdiff.models.rope import (
    ABS_FEATURES,
    absolute_video_features,
    apply_rope,
    audio_positions,
    audio_token_times,
    clip_token_times,
    rope_angles,
    video_positions,
    video_token_times,
)
from vdiff.models.text_encoder import TextEncoder
from vdiff.models.token_mask import TokenMask, stream_mask

constrain = sharding.constrain
STREAMS = ("video", "audio", "text")
REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_attention", "offload")


# ----------------------------------------------------------------------------- patches


def patchify(x: jax.Array, patch: tuple[int, int, int]) -> jax.Array:
    """``(B, T, H, W, C)`` -> ``(B, T/pt * H/ph * W/pw, pt*ph*pw*C)`` tokens in (t, h, w) order."""
    pt, ph, pw = patch
    if x.ndim != 5:
        raise ValueError(f"video latents must be (B, T, H, W, C), got shape {x.shape}")
    _, t, h, w, _ = x.shape
    if t % pt or h % ph or w % pw:
        raise ValueError(
            f"video latent shape (T,H,W)=({t},{h},{w}) is not divisible by model.patch={patch}"
        )
    return einops.rearrange(
        x, "b (t pt) (h ph) (w pw) c -> b (t h w) (pt ph pw c)", pt=pt, ph=ph, pw=pw
    )


def unpatchify(
    tokens: jax.Array, patch: tuple[int, int, int], shape: tuple[int, int, int, int]
) -> jax.Array:
    """Inverse of :func:`patchify`; ``shape`` is the latent ``(T, H, W, C)``."""
    pt, ph, pw = patch
    t, h, w, c = shape
    return einops.rearrange(
        tokens, "b (t h w) (pt ph pw c) -> b (t pt) (h ph) (w pw) c",
        t=t // pt, h=h // ph, w=w // pw, pt=pt, ph=ph, pw=pw, c=c,
    )  # fmt: skip


def patchify_audio(a: jax.Array, patch: int) -> jax.Array:
    """``(B, Ta, Ca)`` -> ``(B, Ta/patch, patch*Ca)``."""
    if a.ndim != 3:
        raise ValueError(f"audio latents must be (B, Ta, Ca), got shape {a.shape}")
    if a.shape[1] % patch:
        raise ValueError(
            f"{a.shape[1]} audio latents are not divisible by model.audio_patch={patch}"
        )
    return einops.rearrange(a, "b (n p) c -> b n (p c)", p=patch)


def unpatchify_audio(tokens: jax.Array, patch: int) -> jax.Array:
    return einops.rearrange(tokens, "b n (p c) -> b (n p) c", p=patch)


# ----------------------------------------------------------------------------- blocks


class StreamLayer(nnx.Module):
    """One modality's weights inside a joint block (adaLN, q/k/v/out, QK norms, MLP)."""

    def __init__(self, width, heads, mlp_ratio, qk_norm, cross, *, rngs, dtype, param_dtype):
        hd = width // heads
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.ada = AdaLN(width, 6, **kw)
        self.q, self.k, self.v = (HeadsProj(width, heads, hd, **kw) for _ in range(3))
        self.out = OutProj(heads, hd, width, **kw)
        self.q_norm = RMSNorm(hd, "kv", rngs=rngs, param_dtype=param_dtype) if qk_norm else None
        self.k_norm = RMSNorm(hd, "kv", rngs=rngs, param_dtype=param_dtype) if qk_norm else None
        self.mlp = MLP(width, int(width * mlp_ratio), **kw)
        if cross:  # cross-attention to the (fixed) text features
            self.cross_q = HeadsProj(width, heads, hd, **kw)
            self.cross_q_norm = (
                RMSNorm(hd, "kv", rngs=rngs, param_dtype=param_dtype) if qk_norm else None
            )
            self.cross_out = OutProj(heads, hd, width, **kw)

    def qkv(self, x, mods, angles):
        shift1, scale1 = mods[0], mods[1]
        # Pinned to the residual layout (see finish() for why).
        h = constrain(modulate(layer_norm(x), shift1, scale1), ("batch", "tokens", "embed"))
        q, k, v = self.q(h), self.k(h), self.v(h)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if angles is not None:
            q, k = apply_rope(q, angles), apply_rope(k, angles)
        names = ("batch", "tokens", "heads", "kv")
        return constrain(q, names), constrain(k, names), constrain(v, names)

    def finish(self, x, o, mods):
        gate1, shift2, scale2, gate2 = mods[2:]
        names = ("batch", "tokens", "embed")
        # The input and the output of every projection are pinned to the residual
        # layout. Without that, the XLA SPMD partitioner (jax 0.10.2) miscompiles the
        # adaLN-modulated / gated projections on data x fsdp x tensor meshes: it permutes
        # batch shards into (fsdp, data) order and never back, in the forward pass and
        # in the gradients (tests/test_xla_dot_permute.py has standalone repros).
        x = x + gate1[:, None, :] * constrain(self.out(o), names)
        x = constrain(x, names)
        h = constrain(modulate(layer_norm(x), shift2, scale2), names)
        x = x + gate2[:, None, :] * constrain(self.mlp(h), names)
        return constrain(x, names)


class JointBlock(nnx.Module):
    """Joint attention over [video, audio, text] tokens with per-stream weights."""

    def __init__(
        self,
        width,
        heads,
        mlp_ratio,
        *,
        streams,
        text_attention,
        qk_norm,
        backend,
        rngs,
        dtype,
        param_dtype,
    ):
        cross = text_attention == "cross"
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.streams = tuple(streams)
        self.layers = nnx.Dict(
            {
                s: StreamLayer(width, heads, mlp_ratio, qk_norm, cross and s != "text", **kw)
                for s in streams
            }
        )
        self.cross = cross
        self.backend = backend
        if cross:
            hd = width // heads
            self.text_k = HeadsProj(width, heads, hd, **kw)
            self.text_v = HeadsProj(width, heads, hd, **kw)
            self.text_k_norm = (
                RMSNorm(hd, "kv", rngs=rngs, param_dtype=param_dtype) if qk_norm else None
            )

    def __call__(self, xs, c_acts, angles, mask, text_ctx):
        order = [s for s in STREAMS if s in xs]
        mods = {s: self.layers[s].ada(c_acts[s]) for s in order}
        qkv = [self.layers[s].qkv(xs[s], mods[s], angles.get(s)) for s in order]
        q, k, v = (jnp.concatenate([t[i] for t in qkv], axis=1) for i in range(3))
        o = constrain(attention(q, k, v, mask, self.backend), ("batch", "tokens", "heads", "kv"))
        bounds = np.cumsum([xs[s].shape[1] for s in order])[:-1]
        outs = dict(zip(order, jnp.split(o, bounds, axis=1)))
        new = {s: self.layers[s].finish(xs[s], outs[s], mods[s]) for s in order}
        if self.cross:
            feats, text_mask = text_ctx
            tk, tv = self.text_k(feats), self.text_v(feats)
            if self.text_k_norm is not None:
                tk = self.text_k_norm(tk)
            heads = ("batch", "tokens", "heads", "kv")
            tk, tv = constrain(tk, heads), constrain(tv, heads)
            for s in order:
                layer = self.layers[s]
                # Pinned like StreamLayer.finish (same XLA partitioner miscompile).
                h = constrain(layer_norm(new[s]), ("batch", "tokens", "embed"))
                cq = layer.cross_q(h)
                if layer.cross_q_norm is not None:
                    cq = layer.cross_q_norm(cq)
                o = constrain(
                    attention(constrain(cq, heads), tk, tv, text_mask, self.backend), heads
                )
                out = constrain(layer.cross_out(o), ("batch", "tokens", "embed"))
                new[s] = constrain(new[s] + out, ("batch", "tokens", "embed"))
        return new


class TextProjection(nnx.Module):
    """A pretrained encoder's embeddings -> the transformer's width: Linear, GELU, Linear."""

    def __init__(self, din, width, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc1 = Dense(din, width, (None, "embed"), **kw)
        self.fc2 = Dense(width, width, ("embed", None), **kw)
        self.dtype = dtype

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class FinalLayer(nnx.Module):
    """adaLN (shift, scale) + zero-initialised projection to the patch dimension."""

    def __init__(self, width, dout, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.ada = AdaLN(width, 2, **kw)
        self.proj = Dense(width, dout, ("embed", None), kernel_init=nnx.initializers.zeros, **kw)

    def __call__(self, x, c_act):
        shift, scale = self.ada(c_act)
        return self.proj(modulate(layer_norm(x), shift, scale)).astype(jnp.float32)


def remat_policy(name: str):
    """``train.remat`` name -> ``jax.checkpoint`` policy (None = no remat)."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat={name!r} is not one of {REMAT_POLICIES}")
    cp = jax.checkpoint_policies
    return {
        "none": None,
        "full": cp.nothing_saveable,
        "save_dots": cp.dots_with_no_batch_dims_saveable,
        "save_dots_attention": cp.save_from_both_policies(
            cp.dots_with_no_batch_dims_saveable,
            cp.save_only_these_names("attention_out", "attention_lse"),
        ),
        # Keeps weight matmul outputs in pinned host memory (accelerators only).
        "offload": cp.offload_dot_with_no_batch_dims("device", "pinned_host"),
    }[name]


@dataclasses.dataclass(frozen=True)
class DiTSizes:
    """What the transformer takes from the other parts of a run: the autoencoders' latent
    channels and strides, the tokenizer's vocabulary or a pretrained text encoder's width,
    the clip rate, and the numerics the trainer chooses (remat policy, compute and
    parameter dtypes)."""

    latent_channels: int
    audio_channels: int | None  # None: no audio stream
    vocab_size: int
    text_features: int | None  # a pretrained encoder's width; None: the internal encoder
    fps: float
    temporal_down: int
    audio_latents_per_second: float
    remat: str = "none"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32


# Muon orthogonalises the update of each hidden projection as a matrix (reduction axes ->
# output axes); a leading stacked-layer axis is a batch axis. Embeddings, output heads,
# adaLN modulation, norms and biases go to optax's Adam branch (NAdamW).
MUON_MATRICES = {
    **{n: ((-3,), (-2, -1)) for n in ("q", "k", "v", "cross_q", "text_k", "text_v")},
    **{n: ((-3, -2), (-1,)) for n in ("out", "cross_out")},
    **{n: ((-2,), (-1,)) for n in ("fc1", "fc2")},
}


# ----------------------------------------------------------------------------- model


class DiT(nnx.Module):
    """The video(+audio) diffusion transformer; build it with :meth:`from_config`.

    Call: ``model(video, t_video, caption, mask, audio=..., t_audio=..., audio_mask=...)``
    -> ``(video_velocity, audio_velocity or None)`` with the shapes of the inputs, where
    ``caption`` is token ids ``(B, L)`` for the internal text encoder or a pretrained
    encoder's embeddings ``(B, L, text_features)``.
    """

    def __init__(
        self, *, rngs: nnx.Rngs, latent_channels: int, audio_channels: int | None, vocab_size: int,
        text_features: int | None = None, width: int = 128, depth: int = 4, heads: int = 4, mlp_ratio: float = 4.0,
        patch=(1, 2, 2), audio_patch: int = 1, text_width: int = 128, text_depth: int = 2,
        text_heads: int = 4, text_attention: str = "joint", qk_norm: bool = True,
        cross_modal: bool = True, attention_backend: str = "auto", scan_layers: bool = True,
        remat: str = "none", fps: float = 8.0, temporal_down: int = 4,
        audio_latents_per_second: float = 25.0, rope_time_scale: float = 25.0,
        rope_theta: float = 10000.0, abs_pos: bool = False, dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):  # fmt: skip
        if text_attention not in ("joint", "cross"):
            raise ValueError(f"model.text_attention={text_attention!r}: use 'joint' or 'cross'")
        if width % heads:
            raise ValueError(f"model.width={width} is not divisible by model.heads={heads}")
        remat_policy(remat)  # validate early
        self.patch = tuple(int(p) for p in patch)
        self.audio_patch = int(audio_patch)
        self.latent_channels, self.audio_channels = latent_channels, audio_channels
        self.width, self.depth, self.heads = width, depth, heads
        self.text_attention, self.cross_modal = text_attention, cross_modal
        self.scan_layers, self.remat = scan_layers, remat
        self.fps, self.temporal_down, self.audio_rate = (
            float(fps),
            temporal_down,
            float(audio_latents_per_second),
        )
        self.rope_time_scale, self.rope_theta = float(rope_time_scale), float(rope_theta)
        self.backend = attention_backend
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)

        self.text_features = text_features
        if text_features is None:
            self.text_encoder = TextEncoder(
                vocab_size,
                text_width,
                text_depth,
                text_heads,
                mlp_ratio=mlp_ratio,
                backend=attention_backend,
                **kw,
            )
            self.text_proj = Dense(text_width, width, (None, "embed"), **kw)
        else:  # a frozen pretrained encoder's embeddings come in at its own width
            text_width = text_features
            self.text_proj = TextProjection(text_features, width, **kw)
        self.pool_fc1 = Dense(text_width, width, (None, "embed"), **kw)
        self.pool_fc2 = Dense(width, width, ("embed", None), **kw)
        self.t_embed = TimestepEmbedder(width, **kw)
        pdim = int(np.prod(self.patch)) * latent_channels
        self.video_embed = Dense(pdim, width, (None, "embed"), **kw)
        self.video_modality = sharding.logical_param(
            nnx.initializers.normal(0.02)(rngs.params(), (width,), param_dtype),
            ("embed",),
        )
        self.video_out = FinalLayer(width, pdim, **kw)
        self.abs_pos = bool(abs_pos)
        if self.abs_pos:  # absolute place of each video token (see absolute_video_features)
            self.video_abs_pos = Dense(ABS_FEATURES, width, (None, "embed"), **kw)
        streams = ["video"]
        if audio_channels:
            adim = self.audio_patch * audio_channels
            self.audio_embed = Dense(adim, width, (None, "embed"), **kw)
            self.audio_modality = sharding.logical_param(
                nnx.initializers.normal(0.02)(rngs.params(), (width,), param_dtype),
                ("embed",),
            )
            self.audio_out = FinalLayer(width, adim, **kw)
            streams.append("audio")
        if text_attention == "joint":
            streams.append("text")

        @nnx.split_rngs(splits=depth)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(r):
            return JointBlock(
                width, heads, mlp_ratio, streams=streams, text_attention=text_attention, qk_norm=qk_norm,
                backend=attention_backend, rngs=r, dtype=dtype, param_dtype=param_dtype,
            )  # fmt: skip

        self.blocks = make_blocks(rngs)

    @classmethod
    def from_config(cls, model_cfg, sizes: DiTSizes, rngs: nnx.Rngs, **overrides) -> DiT:
        """Builds the model from its ``model`` config section and the sizes it takes from
        the other parts (``sizes``, see :func:`vdiff.train.stages.dit_sizes`)."""
        m = model_cfg
        kwargs = dict(
            **dataclasses.asdict(sizes), width=m.width, depth=m.depth, heads=m.heads,
            mlp_ratio=m.mlp_ratio, patch=tuple(m.patch), audio_patch=m.audio_patch,
            text_width=m.text_width, text_depth=m.text_depth, text_heads=m.text_heads,
            text_attention=m.text_attention, qk_norm=m.qk_norm, cross_modal=m.cross_modal,
            attention_backend=m.attention, scan_layers=m.scan_layers,
            rope_time_scale=m.rope_time_scale, rope_theta=m.rope_theta, abs_pos=m.abs_pos,
        )  # fmt: skip
        kwargs.update(overrides)
        return cls(rngs=rngs, **kwargs)

    @staticmethod
    def muon_dims(params):
        """Per-leaf ``MuonDimensionNumbers`` (or None: the Adam branch) for
        :func:`optax.contrib.muon`: the hidden projections (see :data:`MUON_MATRICES`)."""

        def spec(path, x):
            names = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]
            if "kernel" not in names or "t_embed" in names:
                return None
            layer = names[names.index("kernel") - 1]
            if layer not in MUON_MATRICES:
                return None
            red, out = MUON_MATRICES[layer]
            if x.ndim < len(red) + len(out):
                return None
            return optax.contrib.MuonDimensionNumbers(red, out)

        return jax.tree_util.tree_map_with_path(spec, params)

    @property
    def has_audio(self) -> bool:
        return bool(self.audio_channels)

    def encode_text(
        self, caption: jax.Array, mask: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(features (B,L,text_width), pooled (B,text_width), mask)``; constant over sampling
        steps. ``caption``: token ids (internal encoder) or a pretrained encoder's embeddings."""
        mask = mask.astype(bool)
        if self.text_features is None:
            feats, pooled = self.text_encoder(caption, mask)
            return feats, pooled, mask
        if caption.ndim != 3 or caption.shape[-1] != self.text_features:
            raise ValueError(
                f"caption embeddings must be (B, L, {self.text_features}), got {caption.shape}"
            )
        feats = caption.astype(self.text_proj.dtype)
        return feats, masked_mean(feats, mask), mask

    def clip_times(self, fps: jax.Array, num_latent_frames: int) -> jax.Array:
        """``video_times`` (B, T'/pt) of clips at frame rates ``fps`` (B,)."""
        return clip_token_times(fps, num_latent_frames, self.patch[0], self.temporal_down)

    def _attention_mask(self, lengths, audio_mask, text_mask, cross_modal) -> TokenMask | None:
        """Per-token ids of the [video, audio, text] sequence (O(L), see token_mask.py): text
        padding and examples without audio are keys nobody reads; ``cross_modal`` False (or
        False for an example) forbids the audio<->video pairs and text reading either."""
        b = text_mask.shape[0]
        valid = {}
        if "audio" in lengths:
            valid["audio"] = jnp.broadcast_to(audio_mask[:, None], (b, lengths["audio"]))
        if "text" in lengths:
            valid["text"] = text_mask
        return stream_mask(lengths, valid, cross_modal, b)

    def _run_blocks(self, xs, c_acts, angles, mask, text_ctx):
        """Runs the stacked blocks: ``lax.scan`` over the layer axis or an unrolled loop.

        The stack is split into (graphdef, stacked state) and each layer is merged
        back inside the loop body. ``nnx.scan`` would do the same, but it refuses
        modules created at an outer trace level, which is exactly how samplers and
        gradient-accumulation loops call the model (inside ``fori_loop``/``scan``).
        """
        policy = remat_policy(self.remat)
        graphdef, state = nnx.split(self.blocks)

        def body(carry, layer_state):
            block = nnx.merge(graphdef, layer_state)
            return block(carry, c_acts, angles, mask, text_ctx), None

        if policy is not None:
            body = jax.checkpoint(body, policy=policy, prevent_cse=not self.scan_layers)
        if self.scan_layers:
            xs, _ = jax.lax.scan(body, xs, state)
            return xs
        for i in range(self.depth):
            xs, _ = body(xs, jax.tree.map(lambda p, i=i: p[i], state))
        return xs

    def __call__(
        self, video: jax.Array, t_video: jax.Array, tokens: jax.Array | None, mask: jax.Array | None, *,
        audio: jax.Array | None = None, t_audio: jax.Array | None = None,
        audio_mask: jax.Array | None = None, video_times: jax.Array | None = None,
        audio_times: jax.Array | None = None, text=None, cross_modal: bool | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:  # fmt: skip
        """Predicts flow velocities.

        Args:
            video: noisy video latents ``(B, T', H', W', C)``.
            t_video: video noise level ``(B,)`` in [0, 1] (1 = pure noise).
            tokens: caption tokens ``(B, L)`` int, or a pretrained encoder's caption
            embeddings ``(B, L, text_features)`` (ignored when ``text`` is given).
            mask: caption mask ``(B, L)`` bool; all False = empty caption.
            audio: noisy audio latents ``(B, Ta, Ca)`` or None.
            t_audio: audio noise level ``(B,)``; required with ``audio``.
            audio_mask: ``(B,)`` bool, False for examples without audio (their audio
                tokens are hidden from every other token). Default all True.
            video_times: seconds of each temporal video token, ``(T'/pt,)`` or
                ``(B, T'/pt)``; default from ``fps`` and the causal VAE layout.
            audio_times: seconds of each audio token; default 25 latents/s midpoints.
            text: precomputed :meth:`encode_text` output (sampling reuses it).
            cross_modal: override of the model's ``cross_modal`` flag: a bool, or a
                ``(B,)`` bool array choosing per example (training drops cross-modal
                attention for a fraction of examples so that the masked ablation is
                in-distribution at sampling time).

        Returns:
            ``(video_velocity, audio_velocity)``, float32, shaped like the inputs
            (audio None when no audio was given).
        """
        if cross_modal is None:
            cross_modal = self.cross_modal
        if isinstance(cross_modal, (bool, np.bool_)):
            cross_modal = bool(cross_modal)
        b, tl, hl, wl, ch = video.shape
        if ch != self.latent_channels:
            raise ValueError(
                f"video latents have {ch} channels, the model expects {self.latent_channels}"
            )
        if audio is not None:
            if not self.has_audio:
                raise ValueError(
                    "audio latents were given but this model has no audio stream (data.audio=False)"
                )
            if t_audio is None:
                raise ValueError("t_audio is required when audio latents are given")
        if text is None and (tokens is None or mask is None):
            raise ValueError(
                "give caption tokens and mask (or precomputed text=model.encode_text(...))"
            )
        feats, pooled, text_mask = text if text is not None else self.encode_text(tokens, mask)

        pt, ph, pw = self.patch
        grid = (tl // pt, hl // ph, wl // pw)
        head_dim = self.width // self.heads
        if video_times is None:
            video_times = video_token_times(tl, pt, self.fps, self.temporal_down)
        xs = {"video": self.video_embed(patchify(video, self.patch)) + self.video_modality[...]}
        if self.abs_pos:
            xs["video"] = xs["video"] + self.video_abs_pos(
                absolute_video_features(video_times, grid[1:])
            ).astype(xs["video"].dtype)
        rope = dict(time_scale=self.rope_time_scale, theta=self.rope_theta)
        angles = {"video": rope_angles(video_positions(video_times, grid[1:]), head_dim, **rope)}
        c_base = self.pool_fc2(jax.nn.silu(self.pool_fc1(pooled)))
        c = {"video": self.t_embed(t_video) + c_base}
        if audio is not None:
            if audio_times is None:
                audio_times = audio_token_times(audio.shape[1], self.audio_patch, self.audio_rate)
            xs["audio"] = (
                self.audio_embed(patchify_audio(audio, self.audio_patch)) + self.audio_modality[...]
            )
            angles["audio"] = rope_angles(audio_positions(audio_times, grid[1:]), head_dim, **rope)
            c["audio"] = self.t_embed(t_audio) + c_base
            audio_mask = jnp.ones((b,), bool) if audio_mask is None else audio_mask.astype(bool)
        text_ctx = None
        if self.text_attention == "joint":
            xs["text"] = self.text_proj(feats)
            c["text"] = c["video"]
        else:
            text_ctx = (constrain(self.text_proj(feats), ("batch", "tokens", "embed")), text_mask)
        xs = {s: constrain(x, ("batch", "tokens", "embed")) for s, x in xs.items()}
        c_acts = {s: jax.nn.silu(v) for s, v in c.items()}
        lengths = {s: x.shape[1] for s, x in xs.items()}
        attn_mask = self._attention_mask(lengths, audio_mask, text_mask, cross_modal)

        xs = self._run_blocks(xs, c_acts, angles, attn_mask, text_ctx)

        v_video = unpatchify(
            self.video_out(xs["video"], c_acts["video"]), self.patch, (tl, hl, wl, ch)
        )
        v_audio = None
        if audio is not None:
            v_audio = unpatchify_audio(
                self.audio_out(xs["audio"], c_acts["audio"]), self.audio_patch
            )
        return v_video, v_audio
