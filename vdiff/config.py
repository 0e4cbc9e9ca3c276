"""Loading, overriding and validating ml_collections configs.

A config file is a Python file with ``get_config(arg=None)`` returning a
``ConfigDict`` (big_vision style). ``--config path.py:arg`` passes ``arg``. Every
config starts from :func:`configs.base.get_base_config`, so the set of keys is fixed:
an override that names an unknown key is rejected with the closest valid key.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import ml_collections

from data_pipelines.buckets import Strides, check_buckets
from vdiff.errors import UserError

log = logging.getLogger(__name__)

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = "tiny"
MESH_AXES = ("data", "fsdp", "tensor", "context")
BATCH_AXES = ("data", "fsdp")


def resolve_config_path(spec: str) -> tuple[Path, str | None]:
    """``configs/tiny.py:arg``, ``tiny`` or ``tiny:arg`` -> (path, arg)."""
    name, _, arg = spec.partition(":")
    path = Path(name)
    if not path.suffix:
        path = REPO_CONFIGS / f"{name}.py"
    if not path.exists():
        known = sorted(p.stem for p in REPO_CONFIGS.glob("*.py") if not p.stem.startswith("_"))
        raise UserError(
            f"config file '{name}' not found; pass a path to a .py file or one of: {', '.join(known)}"
        )
    return path, (arg or None)


def load_config_file(path: Path, function: str):
    """The function ``function`` of the config file ``path`` (executed as a module)."""
    # Config files import `configs.base`; make the folder above configs/ importable.
    root = str(Path(path).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    module_spec = importlib.util.spec_from_file_location(f"vdiff_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, function):
        raise UserError(
            f"config file {path} has no {function}(arg) function; add one returning a ConfigDict"
        )
    return getattr(module, function)


def load_config(
    spec: str | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> ml_collections.ConfigDict:
    """Loads a config file, applies ``a.b=value`` overrides, and checks the result."""
    path, arg = resolve_config_path(spec or DEFAULT_CONFIG)
    get_config = load_config_file(path, "get_config")
    config = get_config(arg) if arg is not None else get_config()
    for item in overrides:
        apply_override(config, item)
    check_static(config)
    return config


# Keys added to configs/base.py after workdirs were first written, with the value that
# reproduces how a run behaved before the key existed (which is not always today's default:
# e.g. runs before diffusion.p_no_cross_modal never masked audio<->video attention).
ADDED_KEYS: dict[str, Any] = {
    "data.audio": True,
    "data.dit_input": "latents",
    "data.decode": "cache",
    "data.bucket_batch": (),
    "data.image_share": -1.0,
    "vae.train_crop": 0,
    "vae.full_frame_steps": 0,
    "model.cross_modal": True,
    "model.rope_time_scale": 25.0,
    "model.rope_theta": 10000.0,
    "model.abs_pos": False,
    "model.freeze_text": False,
    "train.optimizer": "adamw",
    "train.remat": "none",
    "train.compute_dtype": "float32",
    "train.param_dtype": "float32",
    "diffusion.t_uniform": 0.0,
    "diffusion.p_no_cross_modal": 0.0,
    "sample.renoise_t": (),
    "text.encoder": "internal",
    "text.path": "",
    "text.dtype": "bfloat16",
    "text.batch_size": 64,
}


# Keys that moved: new name -> the name an earlier vdiff saved it under.
RENAMED_KEYS: dict[str, str] = {"text.max_len": "data.caption_len"}


def upgrade_config(saved: dict) -> ml_collections.ConfigDict:
    """A config saved by an earlier vdiff (a workdir's or bundle's ``config.json``) with
    every key that today's code reads.

    A key in :data:`ADDED_KEYS` that the saved config lacks takes the value that reproduces
    the old run, a key in :data:`RENAMED_KEYS` the value saved under its old name; any other
    missing key takes its ``configs/base.py`` default (logged). Keys
    that base no longer has are dropped. JSON lists become the config's tuples again.
    """
    base = base_config()
    config = ml_collections.ConfigDict(_tuplify(saved))
    for key in _all_keys(base):
        if isinstance(_lookup(base, key), ml_collections.ConfigDict):
            continue
        group, _, leaf = key.rpartition(".")
        if group:
            _set_group(config, group)
        node = _lookup(config, group) if group else config
        if leaf in node:
            continue
        old = _lookup(config, RENAMED_KEYS[key]) if key in RENAMED_KEYS else _MISSING
        if old is not _MISSING:
            node[leaf] = old
        elif key in ADDED_KEYS:
            node[leaf] = ADDED_KEYS[key]
        else:
            node[leaf] = _lookup(base, key)
            log.info(
                "config: %s missing from the saved config; using the default %r", key, node[leaf]
            )
    for key in _all_keys(config):
        group, _, leaf = key.rpartition(".")
        if _lookup(base, key) is _MISSING and group not in _OPEN_GROUPS:
            node = _lookup(config, group) if group else config
            if node is not _MISSING and leaf in node:
                del node[leaf]
    return config


def load_saved_config(path: Path) -> ml_collections.ConfigDict:
    """Reads a ``config.json`` written by ``vdiff train`` and upgrades it (:func:`upgrade_config`)."""
    return upgrade_config(json.loads(Path(path).read_text()))


# Groups whose keys are data, not a fixed schema (mesh axis sizes are checked by name).
_OPEN_GROUPS = ("mesh.shape", "mesh.dcn_shape")


_MISSING = object()


def base_config() -> ml_collections.ConfigDict:
    """``configs/base.py``'s config: every key with its default."""
    return load_config_file(REPO_CONFIGS / "base.py", "get_base_config")()


