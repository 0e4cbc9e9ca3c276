"""Causal video VAE: factorised (2+1)D convolutions, channels-last ``(B, T, H, W, C)``.

Compression: ``spatial_down`` x ``spatial_down`` in space (a power of two >= 2) and
``temporal_down`` in time. Causal in time: the first frame is encoded on its own, so a
one-frame video is an image in the same latent space, and latent frame ``j >= 1``
summarises input frames ``(j-1)*td + 1 .. j*td`` (td = temporal_down).

Layout (L = log2(spatial_down); "fold" = time_to_depth by td, with the first frame
repeated td-1 times on the left so that it makes latent frame 0 on its own)::

    encoder: x (B,T,H,W,3) -space_to_depth 2-> conv3x3 -> fold -> 1x1
             -> [ResBlock -> space_to_depth 2 -> 1x1] * (L-1) -> ResBlock * num_blocks
             -> conv3x3 -> (mean, logvar)
    decoder: z -> conv3x3 -> ResBlock * num_blocks -> 1x1 -> unfold (drop td-1 frames)
             -> ResBlock -> [1x1 -> depth_to_space 2 -> ResBlock] * (L-1)
             -> conv3x3 -> depth_to_space 2 -> x_hat

Why it is shaped like this: the tiny recipe trains this VAE on 2 CPU cores, so every
conv runs at H/2 or less (the first space_to_depth is lossless and costs nothing), the
encoder folds time into channels right after its linear stem (so it runs at the latent
frame rate), the decoder spends its full-frame-rate compute on rendering, and the only
ops that look across frames are causal temporal convs. That also makes chunked decoding exact: the
decoder carries each temporal conv's last k-1 input frames in a cache
(:meth:`VideoVAE.decode_step`), and ``decode_chunked`` equals ``decode``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vdiff.models.conv import (
    ChannelNorm,
    Conv2dFrames,
    Pointwise,
    ResBlock2Plus1D,
    depth_to_space,
    depth_to_time,
    space_to_depth,
    time_to_depth,
)
from vdiff.parallel.sharding import constrain

LOGVAR_RANGE = (-30.0, 20.0)
# Added to the encoder's raw log-variance so training starts with little sampling noise
# (std ~0.02) instead of std ~1; moving a bias there by gradient steps alone takes
# thousands of updates, which the tiny CPU recipe does not have.
LOGVAR_OFFSET = -8.0
_VIDEO_AXES = ("batch", "frames", None, None, "conv_out")
Caches = tuple[jax.Array | None, ...]


def latent_frames(num_frames: int, temporal_down: int) -> int:
    """Latent frames for ``num_frames`` input frames: ``1 + ceil((T - 1) / td)``."""
    if num_frames < 1:
        raise ValueError(f"a video needs at least 1 frame, got {num_frames}")
    return 1 + math.ceil((num_frames - 1) / temporal_down)


def decoded_frames(num_latent_frames: int, temporal_down: int) -> int:
    """Frames the decoder returns for ``T'`` latent frames: ``1 + (T' - 1) * td``."""
    return 1 + (num_latent_frames - 1) * temporal_down


def sample_latent(mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
    """Reparameterised draw ``mean + exp(logvar / 2) * eps``."""
    eps = jax.random.normal(rng, mean.shape, mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * eps


def compute_latent_stats(means: jax.Array) -> dict[str, jax.Array]:
    """Per-channel statistics of encoder means ``(..., C)`` for latent normalisation.

    Returns ``{"shift": mean, "scale": 1 / std}``, each of shape ``(C,)``; the engine
    computes them over training data and stores them with the checkpoint.
    """
    means = jnp.asarray(means, jnp.float32)
    flat = means.reshape(-1, means.shape[-1])
    if flat.shape[0] < 2:
        raise ValueError("compute_latent_stats: need at least 2 latent positions")
    return {"shift": flat.mean(0), "scale": 1.0 / (flat.std(0) + 1e-6)}


def from_pixels(x: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 [-1, 1], the VAE's input range (on device, so hosts ship bytes)."""
    return x.astype(jnp.float32) / 127.5 - 1.0


