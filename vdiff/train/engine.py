"""The training engine shared by every stage (video VAE, audio AE, transformer).

A stage supplies a model constructor and a loss ``loss_fn(model, batch, rng) ->
(loss, metrics)``; the engine owns everything else: the optimiser, the train state
(params, optimiser state, EMA, step, RNG, non-finite counters) born sharded from
``jax.eval_shape`` under ``jax.jit``, and one jitted step with in/out shardings,
donated state, gradient accumulation, mixed precision and a non-finite guard.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vdiff.parallel import sharding as shd
from vdiff.parallel.mesh import batch_sharding

log = logging.getLogger(__name__)

LossFn = Callable[[nnx.Module, dict, jax.Array], tuple[jax.Array, dict]]
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class NonFiniteError(RuntimeError):
    """Raised after ``max_nonfinite`` consecutive steps with non-finite loss or grads."""


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    warmup: int = 100
    steps: int = 1000
    b1: float = 0.9
    b2: float = 0.99
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    optimizer: str = "adamw"  # "adamw" or "muon" (hidden matrices; NAdamW for the rest)
    # For "muon": params -> per-leaf MuonDimensionNumbers or None (the Adam branch); the
    # model declares which of its matrices Muon takes (e.g. DiT.muon_dims).
    muon_dims: Callable[[Any], Any] | None = None

    def schedule(self) -> optax.Schedule:
        warmup = max(1, min(self.warmup, self.steps - 1))
        return optax.warmup_cosine_decay_schedule(
            0.0, self.lr, warmup, max(self.steps, warmup + 1), end_value=self.lr * 0.1
        )

    def make(self) -> optax.GradientTransformation:
        parts = []
        if self.grad_clip > 0:
            parts.append(optax.clip_by_global_norm(self.grad_clip))
        if self.optimizer == "adamw":
            parts.append(
                optax.adamw(self.schedule(), b1=self.b1, b2=self.b2, weight_decay=self.weight_decay)
            )
        elif self.optimizer == "muon":
            if self.muon_dims is None:
                raise ValueError("optimizer 'muon' needs muon_dims: the model's Muon matrices")
            # consistent_rms=0.2 scales Muon's orthogonal updates to AdamW's typical RMS,
            # so the same learning rate and schedule serve both parameter groups. optax
            # gives the other group its AdamW with Nesterov momentum (NAdamW), as Muon's.
            parts.append(
                optax.contrib.muon(
                    self.schedule(),
                    adam_b1=self.b1,
                    adam_b2=self.b2,
                    weight_decay=self.weight_decay,
                    adam_weight_decay=self.weight_decay,
                    consistent_rms=0.2,
                    muon_weight_dimension_numbers=self.muon_dims,
                )
            )
        else:
            raise ValueError(f"optimizer must be 'adamw' or 'muon', got {self.optimizer!r}")
        return optax.chain(*parts)


def _cast(tree, dtype):
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


def _microbatches(batch: dict, n: int) -> dict:
    """(B, ...) -> (n, B/n, ...), interleaved so every microbatch spans every batch shard."""

    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} does not split into {n} microbatches")
        return x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def ema_decay_at(decay: float, step: jax.Array) -> jax.Array:
    """EMA decay at ``step`` with warm-up: ``min(decay, (1 + step) / (10 + step))``.

    A fixed decay of 0.999 would still hold 22% of the random initial weights after
    1500 steps (0.999^1500), which ruins short runs; the warm-up averages only recent
    weights early on and reaches ``decay`` after ~10 / (1 - decay) steps.
    """
    s = step.astype(jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + s) / (10.0 + s))


def _unbox(x):
    return x.get_value() if isinstance(x, nnx.Variable) else x


def _frozen_mask(params, frozen: tuple[str, ...]):
    """A tree of bools like ``params``: True under a top-level submodule in ``frozen``;
    None when nothing is frozen. An unknown name is an error, not a silent no-op."""
    if not frozen:
        return None
    top = {path[0].key for path, _ in jax.tree_util.tree_leaves_with_path(params)}
    missing = sorted(set(frozen) - top)
    if missing:
        raise ValueError(f"frozen submodules {missing} are not in the model (it has {sorted(top)})")
    return jax.tree_util.tree_map_with_path(lambda path, _: path[0].key in frozen, params)


class Engine:
    """Sharded init and the jitted train step for one model/loss pair.

    Args:
      make_model: ``rngs -> nnx.Module``; parameters carry logical axis names.
      loss_fn: ``(model, batch, rng) -> (scalar loss, dict of scalar metrics)``.
      mesh: the device mesh; ``rules``: logical -> mesh axis rules from the config.
      optim: optimiser settings. ``ema_decay``: 0 disables the EMA copy's update.
      microbatches: gradient accumulation steps per update.
      compute_dtype: dtype params are cast to inside the step (params stay fp32).
      max_nonfinite: consecutive skipped steps before :class:`NonFiniteError`.
      frozen: top-level submodule names whose parameters are not trained: no gradient flows
        into them (their backward pass is skipped), and the optimiser leaves them out
        (``optax.transforms.selective_transform``: no state for them, no weight decay).
    """

    def __init__(
        self,
        make_model: Callable[[nnx.Rngs], nnx.Module],
        loss_fn: LossFn,
        mesh: Mesh,
        rules,
        optim: OptimConfig,
        *,
        ema_decay: float = 0.0,
        microbatches: int = 1,
        compute_dtype: str = "float32",
        max_nonfinite: int = 5,
        batch_axes: tuple[str, ...] = ("data", "fsdp"),
        frozen: tuple[str, ...] = (),
    ):
        self.make_model = make_model
        self.loss_fn = loss_fn
        self.mesh = mesh
        self.rules = tuple(tuple(r) for r in rules)
        self.optim = optim
        self.ema_decay = float(ema_decay)
        self.microbatches = int(microbatches)
        self.compute_dtype = DTYPES[compute_dtype]
        self.max_nonfinite = int(max_nonfinite)
        self.batch_axes = batch_axes
        # Abstract model outside the mesh context: the parameters' sharding metadata holds
        # logical names, which only the rules below turn into mesh axes.
        with shd.axis_rules(self.rules):
            abstract = nnx.eval_shape(lambda: self._build(nnx.Rngs(0)))
            self.graphdef, abs_params, self._rest = nnx.split(abstract, nnx.Param, ...)
            self.frozen = _frozen_mask(abs_params, frozen)
            self.tx = optim.make()
            if self.frozen is not None:  # the optimiser never sees them: no state, no decay
                self.tx = optax.transforms.selective_transform(self.tx, freeze_mask=self.frozen)
            self.param_shardings = shd.state_shardings(abs_params, mesh, self.rules)
            self.abstract_state = jax.eval_shape(self._init_fn, jax.random.PRNGKey(0))
            self.state_shardings = self._shardings_for(self.abstract_state)
        self._init = jax.jit(self._init_fn, out_shardings=self.state_shardings)
        self._steps: dict[Any, Callable] = {}
        self._pending = None

    # ----------------------------------------------------------------- state
    def _context(self):
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(shd.axis_rules(self.rules))
        return stack

    def _build(self, rngs: nnx.Rngs) -> nnx.Module:
        # Parameters carry logical axis names, which the jitted initialiser's out_shardings
        # turn into mesh placements; Flax must not try to shard them eagerly by those names.
        with nnx.use_eager_sharding(False):
            return self.make_model(rngs)

    def _init_fn(self, key):
        model = self._build(nnx.Rngs(key))
        _, params, _ = nnx.split(model, nnx.Param, ...)
        return {
            "params": params,
            "opt": self.tx.init(params),
            "ema": jax.tree.map(jnp.copy, params),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.fold_in(key, 1),
            "nonfinite_run": jnp.zeros((), jnp.int32),
            "skipped": jnp.zeros((), jnp.int32),
        }

    def _shardings_for(self, abstract_state):
        rep = NamedSharding(self.mesh, PartitionSpec())
        masked = optax.transforms.MaskedNode  # a masked-out state (Muon vs AdamW): no arrays
        opt = optax.tree_map_params(
            self.tx,
            lambda state, s: state if isinstance(_unbox(state), masked) else s,
            abstract_state["opt"],
            self.param_shardings,
            transform_non_params=lambda _: rep,
            is_leaf=lambda x: isinstance(x, nnx.Variable),
        )
        return {
            "params": self.param_shardings,
            "opt": opt,
            "ema": self.param_shardings,
            "step": rep,
            "rng": rep,
            "nonfinite_run": rep,
            "skipped": rep,
        }

    def init(self, seed: int) -> dict:
        """Creates the train state, each array born with its target sharding."""
        with self._context():
            return self._init(jax.random.PRNGKey(seed))

    def model(self, state: dict, *, ema: bool = False) -> nnx.Module:
        """The nnx model holding ``state``'s (EMA) parameters, for sampling and eval."""
        return nnx.merge(self.graphdef, state["ema" if ema else "params"], self._rest)

    # ------------------------------------------------------------------ step
    def _step_fn(self, state: dict, batch: dict):
        rng, step_rng = jax.random.split(state["rng"])
        params = state["params"]

        def loss_of(p, mb, key):
            if self.frozen is not None:
                p = jax.tree.map(lambda x, f: jax.lax.stop_gradient(x) if f else x, p, self.frozen)
            model = nnx.merge(self.graphdef, _cast(p, self.compute_dtype), self._rest)
            loss, metrics = self.loss_fn(model, mb, key)
            return loss.astype(jnp.float32), metrics

        grad_fn = jax.value_and_grad(loss_of, has_aux=True)
        if self.microbatches == 1:
            (loss, metrics), grads = grad_fn(params, batch, step_rng)
        else:
            n = self.microbatches
            mbs = _microbatches(batch, n)
            keys = jax.random.split(step_rng, n)

            def body(acc, xs):
                mb, key = xs
                (l_i, m_i), g_i = grad_fn(params, mb, key)
                return jax.tree.map(jnp.add, acc, (l_i, m_i, g_i)), None

            zero_mb = jax.tree.map(lambda x: x[0], mbs)
            shapes = jax.eval_shape(grad_fn, params, zero_mb, keys[0])
            zeros = jax.tree.map(
                lambda s: jnp.zeros(s.shape, s.dtype), (shapes[0][0], shapes[0][1], shapes[1])
            )
            (loss, metrics, grads), _ = jax.lax.scan(body, zeros, (mbs, keys))
            loss, metrics, grads = jax.tree.map(lambda x: x / n, (loss, metrics, grads))

        grads = _cast(grads, jnp.float32)
        finite = jnp.isfinite(loss) & jnp.all(
            jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
        )
        updates, new_opt = self.tx.update(grads, state["opt"], params)
        new_params = optax.apply_updates(params, updates)

        def keep(new, old):
            return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

        new_params = keep(new_params, params)
        d = ema_decay_at(self.ema_decay, state["step"])
        ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state["ema"], new_params)
        new_state = {
            "params": new_params,
            "opt": keep(new_opt, state["opt"]),
            "ema": keep(ema, state["ema"]),
            "step": state["step"] + 1,
            "rng": rng,
            "nonfinite_run": jnp.where(finite, 0, state["nonfinite_run"] + 1),
            "skipped": state["skipped"] + (~finite).astype(jnp.int32),
        }
        metrics = dict(metrics)
        metrics.update(
            loss=loss,
            grad_norm=optax.tree.norm(grads),
            lr=self.optim.schedule()(state["step"]),
            finite=finite.astype(jnp.float32),
            nonfinite_run=new_state["nonfinite_run"],
            skipped=new_state["skipped"],
        )
        return new_state, metrics

    def _compiled_step(self, batch: dict):
        key = jax.tree.structure(batch), tuple((x.shape, x.dtype) for x in jax.tree.leaves(batch))
        if key not in self._steps:
            batch_sh = jax.tree.map(
                lambda x: batch_sharding(self.mesh, x.ndim, self.batch_axes), batch
            )
            rep = NamedSharding(self.mesh, PartitionSpec())
            self._steps[key] = jax.jit(
                self._step_fn,
                in_shardings=(self.state_shardings, batch_sh),
                out_shardings=(self.state_shardings, rep),
                donate_argnums=(0,),
            )
        return self._steps[key]

    def step(self, state: dict, batch: dict) -> tuple[dict, dict]:
        """One update. Raises NonFiniteError after max_nonfinite skipped steps in a row.

        The check reads the previous step's counter, so it never blocks the step in
        flight (dispatch stays asynchronous).
        """
        fn = self._compiled_step(batch)
        with self._context():
            new_state, metrics = fn(state, batch)
        pending, self._pending = self._pending, metrics["nonfinite_run"]
        if pending is not None and int(pending) >= self.max_nonfinite:
            raise NonFiniteError(
                f"{int(pending)} consecutive steps had a non-finite loss or gradient; "
                "lower train.lr, raise train.warmup, or check the data for NaNs"
            )
        return new_state, metrics

    def lower(self, state: dict, batch: dict):
        """The lowered step (for memory analysis and FLOP counts in benchmarks/tests)."""
        with self._context():
            return self._compiled_step(batch).lower(state, batch)
