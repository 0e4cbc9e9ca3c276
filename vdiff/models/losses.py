"""Autoencoder losses and image metrics (pure jnp, jit-friendly).

Loss convention (shared by the video VAE and the audio AE): the reconstruction term
is a mean over input elements, and the KL term is the KL summed over latent elements
divided by the number of input elements. The ratio between the two is then the same
as "sum over pixels + kl_weight * sum over latents", so ``kl_weight`` values such as
1e-6 mean what they usually mean for latent-diffusion autoencoders.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over all but the batch axis, per example."""
    kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return kl.reshape(kl.shape[0], -1).sum(-1)


def reconstruction(x_hat: jax.Array, x: jax.Array, kind: str = "l1") -> jax.Array:
    """Mean L1 or squared error between ``x_hat`` and ``x``."""
    diff = x_hat.astype(jnp.float32) - x.astype(jnp.float32)
    if kind == "l1":
        return jnp.mean(jnp.abs(diff))
    if kind == "mse":
        return jnp.mean(jnp.square(diff))
    raise ValueError(f"reconstruction loss must be 'l1' or 'mse', got {kind!r}")


def psnr(x: jax.Array, y: jax.Array) -> jax.Array:
    """PSNR in dB of data in [-1, 1] (mapped to [0, 1]), from the MSE over all elements.

    Identical inputs give ``inf``.
    """
    a = (x.astype(jnp.float32) + 1.0) / 2.0
    b = (y.astype(jnp.float32) + 1.0) / 2.0
    mse = jnp.mean(jnp.square(a - b))
    return jnp.where(mse > 0, -10.0 * jnp.log10(jnp.maximum(mse, 1e-30)), jnp.inf)


def _gaussian_window(size: int, sigma: float) -> jax.Array:
    r = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
    g = jnp.exp(-0.5 * jnp.square(r / sigma))
    return g / g.sum()


def ssim(x: jax.Array, y: jax.Array, window: int = 11, sigma: float = 1.5) -> jax.Array:
    """Mean SSIM of images/videos ``(..., H, W, C)`` in [-1, 1], computed per frame.

    Gaussian window (``window`` taps, std ``sigma``, shrunk to fit small frames),
    'valid' filtering, constants for data mapped to [0, 1]; channels are scored
    separately and averaged. Identical inputs give 1.
    """
    if x.shape != y.shape or x.ndim < 3:
        raise ValueError(f"ssim: need equal shapes (..., H, W, C), got {x.shape} and {y.shape}")
    h, w, c = x.shape[-3:]
    size = min(window, h, w)
    size -= 1 - size % 2  # odd, so the window has a centre
    g = _gaussian_window(size, sigma * size / window)

    def to_planes(v):  # (..., H, W, C) -> (N*C, H, W, 1), every channel of every frame
        v = (v.astype(jnp.float32).reshape(-1, h, w, c) + 1.0) / 2.0
        return jnp.moveaxis(v, -1, 1).reshape(-1, h, w, 1)

    def blur(v):  # separable gaussian, 'valid'
        dn = ("NHWC", "HWIO", "NHWC")
        v = jax.lax.conv_general_dilated(
            v, g.reshape(size, 1, 1, 1), (1, 1), "VALID", None, None, dn
        )
        return jax.lax.conv_general_dilated(
            v, g.reshape(1, size, 1, 1), (1, 1), "VALID", None, None, dn
        )

    a, b = to_planes(x), to_planes(y)
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return jnp.mean(s)


def _ae_loss(model, x, rng, kl_weight, recon):
    x_hat, mean, logvar = model(x, rng)
    rec = reconstruction(x_hat, x, recon)
    kl = jnp.mean(kl_divergence(mean, logvar)) / math.prod(x.shape[1:])
    metrics = {
        "recon": rec,
        "kl": kl,
        "kl_per_latent": jnp.mean(kl_divergence(mean, logvar)) / math.prod(mean.shape[1:]),
        "latent_std": jnp.std(mean),
        "logvar": jnp.mean(logvar),
    }
    return rec + kl_weight * kl, x_hat, metrics


def vae_loss(model, x: jax.Array, rng: jax.Array, kl_weight: float, recon: str = "mse"):
    """Video VAE training loss.

    Args:
        model: a ``VideoVAE`` (``model(x, rng) -> (x_hat, mean, logvar)``).
        x: video ``(B, T, H, W, 3)`` in [-1, 1].
        rng: key for the reparameterised latent draw.
        kl_weight: weight of the KL term (see the module docstring for its scale).
        recon: ``"mse"`` (default: it optimises PSNR directly and reached a given
            PSNR fastest in our runs) or ``"l1"``.

    Returns:
        ``(loss, metrics)`` with metrics ``loss, recon, kl, kl_per_latent, latent_std, logvar, psnr``.
    """
    loss, x_hat, metrics = _ae_loss(model, x, rng, kl_weight, recon)
    metrics["loss"] = loss
    metrics["psnr"] = psnr(jax.lax.stop_gradient(x_hat), x)
    return loss, metrics


def audio_ae_loss(model, mel: jax.Array, rng: jax.Array, kl_weight: float, recon: str = "mse"):
    """Audio AE training loss on normalised log-mel ``(B, Tm, n_mels)``.

    Returns ``(loss, metrics)`` with metrics ``loss, recon, kl, kl_per_latent, latent_std, logvar``.
    """
    loss, _, metrics = _ae_loss(model, mel, rng, kl_weight, recon)
    metrics["loss"] = loss
    return loss, metrics
