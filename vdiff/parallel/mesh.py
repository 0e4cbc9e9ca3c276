"""Device meshes from config: axes data / fsdp / tensor / context.

``mesh.shape`` gives per-slice sizes (one may be -1 = fill); ``mesh.dcn_shape`` gives
how many slices (granules) each axis spans, for multi-slice (hybrid ICI x DCN) meshes.
"""

from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from vdiff.config import MESH_AXES, validate
from vdiff.errors import UserError


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> Mesh:
    """Builds the mesh for ``config`` over ``devices`` (default: all devices)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = validate(config, len(devices))
    dcn = {a: int(config.mesh.dcn_shape.get(a, 1)) for a in MESH_AXES}
    sizes = tuple(shape[a] for a in MESH_AXES)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if math.prod(dcn.values()) > 1:
        from jax.experimental import mesh_utils

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
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(sizes, MESH_AXES, axis_types=axis_types)
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, axis_types=axis_types)


def batch_sharding(mesh: Mesh, ndim: int, batch_axes=("data", "fsdp")) -> NamedSharding:
    """Sharding for a batch array: leading axis over the batch axes, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(batch_axes, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
