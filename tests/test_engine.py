"""The shared training engine on meshes of 8 fake CPU devices vs 1 device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _mp_worker import make_mlp

from vdiff.config import load_config
from vdiff.parallel.mesh import make_mesh
from vdiff.train.engine import Engine, NonFiniteError, OptimConfig


def mse(model, batch, rng):
    y = model(batch["x"])
    return jnp.mean((y - batch["y"]) ** 2), {"abs": jnp.mean(jnp.abs(y))}


def _batch(n=8, seed=0):
    x = np.random.RandomState(seed).randn(n, 16).astype(np.float32)
    return {"x": x, "y": np.sin(x)}


def _engine(mesh_shape, loss=mse, **kw):
    cfg = load_config("tiny")
    for axis in ("data", "fsdp", "tensor", "context"):
        cfg.mesh.shape[axis] = mesh_shape.get(axis, 1)
    n = int(np.prod(list(mesh_shape.values())))
    mesh = make_mesh(cfg, jax.devices()[:n])
    return Engine(
        make_mlp,
        loss,
        mesh,
        cfg.mesh.rules,
        OptimConfig(lr=1e-2, warmup=1, steps=10),
        ema_decay=0.9,
        **kw,
    )


def _train(engine, steps=3, batch=None):
    state = engine.init(0)
    for _ in range(steps):
        state, metrics = engine.step(state, batch or _batch())
    return state, metrics


@pytest.mark.parametrize(
    "mesh_shape",
    [dict(data=8), dict(fsdp=8), dict(data=2, fsdp=2, tensor=2), dict(data=2, context=4)],
)
def test_sharded_step_matches_one_device(devices, mesh_shape):
    ref_state, ref_m = _train(_engine(dict(data=1)))
    state, m = _train(_engine(mesh_shape))
    # Tolerance: float32 reductions reordered across shards (observed ~1e-7).
    np.testing.assert_allclose(float(m["loss"]), float(ref_m["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(ref_state["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    for a, b in zip(jax.tree.leaves(state["ema"]), jax.tree.leaves(ref_state["ema"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_params_and_optimizer_are_sharded_on_fsdp(devices):
    engine = _engine(dict(fsdp=8))
    state = engine.init(0)
    kernel = state["params"]["a"]["kernel"]
    assert kernel.sharding.spec[0] == "fsdp"
    assert kernel.addressable_shards[0].data.shape == (16 // 8, 64)
    mu = jax.tree.leaves(state["opt"])
    assert any(
        getattr(x, "shape", ()) == (16, 64) and x.addressable_shards[0].data.shape == (2, 64)
        for x in mu
    )


def test_fsdp_memory_is_split(devices):
    """Per-device parameter + optimizer bytes at fsdp=8 are <= 1.15 x (replicated / 8)."""

    def state_bytes(engine):
        state = engine.init(0)
        per_device = 0
        for x in jax.tree.leaves({k: state[k] for k in ("params", "opt", "ema")}):
            per_device += x.addressable_shards[0].data.nbytes
        return per_device

    replicated = state_bytes(_engine(dict(data=8)))
    sharded = state_bytes(_engine(dict(fsdp=8)))
    # Biases (64 and 16 floats) stay replicated; the kernels dominate.
    assert sharded <= 1.15 * replicated / 8 + 2 * 4 * (64 + 16) * 3


def test_microbatches_equal_one_big_batch(devices):
    one, m1 = _train(_engine(dict(data=2)), steps=2)
    acc, m4 = _train(_engine(dict(data=2), microbatches=4), steps=2)
    np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(acc["params"]), jax.tree.leaves(one["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_nonfinite_step_is_skipped_and_counted(devices):
    engine = _engine(dict(data=1), max_nonfinite=3)
    state = engine.init(0)
    state, _ = engine.step(state, _batch())
    before = jax.tree.map(np.asarray, state["params"])
    bad = _batch()
    bad["x"][0, 0] = np.nan
    state, m = engine.step(state, bad)
    assert float(m["finite"]) == 0.0 and int(m["skipped"]) == 1
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), b)
    state, m = engine.step(state, _batch())
    assert float(m["finite"]) == 1.0 and int(m["nonfinite_run"]) == 0 and int(m["skipped"]) == 1


def test_consecutive_nonfinite_steps_abort(devices):
    engine = _engine(dict(data=1), max_nonfinite=3)
    state = engine.init(0)
    bad = _batch()
    bad["y"][:] = np.inf
    with pytest.raises(NonFiniteError, match="3 consecutive steps"):
        for _ in range(10):
            state, _ = engine.step(state, bad)


def test_ema_warms_up_then_reaches_its_decay(devices):
    from vdiff.train.engine import ema_decay_at

    # Early steps average recent weights only, so the random init fades out fast.
    assert float(ema_decay_at(0.999, jnp.asarray(0))) == pytest.approx(0.1)
    assert float(ema_decay_at(0.999, jnp.asarray(90))) == pytest.approx(0.91)
    assert float(ema_decay_at(0.999, jnp.asarray(100_000))) == pytest.approx(0.999)
    # After one step from init the EMA equals 0.1 * init + 0.9 * new params.
    engine = _engine(dict(data=1))
    state0 = engine.init(0)
    init = jax.tree.map(np.asarray, state0["params"])  # the step donates state0
    state1, _ = engine.step(state0, _batch())
    for e, p0, p1 in zip(
        jax.tree.leaves(state1["ema"]),
        jax.tree.leaves(init),
        jax.tree.leaves(state1["params"]),
    ):
        np.testing.assert_allclose(
            np.asarray(e), 0.1 * np.asarray(p0) + 0.9 * np.asarray(p1), atol=1e-6
        )
