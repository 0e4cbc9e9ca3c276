"""Diffusion transformer: patches, masking, scan/remat, text paths, sharding, FLOPs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vdiff.config import load_config
from vdiff.models.dit import DiT, patchify, patchify_audio, unpatchify, unpatchify_audio
from vdiff.models.flops import (
    dit_forward_flops,
    param_count,
    text_encoder_flops,
    train_flops_per_example,
)
from vdiff.models.rope import ABS_FEATURES
from vdiff.parallel import sharding
from vdiff.parallel.mesh import make_mesh
from vdiff.train.stages import dit_sizes

B, VSHAPE, TA, L = 2, (3, 4, 4, 4), 12, 6


def rngs(seed):
    # The "unsafe_rbg" generator compiles much faster than threefry on CPU.
    return nnx.Rngs(jax.random.key(seed, impl="unsafe_rbg"))


def small_cfg(**model):
    cfg = load_config("tiny")
    m = cfg.model
    m.width, m.depth, m.heads, m.mlp_ratio = 32, 2, 2, 2.0
    m.text_width, m.text_depth, m.text_heads = 32, 1, 2
    m.attention = "xla"
    # The model's own defaults, not the tiny recipe's choices (cross text, 2-latent audio tokens).
    m.patch, m.audio_patch, m.text_attention, m.abs_pos = (1, 2, 2), 1, "joint", False
    cfg.vae.latent_channels = cfg.audio_ae.latent_channels = 4
    cfg.data.vocab_size = 64
    for k, v in model.items():
        m[k] = v
    return cfg


def dit_from(cfg, rngs, **overrides):
    return DiT.from_config(cfg.model, dit_sizes(cfg), rngs, **overrides)


def randomize(model, seed=0, scale=0.1):
    """Perturbs every parameter so zero-initialised gates/outputs do not hide effects.

    Host-side numpy noise: jax.random on 80 shapes would spend seconds compiling.
    """
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    new = [x + scale * rng.standard_normal(x.shape).astype(x.dtype) for x in leaves]
    nnx.update(model, jax.tree.unflatten(treedef, new))
    return model


def build(seed=0, **model):
    return randomize(dit_from(small_cfg(**model), rngs(seed)), seed)


def inputs(seed=0, batch=B):
    k = jax.random.split(jax.random.key(seed), 4)
    tokens = jax.random.randint(k[0], (batch, L), 1, 64)
    mask = jnp.arange(L)[None] < jnp.array([4, 6, 2, 5, 1, 6, 3, 4][:batch])[:, None]
    return dict(
        video=jax.random.normal(k[1], (batch, *VSHAPE)),
        t_video=jax.random.uniform(k[2], (batch,)),
        tokens=tokens,
        mask=mask,
        audio=jax.random.normal(k[3], (batch, TA, 4)),
        t_audio=jax.random.uniform(k[2], (batch,)) * 0.5,
    )


_JITTED = {}


def call(model, x, **kw):
    """Jitted forward (one compiled function per set of static keyword options)."""
    key = tuple(sorted(kw.items()))
    if key not in _JITTED:

        @nnx.jit
        def f(m, xin):
            rest = {k: v for k, v in xin.items() if k not in ("video", "t_video", "tokens", "mask")}
            return m(xin["video"], xin["t_video"], xin["tokens"], xin["mask"], **rest, **kw)

        _JITTED[key] = f
    return _JITTED[key](model, x)


@pytest.mark.parametrize("patch", [(1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 1, 4)])
def test_patchify_round_trip(patch):
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8, 3))
    tok = patchify(x, patch)
    n = (4 // patch[0]) * (4 // patch[1]) * (8 // patch[2])
    assert tok.shape == (2, n, int(np.prod(patch)) * 3)
    # First token = the top-left-first patch, flattened (t, h, w, c).
    first = x[0, : patch[0], : patch[1], : patch[2], :].reshape(-1)
    np.testing.assert_array_equal(tok[0, 0], first)
    np.testing.assert_array_equal(unpatchify(tok, patch, x.shape[1:]), x)


def test_patchify_rejects_indivisible_and_audio_round_trip():
    with pytest.raises(ValueError, match="not divisible"):
        patchify(jnp.zeros((1, 3, 4, 4, 2)), (2, 2, 2))
    a = jax.random.normal(jax.random.key(1), (2, 12, 5))
    np.testing.assert_array_equal(unpatchify_audio(patchify_audio(a, 3), 3), a)
    with pytest.raises(ValueError, match="audio_patch"):
        patchify_audio(a, 5)


def test_output_shapes_zero_init_and_partition_names():
    model = dit_from(small_cfg(), rngs(0))
    x = inputs()
    vv, va = call(model, x)
    assert vv.shape == x["video"].shape and va.shape == x["audio"].shape
    # adaLN-Zero / zero output layer: the untrained model predicts zero velocity.
    assert float(jnp.abs(vv).max()) == 0.0 and float(jnp.abs(va).max()) == 0.0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var.get_value().ndim, path
        if path[0] == "blocks":
            assert names[0] == "layers", path


def test_scanned_equals_unscanned_and_remat_keeps_gradients():
    scanned = build(scan_layers=True)
    x = inputs()
    unscanned = dit_from(small_cfg(scan_layers=False), rngs(5))
    nnx.update(unscanned, nnx.state(scanned))
    for a, b in zip(call(scanned, x), call(unscanned, x)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)

    def loss(m):  # video only: a smaller backward graph compiles faster
        vv, _ = m(x["video"], x["t_video"], x["tokens"], x["mask"])
        return jnp.sum(vv**2)

    remat = dit_from(small_cfg(), rngs(5), remat="full")
    nnx.update(remat, nnx.state(scanned))
    g_ref = nnx.jit(nnx.grad(loss))(scanned)
    g_remat = nnx.jit(nnx.grad(loss))(remat)
    for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_ref)) > 0


def test_cross_modal_masking_only_cuts_audio_video_paths():
    model = build()
    x = inputs()
    x_alt_audio = dict(x, audio=x["audio"] + 1.0)
    x_alt_video = dict(x, video=x["video"] + 1.0)
    on, off = call(model, x, cross_modal=True), call(model, x, cross_modal=False)
    assert float(jnp.abs(on[0] - off[0]).max()) > 1e-3
    assert float(jnp.abs(on[1] - off[1]).max()) > 1e-3
    # With the mask on, neither modality can see the other ...
    off_a, off_v = (
        call(model, x_alt_audio, cross_modal=False),
        call(model, x_alt_video, cross_modal=False),
    )
    np.testing.assert_allclose(off_a[0], off[0], atol=1e-5)
    np.testing.assert_allclose(off_v[1], off[1], atol=1e-5)
    # ... while without it they do.
    assert float(jnp.abs(call(model, x_alt_audio)[0] - on[0]).max()) > 1e-3
    # Without audio tokens the flag has nothing to cut.
    no_audio = {k: v for k, v in x.items() if k not in ("audio", "t_audio")}
    a, b = call(model, no_audio, cross_modal=True), call(model, no_audio, cross_modal=False)
    np.testing.assert_allclose(a[0], b[0], atol=1e-6)
    assert a[1] is None
    # Text still conditions both modalities with the mask on.
    other_text = call(model, dict(x, tokens=(x["tokens"] + 7) % 64), cross_modal=False)
    assert float(jnp.abs(other_text[0] - off[0]).max()) > 1e-3
    assert float(jnp.abs(other_text[1] - off[1]).max()) > 1e-3


def test_audio_mask_hides_audio_of_that_example():
    model = build()
    x = dict(inputs(), audio_mask=jnp.array([False, True]))
    alt = dict(x, audio=x["audio"] + 1.0)
    a, b = call(model, x), call(model, alt)
    np.testing.assert_allclose(a[0][0], b[0][0], atol=1e-5)  # example 0: audio hidden
    assert float(jnp.abs(a[0][1] - b[0][1]).max()) > 1e-3  # example 1: audio seen


@pytest.mark.parametrize("text_attention", ["joint", "cross"])
def test_empty_caption_is_finite_and_ignores_masked_tokens(text_attention):
    model = build(text_attention=text_attention)
    x = inputs()
    empty = dict(x, mask=jnp.zeros_like(x["mask"]))
    out = call(model, empty)
    assert all(bool(jnp.isfinite(o).all()) for o in out)
    junk = call(model, dict(empty, tokens=(x["tokens"] * 3 + 1) % 64))
    for a, b in zip(out, junk):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # Padding positions of a real caption are ignored; visible tokens matter.
    pad_changed = x["tokens"].at[:, -1].set(63)  # last position is padding for example 0
    np.testing.assert_allclose(
        call(model, dict(x, tokens=pad_changed))[0][0], call(model, x)[0][0], atol=1e-6
    )
    assert float(jnp.abs(out[0] - call(model, x)[0]).max()) > 1e-3


def test_joint_time_shift_leaves_outputs_unchanged():
    # Text tokens carry no rotation, so in joint mode video<->text logits see absolute
    # time (clips start at 0 s); with cross-attention to text, only relative time exists.
    model = build(text_attention="cross")
    x = inputs()
    tv = jnp.array([0.0, 0.3125, 0.8125])
    ta = (jnp.arange(TA) + 0.5) / 25.0
    ref = call(model, dict(x, video_times=tv, audio_times=ta))
    shifted = call(model, dict(x, video_times=tv + 1.37, audio_times=ta + 1.37))
    for a, b in zip(ref, shifted):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
    # Moving audio alone in time changes the result (time really is in the attention).
    audio_only = call(model, dict(x, video_times=tv, audio_times=ta + 0.5))
    assert float(jnp.abs(audio_only[0] - ref[0]).max()) > 1e-4


# data x fsdp x tensor needs the constraints in StreamLayer.finish that work around an
# XLA partitioner miscompile (tests/test_xla_dot_permute.py).
MESHES = [dict(data=1, fsdp=4, tensor=2), dict(data=2, fsdp=2, tensor=2)]


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(f"{k}{v}" for k, v in s.items()))
def test_sharded_forward_matches_single_device(devices, shape):
    cfg = small_cfg()
    model = build()
    x = inputs(batch=8)
    ref = call(model, x)
    cfg.mesh.shape.update(dict(shape, context=1))
    mesh = make_mesh(cfg, devices)
    rules = cfg.mesh.rules
    with jax.set_mesh(mesh), sharding.axis_rules(rules):
        state = nnx.state(model)
        shardings = sharding.state_shardings(state, mesh, rules)
        nnx.update(model, jax.device_put(state, shardings))
        kernel = model.blocks.layers["video"].mlp.fc1.kernel.get_value()
        assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
        out = call(model, x)
    for a, b in zip(ref, out):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("abs_pos", [False, True])
def test_flops_match_compiled_forward_and_param_count(abs_pos):
    # Unscanned: XLA's cost analysis counts a while-loop body once, not per layer.
    cfg = small_cfg(scan_layers=False, abs_pos=abs_pos)
    model = build(scan_layers=False, abs_pos=abs_pos)
    x = inputs(batch=1)
    audio_kw = dict(audio=x["audio"], t_audio=x["t_audio"])
    graphdef, state = nnx.split(model)

    def fwd(state, x):
        m = nnx.merge(graphdef, state)
        return m(x["video"], x["t_video"], x["tokens"], x["mask"], **audio_kw)

    compiled = jax.jit(fwd).lower(state, x).compile()
    xla_flops = compiled.cost_analysis()["flops"]
    ours = dit_forward_flops(cfg, VSHAPE, TA, L) + text_encoder_flops(cfg, L)
    # XLA also counts norms, softmax and activations; matmuls dominate.
    assert 0.75 < ours / xla_flops <= 1.0, (ours, xla_flops)
    assert train_flops_per_example(cfg, VSHAPE, TA, L) == pytest.approx(3 * ours)
    # Adding 10 words to the vocabulary adds exactly 10 embedding rows.
    bigger = small_cfg(abs_pos=abs_pos)
    bigger.data.vocab_size += 10
    n0 = param_count(dit_from(cfg, rngs(0)))
    n1 = param_count(dit_from(bigger, rngs(0)))
    assert n1 - n0 == 10 * cfg.model.text_width
    if abs_pos:  # and the features' projection is what abs_pos adds
        without = param_count(dit_from(small_cfg(scan_layers=False), rngs(0)))
        assert n0 - without == (ABS_FEATURES + 1) * cfg.model.width


def test_per_example_cross_modal_flag_matches_the_global_flag():
    model = build()
    x = inputs()
    on, off = call(model, x, cross_modal=True), call(model, x, cross_modal=False)
    mixed = call(model, dict(x, cross_modal=jnp.array([True, False])))
    for stream in (0, 1):  # video, audio
        np.testing.assert_allclose(mixed[stream][0], on[stream][0], atol=1e-5)
        np.testing.assert_allclose(mixed[stream][1], off[stream][1], atol=1e-5)


def test_absolute_position_features_tell_edges_and_the_first_frame_apart():
    # RoPE is relative only: on a latent that is the same everywhere, every video token
    # attends to identical values and computes the same velocity. model.abs_pos gives
    # each token its distance from the edges and from the clip start.
    x = inputs()
    x["video"] = jnp.broadcast_to(x["video"][:, :1, :1, :1], x["video"].shape)
    del x["audio"], x["t_audio"]
    spread = {}
    for abs_pos in (False, True):
        v, _ = call(build(abs_pos=abs_pos, text_attention="cross"), x)
        tokens = patchify(v, (1, 2, 2))
        spread[abs_pos] = float(jnp.abs(tokens - tokens[:, :1]).max())
    assert spread[False] < 1e-5
    assert spread[True] > 1e-3
