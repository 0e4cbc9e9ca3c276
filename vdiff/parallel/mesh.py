"""Device meshes from config: axes data / fsdp / tensor / context.

``mesh.shape`` gives per-slice sizes (one may be -1 = fill); ``mesh.dcn_shape`` gives
how many slices (granules) each axis spans, for multi-slice (hybrid ICI x DCN) meshes.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from vdiff.config import BATCH_AXES, MESH_AXES, validate
from vdiff.errors import UserError


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> Mesh:
    """Builds the mesh for ``config`` over ``devices`` (default: all devices)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = validate(config, len(devices))
    dcn = {a: int(config.mesh.dcn_shape[a]) for a in MESH_AXES}
    sizes = tuple(shape[a] for a in MESH_AXES)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if math.prod(dcn.values()) > 1:
        for a in MESH_AXES:
            if shape[a] % dcn[a]:
                raise UserError(
                    f"mesh.dcn_shape.{a}={dcn[a]} does not divide mesh.shape.{a}={shape[a]}; "
                    "the across-slice size must divide the axis size"
                )
        ici = tuple(shape[a] // dcn[a] for a in MESH_AXES)
        grid = mesh_utils.create_hybrid_device_mesh(
            ici, tuple(dcn[a] for a in MESH_AXES), devices=devices
        )
        return Mesh(grid, MESH_AXES, axis_types=axis_types)
    if devices == jax.devices():
        return jax.make_mesh(sizes, MESH_AXES, axis_types=axis_types)
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, axis_types=axis_types)


def batch_sharding(mesh: Mesh, ndim: int, batch_axes=BATCH_AXES) -> NamedSharding:
    """Sharding for a batch array: leading axis over the batch axes (those the mesh has),
    the rest replicated."""
    axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    return NamedSharding(mesh, PartitionSpec(axes or None, *([None] * (ndim - 1))))


def to_global(batch: dict[str, Any], mesh: Mesh, batch_axes=BATCH_AXES) -> dict[str, jax.Array]:
    """Assembles per-process numpy batches into global jax.Arrays sharded over the batch axes.

    Every process passes its own rows (same shapes on all); the global leading dimension
    stacks the processes' rows in process order. String fields (e.g. ``key``) are dropped.
    """
    out = {}
    for name, value in batch.items():
        value = np.asarray(value)
        if value.dtype.kind in "USO":
            continue
        sharding = batch_sharding(mesh, value.ndim, batch_axes)
        out[name] = jax.make_array_from_process_local_data(sharding, value)
    return out


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
