"""``model.freeze_text``: the internal text encoder gets no gradient and no update (weight
decay included), while the rest of the transformer trains."""

import jax
import numpy as np
import pytest
from test_dit_sharded import FAST_COMPILE, batch, perturbed_initial_state, tiny_config

from vdiff.parallel.mesh import make_mesh
from vdiff.train.engine import _frozen_mask
from vdiff.train.stages import dit_engine


def _moved(freeze: bool, devices, optimizer="adamw") -> tuple[dict[str, bool], int]:
    """(top-level submodule -> whether any of its parameters changed in two steps, the
    optimiser state's element count)."""
    cfg = tiny_config(dict(data=1))
    cfg.model.freeze_text = freeze
    cfg.train.optimizer = optimizer
    cfg.train.weight_decay = 0.1  # decay alone would move a frozen weight
    engine = dit_engine(cfg, make_mesh(cfg, devices[:1]))
    state0 = perturbed_initial_state(engine)
    state = jax.device_put(state0, engine.state_shardings)
    step = engine.lower(state, batch()).compile(FAST_COMPILE)
    for _ in range(2):  # the first step has lr 0 (warm-up)
        state, metrics = step(state, batch())
    assert float(metrics["finite"]) == 1.0
    moved: dict[str, bool] = {}
    after = jax.tree_util.tree_leaves_with_path(state["params"])
    for (path, a), b in zip(after, jax.tree.leaves(state0["params"])):
        key = path[0].key
        moved[key] = moved.get(key, False) or not np.array_equal(np.asarray(a), b)
    return moved, sum(np.size(x) for x in jax.tree.leaves(state["opt"]))


def test_frozen_text_encoder_stays_exactly_and_the_rest_trains(devices):
    (frozen, frozen_opt), (trained, trained_opt) = _moved(True, devices), _moved(False, devices)
    assert trained["text_encoder"] and trained["blocks"]
    assert not frozen["text_encoder"]
    assert frozen["blocks"] and frozen["video_embed"]
    assert frozen_opt < trained_opt  # no optimiser state for the frozen encoder
    muon, _ = _moved(True, devices, "muon")  # Muon takes the encoder's matrices otherwise
    assert not muon["text_encoder"] and muon["blocks"]


def test_unknown_frozen_module_is_an_error():
    params = {"blocks": {"w": np.zeros(2)}, "text_encoder": {"w": np.zeros(2)}}
    mask = _frozen_mask(params, ("text_encoder",))
    assert mask == {"blocks": {"w": False}, "text_encoder": {"w": True}}
    with pytest.raises(ValueError, match="not in the model"):
        _frozen_mask(params, ("text_encdoer",))
