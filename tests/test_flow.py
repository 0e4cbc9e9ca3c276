"""Flow matching: timestep sampling, interpolation, the loss and its options, overfitting."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from vdiff.config import load_config
from vdiff.diffusion.flow import flow_loss, interpolate, resolution_shift, sample_t, shift_t
from vdiff.models.dit import DiT
from vdiff.train.stages import dit_sizes


def diffusion_cfg(**kw):
    cfg = load_config("tiny")
    for k, v in kw.items():
        cfg.diffusion[k] = v
    return cfg


class Recorder:
    """A stand-in model: returns ``(x_t - x0) / t`` (the exact velocity) and records its inputs."""

    has_audio = True

    def __init__(self, x0_v, x0_a):
        self.x0_v, self.x0_a, self.calls = x0_v, x0_a, []

    def __call__(
        self, xv, tv, tokens, mask, audio=None, t_audio=None, audio_mask=None, cross_modal=None,
        video_times=None,
    ):  # fmt: skip
        self.calls.append(
            dict(
                xv=xv,
                tv=tv,
                tokens=tokens,
                mask=mask,
                xa=audio,
                ta=t_audio,
                audio_mask=audio_mask,
                cross_modal=cross_modal,
                video_times=video_times,
            )
        )

        def exact(x, x0, t):
            tb = t.reshape((-1,) + (1,) * (x.ndim - 1))
            return jnp.where(tb > 0, (x - x0) / jnp.where(tb > 0, tb, 1.0), 0.0)

        return exact(xv, self.x0_v, tv), None if audio is None else exact(audio, self.x0_a, t_audio)


def batch(n=64, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    return dict(
        video_latents=jax.random.normal(k[0], (n, 2, 4, 4, 3)),
        audio_latents=jax.random.normal(k[1], (n, 8, 3)),
        tokens=jax.random.randint(k[2], (n, 5), 1, 50),
        mask=jnp.ones((n, 5), bool),
    )


def test_each_clips_frame_rate_reaches_the_model_with_and_without_audio():
    """A batch's ``fps`` becomes per-clip token times (``model.clip_times``) in the call."""
    b = batch(4)
    b["fps"] = jnp.asarray([8.0, 12.0, 24.0, 30.0])
    for with_audio in (True, False):
        bb = b if with_audio else {k: v for k, v in b.items() if k != "audio_latents"}
        model = Recorder(bb["video_latents"], bb.get("audio_latents"))
        model.clip_times = lambda fps, n: fps[:, None] * jnp.arange(n)
        flow_loss(model, bb, jax.random.key(0), diffusion_cfg())
        times = model.calls[0]["video_times"]
        assert times is not None, with_audio
        np.testing.assert_allclose(times[:, 1], b["fps"])
    del b["fps"]
    model = Recorder(b["video_latents"], b["audio_latents"])
    flow_loss(model, b, jax.random.key(0), diffusion_cfg())
    assert model.calls[0]["video_times"] is None  # the model's default frame rate


def test_shift_and_timestep_distribution():
    t = jnp.linspace(0.0, 1.0, 11)
    np.testing.assert_allclose(shift_t(t, 1.0), t, atol=1e-7)
    np.testing.assert_allclose(shift_t(jnp.array(0.5), 3.0), 0.75, rtol=1e-6)
    s = shift_t(t, 3.0)
    assert float(s[0]) == 0.0 and float(s[-1]) == pytest.approx(1.0)
    assert bool(jnp.all(jnp.diff(s) > 0)) and bool(jnp.all(s[1:-1] > t[1:-1]))
    u = sample_t(jax.random.key(0), (20000,), mean=0.5, std=0.8)
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0
    logit = jnp.log(u) - jnp.log1p(-u)
    assert float(logit.mean()) == pytest.approx(0.5, abs=0.03)
    assert float(logit.std()) == pytest.approx(0.8, abs=0.03)
    assert float(sample_t(jax.random.key(0), (20000,), shift=3.0).mean()) > float(u.mean()) + 0.05
    assert resolution_shift(4096, 1024) == pytest.approx(2.0)
    assert resolution_shift(256, 1024, base_shift=3.0) == pytest.approx(1.5)


