"""The DiT train step on meshes of 8 fake CPU devices equals the 1-device step.

A tiny DiT (width 64, depth 2, video + joint text) runs two Engine steps
(the warmup schedule gives lr = 0 on the first, so the second moves the weights)
from the same initial state on every mesh; losses, gradient norms and the updated
parameters must match the 1-device run. The parameters are perturbed first so the
adaLN-Zero gates are not zero: with zero gates most of the network gets no gradient
and sharding mistakes inside the blocks could hide.

Speed: the 1-device engine initialises the state once; every mesh gets a copy placed
with ``jax.device_put`` onto its engine's state shardings. The engine's own jitted step
(``Engine.lower``: same in/out shardings and donation as ``Engine.step``) is compiled
with LLVM optimisation off, which halves XLA:CPU compile time and changes no float
semantics.
"""

import jax
import numpy as np
import pytest
from flax import nnx

from vdiff.config import load_config
from vdiff.parallel.mesh import make_mesh
from vdiff.train.stages import dit_engine

MESHES = {
    "one": dict(data=1),
    "data8": dict(data=8),
    "fsdp8": dict(fsdp=8),
    "d2f2t2": dict(data=2, fsdp=2, tensor=2),
    "d2c4": dict(data=2, context=4),
    "c8_ulysses_ring": dict(context=8),
}
# model.attention per mesh (default "auto": on d2c4 Ulysses for the self-attention, 4 heads
# over 4 context devices, and the ring for the cross-attention to the text); c8: 4 heads
# over 8 context devices -> all-to-all in groups of 4, ring of 2.
ATTENTION = {"c8_ulysses_ring": "ulysses_ring"}
FAST_COMPILE = {"xla_backend_optimization_level": 0}
BATCH = 8
# Video latents (2, 4, 4, 4) with 1x2x2 patches = 8 tokens + 7 caption tokens: 15 joint
# tokens, not a multiple of context=4 (the ring pads to 16). The audio stream is left
# out to halve compile time: it is the same StreamLayer code as video and text, and
# tests/test_dit.py checks the sharded forward pass with audio.
VIDEO, TEXT = (2, 4, 4, 4), 7


def tiny_config(mesh_shape, attention="auto"):
    cfg = load_config("tiny")
    m = cfg.model
    m.width, m.depth, m.heads, m.mlp_ratio = 64, 2, 4, 2.0
    # 4 text heads too: explicit Ulysses splits every attention's heads over the context.
    m.text_width, m.text_depth, m.text_heads = 32, 1, 4
    m.attention = attention
    cfg.vae.latent_channels = cfg.audio_ae.latent_channels = 4
    cfg.data.vocab_size = 64
    cfg.data.audio = False
    t = cfg.train
    t.lr, t.warmup, t.steps, t.batch_size, t.ema_decay = 1e-3, 1, 10, BATCH, 0.9
    t.optimizer = "adamw"  # the tiny recipe's Muon: tests/test_muon.py (same meshes' logic)
    for axis in ("data", "fsdp", "tensor", "context"):
        cfg.mesh.shape[axis] = mesh_shape.get(axis, 1)
    return cfg


def batch():
    r = np.random.default_rng(0)
    lengths = np.array([7, 3, 0, 5, 7, 1, 4, 6])  # one empty caption
    return {
        "video_latents": r.standard_normal((BATCH, *VIDEO)).astype(np.float32),
        "tokens": r.integers(1, 64, (BATCH, TEXT)).astype(np.int32),
        "mask": np.arange(TEXT)[None] < lengths[:, None],
    }


def engine_for(name, devices):
    shape = MESHES[name]
    cfg = tiny_config(shape, ATTENTION.get(name, "auto"))
    return dit_engine(cfg, make_mesh(cfg, devices[: int(np.prod(list(shape.values())))]))


def perturbed_initial_state(engine):
    """Host copy of ``engine``'s initial state, parameters and EMA perturbed."""
    state = jax.tree.map(np.asarray, engine.init(0))
    rng = np.random.default_rng(1)
    leaves, treedef = jax.tree.flatten(state["params"])
    params = [x + 0.1 * rng.standard_normal(x.shape).astype(x.dtype) for x in leaves]
    state["params"] = jax.tree.unflatten(treedef, params)
    state["ema"] = jax.tree.unflatten(treedef, [p.copy() for p in params])
    return state


