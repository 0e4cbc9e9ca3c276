"""Ring (context-parallel) attention against full attention on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from vdiff.models.attention import attention, resolve_backend
from vdiff.models.token_mask import TokenMask
from vdiff.parallel import sharding
from vdiff.parallel.context import context_axis, ring_attention

AXES = ("data", "fsdp", "tensor", "context")
RULES = (("batch", ("data", "fsdp")), ("tokens", "context"), ("heads", "tensor"))
B, H, D = 4, 2, 8


def mesh_of(**sizes):
    shape = tuple(sizes.get(a, 1) for a in AXES)
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 4)


def qkv(lq, lk, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(k[0], (B, lq, H, D)),
        jax.random.normal(k[1], (B, lk, H, D)),
        jax.random.normal(k[2], (B, lk, H, D)),
    )


def masks(lq, lk):
    """None, key padding (incl. an empty row and keys only in the first block), 4-D random."""
    lengths = jnp.array([lk, 3, 0, lk // 2 + 1])
    key_pad = jnp.arange(lk)[None] < lengths[:, None]
    rand = jax.random.bernoulli(jax.random.key(7), 0.6, (B, 1, lq, lk))
    rand = rand.at[1, :, 2, :].set(False)  # one fully masked query row
    rng = np.random.default_rng(3)  # ids in 3 groups; example 1's group 2 reads nothing
    table = jnp.asarray(rng.random((B, 3, 3)) < 0.6).at[1, 2].set(False)
    ids = TokenMask(
        jnp.asarray(rng.integers(0, 3, (B, lq)), jnp.int32),
        jnp.asarray(rng.integers(0, 3, (B, lk)), jnp.int32),
        table,
    )
    return {"none": None, "key_padding": key_pad, "random_4d": rand, "token_ids": ids}


def loss(fn):
    return lambda q, k, v, m: jnp.sum(jnp.sin(fn(q, k, v, m)) * jnp.arange(D))


def ring_and_full(mesh, lq, lk, mask_name, seed=0):
    q, k, v = qkv(lq, lk, seed)
    mask = masks(lq, lk)[mask_name]

    def value_and_grads(fn):  # one compiled function for the output and its gradients
        return jax.jit(lambda *a: (fn(*a), jax.grad(loss(fn), argnums=(0, 1, 2))(*a)))

    full = value_and_grads(lambda *a: attention(*a, "xla"))(q, k, v, mask)
    with jax.set_mesh(mesh), sharding.axis_rules(RULES):
        ring = value_and_grads(ring_attention)(q, k, v, mask)
    return full, ring


# Tolerance: float32, the online softmax sums blocks in another order (observed < 1e-6).
TOL = dict(atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("mask_name", ["none", "key_padding", "random_4d", "token_ids"])
@pytest.mark.parametrize(
    "sizes,length",
    [(dict(data=2, context=4), 32), (dict(data=2, context=4), 30), (dict(context=8), 13)],
    ids=["d2c4-L32", "d2c4-L30-padded", "c8-L13-padded"],
)
def test_ring_equals_full_attention(devices, sizes, length, mask_name):
    (full, g_full), (ring, g_ring) = ring_and_full(mesh_of(**sizes), length, length, mask_name)
    assert ring.shape == full.shape
    np.testing.assert_allclose(ring, full, **TOL)
    for a, b in zip(g_ring, g_full):
        assert bool(jnp.isfinite(a).all())
        np.testing.assert_allclose(a, b, **TOL)


def test_ring_builds_no_full_mask_from_ids(devices):
    """With a TokenMask the ring holds ids and builds each block's mask: no (Lq, Lk) array."""
    q, k, v = qkv(32, 32)
    ids = masks(32, 32)["token_ids"]
    with jax.set_mesh(mesh_of(data=2, context=4)), sharding.axis_rules(RULES):
        hlo = jax.jit(ring_attention).lower(q, k, v, ids).as_text()
        dense = jax.jit(ring_attention).lower(q, k, v, ids.dense()).as_text()
    full = "x32x32xi1>"  # a (B, 1, 32, 32) boolean in the lowered module
    assert full in dense and full not in hlo


def test_masked_rows_are_zero_and_masked_keys_ignored(devices):
    mesh = mesh_of(data=2, context=4)
    q, k, v = qkv(30, 30)
    mask = masks(30, 30)["key_padding"]
    with jax.set_mesh(mesh), sharding.axis_rules(RULES):
        out = jax.jit(ring_attention)(q, k, v, mask)
        # Changing masked keys/values (example 1 sees only 3 keys) changes nothing.
        k2 = k.at[1, 3:].set(100.0)
        v2 = v.at[1, 3:].set(-50.0)
        out2 = jax.jit(ring_attention)(q, k2, v2, mask)
    np.testing.assert_array_equal(out[2], 0.0)  # example 2 has no valid key
    np.testing.assert_allclose(out2[1], out[1], atol=1e-6)
    assert float(jnp.abs(out[1]).max()) > 0.1


