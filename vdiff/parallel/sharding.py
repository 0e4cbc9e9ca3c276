"""Logical axis names -> mesh axes, in one place.

Model code speaks only logical names (``batch``, ``frames``, ``tokens``, ``embed``,
``heads``, ``mlp``, ...). Parameters carry them through
:func:`logical_param` (``logical_param(value, ("embed", "mlp"))``); activations go through
:func:`constrain`. The mapping to mesh axes (``data``, ``fsdp``, ``tensor``,
``context``) comes from the config and is installed with :func:`axis_rules`.
With no rules installed (or no mesh set) every helper here is a no-op, so models
run unchanged on one device and in unit tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

LogicalAxes = Sequence[str | None]
Rules = Sequence[tuple[str, str | Sequence[str] | None]]

_RULES: list[Rules | None] = [None]


@contextlib.contextmanager
def axis_rules(rules: Rules | None) -> Iterator[None]:
    """Installs logical->mesh rules for the code run inside the block."""
    _RULES.append(tuple((k, v) for k, v in rules) if rules is not None else None)
    try:
        yield
    finally:
        _RULES.pop()


def current_rules() -> Rules | None:
    return _RULES[-1]


def logical_param(value: jax.Array, names: LogicalAxes) -> nnx.Param:
    """A parameter whose axes carry logical names, e.g. ``("embed", "mlp")``.

    It is created unsharded and placed by the jitted initialiser (out_shardings from the
    logical rules), never eagerly by Flax: its names are logical, not mesh axes.
    """
    if len(names) != value.ndim:
        raise ValueError(
            f"parameter of shape {value.shape} needs {value.ndim} axis names, got {names}"
        )
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def logical_to_mesh(
    logical: LogicalAxes | PartitionSpec, rules: Rules | None = None
) -> PartitionSpec:
    """Maps a tuple of logical axis names to a PartitionSpec of mesh axes.

    A logical name missing from the rules (or mapped to None) is replicated. A mesh
    axis is used at most once per spec: the first logical dimension that asks for it
    gets it, later ones are replicated (e.g. ``heads`` and ``mlp`` both on ``tensor``).
    """
    rules = current_rules() if rules is None else rules
    table = dict(rules or ())
    used: set[str] = set()
    out = []
    for name in tuple(logical):
        target = table.get(name) if name is not None else None
        if target is None:
            out.append(None)
            continue
        axes = (target,) if isinstance(target, str) else tuple(target)
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def active_mesh():
    """The mesh set for the current trace (``jax.set_mesh``), or None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return None
    return mesh


def constrain(x: jax.Array, logical: LogicalAxes) -> jax.Array:
    """Constrains an activation's sharding by logical names (no-op without mesh/rules)."""
    rules = current_rules()
    if rules is None or active_mesh() is None:
        return x
    if len(logical) != x.ndim:
        raise ValueError(f"constrain: {len(logical)} logical axes for an array of rank {x.ndim}")
    return jax.lax.with_sharding_constraint(x, logical_to_mesh(logical, rules))


def state_shardings(state, mesh: jax.sharding.Mesh, rules: Rules | None = None):
    """NamedShardings for an (abstract) nnx.State, from its variables' logical names.

    The result has the same tree structure as ``state`` (Variable nodes kept, a
    NamedSharding in place of each array), so it can be used as jit in/out shardings
    and with ``optax.tree_map_params``.
    """
    specs = nnx.get_partition_spec(state)
    rules = rules if rules is not None else current_rules()
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, logical_to_mesh(spec, rules)),
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