@pytest.fixture(scope="module")
def initial_state(devices):
    return perturbed_initial_state(engine_for("one", devices))


@pytest.fixture(scope="module")
def compiled(devices, initial_state):
    """``name -> (engine, compiled step)``, built once per mesh for all tests here."""
    cache = {}

    def get(name):
        if name not in cache:
            engine = engine_for(name, devices)
            state = jax.device_put(initial_state, engine.state_shardings)
            cache[name] = engine, engine.lower(state, batch()).compile(FAST_COMPILE)
        return cache[name]

    return get


def train(name, compiled, initial_state, steps=2):
    engine, step = compiled(name)
    state = jax.device_put(initial_state, engine.state_shardings)
    metrics = []
    for _ in range(steps):
        state, m = step(state, batch())
        metrics.append({k: float(v) for k, v in m.items()})
    return state, metrics


@pytest.fixture(scope="module")
def reference(compiled, initial_state):
    return train("one", compiled, initial_state)


@pytest.mark.parametrize("name", ["data8", "fsdp8", "d2f2t2", "d2c4", "c8_ulysses_ring"])
def test_dit_step_matches_one_device(compiled, initial_state, reference, name):
    ref_state, ref_metrics = reference
    state, metrics = train(name, compiled, initial_state)
    hlo = compiled(name)[1].as_text()
    if name == "d2c4":  # the cross-attention's ring: K/V blocks pass between devices
        ring = [
            line
            for line in hlo.splitlines()
            if "collective-permute(" in line and "ppermute" in line
        ]
        assert len(ring) >= 2 * (4 - 1)  # K and V, context - 1 hops, per attention
    if name in ("d2c4", "c8_ulysses_ring"):  # Ulysses: sequence <-> heads swaps, q/k/v and out
        assert hlo.count("all-to-all(") + hlo.count("all-to-all-start(") >= 4
    # Tolerance (float32): shards reorder reductions and the ring sums attention blocks in
    # another order. Observed: <= 3e-7 relative on the loss and gradient norm, <= 1.3e-6 on
    # the weights (Adam's division by sqrt(v) amplifies noise on near-zero gradients).
    for m, r in zip(metrics, ref_metrics):
        assert m["finite"] == 1.0
        np.testing.assert_allclose(m["loss"], r["loss"], rtol=1e-5)
        np.testing.assert_allclose(m["grad_norm"], r["grad_norm"], rtol=1e-5)
    flat = nnx.to_flat_state(state["params"])
    ref_flat = nnx.to_flat_state(ref_state["params"])
    for (path, a), (_, b) in zip(flat, ref_flat):
        np.testing.assert_allclose(a.get_value(), b.get_value(), atol=1e-5, err_msg=str(path))
    # The weights really moved (lr 1e-3 on the second step), so equality means something.
    start = jax.tree.leaves(initial_state["params"])
    moved = max(float(np.abs(b.get_value() - s).max()) for (_, b), s in zip(ref_flat, start))
    assert moved > 5e-4


def test_fsdp_argument_bytes_are_split(compiled):
    """Per-device param + optimizer + EMA bytes of the compiled step: fsdp=8 vs data=8.

    ``memory_analysis`` reports one device's program; the batch is sharded the same
    way on both meshes (8 examples over 8 devices), so its bytes are subtracted.
    """
    per_device_batch = sum(x.nbytes // 8 for x in jax.tree.leaves(batch()))

    def state_bytes(name):
        mem = compiled(name)[1].memory_analysis()
        return mem.argument_size_in_bytes - per_device_batch

    replicated, sharded = state_bytes("data8"), state_bytes("fsdp8")
    engine = compiled("data8")[0]
    total = sum(
        int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(engine.abstract_state)
    )
    assert abs(replicated - total) <= 64  # data=8 holds everything on every device
    assert sharded <= 1.15 * replicated / 8, (sharded, replicated)