def test_cross_attention_lengths_and_tensor_heads(devices):
    """Lq != Lk (DiT cross-attention to text) with heads also sharded on tensor."""
    mesh = mesh_of(tensor=2, context=4)
    q, _, _ = qkv(22, 22, seed=1)
    _, k, v = qkv(9, 9, seed=2)
    mask = masks(22, 9)["key_padding"]
    full = attention(q, k, v, mask, "xla")
    with jax.set_mesh(mesh), sharding.axis_rules(RULES):
        ring = jax.jit(ring_attention)(q, k, v, mask)
    np.testing.assert_allclose(ring, full, **TOL)


def test_auto_backend_picks_ring_only_when_tokens_are_split(devices):
    q, k, v = qkv(16, 16)
    assert context_axis() is None
    assert resolve_backend("auto", jnp.float32, D) == "xla"
    assert resolve_backend("ring", jnp.float32, D) == "xla"  # one device: local path
    with jax.set_mesh(mesh_of(data=8)), sharding.axis_rules(RULES):
        assert context_axis() is None  # context=1: nothing to split
        assert resolve_backend("auto", jnp.float32, D) == "xla"
    mesh = mesh_of(data=2, context=4)
    with jax.set_mesh(mesh), sharding.axis_rules(RULES):
        assert context_axis() == "context"
        assert resolve_backend("auto", jnp.float32, D) == "ring"
        hlo = jax.jit(lambda *a: attention(*a, None, "auto")).lower(q, k, v).compile().as_text()
    # The ring passes K/V blocks between neighbours: 2 x (context - 1) permutes.
    assert hlo.count("collective-permute(") + hlo.count("collective-permute-start(") == 6
    with pytest.raises(ValueError, match="tokens"):
        ring_attention(q, k, v)


# ----------------------------------------------------------------------------- Ulysses


def _stream_mask(length):
    """Video, audio and text streams with text padding, one example without sound and the
    cross-modal ablation on two examples (one of them with an all-masked text row set)."""
    from vdiff.models.token_mask import stream_mask

    lens = {"video": length - 9, "audio": 5, "text": 4}
    text = jnp.arange(4)[None] < jnp.array([4, 0, 2, 3])[:, None]
    audio = jnp.broadcast_to(jnp.array([True, True, False, True])[:, None], (B, 5))
    return stream_mask(lens, {"audio": audio, "text": text}, jnp.array([1, 0, 1, 0], bool), B)


@pytest.mark.parametrize(
    "sizes,backend,heads",
    [
        (dict(data=2, context=4), "ulysses", 4),
        (dict(context=8), "ulysses", 8),
        (dict(context=8), "ulysses_ring", 4),  # all-to-all in groups of 4, ring of 2
        (dict(data=2, context=4), "ulysses_ring", 2),  # groups of 2, ring of 2
    ],
)
def test_ulysses_equals_full_attention(devices, sizes, backend, heads):
    length = 37  # not a multiple of the context size: padded
    k = jax.random.split(jax.random.key(5), 3)
    q, kk, v = (jax.random.normal(x, (B, length, heads, D)) for x in k)
    mask = _stream_mask(length)

    def value_and_grads(fn):
        return jax.jit(lambda *a: (fn(*a), jax.grad(loss(fn), argnums=(0, 1, 2))(*a)))

    full = value_and_grads(lambda *a: attention(*a, "xla"))(q, kk, v, mask)
    with jax.set_mesh(mesh_of(**sizes)), sharding.axis_rules(RULES):
        assert resolve_backend(backend, jnp.float32, D, (length, length), heads) == backend
        fn = value_and_grads(lambda *a: attention(*a, backend))
        out = fn(q, kk, v, mask)
        hlo = fn.lower(q, kk, v, mask).compile().as_text()
    assert hlo.count("all-to-all") >= 4  # q, k, v to heads and the output back
    if backend == "ulysses_ring":
        assert "collective-permute" in hlo
    np.testing.assert_allclose(out[0], full[0], **TOL)
    for a, b in zip(out[1], full[1]):
        np.testing.assert_allclose(a, b, **TOL)


def test_ulysses_needs_heads_divisible_by_the_context(devices):
    q, k, v = qkv(16, 16)  # 2 heads
    with jax.set_mesh(mesh_of(data=2, context=4)), sharding.axis_rules(RULES):
        assert resolve_backend("auto", jnp.float32, D, (16, 16), 2) == "ring"
        assert resolve_backend("auto", jnp.float32, D, (16, 16), 8) == "ulysses"
        with pytest.raises(ValueError, match="heads must divide"):
            attention(q, k, v, None, "ulysses")