def normalize(z: jax.Array, stats: dict[str, jax.Array]) -> jax.Array:
    """Maps VAE latents to roughly zero-mean unit-variance per channel."""
    return (z - stats["shift"]) * stats["scale"]


def denormalize(z: jax.Array, stats: dict[str, jax.Array]) -> jax.Array:
    """Inverse of :func:`normalize`."""
    return z / stats["scale"] + stats["shift"]


class VideoVAE(nnx.Module):
    """Causal (2+1)D convolutional video VAE.

    Args:
        spatial_down: spatial compression, a power of two >= 2 (4 or 8 in practice).
        temporal_down: temporal compression >= 1 (4 in practice; 1 = per-frame).
        latent_channels: channels of the latent.
        channels: base width (at H/2, full frame rate); deeper levels use
            ``channels * channel_mult`` and the latent-rate trunk ``channels * latent_mult``.
        rngs: parameter RNGs.
        channel_mult: width multipliers per spatial level (the last one repeats).
        latent_mult: width multiplier of the trunk at latent rate and resolution (it sees
            td x fewer frames and (s/2)^2 x fewer pixels than the first level). On shapes a
            4x trunk gained under 0.5 dB per step over 2x at 1.6x the step cost.
        num_blocks: residual blocks at latent rate in encoder and decoder.
    """

    def __init__(
        self,
        *,
        spatial_down: int = 4,
        temporal_down: int = 4,
        latent_channels: int = 8,
        channels: int = 16,
        rngs: nnx.Rngs,
        channel_mult: Sequence[int] = (1, 2),
        latent_mult: int = 2,
        num_blocks: int = 2,
    ):
        if spatial_down < 2 or spatial_down & (spatial_down - 1):
            raise ValueError(f"vae.spatial_down must be a power of two >= 2, got {spatial_down}")
        if temporal_down < 1:
            raise ValueError(f"vae.temporal_down must be >= 1, got {temporal_down}")
        if latent_channels < 1 or channels < 1:
            raise ValueError("vae.latent_channels and vae.channels must be positive")
        self.spatial_down, self.temporal_down = spatial_down, temporal_down
        self.latent_channels = latent_channels
        levels = int(math.log2(spatial_down))  # level l runs at H / 2^(l+1)
        mult = list(channel_mult) or [1]
        ch = [channels * mult[min(i, len(mult) - 1)] for i in range(levels)]
        low, wide, td = ch[-1], channels * latent_mult, temporal_down

        # Encoder: time is folded right after the (per-frame, linear) stem, so every
        # later encoder layer runs at the latent frame rate.
        down_out = [*ch[1:-1], wide]  # the last spatial level feeds the latent trunk
        self.enc_in = Conv2dFrames(12, ch[0], 3, rngs=rngs)
        self.enc_time = Pointwise(td * ch[0], ch[0] if levels > 1 else wide, rngs=rngs)
        self.enc_level_blocks = nnx.List(
            [ResBlock2Plus1D(ch[i], rngs=rngs) for i in range(levels - 1)]
        )
        self.enc_down = nnx.List(
            [Pointwise(4 * ch[i], down_out[i], rngs=rngs) for i in range(levels - 1)]
        )
        self.enc_latent_blocks = nnx.List(
            [ResBlock2Plus1D(wide, rngs=rngs) for _ in range(num_blocks)]
        )
        self.enc_norm = ChannelNorm(wide)
        self.enc_out = Conv2dFrames(wide, 2 * latent_channels, 3, rngs=rngs)

        # Decoder.
        self.dec_in = Conv2dFrames(latent_channels, wide, 3, rngs=rngs)
        self.dec_latent_blocks = nnx.List(
            [ResBlock2Plus1D(wide, rngs=rngs) for _ in range(num_blocks)]
        )
        self.dec_time = Pointwise(wide, td * low, rngs=rngs)
        self.dec_low_block = ResBlock2Plus1D(low, rngs=rngs)
        # dec_up[i] / dec_level_blocks[i] bring level i+1 up to level i (applied deepest first).
        self.dec_up = nnx.List(
            [Pointwise(ch[i + 1], 4 * ch[i], rngs=rngs) for i in range(levels - 1)]
        )
        self.dec_level_blocks = nnx.List(
            [ResBlock2Plus1D(ch[i], rngs=rngs) for i in range(levels - 1)]
        )
        self.dec_norm = ChannelNorm(ch[0])
        self.dec_out = Conv2dFrames(ch[0], 12, 3, rngs=rngs)

    @classmethod
    def from_config(cls, cfg, rngs: nnx.Rngs) -> VideoVAE:
        """Builds from the ``vae`` section of the config."""
        return cls(
            spatial_down=int(cfg.spatial_down),
            temporal_down=int(cfg.temporal_down),
            latent_channels=int(cfg.latent_channels),
            channels=int(cfg.channels),
            rngs=rngs,
        )

    # --- shapes -----------------------------------------------------------------------------

    def latent_frames(self, num_frames: int) -> int:
        return latent_frames(num_frames, self.temporal_down)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(T', H/s, W/s, C)`` of the latent of a ``(T, H, W)`` clip."""
        s = self.spatial_down
        return (self.latent_frames(num_frames), height // s, width // s, self.latent_channels)

    def _check_video(self, x: jax.Array) -> None:
        if x.ndim != 5 or x.shape[-1] != 3:
            raise ValueError(f"VideoVAE expects (B, T, H, W, 3) video, got shape {x.shape}")
        h, w = x.shape[2:4]
        if h % self.spatial_down or w % self.spatial_down:
            raise ValueError(
                f"VideoVAE: frame size {h}x{w} is not divisible by spatial_down="
                f"{self.spatial_down}; resize or crop the clip"
            )

    def _pad_frames(self, x: jax.Array) -> jax.Array:
        """Repeats the last frame so T = 1 + k * temporal_down."""
        t = x.shape[1]
        extra = decoded_frames(self.latent_frames(t), self.temporal_down) - t
        if extra:
            x = jnp.concatenate([x, jnp.repeat(x[:, -1:], extra, axis=1)], axis=1)
        return x

    # --- encoder ----------------------------------------------------------------------------

    def encode_step(
        self, x: jax.Array, cache: Caches | None = None
    ) -> tuple[jax.Array, jax.Array, Caches]:
        """Encodes one time chunk; ``cache=None`` marks the start of a video.

        The first chunk must hold ``1 + k * td`` frames, later chunks ``k * td``.
        Returns ``(mean, logvar, new_cache)``.
        """
        self._check_video(x)
        td, start = self.temporal_down, cache is None
        t = x.shape[1]
        if (t - 1 if start else t) % td:
            raise ValueError(
                f"encode_step: a {'first' if start else 'later'} chunk of {t} frames does not "
                f"fit temporal_down={td} (first chunk 1 + k*td frames, later chunks k*td)"
            )
        caches = iter(cache or ())
        new: list = []

        def block(blk, h):
            h, c = blk(h, next(caches, None))
            new.append(c)
            return constrain(h, _VIDEO_AXES)

        h = self.enc_in(space_to_depth(x, 2))
        if start and td > 1:  # the first frame alone makes latent frame 0
            h = jnp.concatenate([jnp.repeat(h[:, :1], td - 1, axis=1), h], axis=1)
        h = self.enc_time(time_to_depth(h, td))
        for blk, down in zip(self.enc_level_blocks, self.enc_down):
            h = down(space_to_depth(block(blk, h), 2))
        for blk in self.enc_latent_blocks:
            h = block(blk, h)
        moments = self.enc_out(jax.nn.silu(self.enc_norm(h)))
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar + LOGVAR_OFFSET, *LOGVAR_RANGE), tuple(new)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(B, T, H, W, 3)`` in [-1, 1] -> ``(mean, logvar)``, each ``(B, T', H/s, W/s, C)``."""
        self._check_video(x)
        mean, logvar, _ = self.encode_step(self._pad_frames(x))
        return mean, logvar

    def encode_chunked(self, x: jax.Array, chunk_frames: int) -> tuple[jax.Array, jax.Array]:
        """:meth:`encode` in chunks of ``chunk_frames`` latent frames (same result)."""
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
        self._check_video(x)
        x, td = self._pad_frames(x), self.temporal_down
        means, logvars, cache, t0 = [], [], None, 0
        while t0 < x.shape[1]:
            # Latent frame 0 takes 1 input frame, every later latent frame td frames.
            t1 = t0 + (1 + (chunk_frames - 1) * td if cache is None else chunk_frames * td)
            mean, logvar, cache = self.encode_step(x[:, t0:t1], cache)
            means.append(mean)
            logvars.append(logvar)
            t0 = t1
        return jnp.concatenate(means, axis=1), jnp.concatenate(logvars, axis=1)

    # --- decoder ----------------------------------------------------------------------------

    def decode_step(self, z: jax.Array, cache: Caches | None = None) -> tuple[jax.Array, Caches]:
        """Decodes a chunk of latent frames; ``cache=None`` marks the start of a video.

        Returns ``(frames, new_cache)``: ``1 + (n-1) * td`` frames for the first chunk
        of n latent frames, ``n * td`` for later ones. Jit this for bounded-memory
        decoding of long videos.
        """
        if z.ndim != 5 or z.shape[-1] != self.latent_channels:
            raise ValueError(
                f"VideoVAE.decode expects (B, T', h, w, {self.latent_channels}) latents, "
                f"got shape {z.shape}"
            )
        td, start = self.temporal_down, cache is None
        caches = iter(cache or ())
        new: list = []

        def block(blk, h):
            h, c = blk(h, next(caches, None))
            new.append(c)
            return constrain(h, _VIDEO_AXES)

        h = self.dec_in(z)
        for blk in self.dec_latent_blocks:
            h = block(blk, h)
        h = depth_to_time(self.dec_time(h), td)
        if start and td > 1:  # latent frame 0 decodes to the first frame only
            h = h[:, td - 1 :]
        h = block(self.dec_low_block, h)
        for up, blk in zip(reversed(self.dec_up), reversed(self.dec_level_blocks)):
            h = block(blk, depth_to_space(up(h), 2))
        x = depth_to_space(self.dec_out(jax.nn.silu(self.dec_norm(h))), 2)
        return x, tuple(new)

    def decode(self, z: jax.Array, num_frames: int | None = None) -> jax.Array:
        """Latents ``(B, T', h, w, C)`` -> video ``(B, 1 + (T'-1)*td, H, W, 3)``.

        ``num_frames`` crops the result to the original clip length.
        """
        x, _ = self.decode_step(z)
        return self._crop(x, num_frames)

    def decode_chunked(
        self, z: jax.Array, chunk_frames: int, num_frames: int | None = None
    ) -> jax.Array:
        """:meth:`decode` in chunks of ``chunk_frames`` latent frames (same result)."""
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
        outs, cache = [], None
        for t0 in range(0, z.shape[1], chunk_frames):
            x, cache = self.decode_step(z[:, t0 : t0 + chunk_frames], cache)
            outs.append(x)
        return self._crop(jnp.concatenate(outs, axis=1), num_frames)

    def _crop(self, x: jax.Array, num_frames: int | None) -> jax.Array:
        if num_frames is None:
            return x
        if not 1 <= num_frames <= x.shape[1]:
            raise ValueError(f"num_frames={num_frames} is outside 1..{x.shape[1]} decoded frames")
        return x[:, :num_frames]

    def __call__(self, x: jax.Array, rng: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Encode, draw a reparameterised latent, decode: ``(x_hat, mean, logvar)``."""
        mean, logvar = self.encode(x)
        x_hat = self.decode(sample_latent(mean, logvar, rng), num_frames=x.shape[1])
        return x_hat, mean, logvar