def test_uniform_fraction_of_timesteps_reaches_low_noise():
    key, n = jax.random.key(0), 40000
    high = sample_t(key, (n,), mean=0.5, shift=3.0)
    mixed = sample_t(key, (n,), mean=0.5, shift=3.0, uniform=0.3)
    # the shifted logit-normal alone almost never trains below t = 0.2 ...
    assert float(jnp.mean(high < 0.2)) < 0.01
    # ... a 30% uniform share puts ~0.3 * 0.2 of the draws there, and leaves the rest alone
    assert float(jnp.mean(mixed < 0.2)) == pytest.approx(
        0.3 * 0.2 + float(jnp.mean(high < 0.2)) * 0.7, abs=0.01
    )
    assert float(jnp.mean(mixed == high)) == pytest.approx(0.7, abs=0.01)
    all_uniform = sample_t(key, (n,), mean=0.5, shift=3.0, uniform=1.0)
    assert float(all_uniform.mean()) == pytest.approx(0.5, abs=0.01)
    assert float(all_uniform.min()) > 0.0 and float(all_uniform.max()) < 1.0


def test_interpolation_endpoints_and_velocity():
    x0, eps = jnp.full((2, 3), 2.0), jnp.full((2, 3), -1.0)
    np.testing.assert_allclose(interpolate(x0, eps, jnp.zeros(2)), x0)
    np.testing.assert_allclose(interpolate(x0, eps, jnp.ones(2)), eps)
    dt = 1e-3
    fd = (interpolate(x0, eps, jnp.full(2, 0.4 + dt)) - interpolate(x0, eps, jnp.full(2, 0.4))) / dt
    np.testing.assert_allclose(fd, eps - x0, rtol=1e-3)


def test_exact_velocity_gives_zero_loss_and_wrong_sign_does_not():
    b = batch()
    cfg = diffusion_cfg(caption_dropout=0.0, p_clean_audio=0.0, p_clean_video=0.0)
    model = Recorder(b["video_latents"], b["audio_latents"])
    loss, metrics = flow_loss(model, b, jax.random.key(1), cfg)
    assert float(loss) < 1e-6 and set(metrics) >= {"loss", "loss_video", "loss_audio"}
    # Same t for both modalities; inputs are interpolations between data and noise.
    call = model.calls[-1]
    np.testing.assert_array_equal(call["tv"], call["ta"])
    assert bool(jnp.all(call["audio_mask"]))

    class Negated(Recorder):
        def __call__(self, *a, **k):
            v, va = super().__call__(*a, **k)
            return -v, -va

    loss_neg, _ = flow_loss(
        Negated(b["video_latents"], b["audio_latents"]), b, jax.random.key(1), cfg
    )
    assert float(loss_neg) > 1.0


def test_clean_modalities_get_t0_and_no_loss():
    b = batch()

    class Zero(Recorder):
        def __call__(self, *a, **k):
            super().__call__(*a, **k)
            return jnp.zeros_like(a[0]), jnp.zeros_like(k["audio"])

    model = Zero(jnp.zeros(()), jnp.zeros(()))
    _, m = flow_loss(
        model, b, jax.random.key(2), diffusion_cfg(p_clean_audio=1.0, p_clean_video=0.0)
    )
    call = model.calls[-1]
    assert (
        float(m["clean_audio"]) == 1.0
        and float(m["loss_audio"]) == 0.0
        and float(m["loss_video"]) > 0.5
    )
    assert bool(jnp.all(call["ta"] == 0)) and bool(jnp.all(call["tv"] > 0))
    np.testing.assert_array_equal(call["xa"], b["audio_latents"])

    _, m = flow_loss(
        model, b, jax.random.key(2), diffusion_cfg(p_clean_audio=0.0, p_clean_video=1.0)
    )
    call = model.calls[-1]
    assert (
        float(m["clean_video"]) == 1.0
        and float(m["loss_video"]) == 0.0
        and float(m["loss_audio"]) > 0.5
    )
    np.testing.assert_array_equal(call["xv"], b["video_latents"])

    # Mixed probabilities: the two clean sets never overlap and match the rates roughly.
    _, m = flow_loss(
        model, batch(2000), jax.random.key(3), diffusion_cfg(p_clean_audio=0.2, p_clean_video=0.3)
    )
    call = model.calls[-1]
    assert not bool(jnp.any((call["ta"] == 0) & (call["tv"] == 0)))
    assert float(m["clean_audio"]) == pytest.approx(0.2, abs=0.04)
    assert float(m["clean_video"]) == pytest.approx(0.3, abs=0.04)


