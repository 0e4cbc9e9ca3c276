"""Video VAE: shapes, causality, chunked decoding, latent stats, losses and metrics."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs.base import get_base_config
from vdiff.models import losses
from vdiff.models.video_vae import (
    VideoVAE,
    compute_latent_stats,
    decoded_frames,
    denormalize,
    latent_frames,
    normalize,
)


def _vae(spatial_down=4, temporal_down=4, seed=0):
    """A small VAE with every parameter random.

    Residual branches start at zero (each block is the identity), which would make
    the causality and chunking tests pass trivially; random values make every
    temporal conv actually mix frames.
    """
    abstract = nnx.eval_shape(
        lambda: VideoVAE(
            spatial_down=spatial_down,
            temporal_down=temporal_down,
            latent_channels=4,
            channels=8,
            rngs=nnx.Rngs(seed),
        )
    )
    graphdef, state = nnx.split(abstract)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)  # numpy: no per-shape PRNG compiles
    values = [
        rng.standard_normal(leaf.shape) / math.sqrt(math.prod(leaf.shape[:-1]))
        if leaf.ndim >= 2  # conv kernels: fan-in scaled
        else 1.0 + 0.1 * rng.standard_normal(leaf.shape)  # biases and norm scales
        for leaf in leaves
    ]
    values = [jnp.asarray(v, jnp.float32) for v in values]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, values))


# Jitted entry points: one compile per shape instead of hundreds of eager op dispatches.
_encode = nnx.jit(VideoVAE.encode)
_decode = nnx.jit(VideoVAE.decode, static_argnames="num_frames")
_decode_chunked = nnx.jit(VideoVAE.decode_chunked, static_argnames=("chunk_frames", "num_frames"))
_encode_chunked = nnx.jit(VideoVAE.encode_chunked, static_argnames="chunk_frames")


def _video(shape, seed=0):
    return jax.random.uniform(jax.random.key(seed), shape, minval=-1.0, maxval=1.0)


@pytest.fixture(scope="module")
def vae():
    return _vae()


def _abstract_vae(**kw):
    """A VAE with abstract parameters: shape checks trace the model without running it."""
    return nnx.eval_shape(lambda: VideoVAE(latent_channels=4, channels=8, rngs=nnx.Rngs(0), **kw))


@pytest.mark.parametrize("spatial_down", [2, 4, 8])
@pytest.mark.parametrize("thw", [(1, 32, 32), (5, 32, 48), (16, 64, 32), (9, 16, 16)])
def test_shapes_follow_compression(spatial_down, thw):
    t, h, w = thw
    model = _abstract_vae(spatial_down=spatial_down, temporal_down=4)
    x = jax.ShapeDtypeStruct((2, t, h, w, 3), jnp.float32)
    mean, logvar = nnx.eval_shape(lambda m, x: m.encode(x), model, x)
    tl = 1 + -(-(t - 1) // 4)
    assert mean.shape == (2, tl, h // spatial_down, w // spatial_down, 4)
    assert logvar.shape == mean.shape
    assert model.latent_shape(t, h, w) == mean.shape[1:]
    full = nnx.eval_shape(lambda m, z: m.decode(z), model, mean)
    assert full.shape == (2, decoded_frames(tl, 4), h, w, 3)
    cropped = nnx.eval_shape(lambda m, z: m.decode(z, num_frames=t), model, mean)
    assert cropped.shape == x.shape
    chunked = nnx.eval_shape(lambda m, z: m.decode_chunked(z, 2, num_frames=t), model, mean)
    assert chunked.shape == x.shape


def test_temporal_down_one_is_per_frame():
    model = _abstract_vae(temporal_down=1)
    x = jax.ShapeDtypeStruct((1, 6, 16, 16, 3), jnp.float32)
    mean, _ = nnx.eval_shape(lambda m, x: m.encode(x), model, x)
    assert mean.shape == (1, 6, 4, 4, 4)
    assert nnx.eval_shape(lambda m, z: m.decode(z), model, mean).shape == x.shape


def test_latent_frames_formula():
    assert [latent_frames(t, 4) for t in (1, 2, 5, 6, 16, 17)] == [1, 2, 2, 3, 5, 5]
    assert [decoded_frames(n, 4) for n in (1, 2, 5)] == [1, 5, 17]
    assert latent_frames(7, 1) == 7
    with pytest.raises(ValueError, match="at least 1 frame"):
        latent_frames(0, 4)


def test_image_round_trip_and_first_frame_causality(vae):
    x = _video((1, 9, 16, 16, 3), seed=1)
    image = x[:, :1]
    mean_img, logvar_img = _encode(vae, image)
    assert mean_img.shape[1] == 1
    assert _decode(vae, mean_img).shape == image.shape
    mean_vid, logvar_vid = _encode(vae, x)
    np.testing.assert_allclose(mean_img[:, 0], mean_vid[:, 0], atol=1e-5)
    np.testing.assert_allclose(logvar_img[:, 0], logvar_vid[:, 0], atol=1e-5)


def test_encoder_is_causal(vae):
    x = _video((1, 13, 16, 16, 3), seed=2)
    t = 6  # latent frame j covers input frames up to j*4, so latents 0 and 1 must not move
    y = x.at[:, t].set(-x[:, t])
    mx, _ = _encode(vae, x)
    my, _ = _encode(vae, y)
    np.testing.assert_allclose(mx[:, :2], my[:, :2], atol=1e-5)
    assert float(jnp.max(jnp.abs(mx[:, 2:] - my[:, 2:]))) > 1e-3


def test_decoder_is_causal(vae):
    z = _video((1, 4, 4, 4, 4), seed=3)
    j = 2  # latent frame 2 decodes to frames 5..8; frames 0..4 must not move
    out = _decode(vae, z)
    out2 = _decode(vae, z.at[:, j].add(1.0))
    first = decoded_frames(j, 4)
    np.testing.assert_allclose(out[:, :first], out2[:, :first], atol=1e-5)
    assert float(jnp.max(jnp.abs(out[:, first:] - out2[:, first:]))) > 1e-3


def test_per_frame_model_is_frame_causal():
    model = _vae(temporal_down=1, seed=4)
    x = _video((1, 6, 16, 16, 3), seed=4)
    for t in (1, 3, 5):
        y = x.at[:, t].add(0.5)
        a = _decode(model, _encode(model, x)[0])
        b = _decode(model, _encode(model, y)[0])
        np.testing.assert_allclose(a[:, :t], b[:, :t], atol=1e-5)
        assert float(jnp.max(jnp.abs(a[:, t] - b[:, t]))) > 1e-3


@pytest.mark.parametrize("chunk", [1, 2])
def test_chunked_decode_matches_full(vae, chunk):
    z = _video((1, 5, 4, 4, 4), seed=5)
    full = _decode(vae, z, num_frames=16)
    chunked = _decode_chunked(vae, z, chunk, num_frames=16)
    assert chunked.shape == full.shape == (1, 16, 16, 16, 3)
    np.testing.assert_allclose(chunked, full, atol=1e-4)


@pytest.mark.parametrize("chunk", [1, 2])
def test_chunked_encode_matches_full(vae, chunk):
    x = _video((1, 13, 16, 16, 3), seed=6)
    mean, logvar = _encode(vae, x)
    mean_c, logvar_c = _encode_chunked(vae, x, chunk)
    np.testing.assert_allclose(mean_c, mean, atol=1e-4)
    np.testing.assert_allclose(logvar_c, logvar, atol=1e-4)


def test_latent_stats_normalize_round_trip():
    means = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (4, 5, 8, 8, 6))
    stats = compute_latent_stats(means)
    assert stats["shift"].shape == stats["scale"].shape == (6,)
    z = normalize(means, stats)
    flat = z.reshape(-1, 6)
    np.testing.assert_allclose(flat.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(flat.std(0), 1.0, atol=1e-3)
    np.testing.assert_allclose(denormalize(z, stats), means, atol=1e-4)


def test_bad_inputs_raise_clear_errors(vae):
    with pytest.raises(ValueError, match="not divisible by spatial_down"):
        vae.encode(jnp.zeros((1, 5, 30, 32, 3)))
    with pytest.raises(ValueError, match=r"\(B, T, H, W, 3\)"):
        vae.encode(jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match="num_frames"):
        vae.decode(jnp.zeros((1, 2, 8, 8, 4)), num_frames=6)
    with pytest.raises(ValueError, match="power of two"):
        VideoVAE(spatial_down=6, rngs=nnx.Rngs(0))


def test_from_config_and_logical_axes():
    cfg = get_base_config().vae
    model = nnx.eval_shape(lambda: VideoVAE.from_config(cfg, nnx.Rngs(0)))
    assert model.latent_shape(16, 32, 32) == (5, 8, 8, cfg.latent_channels)
    params = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(params):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var.get_value().ndim, path
        assert names[-1] == "conv_out", path


def test_vae_loss_trains_on_a_fixed_batch():
    model = VideoVAE(
        spatial_down=4, temporal_down=4, latent_channels=4, channels=8, rngs=nnx.Rngs(0)
    )
    x = _video((2, 5, 16, 16, 3), seed=7)
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, rng):
        (_, metrics), grads = nnx.value_and_grad(losses.vae_loss, has_aux=True)(model, x, rng, 1e-6)
        opt.update(model, grads)
        return metrics

    first = step(model, opt, jax.random.key(0))
    assert set(first) >= {"loss", "recon", "kl", "psnr"}
    for i in range(1, 20):
        last = step(model, opt, jax.random.key(i))
    assert float(last["loss"]) < 0.7 * float(first["loss"])
    assert float(last["psnr"]) > float(first["psnr"]) + 1.0


def test_psnr_and_ssim():
    x = _video((2, 3, 32, 32, 3), seed=8)
    assert float(losses.psnr(x, x)) == np.inf
    np.testing.assert_allclose(float(losses.ssim(x, x)), 1.0, atol=1e-5)
    noise = jax.random.normal(jax.random.key(9), x.shape)
    scores = [
        (float(losses.psnr(x + s * noise, x)), float(losses.ssim(x + s * noise, x)))
        for s in (0.02, 0.1, 0.4)
    ]
    psnrs, ssims = zip(*scores)
    assert psnrs[0] > psnrs[1] > psnrs[2]
    assert 1.0 > ssims[0] > ssims[1] > ssims[2]
    # PSNR of a known error: a constant offset of 0.2 in [-1, 1] is 0.1 in [0, 1] -> 20 dB.
    np.testing.assert_allclose(float(losses.psnr(x + 0.2, x)), 20.0, atol=1e-3)


def test_kl_divergence_zero_for_standard_normal():
    mean = jnp.zeros((2, 3, 4))
    np.testing.assert_allclose(losses.kl_divergence(mean, jnp.zeros_like(mean)), 0.0, atol=1e-7)
    assert float(losses.kl_divergence(mean + 1.0, jnp.zeros_like(mean))[0]) == pytest.approx(6.0)


def test_random_crops_are_aligned_slices_of_each_clip():
    from vdiff.train.stages import random_crops

    x = jnp.arange(4 * 3 * 12 * 10 * 2, dtype=jnp.float32).reshape(4, 3, 12, 10, 2)
    offsets = set()
    for seed in range(8):
        out = np.asarray(random_crops(x, jax.random.key(seed), 6, 2))
        assert out.shape == (4, 3, 6, 6, 2)
        for b in range(4):
            # Values encode their position: the crop's corner says where it was cut.
            y, x0 = divmod(int(out[b, 0, 0, 0, 0]) // 2 % (12 * 10), 10)
            assert y % 2 == 0 and x0 % 2 == 0 and y <= 6 and x0 <= 4
            np.testing.assert_array_equal(out[b], np.asarray(x[b, :, y : y + 6, x0 : x0 + 6]))
            offsets.add((y, x0))
    assert len(offsets) > 4  # offsets differ between clips and draws


def _train_vae_stage(tmp_path, name: str, overrides: list[str]):
    """The main job's video-VAE stage on 16 random 8-frame 16x16 clips, 4 steps, checkpoints
    every 2."""
    from data_pipelines.stream import BatchStream
    from vdiff.config import load_config
    from vdiff.parallel.mesh import make_mesh
    from vdiff.train.checkpoint import Checkpointer
    from vdiff.train.stages import train_video_vae

    small = ["data.resolution=16", "data.frames=8", "data.buckets=((16, 16, 8),)", "vae.channels=8"]
    config = load_config("tiny:smoke", [*small, "vae.steps=4", "train.ckpt_every=2", *overrides])
    mesh = make_mesh(config)
    video = np.random.default_rng(0).integers(0, 256, (16, 8, 16, 16, 3), dtype=np.uint8)

    class Data:  # the stage's one call into vdiff.train.data.Data, over these clips
        def stream(self, split, fields, *, batch_sizes, seed, images=True):
            assert split == "train" and fields == {"video": "video"}
            return BatchStream(
                len(video), lambda pos, i: {"video": video[i]}, batch_size=batch_sizes["16x16x8"],
                seed=seed, process_index=0, process_count=1,
            )  # fmt: skip

    data = Data()
    trained, summary = train_video_vae(config, tmp_path / name, mesh, data)
    engine, state = trained.engine, trained.state
    leaves = lambda s: [np.asarray(x) for x in jax.tree.leaves(s["params"])]  # noqa: E731
    ckpt = Checkpointer(tmp_path / name / "checkpoints" / "vae")
    at2 = None
    if 2 in ckpt.all_steps():
        at2 = leaves(ckpt.restore(engine.abstract_state, engine.state_shardings, step=2)[1])
    ckpt.close()
    return at2, leaves(state), summary


def test_vae_crop_phase_then_whole_frames(tmp_path):
    from vdiff.train.stages import vae_crop_steps

    two_phase = _train_vae_stage(tmp_path, "two", ["vae.train_crop=8", "vae.full_frame_steps=2"])
    crops = _train_vae_stage(tmp_path, "crops", ["vae.train_crop=8"])
    assert two_phase[2]["crop_steps"] == 2 and two_phase[2]["end_step"] == 4
    assert two_phase[2]["full_frame_start_step"] == 2 and two_phase[2]["start_step"] == 0
    assert crops[2]["crop_steps"] == 4
    # Steps 1-2 are the crop run's own steps (same init, batches and noise) ...
    for a, b in zip(two_phase[0], crops[0]):
        np.testing.assert_array_equal(a, b)
    # ... and steps 3-4, resumed from that checkpoint, are not: they see whole frames.
    assert any(not np.array_equal(a, b) for a, b in zip(two_phase[1], crops[1]))
    # Out of time inside the crop phase: the stage ends there (no whole-frame step), and
    # the rerun finishes the crops first, ending exactly where the uninterrupted run did.
    flags = ["vae.train_crop=8", "vae.full_frame_steps=2"]
    cut = _train_vae_stage(tmp_path, "cut", [*flags, "train.time_budget_s=1e-6"])
    assert cut[2]["end_step"] == 1 and "full_frame_start_step" not in cut[2]
    rerun = _train_vae_stage(tmp_path, "cut", flags)
    assert rerun[2]["start_step"] == 1 and rerun[2]["full_frame_start_step"] == 2
    for a, b in zip(rerun[1], two_phase[1]):
        np.testing.assert_array_equal(a, b)
    cfg = get_base_config().vae
    cfg.steps, cfg.train_crop, cfg.full_frame_steps = 10, 16, 12
    assert vae_crop_steps(cfg) == 0  # more whole-frame steps than steps: whole frames only
