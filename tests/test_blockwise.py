"""Blockwise attention (O(L) memory) against the einsum reference, and masks as token ids."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vdiff.models import blockwise
from vdiff.models.attention import attention, fused_attention, resolve_backend
from vdiff.models.blockwise import blockwise_attention
from vdiff.models.token_mask import TokenMask, stream_mask

B, H, D = 4, 2, 8
LENS = {"video": 37, "audio": 11, "text": 9}
L = sum(LENS.values())


def _qkv(seed=0, lq=L, lk=L):
    rng = np.random.default_rng(seed)
    shapes = ((B, lq, H, D), (B, lk, H, D), (B, lk, H, D), (B, lq, H, D))
    return [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]


def _stream_mask():
    """Text padding (example 1 has an empty caption), example 2 without sound, and the
    cross-modal ablation on examples 1 and 3: example 1's text rows then see no key."""
    rng = np.random.default_rng(1)
    text = jnp.asarray(rng.random((B, LENS["text"])) < 0.6).at[1].set(False)
    audio = jnp.asarray([True, True, False, True])
    valid = {"audio": jnp.broadcast_to(audio[:, None], (B, LENS["audio"])), "text": text}
    return stream_mask(LENS, valid, jnp.asarray([True, False, True, False]), B)


def _both(mask, **blocks):
    """(reference, blockwise) attention as functions of q, k, v."""
    scale = D**-0.5

    def ref(q, k, v):
        return attention(q, k, v, mask.dense(), backend="xla", scale=scale)

    def blk(q, k, v):
        return blockwise_attention(q, k, v, mask, scale=scale, **blocks)

    return ref, blk


def _assert_same(ref, fn, qkv, w, *, atol, grad_atol):
    """``fn`` equals ``ref`` on ``qkv``, and so do the gradients of ``sum(out * w)``."""
    np.testing.assert_allclose(fn(*qkv), ref(*qkv), rtol=0, atol=atol)
    grads = [
        jax.grad(lambda *a, f=f: jnp.sum(f(*a) * w), argnums=(0, 1, 2))(*qkv) for f in (ref, fn)
    ]
    for a, b in zip(*grads):
        np.testing.assert_allclose(b, a, rtol=0, atol=grad_atol)


@pytest.mark.parametrize("blocks", [dict(block_q=16, block_k=8), dict(block_q=64, block_k=64)])
@pytest.mark.parametrize("group", [(4, 2), (2, 2), (1, 1)])
def test_forward_and_gradients_match_the_reference(blocks, group, monkeypatch):
    """Also in groups of (examples, heads): the tiles of 4 x 2 at once, or looped."""
    tile = 4 * blocks["block_q"] * blocks["block_k"]
    monkeypatch.setattr(blockwise, "GROUP_TILE_BYTES", group[0] * group[1] * tile)
    assert blockwise._split(B, H, blocks["block_q"], blocks["block_k"]) == group
    q, k, v, w = _qkv()
    mask = _stream_mask()
    ref, blk = _both(mask, **blocks)
    _assert_same(ref, blk, (q, k, v), w, atol=2e-6, grad_atol=5e-6)


@pytest.mark.parametrize("lengths", [(64, 64), (57, 45)])
def test_no_mask_matches_the_reference(lengths, monkeypatch):
    """``mask=None`` (nothing masked: no per-tile masking), with and without padded tails."""
    monkeypatch.setattr(blockwise, "GROUP_TILE_BYTES", 4 * 16 * 16 * 2)  # (1, 2) a group
    q, k, v, w = _qkv(seed=6, lq=lengths[0], lk=lengths[1])

    def ref(q, k, v):
        return attention(q, k, v, None, backend="xla", scale=D**-0.5)

    def blk(q, k, v):
        return blockwise_attention(q, k, v, None, scale=D**-0.5, block_q=16, block_k=16)

    _assert_same(ref, blk, (q, k, v), w, atol=2e-6, grad_atol=5e-6)