def test_examples_without_audio_get_no_audio_loss_and_are_masked():
    b = dict(batch(), has_audio=jnp.arange(64) % 2 == 0)
    model = Recorder(b["video_latents"], b["audio_latents"] + 1.0)  # wrong audio target
    cfg = diffusion_cfg(caption_dropout=0.0, p_clean_audio=0.5, p_clean_video=0.5)
    _, m = flow_loss(model, b, jax.random.key(4), cfg)
    call = model.calls[-1]
    np.testing.assert_array_equal(call["audio_mask"], b["has_audio"])
    # No clean-modality draw for examples without audio: their video is always noised.
    assert bool(jnp.all(call["tv"][~b["has_audio"]] > 0))
    assert float(m["has_audio"]) == 0.5
    nb = dict(b, has_audio=jnp.zeros(64, bool))
    _, m_none = flow_loss(model, nb, jax.random.key(4), cfg)
    assert float(m_none["loss_audio"]) == 0.0 and float(m["loss_audio"]) > 0.1


def test_caption_dropout_empties_captions():
    b = batch()
    model = Recorder(b["video_latents"], b["audio_latents"])
    flow_loss(model, b, jax.random.key(5), diffusion_cfg(caption_dropout=1.0))
    assert not bool(jnp.any(model.calls[-1]["mask"]))
    flow_loss(model, b, jax.random.key(5), diffusion_cfg(caption_dropout=0.0))
    np.testing.assert_array_equal(model.calls[-1]["tokens"], b["tokens"])
    _, m = flow_loss(model, b, jax.random.key(6), diffusion_cfg(caption_dropout=0.5))
    assert 0.2 < float(m["caption_dropped"]) < 0.8


def test_single_batch_overfits():
    """Tiny DiT, one fixed batch of 2 (one with an empty caption), fixed t and noise."""
    cfg = load_config("tiny")
    m = cfg.model
    m.width, m.depth, m.heads, m.mlp_ratio = 32, 2, 2, 2.0
    m.text_width, m.text_depth, m.text_heads, m.attention = 32, 1, 2, "xla"
    cfg.vae.latent_channels = cfg.audio_ae.latent_channels = 4
    cfg.data.vocab_size = 64
    cfg.diffusion.caption_dropout = cfg.diffusion.p_clean_audio = cfg.diffusion.p_clean_video = 0.0
    model = DiT.from_config(
        cfg.model, dit_sizes(cfg), nnx.Rngs(jax.random.key(0, impl="unsafe_rbg"))
    )
    k = jax.random.split(jax.random.key(7), 3)
    b = dict(
        video_latents=jax.random.normal(k[0], (2, 2, 4, 4, 4)),
        audio_latents=jax.random.normal(k[1], (2, 8, 4)),
        tokens=jax.random.randint(k[2], (2, 6), 1, 64),
        mask=jnp.array([[True] * 4 + [False] * 2, [False] * 6]),
    )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(1e-3)
    rng = jax.random.key(8)  # the same t, noise every step

    @jax.jit
    def step(params, opt_state):
        def loss_fn(p):
            return flow_loss(nnx.merge(graphdef, p, rest), b, rng, cfg)[0]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    opt_state = tx.init(params)
    losses = []
    for i in range(150):
        params, opt_state, loss, grads = step(params, opt_state)
        losses.append(float(loss))
        if i == 0:  # the empty caption must not poison the gradients
            assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_cross_modal_dropout_draws_per_example():
    b = batch(n=512)
    rec = Recorder(b["video_latents"], b["audio_latents"])
    flow_loss(rec, b, jax.random.key(5), diffusion_cfg(p_no_cross_modal=0.3))
    joint = np.asarray(rec.calls[-1]["cross_modal"])
    assert joint.shape == (512,) and joint.dtype == bool
    assert 0.22 < 1.0 - joint.mean() < 0.38  # ~30% of the examples masked
    flow_loss(rec, b, jax.random.key(5), diffusion_cfg(p_no_cross_modal=0.0))
    assert rec.calls[-1]["cross_modal"] is None  # off: the model's own flag applies
