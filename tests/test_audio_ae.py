"""Audio AE: shapes, helpers, and that a short training run on clicks learns them."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs.base import get_base_config
from vdiff.models.audio_ae import (
    AudioAE,
    compute_mel_stats,
    crop_mel,
    denormalize_mel,
    normalize_mel,
    pad_mel,
)
from vdiff.models.losses import audio_ae_loss

N_MELS = 32


def _clicks(rng: np.random.Generator, batch: int, frames: int, n_mels: int = N_MELS):
    """Normalised log-mel of silence with clicks: a one-frame onset then a fast decay.

    Returns the mels ``(B, Tm, n_mels)`` and the onset frames of each clip.
    """
    mel = -1.0 + 0.05 * rng.standard_normal((batch, frames, n_mels))
    onsets = []
    for b in range(batch):
        starts = rng.choice(np.arange(4, frames - 4, 6), size=3, replace=False)
        for s in starts:
            lo = rng.integers(0, n_mels - 8)
            band = slice(lo, lo + 8)
            for k, level in enumerate((4.0, 2.0, 0.5)):  # onset frame is the loudest
                mel[b, s + k, band] = level
        onsets.append(np.sort(starts))
    return jnp.asarray(mel, jnp.float32), onsets


def _model(seed=0):
    return AudioAE(n_mels=N_MELS, latent_channels=8, channels=32, time_down=4, rngs=nnx.Rngs(seed))


def test_shapes_and_from_config():
    cfg = get_base_config()
    model = AudioAE.from_config(cfg.audio_ae, cfg.data.n_mels, nnx.Rngs(0))
    mel = jax.random.normal(jax.random.key(0), (2, 200, cfg.data.n_mels))
    mean, logvar = model.encode(mel)
    assert mean.shape == logvar.shape == (2, 50, cfg.audio_ae.latent_channels)
    assert model.decode(mean).shape == mel.shape
    mel_hat, mean2, _ = model(mel, jax.random.key(1))
    assert mel_hat.shape == mel.shape and mean2.shape == mean.shape


def test_bad_inputs_raise_clear_errors():
    model = _model()
    with pytest.raises(ValueError, match="pad_mel"):
        model.encode(jnp.zeros((1, 30, N_MELS)))
    with pytest.raises(ValueError, match=r"\(B, Tm, 32\)"):
        model.encode(jnp.zeros((1, 32, 64)))
    with pytest.raises(ValueError, match="latents"):
        model.decode(jnp.zeros((1, 8, 3)))


def test_pad_crop_and_normalisation_helpers():
    mel = jax.random.normal(jax.random.key(0), (2, 30, N_MELS)) * 3.0 - 5.0
    padded, length = pad_mel(mel, 4)
    assert padded.shape == (2, 32, N_MELS) and length == 30
    np.testing.assert_array_equal(padded[:, 30:], jnp.repeat(mel[:, -1:], 2, axis=1))
    np.testing.assert_array_equal(crop_mel(padded, length), mel)
    stats = compute_mel_stats(mel)
    norm = normalize_mel(mel, stats)
    np.testing.assert_allclose(norm.reshape(-1, N_MELS).mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(norm.reshape(-1, N_MELS).std(0), 1.0, atol=1e-3)
    np.testing.assert_allclose(denormalize_mel(norm, stats), mel, atol=1e-4)


def test_training_on_clicks_reduces_loss_and_keeps_onsets():
    model = _model()
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, mel, rng):
        (_, metrics), grads = nnx.value_and_grad(audio_ae_loss, has_aux=True)(model, mel, rng, 1e-6)
        opt.update(model, grads)
        return metrics

    rng = np.random.default_rng(0)
    losses = []
    for i in range(120):
        mel, _ = _clicks(rng, 8, 64)
        losses.append(float(step(model, opt, mel, jax.random.key(i))["loss"]))
    assert np.mean(losses[-10:]) < 0.2 * np.mean(losses[:3])

    # Sharp onsets: on fresh clips, the reconstruction's largest frame-to-frame rise
    # near each click sits exactly on the onset frame.
    mel, onsets = _clicks(np.random.default_rng(1), 8, 64)
    mean, _ = model.encode(mel)
    energy = model.decode(mean).mean(-1)  # (B, Tm)
    rise = np.diff(np.asarray(energy), axis=1)  # rise[t-1] = e[t] - e[t-1]
    hits = [
        int(np.argmax(rise[b, s - 3 : s + 2]) + s - 2) == s for b in range(8) for s in onsets[b]
    ]
    assert np.mean(hits) >= 0.9


def test_params_carry_logical_axes():
    model = nnx.eval_shape(lambda: AudioAE(n_mels=N_MELS, rngs=nnx.Rngs(0)))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var.get_value().ndim, path
        assert names[-1] == "conv_out", path
