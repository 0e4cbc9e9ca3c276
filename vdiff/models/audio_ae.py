"""Audio autoencoder: 1D convolutions over log-mel frames, mel bins as channels.

Input: normalised log-mel ``(B, Tm, n_mels)`` at 100 frames/s (hop 160 at 16 kHz).
Normalise with :func:`normalize_mel` using statistics from :func:`compute_mel_stats`
(computed over training data and kept with the checkpoint), so inputs are roughly
zero-mean unit-variance; the reconstruction loss is measured in that space.
``Tm`` must divide by ``time_down`` (4 -> 25 latents/s); :func:`pad_mel` pads a clip
up to that length and :func:`crop_mel` cuts it back.

Layout::

    mel -> conv3 -> ResBlock -> time_to_depth td -> 1x1 -> ResBlock * num_blocks
        -> conv3 -> (mean, logvar) (B, Tm/td, latent_channels)

Folding time into channels (rather than strided or pooled convs) is lossless and keeps
the decoder time-local: each latent frame owns exactly td mel frames, so a click whose
onset is one mel frame stays in that frame after reconstruction.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vdiff.models.conv import (
    ChannelNorm,
    Conv1d,
    Pointwise,
    ResBlock1D,
    depth_to_time,
    time_to_depth,
)
from vdiff.models.video_vae import LOGVAR_OFFSET, LOGVAR_RANGE, sample_latent
from vdiff.parallel.sharding import constrain

_AUDIO_AXES = ("batch", "frames", "conv_out")


def compute_mel_stats(mels) -> dict[str, jax.Array]:
    """Per-bin mean and std of log-mel frames ``(..., n_mels)``: ``{"mean", "std"}``."""
    mels = jnp.asarray(mels, jnp.float32)
    flat = mels.reshape(-1, mels.shape[-1])
    if flat.shape[0] < 2:
        raise ValueError("compute_mel_stats: need at least 2 mel frames")
    return {"mean": flat.mean(0), "std": flat.std(0) + 1e-5}


def normalize_mel(mel: jax.Array, stats: dict[str, jax.Array]) -> jax.Array:
    """Log-mel -> the zero-mean unit-variance space the AE works in."""
    return (mel - stats["mean"]) / stats["std"]


def denormalize_mel(mel: jax.Array, stats: dict[str, jax.Array]) -> jax.Array:
    """Inverse of :func:`normalize_mel`."""
    return mel * stats["std"] + stats["mean"]


def pad_mel(mel: jax.Array, multiple: int = 4) -> tuple[jax.Array, int]:
    """Pads ``(B, Tm, n_mels)`` at the end (repeating the last frame) to a multiple.

    Returns ``(padded, Tm)``; pass Tm to :func:`crop_mel` after decoding.
    """
    t = mel.shape[1]
    extra = -t % multiple
    if extra:
        mel = jnp.concatenate([mel, jnp.repeat(mel[:, -1:], extra, axis=1)], axis=1)
    return mel, t


def crop_mel(mel: jax.Array, num_frames: int) -> jax.Array:
    """Cuts decoded mel frames back to the clip's original length."""
    return mel[:, :num_frames]


class AudioAE(nnx.Module):
    """1D convolutional VAE over log-mel frames.

    Args:
        n_mels: mel bins (input channels).
        latent_channels: channels of the latent.
        channels: width of the conv stack.
        time_down: time compression (mel frames per latent frame).
        rngs: parameter RNGs.
        num_blocks: residual blocks at latent rate in encoder and decoder.
    """

    def __init__(
        self,
        *,
        n_mels: int = 64,
        latent_channels: int = 8,
        channels: int = 64,
        time_down: int = 4,
        rngs: nnx.Rngs,
        num_blocks: int = 2,
    ):
        if min(n_mels, latent_channels, channels, time_down) < 1:
            raise ValueError(
                "audio_ae: n_mels, latent_channels, channels and time_down must be positive"
            )
        self.n_mels, self.latent_channels, self.time_down = n_mels, latent_channels, time_down
        c, td = channels, time_down
        self.enc_in = Conv1d(n_mels, c, 3, rngs=rngs)
        self.enc_full_block = ResBlock1D(c, rngs=rngs)
        self.enc_time = Pointwise(td * c, c, rngs=rngs)
        self.enc_blocks = nnx.List([ResBlock1D(c, rngs=rngs) for _ in range(num_blocks)])
        self.enc_norm = ChannelNorm(c)
        self.enc_out = Conv1d(c, 2 * latent_channels, 3, rngs=rngs)

        self.dec_in = Conv1d(latent_channels, c, 3, rngs=rngs)
        self.dec_blocks = nnx.List([ResBlock1D(c, rngs=rngs) for _ in range(num_blocks)])
        self.dec_time = Pointwise(c, td * c, rngs=rngs)
        self.dec_full_block = ResBlock1D(c, rngs=rngs)
        self.dec_norm = ChannelNorm(c)
        self.dec_out = Conv1d(c, n_mels, 3, rngs=rngs)

    @classmethod
    def from_config(cls, cfg, n_mels: int, rngs: nnx.Rngs) -> AudioAE:
        """Builds from the ``audio_ae`` section of the config and the data's ``n_mels``."""
        return cls(
            n_mels=int(n_mels),
            latent_channels=int(cfg.latent_channels),
            channels=int(cfg.channels),
            time_down=int(cfg.time_down),
            rngs=rngs,
        )

    def latent_frames(self, num_mel_frames: int) -> int:
        """Latent frames for ``Tm`` mel frames (Tm must divide by time_down)."""
        if num_mel_frames % self.time_down:
            raise ValueError(
                f"AudioAE: {num_mel_frames} mel frames do not divide by time_down="
                f"{self.time_down}; pad with vdiff.models.audio_ae.pad_mel"
            )
        return num_mel_frames // self.time_down

    def encode(self, mel: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(B, Tm, n_mels)`` -> ``(mean, logvar)``, each ``(B, Tm/td, latent_channels)``."""
        if mel.ndim != 3 or mel.shape[-1] != self.n_mels:
            raise ValueError(f"AudioAE expects (B, Tm, {self.n_mels}) log-mel, got {mel.shape}")
        self.latent_frames(mel.shape[1])
        h = self.enc_full_block(self.enc_in(mel))
        h = self.enc_time(time_to_depth(h, self.time_down))
        for blk in self.enc_blocks:
            h = constrain(blk(h), _AUDIO_AXES)
        mean, logvar = jnp.split(self.enc_out(jax.nn.silu(self.enc_norm(h))), 2, axis=-1)
        return mean, jnp.clip(logvar + LOGVAR_OFFSET, *LOGVAR_RANGE)

    def decode(self, z: jax.Array) -> jax.Array:
        """``(B, Tm/td, latent_channels)`` -> log-mel ``(B, Tm, n_mels)``."""
        if z.ndim != 3 or z.shape[-1] != self.latent_channels:
            raise ValueError(
                f"AudioAE.decode expects (B, T', {self.latent_channels}) latents, got {z.shape}"
            )
        h = self.dec_in(z)
        for blk in self.dec_blocks:
            h = constrain(blk(h), _AUDIO_AXES)
        h = self.dec_full_block(depth_to_time(self.dec_time(h), self.time_down))
        return self.dec_out(jax.nn.silu(self.dec_norm(h)))

    def __call__(self, mel: jax.Array, rng: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Encode, draw a reparameterised latent, decode: ``(mel_hat, mean, logvar)``."""
        mean, logvar = self.encode(mel)
        return self.decode(sample_latent(mean, logvar, rng)), mean, logvar
