"""``train.optimizer="muon"``: which weights Muon updates, that its updates are
orthogonalised, that the masked optimiser state shards and checkpoints like AdamW's,
and that a sharded Muon step equals the 1-device step."""

import json

import jax
import numpy as np
import optax
import pytest
from test_dit_sharded import FAST_COMPILE, batch, perturbed_initial_state, tiny_config

from vdiff.config import upgrade_config
from vdiff.errors import UserError
from vdiff.models.dit import DiT
from vdiff.parallel.mesh import make_mesh
from vdiff.train.checkpoint import Checkpointer
from vdiff.train.stages import dit_engine


def _engine(mesh_shape, devices):
    cfg = tiny_config(mesh_shape)
    cfg.train.optimizer = "muon"
    n = int(np.prod(list(mesh_shape.values())))
    return dit_engine(cfg, make_mesh(cfg, devices[:n]))


def _flat(tree):
    return {
        jax.tree_util.keystr(p): x
        for p, x in jax.tree_util.tree_leaves_with_path(
            tree, is_leaf=lambda x: isinstance(x, optax.contrib.MuonDimensionNumbers)
        )
    }


def test_muon_takes_hidden_matrices_and_leaves_the_rest_to_adam(devices):
    engine = _engine(dict(data=1), devices)
    dims = _flat(DiT.muon_dims(engine.abstract_state["params"]))
    muon = {k for k, v in dims.items() if v is not None}
    assert muon, "no parameter was given to Muon"
    for k in muon:  # attention and MLP projections inside the blocks / text encoder
        assert "kernel" in k and any(f"['{n}']" in k for n in ("q", "k", "v", "out", "fc1", "fc2",
                                                                 "cross_q", "cross_out", "text_k",
                                                                 "text_v")), k  # fmt: skip
    # Embeddings, the output head, adaLN modulation, norms and biases stay with (N)AdamW.
    for name in ("video_embed", "video_out", "['ada']", "t_embed", "bias", "scale", "['embed']"):
        assert not any(name in k for k in muon), name
    # Stacked (scanned) layers: the layer axis is a batch axis, not part of the matrix.
    qkv = next(v for k, v in dims.items() if "['blocks']['layers']" in k and "['q']" in k)
    assert qkv.reduction_axis == (-3,) and qkv.output_axis == (-2, -1)


def _two_steps(engine, state0):
    state = jax.device_put(state0, engine.state_shardings)
    step = engine.lower(state, batch()).compile(FAST_COMPILE)
    for _ in range(2):  # warm-up gives lr 0 on the first step
        state, m = step(state, batch())
    assert float(m["finite"]) == 1.0
    return state, float(m["loss"])


@pytest.fixture(scope="module")
def one_device(devices):
    """(engine, perturbed initial state on the host, state and loss after two steps)."""
    engine = _engine(dict(data=1), devices)
    state0 = perturbed_initial_state(engine)  # adaLN-Zero's zero gates would stop gradients
    return engine, state0, *_two_steps(engine, state0)


def test_muon_update_is_orthogonalised(one_device):
    """A Muon matrix moves by a (nearly) orthogonalised momentum: its leading singular
    values are nearly equal. Measured on this state: the top 12 within 0.82 of the
    largest with Muon, down to 0.44 with AdamW (the gradient's rank is limited by the
    64 tokens of the batch, so the tail is ~0 either way)."""
    _, before, state, _ = one_device
    fc1 = "['blocks']['layers']['video']['mlp']['fc1']['kernel'].value"
    after = _flat(jax.tree.map(np.asarray, state["params"]))
    delta = after[fc1] - _flat(before["params"])[fc1]  # (depth, width, mlp)
    s = np.linalg.svd(delta[0], compute_uv=False)
    assert s[0] > 0
    assert s[11] / s[0] > 0.7, s[:12] / s[0]


def test_muon_state_checkpoints_and_sharded_step_matches(devices, one_device, tmp_path):
    _, state0, ref, ref_loss = one_device
    sharded = _engine(dict(data=2, fsdp=2, tensor=2), devices)
    # Masked (AdamW-only or Muon-only) state slots carry no arrays and no shardings.
    assert len(jax.tree.leaves(sharded.state_shardings["opt"])) == len(
        jax.tree.leaves(state0["opt"])
    )
    got, loss = _two_steps(sharded, state0)
    # Tolerance: float32 reductions reordered across shards, here also inside Newton-Schulz.
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got["params"]), jax.tree.leaves(ref["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
    # The Muon state restores onto the sharded mesh from a checkpoint, momentum included.
    ckpt = Checkpointer(tmp_path / "ckpt", keep=1)
    ckpt.save(2, ref)
    ckpt.wait()
    start, restored, _ = Checkpointer(tmp_path / "ckpt", keep=1).restore(
        sharded.abstract_state, sharded.state_shardings
    )
    assert start == 2
    for a, b in zip(jax.tree.leaves(restored["opt"]), jax.tree.leaves(ref["opt"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    mu = [x for x in jax.tree.leaves(restored["opt"]) if np.asarray(x).ndim >= 2]
    assert any(np.abs(np.asarray(x)).max() > 0 for x in mu)
    # An AdamW engine cannot resume Muon checkpoints: one clear error that names the key.
    cfg = tiny_config(dict(data=1))
    adamw = dit_engine(cfg, make_mesh(cfg, devices[:1]))
    with pytest.raises(UserError, match=r"no readable checkpoint.*train\.optimizer"):
        Checkpointer(tmp_path / "ckpt", keep=1).restore(adamw.abstract_state, adamw.state_shardings)


def test_config_saved_without_the_optimizer_key_builds_adamw(devices):
    """Workdirs written before ``train.optimizer`` existed (AdamW runs) still sample,
    evaluate and export: their saved config has no such key."""
    saved = json.loads(tiny_config(dict(data=1)).to_json())
    del saved["train"]["optimizer"]
    cfg = upgrade_config(saved)
    engine = dit_engine(cfg, make_mesh(cfg, devices[:1]))
    assert engine.optim.optimizer == "adamw"
    mu = engine.abstract_state["opt"]
    assert not any(isinstance(x, optax.transforms.MaskedNode) for x in jax.tree.leaves(
        mu, is_leaf=lambda x: isinstance(x, optax.transforms.MaskedNode)))  # fmt: skip
