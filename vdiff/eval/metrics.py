"""Sweep metrics that need no pretrained network beyond what vdiff trains itself.

- :func:`temporal_flicker`: frame-to-frame stability of a clip (1 = no change at all).
- :func:`vae_features` + :func:`frechet_distance`: a Fréchet distance between real and
  generated clips on features of vdiff's own video VAE encoder. It is *not* FVD (which
  uses an I3D network trained on Kinetics); its numbers only compare runs that share the
  same VAE.
- :func:`fixed_grid_flow_loss`: held-out flow-matching loss on a fixed grid of noise
  levels and noise draws, so checkpoints of one run are compared on identical inputs.
- :func:`nfe`: network evaluations per clip for a sampler setting.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from flax import nnx

from vdiff.diffusion.flow import interpolate
from vdiff.sampling import encode_video_mean

# Noise levels of the held-out loss: midpoints of K equal bins of (0, 1).
FLOW_GRID_POINTS = 8
# Base key of the held-out loss noise; fixed so every checkpoint sees the same draws.
FLOW_NOISE_SEED = 12345


def temporal_flicker(video: np.ndarray) -> float:
    """Temporal-flickering score of one clip: ``(255 - mean |x_{t+1} - x_t|) / 255``.

    The mean runs over every pixel and channel of every consecutive frame pair, so a
    static clip scores 1.0 and frames alternating between black and white score 0.0.

    Args:
        video: uint8 (T, H, W, C) with T >= 2.
    """
    x = np.asarray(video)
    if x.ndim != 4 or x.shape[0] < 2:
        raise ValueError(f"temporal_flicker needs a (T>=2, H, W, C) clip, got shape {x.shape}")
    diff = np.abs(np.diff(x.astype(np.float32), axis=0))
    return float((255.0 - diff.mean()) / 255.0)


def nfe(steps: int, sampler: str, cfg: float) -> int:
    """Transformer evaluations per clip: Euler 1 per step, Heun 2 per step but the last
    (which ends at t = 0); guidance (cfg != 1) doubles each (conditional + unconditional)."""
    calls = steps if sampler == "euler" else 2 * steps - 1
    return calls * (1 if cfg == 1.0 else 2)


@nnx.jit
def _encode_audio_mean(audio_ae, mel):
    return audio_ae.encode(mel)[0]


def _padded_batches(fn, module, arrays: np.ndarray, batch: int) -> np.ndarray:
    """``fn(module, chunk)`` over ``arrays`` in batches; the last batch is padded to
    ``batch`` (repeating its last row) so one compiled shape serves every call."""
    out = []
    for i in range(0, len(arrays), batch):
        chunk = np.asarray(arrays[i : i + batch])
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, 0)])
        out.append(np.asarray(fn(module, jnp.asarray(chunk)))[:n])
    return np.concatenate(out)


def vae_latents(vae, videos: np.ndarray, batch: int = 16) -> np.ndarray:
    """Encoder means ``(N, T', H', W', C)`` of uint8 clips ``(N, T, H, W, 3)``."""
    return _padded_batches(encode_video_mean, vae, videos, batch)


def pooled_features(latents: np.ndarray) -> np.ndarray:
    """``(N, T', H', W', C)`` -> ``(N, 3C)``: per-channel mean and std over space-time, and
    the per-channel mean absolute change between latent frames (motion)."""
    z = np.asarray(latents, np.float64)
    n, c = z.shape[0], z.shape[-1]
    flat = z.reshape(n, -1, c)
    motion = (
        np.abs(np.diff(z, axis=1)).reshape(n, -1, c).mean(1) if z.shape[1] > 1 else np.zeros((n, c))
    )
    return np.concatenate([flat.mean(1), flat.std(1), motion], axis=1)


def vae_features(vae, videos: np.ndarray, batch: int = 16) -> np.ndarray:
    """Pooled video-VAE encoder features of uint8 clips (see :func:`pooled_features`)."""
    return pooled_features(vae_latents(vae, videos, batch))


def frechet_distance(real: np.ndarray, fake: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(N, D)``.

    ``|mu_r - mu_f|^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2))``. With few samples the
    covariances are singular; a small ``eps`` on the diagonal keeps the square root
    finite. NaN when either set has fewer than 2 rows (no covariance).
    """
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if len(real) < 2 or len(fake) < 2:
        return float("nan")
    mu_r, mu_f = real.mean(0), fake.mean(0)
    s_r = np.atleast_2d(np.cov(real, rowvar=False))
    s_f = np.atleast_2d(np.cov(fake, rowvar=False))
    covmean = scipy.linalg.sqrtm(s_r @ s_f)
    if not np.all(np.isfinite(covmean)):
        offset = np.eye(len(s_r)) * eps
        covmean = scipy.linalg.sqrtm((s_r + offset) @ (s_f + offset))
    covmean = np.real(covmean)
    value = np.sum((mu_r - mu_f) ** 2) + np.trace(s_r) + np.trace(s_f) - 2.0 * np.trace(covmean)
    return float(max(value, 0.0))


@nnx.jit
def _grid_losses(model, batch, ids, t, k):
    """Per-example video and audio MSE at noise level ``t`` with noise keyed by (id, k)."""
    x0_v, x0_a = batch["video_latents"], batch.get("audio_latents")
    base = jax.random.PRNGKey(FLOW_NOISE_SEED)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(base, i), k))(ids)
    kv, ka = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
    eps_v = jax.vmap(lambda key: jax.random.normal(key, x0_v.shape[1:], jnp.float32))(kv)
    tb = jnp.full((x0_v.shape[0],), t, jnp.float32)
    kwargs = {}
    if x0_a is not None:
        eps_a = jax.vmap(lambda key: jax.random.normal(key, x0_a.shape[1:], jnp.float32))(ka)
        kwargs = dict(audio=interpolate(x0_a, eps_a, tb), t_audio=tb, audio_mask=batch["has_audio"])
    if "fps" in batch:
        kwargs["video_times"] = model.clip_times(batch["fps"], x0_v.shape[1])
    pred_v, pred_a = model(
        interpolate(x0_v, eps_v, tb), tb, batch["tokens"], batch["mask"], **kwargs
    )
    mse = lambda p, y: jnp.mean(jnp.square(p - y).reshape(p.shape[0], -1), axis=1)  # noqa: E731
    loss_v = mse(pred_v, eps_v - x0_v)
    loss_a = mse(pred_a, eps_a - x0_a) if x0_a is not None else jnp.zeros_like(loss_v)
    return loss_v, loss_a


def fixed_grid_flow_loss(
    model,
    arrays: dict,
    *,
    audio_weight: float = 1.0,
    points: int = FLOW_GRID_POINTS,
    batch: int = 16,
) -> dict[str, float]:
    """Held-out flow-matching loss over a fixed (t, noise) grid.

    Every example is noised at each of ``points`` levels ``t_k = (k + 1/2) / points`` with
    noise keyed by (example index, k) only, so two checkpoints are scored on identical
    inputs. As in training, the video loss averages over examples, the audio loss over
    examples that have audio, and ``loss = video + audio_weight * audio``; unlike
    training there is no caption dropout and no clean-modality example.

    Args:
        model: a :class:`vdiff.models.dit.DiT`.
        arrays: ``video_latents``, ``tokens``, ``mask`` and optionally ``audio_latents``
            and ``has_audio`` (normalised latents, as the transformer trains on).
        audio_weight: ``diffusion.audio_loss_weight``.
        points: grid size.
        batch: examples per call (the last batch is padded and the padding dropped).

    Returns:
        ``{"flow_loss_val", "flow_loss_val_video"[, "flow_loss_val_audio"]}``.
    """
    n = len(arrays["video_latents"])
    keys = [
        k
        for k in ("video_latents", "audio_latents", "tokens", "mask", "has_audio", "fps")
        if k in arrays
    ]
    has_audio = "audio_latents" in arrays
    lv, la = np.zeros((points, n)), np.zeros((points, n))
    for i in range(0, n, batch):
        m = min(batch, n - i)
        idx = np.arange(i, i + batch).clip(max=n - 1)  # pad by repeating the last example
        chunk = {key: jnp.asarray(np.asarray(arrays[key])[idx]) for key in keys}
        if has_audio and "has_audio" not in chunk:
            chunk["has_audio"] = jnp.ones((batch,), bool)
        if "has_audio" in chunk and not has_audio:
            chunk.pop("has_audio")
        for k in range(points):
            t = (k + 0.5) / points
            v, a = _grid_losses(model, chunk, jnp.asarray(idx, jnp.int32), t, k)
            lv[k, i : i + m] = np.asarray(v)[:m]
            la[k, i : i + m] = np.asarray(a)[:m]
    out = {"flow_loss_val_video": float(lv.mean())}
    total = out["flow_loss_val_video"]
    if has_audio:
        w = np.asarray(arrays.get("has_audio", np.ones(n, bool)), bool)
        if w.any():
            out["flow_loss_val_audio"] = float(la[:, w].mean())
            total += audio_weight * out["flow_loss_val_audio"]
    out["flow_loss_val"] = total
    return out


def flow_inputs(gen, val, batch: int = 16) -> dict[str, np.ndarray]:
    """What :func:`fixed_grid_flow_loss` scores: ``val``'s clips (a
    :class:`vdiff.train.data.Examples`) encoded by ``gen``'s autoencoders and normalised
    like the transformer's training latents, with their tokens and masks."""

    def norm(z, mod):
        st = gen.latent_stats[mod]
        return ((z - st["shift"]) * st["scale"]).astype(np.float32)

    arrays = {
        "video_latents": norm(vae_latents(gen.vae, val.video, batch), "video"),
        "tokens": val.tokens,
        "mask": val.mask,
        "fps": np.asarray(val.fps, np.float32),
    }
    if (
        gen.audio_ae is not None
        and gen.dit.has_audio
        and "audio" in gen.latent_stats
        and val.has_audio.any()
    ):
        arrays["audio_latents"] = norm(audio_latents(gen.audio_ae, val.mel_norm, batch), "audio")
        arrays["has_audio"] = val.has_audio
    return arrays


def audio_latents(audio_ae, mel_norm: np.ndarray, batch: int = 16) -> np.ndarray:
    """Audio encoder means ``(N, Ta, Ca)`` of normalised log-mel ``(N, Tm, n_mels)``."""
    return _padded_batches(_encode_audio_mean, audio_ae, np.asarray(mel_norm, np.float32), batch)
