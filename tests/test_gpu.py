"""On a GPU: cuDNN attention against the portable XLA attention, and the DiT train step
against the same step on the CPU. Skipped where JAX sees no GPU (tests/conftest.py);
run with ``JAX_PLATFORMS=cuda,cpu python -m pytest -m gpu tests/test_gpu.py``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_dit_sharded import batch, engine_for, perturbed_initial_state, tiny_config

from vdiff.models.attention import attention
from vdiff.parallel.mesh import make_mesh
from vdiff.train.stages import dit_engine

pytestmark = pytest.mark.gpu


def test_cudnn_attention_matches_xla():
    r = np.random.default_rng(0)
    b, length, heads, dim = 2, 77, 4, 64  # a length cuDNN pads internally
    q, k, v = (jnp.asarray(r.standard_normal((b, length, heads, dim)), jnp.bfloat16) for _ in "qkv")
    mask = jnp.asarray(np.arange(length)[None] < np.array([[77], [30]]))  # key padding
    with jax.default_device(jax.devices("gpu")[0]):
        fast = attention(q, k, v, mask, backend="cudnn")
        ref = attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask,
                        backend="xla")  # fmt: skip
    assert fast.dtype == jnp.bfloat16
    # bfloat16 keeps 8 mantissa bits: outputs of unit scale agree to ~1e-2.
    np.testing.assert_allclose(np.asarray(fast, np.float32), np.asarray(ref), atol=2e-2)


def test_dit_step_on_gpu_matches_cpu():
    cpu = engine_for("one", jax.devices("cpu"))
    start = perturbed_initial_state(cpu)
    cfg = tiny_config(dict(data=1))
    gpu = dit_engine(cfg, make_mesh(cfg, jax.devices("gpu")[:1]))
    results = []
    with jax.default_matmul_precision("highest"):  # no TF32: compare float32 with float32
        for engine in (cpu, gpu):
            state = jax.device_put(start, engine.state_shardings)
            for _ in range(2):  # lr is 0 on the first step (warm-up), so take two
                state, metrics = engine.step(state, {k: np.asarray(v) for k, v in batch().items()})
            results.append((jax.tree.map(np.asarray, state["params"]), float(metrics["loss"])))
    (cpu_params, cpu_loss), (gpu_params, gpu_loss) = results
    assert {d.platform for d in gpu.mesh.devices.flat} == {"gpu"}
    np.testing.assert_allclose(gpu_loss, cpu_loss, rtol=1e-4)
    for a, c in zip(jax.tree.leaves(gpu_params), jax.tree.leaves(cpu_params)):
        np.testing.assert_allclose(a, c, atol=1e-4)
