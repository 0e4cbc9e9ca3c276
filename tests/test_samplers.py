"""Euler/Heun samplers: time grid, determinism, guidance, unseen shapes, clean conditioning."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vdiff.config import load_config
from vdiff.diffusion.samplers import sample, time_grid
from vdiff.models.dit import DiT
from vdiff.train.stages import dit_sizes

B, C = 2, 4
SHAPES = {"video": (B, 2, 4, 4, C), "audio": (B, 8, C)}


def tiny_model(seed=0):
    cfg = load_config("tiny")
    m = cfg.model
    m.width, m.depth, m.heads, m.mlp_ratio = 32, 2, 2, 2.0
    m.text_width, m.text_depth, m.text_heads, m.attention = 32, 1, 2, "xla"
    # The model's own defaults, not the tiny recipe's choices (cross text, 4x4 patches).
    m.patch, m.audio_patch, m.text_attention = (1, 2, 2), 1, "joint"
    cfg.vae.latent_channels = cfg.audio_ae.latent_channels = C
    cfg.data.vocab_size = 64
    model = DiT.from_config(
        cfg.model, dit_sizes(cfg), nnx.Rngs(jax.random.key(seed, impl="unsafe_rbg"))
    )
    # Perturb the zero-initialised output layers so the velocity is not identically 0.
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.Param))
    nnx.update(
        model,
        jax.tree.unflatten(
            treedef, [x + 0.1 * rng.standard_normal(x.shape).astype(x.dtype) for x in leaves]
        ),
    )
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def text():
    tokens = jnp.array([[5, 9, 3, 0], [7, 2, 0, 0]], jnp.int32)
    return tokens, tokens > 0


class ConstantVelocity(nnx.Module):
    """v(x, t) = c: any grid must carry noise x1 to exactly x1 - c."""

    has_audio = True

    def __init__(self):
        self.c = nnx.Param(jnp.full((C,), 0.5))

    def encode_text(self, tokens, mask):
        return jnp.zeros((*tokens.shape, 1)), jnp.zeros((tokens.shape[0], 1)), mask

    def __call__(self, xv, tv, tokens, mask, *, text=None, audio=None, t_audio=None):
        va = None if audio is None else jnp.broadcast_to(self.c[...], audio.shape)
        return jnp.broadcast_to(self.c[...], xv.shape), va


def test_time_grid():
    g = time_grid(10)
    assert g.shape == (11,) and g[0] == 1.0 and g[-1] == 0.0 and np.all(np.diff(g) < 0)
    gs = time_grid(10, shift=3.0)
    assert gs[0] == pytest.approx(1.0) and gs[-1] == 0.0 and np.all(gs[1:-1] > g[1:-1])
    with pytest.raises(ValueError):
        time_grid(0)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_integration_of_a_constant_velocity_is_exact(sampler, text):
    out = sample(
        ConstantVelocity(),
        *text,
        SHAPES,
        jax.random.key(0),
        steps=4,
        cfg=2.0,
        sampler=sampler,
        shift=2.0,
    )
    kv, ka = jax.random.split(jax.random.key(0))
    np.testing.assert_allclose(
        out["video"], jax.random.normal(kv, SHAPES["video"]) - 0.5, atol=1e-5
    )
    np.testing.assert_allclose(
        out["audio"], jax.random.normal(ka, SHAPES["audio"]) - 0.5, atol=1e-5
    )


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_sampling_from_t_start_integrates_only_that_span(sampler, text):
    # A clip re-noised to t = 0.3 moves by 0.3 x velocity on the way to t = 0, not by 1.
    start = {k: jnp.full(v, 2.0) for k, v in SHAPES.items()}
    out = sample(
        ConstantVelocity(), *text, SHAPES, None, steps=5, cfg=2.0, sampler=sampler,
        shift=3.0, noise=start, t_start=0.3,
    )  # fmt: skip
    for k in SHAPES:
        np.testing.assert_allclose(out[k], 2.0 - 0.5 * 0.3, atol=1e-5)
    with pytest.raises(ValueError, match="t_start must be in"):
        sample(ConstantVelocity(), *text, SHAPES, None, noise=start, t_start=0.0)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_sampling_is_deterministic_for_a_seed(sampler, model, text):
    def run(seed):
        return sample(model, *text, SHAPES, jax.random.key(seed), steps=3, cfg=3.0, sampler=sampler)

    a, b, c = run(0), run(0), run(1)
    for key in ("video", "audio"):
        assert a[key].shape == SHAPES[key] and bool(jnp.isfinite(a[key]).all())
        np.testing.assert_array_equal(a[key], b[key])
        assert float(jnp.abs(a[key] - c[key]).max()) > 1e-2


def test_guidance_scale_one_equals_conditional(model, text):
    key = jax.random.key(3)
    guided = sample(model, *text, SHAPES, key, steps=3, cfg=1.0)
    cond = sample(model, *text, SHAPES, key, steps=3, cfg=None)
    for k in ("video", "audio"):
        np.testing.assert_allclose(guided[k], cond[k], atol=1e-5)
    # One step (one model call on identical inputs): the scale acts per modality, and
    # the unconditional branch is really used.
    strong = sample(model, *text, SHAPES, key, steps=1, cfg=4.0, audio_cfg=1.0)
    cond1 = sample(model, *text, SHAPES, key, steps=1, cfg=None)
    np.testing.assert_allclose(strong["audio"], cond1["audio"], atol=1e-5)
    assert float(jnp.abs(strong["video"] - cond1["video"]).max()) > 1e-2


def test_unseen_latent_shape(model, text):
    shapes = {"video": (B, 3, 6, 2, C), "audio": (B, 13, C)}
    out = sample(model, *text, shapes, jax.random.key(0), steps=2, cfg=2.0)
    assert out["video"].shape == shapes["video"] and out["audio"].shape == shapes["audio"]
    assert bool(jnp.isfinite(out["video"]).all()) and bool(jnp.isfinite(out["audio"]).all())


def test_clean_video_conditions_audio(model, text):
    key = jax.random.key(4)
    clean = jax.random.normal(jax.random.key(9), SHAPES["video"])
    a = sample(model, *text, SHAPES, key, steps=2, cfg=2.0, clean_video=clean)
    b = sample(model, *text, SHAPES, key, steps=2, cfg=2.0, clean_video=clean + 1.0)
    np.testing.assert_array_equal(a["video"], clean)
    assert float(jnp.abs(a["audio"] - b["audio"]).max()) > 1e-3
    with pytest.raises(ValueError, match="at most one"):
        sample(
            model,
            *text,
            SHAPES,
            key,
            steps=2,
            clean_video=clean,
            clean_audio=jnp.zeros(SHAPES["audio"]),
        )


def test_given_noise_equals_drawn_noise_and_batching_keeps_examples(model, text):
    from vdiff.diffusion.samplers import initial_noise, per_example_noise

    tokens, mask = text
    key = jax.random.key(3)
    drawn = sample(model, tokens, mask, SHAPES, key, steps=3, cfg=2.0)
    xv, xa = initial_noise(key, SHAPES["video"], SHAPES["audio"])
    given = sample(
        model, tokens, mask, SHAPES, None, steps=3, cfg=2.0, noise={"video": xv, "audio": xa}
    )
    for k in ("video", "audio"):
        np.testing.assert_array_equal(np.asarray(drawn[k]), np.asarray(given[k]))
    # Per-example keys: example 1 sampled in a batch of 2 equals it sampled alone.
    keys = [jax.random.key(10), jax.random.key(11)]
    per = {k: v[1:] for k, v in SHAPES.items()}
    batch = sample(
        model, tokens, mask, SHAPES, None, steps=3, cfg=2.0,
        noise=per_example_noise(keys, per["video"], per["audio"]),
    )  # fmt: skip
    alone = sample(
        model, tokens[1:], mask[1:], {k: (1, *v) for k, v in per.items()}, None, steps=3,
        cfg=2.0, noise=per_example_noise(keys[1:], per["video"], per["audio"]),
    )  # fmt: skip
    for k in ("video", "audio"):
        np.testing.assert_allclose(np.asarray(batch[k][1:]), np.asarray(alone[k]), atol=1e-4)