def _lookup(config: ml_collections.ConfigDict, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _set_group(config: ml_collections.ConfigDict, group: str) -> None:
    node = config
    for part in group.split("."):
        if part not in node:
            node[part] = ml_collections.ConfigDict()
        node = node[part]


def _tuplify(value: Any) -> Any:
    """JSON turns tuples into lists; the config's sequence values are tuples."""
    if isinstance(value, dict):
        return {k: _tuplify(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(_tuplify(v) for v in value)
    return value


def _all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in config.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, ml_collections.ConfigDict):
            keys.extend(_all_keys(v, full + "."))
    return keys


def _parse_value(key: str, text: str, current: Any) -> Any:
    """Parses ``text`` to the type of the current value, naming the key on failure."""
    kind = type(current)
    try:
        if isinstance(current, bool):
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if isinstance(current, int):
            value = ast.literal_eval(text)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(text)
            return value
        if isinstance(current, float):
            return float(text)
        if isinstance(current, str):
            return text
        if isinstance(current, (tuple, list)):
            value = ast.literal_eval(text)
            if isinstance(value, (int, float, str)):
                value = (value,)
            return kind(value)
        if current is None:
            try:
                return ast.literal_eval(text)
            except (ValueError, SyntaxError):
                return text
    except (ValueError, SyntaxError):
        pass
    raise UserError(
        f"--config.{key}={text}: expected a value of type {kind.__name__} "
        f"(current value {current!r}); pass e.g. --config.{key}={current!r}"
    )


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
    """Applies one ``a.b.c=value`` override, rejecting unknown keys and wrong types."""
    key, sep, text = item.partition("=")
    if not sep:
        raise UserError(f"override '{item}' has no '='; write it as --config.{key}=VALUE")
    node = config
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            valid = _all_keys(config)
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = (
                f"did you mean --config.{close[0]}?"
                if close
                else "see the config file for valid keys"
            )
            raise UserError(f"unknown config key '{key}'; {hint}")
        if i < len(parts) - 1:
            node = node[part]
    leaf = parts[-1]
    current = node[leaf]
    if isinstance(current, ml_collections.ConfigDict):
        raise UserError(
            f"'{key}' is a group of settings, not a value; override one of its keys, e.g. --config.{key}.<name>=VALUE"
        )
    node[leaf] = _parse_value(key, text, current)


def check_local_path(what: str, path: str) -> None:
    """vdiff reads and writes files through the file system: an object-store URL (``gs://``,
    ``s3://``) fails here, naming the fix, instead of later as a strange local path."""
    if "://" in str(path):
        raise UserError(
            f"{what}={path}: vdiff reads and writes files through the file system; mount the "
            "bucket (e.g. gcsfuse BUCKET /mnt/BUCKET) and pass the mounted path"
        )


def check_static(config: ml_collections.ConfigDict) -> None:
    """Checks that need no devices: mesh axis names and at most one -1, paths, ranges."""
    check_local_path("data.root", config.data.root)
    mesh = config.mesh
    for axis in mesh.shape:
        if axis not in MESH_AXES:
            close = difflib.get_close_matches(axis, MESH_AXES, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"use {MESH_AXES}"
            raise UserError(f"mesh.shape has unknown axis '{axis}'; {hint}")
    fills = [a for a, s in mesh.shape.items() if s == -1]
    if len(fills) > 1:
        raise UserError(
            f"mesh.shape: only one axis may be -1 (fill), got {fills}; give the others sizes"
        )
    for a, s in mesh.shape.items():
        if s != -1 and s < 1:
            raise UserError(f"mesh.shape.{a}={s}: sizes must be >= 1 or -1 (fill)")
    try:
        buckets = check_buckets(config.data.buckets, Strides.from_config(config))
    except ValueError as e:
        raise UserError(str(e)) from None
    share = config.data.image_share
    if share != -1.0 and not 0.0 <= share <= 1.0:
        raise UserError(f"data.image_share={share}: use a fraction in [0, 1], or -1 (by data)")
    if config.data.bucket_batch and len(config.data.bucket_batch) != len(buckets):
        raise UserError(
            f"data.bucket_batch gives {len(config.data.bucket_batch)} sizes for "
            f"{len(buckets)} data.buckets; give one per bucket, or () for the token budget"
        )
    crop = config.vae.train_crop
    if crop:
        down = config.vae.spatial_down
        res = min(min(b.height, b.width) for b in buckets)
        if crop % down or not 0 < crop <= res:
            raise UserError(
                f"vae.train_crop={crop} must be a multiple of vae.spatial_down={down} in "
                f"(0, {res}] (the smallest side of data.buckets); or 0 to train on whole frames"
            )
    full = config.vae.full_frame_steps
    if full < 0 or (full and not crop):
        raise UserError(
            f"vae.full_frame_steps={full}: the whole-frame steps that end a crop-trained VAE; "
            "use a count >= 0 together with vae.train_crop > 0, or 0"
        )
    _check_probabilities(config)
    _check_renoise_levels(config)
    _check_text(config)
    from vdiff.models.attention import BACKENDS  # jax: only once a config is checked

    if config.model.attention not in BACKENDS:
        raise UserError(f"model.attention={config.model.attention!r}: use one of {BACKENDS}")
    from vdiff.models.dit import REMAT_POLICIES

    if config.train.remat not in REMAT_POLICIES:
        raise UserError(f"train.remat={config.train.remat!r}: use one of {REMAT_POLICIES}")
    optimizer = config.train.optimizer
    if optimizer not in ("adamw", "muon"):
        raise UserError(f"train.optimizer={optimizer!r}: use 'adamw' or 'muon'")


TEXT_ENCODERS = ("internal", "t5")


def _check_text(config: ml_collections.ConfigDict) -> None:
    """The text section: a known encoder, a local folder for a pretrained one, sizes."""
    x = config.text
    if x.encoder not in TEXT_ENCODERS:
        raise UserError(f"text.encoder={x.encoder!r}: use one of {TEXT_ENCODERS}")
    if x.max_len < 1 or x.batch_size < 1:
        raise UserError(
            f"text.max_len={x.max_len}, text.batch_size={x.batch_size}: both must be >= 1"
        )
    if x.dtype not in ("float32", "bfloat16"):
        raise UserError(f"text.dtype={x.dtype!r}: use 'bfloat16' or 'float32'")
    if x.encoder == "internal":
        return
    if not x.path:
        raise UserError(
            "text.encoder='t5' needs text.path: a local Hugging Face T5 / UMT5 folder "
            "(config.json, model.safetensors, spiece.model)"
        )
    check_local_path("text.path", x.path)
    if config.data.dit_input != "latents":
        raise UserError(
            "text.encoder='t5' trains from caption embeddings cached with the latents; set "
            "data.dit_input='latents'"
        )


_PROBABILITIES = (
    "caption_dropout",
    "p_clean_audio",
    "p_clean_video",
    "p_no_cross_modal",
    "t_uniform",
)


def _check_probabilities(config: ml_collections.ConfigDict) -> None:
    """The diffusion section's fractions of examples lie in [0, 1] (two clean draws share one)."""
    d = config.diffusion
    for name in _PROBABILITIES:
        p = d[name]
        if not 0.0 <= p <= 1.0:
            raise UserError(
                f"diffusion.{name}={p} is a fraction of examples; use a value in [0, 1]"
            )
    clean = d.p_clean_audio + d.p_clean_video
    if clean > 1.0:
        raise UserError(
            f"diffusion.p_clean_audio + diffusion.p_clean_video = {clean} > 1: they split one "
            "draw per example; lower one of them"
        )


def _check_renoise_levels(config: ml_collections.ConfigDict) -> None:
    """The report's re-noising levels lie strictly inside (0, 1) (it divides by 1 - t)."""
    for t in config.sample.renoise_t:
        if not 0.0 < float(t) < 1.0:
            raise UserError(
                f"sample.renoise_t has {t}: re-noising levels lie strictly between 0 (the clip) "
                "and 1 (pure noise, which oracle.* already covers); e.g. (0.3, 0.6)"
            )


def resolve_mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Mesh axis sizes with -1 filled; fails naming the sizes and the device count."""
    shape = {a: int(config.mesh.shape[a]) for a in MESH_AXES}
    fixed = math.prod(s for s in shape.values() if s != -1)
    fill = [a for a, s in shape.items() if s == -1]
    sizes = ", ".join(f"{a}={s}" for a, s in shape.items())
    if fill:
        if num_devices % fixed:
            raise UserError(
                f"mesh ({sizes}) does not fit {num_devices} devices: the fixed axes multiply to "
                f"{fixed}, which does not divide {num_devices}; change --config.mesh.shape"
            )
        shape[fill[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise UserError(
            f"mesh ({sizes}) multiplies to {fixed} but there are {num_devices} devices; "
            f"make the sizes multiply to {num_devices} or set one axis to -1"
        )
    return shape


def validate(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Device-dependent checks; returns the resolved mesh shape."""
    check_static(config)
    shape = resolve_mesh_shape(config, num_devices)
    shards = math.prod(shape[a] for a in BATCH_AXES)
    for key in ("train.batch_size", "vae.batch_size", "audio_ae.batch_size"):
        group, name = key.split(".")
        if group in config and name in config[group]:
            bs = config[group][name]
            if bs % shards:
                raise UserError(
                    f"{key}={bs} is not divisible by the batch-sharding axes "
                    f"(data x fsdp = {shards}); use a multiple of {shards}"
                )
    return shape