def test_all_masked_rows_are_zero_with_zero_gradient():
    q, k, v, w = _qkv()
    mask = _stream_mask()
    _, blk = _both(mask, block_q=16, block_k=8)
    out = blk(q, k, v)
    rows = slice(LENS["video"] + LENS["audio"], L)  # example 1's text rows (cross-modal off)
    assert not np.asarray(mask.dense()[1, 0, rows]).any()
    np.testing.assert_array_equal(out[1, rows], 0.0)
    dq = jax.grad(lambda q: jnp.sum(blk(q, k, v) * w))(q)
    np.testing.assert_array_equal(dq[1, rows], 0.0)
    assert np.isfinite(np.asarray(dq)).all()


def test_masks_as_ids_cut_exactly_the_audio_video_pairs():
    m = _stream_mask().dense()[:, 0]
    v, a, t = slice(0, 37), slice(37, 48), slice(48, 57)
    assert m[0, v, a].all() and not m[1, v, a].any() and not m[1, a, v].any()
    assert not m[2, :, a].any()  # no sound in example 2: its audio keys are hidden
    assert m[1, t, t].sum() == 0 and m[3, v, t].any() and not m[3, t, v].any()


def test_cross_attention_lengths_and_key_padding():
    q, k, v, _ = _qkv(lq=70, lk=13)
    valid = jnp.arange(13)[None] < jnp.asarray([13, 5, 0, 1])[:, None]
    ref = attention(q, k, v, valid, backend="xla")
    out = attention(q, k, v, valid, backend="blockwise")
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-6)
    np.testing.assert_array_equal(out[2], 0.0)


@pytest.mark.parametrize("kind", ["key_padding", "bool_padding", "streams", "none"])
def test_fused_attention_takes_key_lengths_for_key_padding(kind, monkeypatch):
    """The cuDNN path's mask handling, run through dot_product_attention's xla
    implementation: key padding with holes (audio keys of a silent clip sit mid-sequence)
    becomes valid-keys-first + key_value_seq_lengths; an example with no valid key is 0."""
    q, k, v, w = _qkv(seed=7)
    rng = np.random.default_rng(8)
    valid = jnp.asarray(rng.random((B, L)) < 0.5).at[2].set(False).at[0].set(True)
    mask = {
        "key_padding": TokenMask.key_padding(valid, L),
        "bool_padding": valid,
        "streams": _stream_mask(),
        "none": None,
    }[kind]
    dense = None if mask is None else (valid if kind == "bool_padding" else mask.dense())

    def ref(q, k, v):
        return attention(q, k, v, dense, backend="xla", scale=D**-0.5)

    def fused(q, k, v):
        return fused_attention(q, k, v, mask, scale=D**-0.5, implementation="xla")

    calls = []
    kernel = jax.nn.dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    _assert_same(ref, fused, (q, k, v), w, atol=2e-6, grad_atol=5e-6)
    if kind in ("key_padding", "bool_padding"):  # lengths, and no (Lq, Lk) mask
        assert calls[0].get("mask") is None and calls[0]["key_value_seq_lengths"] is not None
        np.testing.assert_array_equal(fused(q, k, v)[2], 0.0)
    elif kind == "streams":
        assert calls[0]["mask"].shape[-2:] == (L, L)


def test_auto_picks_blockwise_off_gpu_for_long_sequences_only():
    assert resolve_backend("auto", jnp.float32, 64, (600, 600)) == "blockwise"
    assert resolve_backend("auto", jnp.float32, 64, (300, 32)) == "xla"  # one tile: same math
    with pytest.raises(ValueError, match="TokenMask or \\(B, Lk\\) key padding"):
        q, k, v, _ = _qkv()
        attention(q, k, v, _stream_mask().dense(), backend="blockwise")


