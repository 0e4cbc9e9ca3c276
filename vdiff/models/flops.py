"""Analytic training FLOPs of the diffusion transformer, and a parameter counter.

Counts matrix-multiply FLOPs only (2 per multiply-add): projections, MLPs, adaLN,
patch embed/unembed, the text encoder, and attention scores and mixing over the full
(dense, masked entries included) joint sequence. Training is 3x the forward pass
(forward + two matmuls per weight in the backward); a frozen text encoder counts
1x. Rematerialisation is not counted, following the usual model-FLOPs (MFU)
convention. Norms, softmax and activations are left out (a few percent).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx

from vdiff.models.rope import ABS_FEATURES
from vdiff.models.t5 import pretrained_width


def _mm(m: float, k: float, n: float) -> float:
    return 2.0 * m * k * n


def _stream_layer(tokens: float, width: int, hidden: int) -> float:
    """q, k, v, out projections and the MLP of one stream in one block."""
    return _mm(tokens, width, 4 * width) + 2 * _mm(tokens, width, hidden)


def text_encoder_flops(cfg, text_len: int) -> float:
    """Forward FLOPs of the internal text encoder for one caption in the train step (0 for
    a pretrained encoder: its embeddings are cached, the step never runs it)."""
    if cfg.text.encoder != "internal":
        return 0.0
    m = cfg.model
    tw = m.text_width
    hidden = int(tw * m.mlp_ratio)
    per_layer = _stream_layer(text_len, tw, hidden) + 2 * _mm(text_len, tw, text_len)
    return m.text_depth * per_layer


def dit_forward_flops(cfg, video_shape, audio_len: int | None, text_len: int) -> float:
    """Forward FLOPs of the DiT (text encoder excluded) for one example.

    Args:
        cfg: the whole config (``model.*``, ``vae.latent_channels``,
            ``audio_ae.latent_channels``, ``data.audio``).
        video_shape: latent ``(T', H', W')`` (a trailing channel entry is ignored).
        audio_len: audio latent frames ``Ta`` (None or 0 = no audio stream).
        text_len: caption tokens ``L``.
    """
    m = cfg.model
    w, depth = m.width, m.depth
    hidden = int(w * m.mlp_ratio)
    t, h, wd = (int(s) for s in tuple(video_shape)[:3])
    pt, ph, pw = m.patch
    if t % pt or h % ph or wd % pw:
        raise ValueError(
            f"video latent shape {video_shape} is not divisible by model.patch={m.patch}"
        )
    nv = (t // pt) * (h // ph) * (wd // pw)
    pdim = pt * ph * pw * cfg.vae.latent_channels
    audio_on = bool(audio_len) and bool(cfg.data.audio)
    na = audio_len // m.audio_patch if audio_on else 0
    adim = m.audio_patch * cfg.audio_ae.latent_channels
    joint = m.text_attention == "joint"
    streams = [nv] + ([na] if audio_on else []) + ([text_len] if joint else [])
    n = sum(streams)

    per_layer = sum(_stream_layer(s, w, hidden) for s in streams)
    per_layer += len(streams) * _mm(1, w, 6 * w)  # adaLN
    per_layer += 2 * _mm(n, w, n)  # q k^T and probs @ v over all heads
    if not joint:  # cross-attention: q/out per modality token, k/v of the text, scores
        per_layer += (
            _mm(nv + na, w, 2 * w) + _mm(text_len, w, 2 * w) + 2 * _mm(nv + na, w, text_len)
        )
    flops = depth * per_layer
    flops += _mm(nv, pdim, w) * 2 + _mm(1, w, 2 * w)  # video embed, final layer, its adaLN
    if m.abs_pos:
        flops += _mm(nv, ABS_FEATURES, w)  # absolute position features -> width
    if audio_on:
        flops += _mm(na, adim, w) * 2 + _mm(1, w, 2 * w)
    tw = pretrained_width(cfg.text) or m.text_width
    flops += _mm(text_len, tw, w)  # text projection
    if cfg.text.encoder != "internal":  # its second layer
        flops += _mm(text_len, w, w)
    flops += _mm(1, tw, w) + _mm(1, w, w)  # pooled text MLP
    flops += (1 + audio_on) * (_mm(1, 256, w) + _mm(1, w, w))  # timestep embedders
    return flops


def train_flops_per_example(cfg, video_shape, audio_len: int | None, text_len: int) -> float:
    """Matmul FLOPs of one training example (forward + backward)."""
    text_mult = 1.0 if cfg.model.freeze_text else 3.0
    return 3.0 * dit_forward_flops(
        cfg, video_shape, audio_len, text_len
    ) + text_mult * text_encoder_flops(cfg, text_len)


def param_count(model: nnx.Module) -> int:
    """Number of parameters (``nnx.Param`` leaves) in ``model``."""
    return int(sum(math.prod(np.shape(x)) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