def test_sharded_over_8_devices_matches_one_device(devices):
    q, k, v, w = _qkv(seed=3)
    mask = _stream_mask()
    mesh = jax.sharding.Mesh(np.asarray(devices).reshape(4, 2), ("data", "tensor"))
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    heads = P("data", None, "tensor", None)
    qs, ks, vs = (put(x, heads) for x in (q, k, v))
    ms = jax.tree.map(lambda x: put(x, P("data", *([None] * (x.ndim - 1)))), mask)

    def loss(q, k, v, m):
        return jnp.sum(blockwise_attention(q, k, v, m, scale=D**-0.5, block_q=16, block_k=16) * w)

    one = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v, mask)
    eight = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(qs, ks, vs, ms)
    np.testing.assert_allclose(eight[0], one[0], rtol=1e-6)
    for a, b in zip(one[1], eight[1]):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)


def test_dit_step_with_blockwise_matches_xla():
    from test_dit import build, inputs

    x = inputs(batch=2)

    def loss(model):
        @nnx.jit
        def f(m):
            rest = {k: v for k, v in x.items() if k not in ("video", "t_video", "tokens", "mask")}
            vv, va = m(x["video"], x["t_video"], x["tokens"], x["mask"], **rest)
            return jnp.sum(vv**2) + jnp.sum(va**2)

        return nnx.value_and_grad(f)(model)

    ref_loss, ref_grads = loss(build(attention="xla"))
    blk_loss, blk_grads = loss(build(attention="blockwise"))
    np.testing.assert_allclose(blk_loss, ref_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(ref_grads), jax.tree.leaves(blk_grads)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_token_mask_pad_hides_padded_keys_and_rows():
    m = TokenMask.key_padding(jnp.asarray([[True, False, True]]), 2).pad(4, 5).dense()[0, 0]
    assert m.tolist() == [[True, False, True, False, False]] * 2 + [[False] * 5] * 2


# ----------------------------------------------------------------------------- splash


@pytest.mark.parametrize("lengths", [(200, 200), (150, 40)])
def test_splash_in_interpret_mode_matches_the_reference(lengths):
    from vdiff.models.splash import splash_attention

    lq, lk = lengths
    q, k, v, _ = _qkv(seed=4, lq=lq, lk=lk)
    w = jnp.asarray(np.random.default_rng(5).standard_normal(q.shape), jnp.float32)
    valid = jnp.arange(lk)[None] < jnp.asarray([lk, 7, 0, lk // 2])[:, None]  # one empty row set
    mask = TokenMask.key_padding(valid, lq)
    scale = D**-0.5

    def ref(q, k, v):
        return attention(q, k, v, valid, backend="xla", scale=scale)

    def spl(q, k, v):
        return splash_attention(q, k, v, mask, scale=scale, interpret=True)

    _assert_same(ref, spl, (q, k, v), w, atol=2e-6, grad_atol=1e-5)
    np.testing.assert_array_equal(spl(q, k, v)[2], 0.0)


def test_splash_refuses_the_cross_modal_ablation_and_the_cpu():
    from vdiff.models.splash import splash_attention

    q, k, v, _ = _qkv()
    with pytest.raises(ValueError, match="key-padding masks"):
        splash_attention(q, k, v, _stream_mask(), scale=1.0, interpret=True)
    with pytest.raises(ValueError, match="TPU splash attention"):
        resolve_backend("splash", jnp.float32, D, (L, L))


def test_save_dots_attention_keeps_the_output_instead_of_rerunning_the_forward():
    from vdiff.models.dit import remat_policy

    q, k, v, w = _qkv(seed=9)

    def grad_fn(policy):
        def attn(q, k, v):
            return blockwise_attention(q, k, v, None, scale=D**-0.5, block_q=16, block_k=16)

        f = jax.checkpoint(attn, policy=remat_policy(policy))
        return jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * w), argnums=(0, 1, 2))

    # The online softmax's running max is forward-only: once per forward pass in the program.
    passes = {
        p: str(jax.make_jaxpr(grad_fn(p))(q, k, v)).count("reduce_max")
        for p in ("save_dots", "save_dots_attention")
    }
    assert passes["save_dots"] == 2 * passes["save_dots_attention"] > 0
    for a, b in zip(grad_fn("save_dots")(q, k, v), grad_fn("save_dots_attention")(q, k, v)):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
