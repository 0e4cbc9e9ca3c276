"""Loads a Hugging Face T5 / mT5 / UMT5 checkpoint from a local folder into :class:`T5Encoder`.

A folder holds what the models ship with: ``config.json``, ``spiece.model`` and the
weights as ``model.safetensors`` or shards listed by ``model.safetensors.index.json``.

Tensors are read lazily from the memory-mapped files, one device shard at a time:
every parameter is built with ``jax.make_array_from_callback`` in its target sharding
(from the parameters' logical axis names and the mesh rules), and the callback reads only
the slice of the file tensor that shard holds. No process ever holds a full copy of a
sharded encoder, on the host or on a device. The reads go through the ``safetensors``
library (``framework="flax"``: its numpy reader has no bfloat16).

Name mapping (PyTorch ``Linear`` stores ``(out, in)``; vdiff's kernels are ``(in, out)`` with
the heads split out)::

    shared.weight | encoder.embed_tokens.weight                  embed (vocab, d_model)
    encoder.block.{i}.layer.0.SelfAttention.{q,k,v}.weight      (heads*d_kv, d_model)
                                                                 -> (d_model, heads, d_kv)
    encoder.block.{i}.layer.0.SelfAttention.o.weight             (d_model, heads*d_kv)
                                                                 -> (heads, d_kv, d_model)
    encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight  (buckets, heads)
    encoder.block.{i}.layer.0.layer_norm.weight                  attn_norm
    encoder.block.{i}.layer.1.DenseReluDense.{wi_0,wi_1,wo}.weight  transposed
    encoder.block.{i}.layer.1.layer_norm.weight                  ff_norm
    encoder.final_layer_norm.weight                              final_norm

``decoder.*`` and ``lm_head.*`` tensors of a whole encoder-decoder checkpoint are skipped.
A missing, unexpected or mis-shaped tensor is one :class:`~vdiff.errors.UserError` line
naming the file and the key.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

import vdiff.parallel.sharding as sharding
from vdiff.errors import UserError
from vdiff.models.t5 import T5Encoder, T5Spec

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
SKIPPED_PREFIXES = ("decoder.", "lm_head.")
EMBEDDING_KEYS = ("shared.weight", "encoder.embed_tokens.weight")

# How a file tensor becomes a vdiff parameter: "copy", "t" (transpose a Linear),
# "qkv" (Linear -> (d_model, heads, d_kv)) or "o" (Linear -> (heads, d_kv, d_model)).
Layout = str


def weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (single file or index)."""
    folder = Path(folder)
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{index} is not a safetensors index ({e})") from None
        files = {name: folder / file for name, file in weight_map.items()}
        for path in sorted(set(files.values())):
            if not path.is_file():
                raise UserError(f"{path} is missing ({index} lists it)")
        return files
    single = folder / WEIGHTS
    if not single.is_file():
        raise UserError(
            f"{folder} has neither {WEIGHTS} nor {INDEX}; text.path must be a Hugging Face "
            "T5 folder"
        )
    with safe_open(str(single), framework="flax") as f:
        return {name: single for name in f.keys()}  # noqa: SIM118 (not iterable)


def expected_tensors(spec: T5Spec) -> dict[str, tuple[tuple, tuple[int, ...], Layout]]:
    """File tensor name -> (parameter path in :class:`T5Encoder`, file shape, layout)."""
    d, h, k, ff = spec.d_model, spec.num_heads, spec.d_kv, spec.d_ff
    out = {"shared.weight": (("embed",), (spec.vocab_size, d), "copy")}
    for i in range(spec.num_layers):
        a, f = f"encoder.block.{i}.layer.0.", f"encoder.block.{i}.layer.1."
        blk = ("blocks", i)
        for n in "qkv":
            out[f"{a}SelfAttention.{n}.weight"] = ((*blk, "attn", n), (h * k, d), "qkv")
        out[f"{a}SelfAttention.o.weight"] = ((*blk, "attn", "o"), (d, h * k), "o")
        if spec.bias_per_layer or i == 0:
            out[f"{a}SelfAttention.relative_attention_bias.weight"] = (
                (*blk, "attn", "relative_bias"), (spec.num_buckets, h), "copy"
            )  # fmt: skip
        out[f"{a}layer_norm.weight"] = ((*blk, "attn_norm", "scale"), (d,), "copy")
        for n, shape in (("wi_0", (ff, d)), ("wi_1", (ff, d)), ("wo", (d, ff))):
            out[f"{f}DenseReluDense.{n}.weight"] = ((*blk, n, "kernel"), shape, "t")
        out[f"{f}layer_norm.weight"] = ((*blk, "ff_norm", "scale"), (d,), "copy")
    out["encoder.final_layer_norm.weight"] = (("final_norm", "scale"), (d,), "copy")
    return out


def _bounds(index: tuple, shape: tuple[int, ...]) -> list[tuple[int, int]]:
    return [s.indices(n)[:2] for s, n in zip(index, shape, strict=True)]


def _reader(read: Callable, layout: Layout, heads_kv: tuple[int, int]) -> Callable:
    """``read(slices)`` of the file tensor -> ``shard(index)`` of the vdiff parameter."""
    _, kv = heads_kv

    def shard(index, shape):
        b = _bounds(index, shape)
        if layout == "copy":
            return read(tuple(slice(*x) for x in b))
        if layout == "t":
            (i0, i1), (o0, o1) = b
            return read((slice(o0, o1), slice(i0, i1))).T
        if layout == "qkv":  # (d, h, k) from rows h*kv + k, columns d
            (d0, d1), (h0, h1), (k0, k1) = b
            x = read((slice(h0 * kv, h1 * kv), slice(d0, d1)))
            return jnp.transpose(x.reshape(h1 - h0, kv, d1 - d0)[:, k0:k1], (2, 0, 1))
        # "o": (h, k, d) from rows d, columns h*kv + k
        (h0, h1), (k0, k1), (d0, d1) = b
        x = read((slice(d0, d1), slice(h0 * kv, h1 * kv)))
        return jnp.transpose(x.reshape(d1 - d0, h1 - h0, kv)[:, :, k0:k1], (1, 2, 0))

    return shard


def _check_names(files: dict[str, Path], expected: dict, folder: Path) -> dict[str, str]:
    """Expected name -> the file name that holds it (the embedding under either key)."""
    names = {n: n for n in expected}
    emb = [k for k in EMBEDDING_KEYS if k in files]
    if not emb:
        raise UserError(
            f"{folder}: no token embedding (neither {' nor '.join(EMBEDDING_KEYS)} in the "
            "safetensors files)"
        )
    names["shared.weight"] = emb[0]
    for name in expected:
        if names[name] not in files:
            raise UserError(f"{folder / WEIGHTS}: tensor {name!r} is missing")
    known = set(names.values()) | set(EMBEDDING_KEYS)
    for name in sorted(files):
        if name not in known and not name.startswith(SKIPPED_PREFIXES):
            raise UserError(
                f"{files[name]}: unexpected tensor {name!r} for a {len(expected)}-"
                "tensor T5 encoder (is config.json the checkpoint's own?)"
            )
    return names


def load_t5(
    folder: Path,
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules=None,
    dtype=jnp.bfloat16,
    param_dtype=None,
) -> T5Encoder:
    """A :class:`T5Encoder` with the folder's weights, each placed in its mesh sharding.

    Args:
        folder: A Hugging Face T5 / mT5 / UMT5 folder (``config.json``, safetensors).
        mesh: The mesh to shard over (default: one device, every parameter whole).
        rules: Logical -> mesh axis rules (``config.mesh.rules``); needed with ``mesh``.
        dtype: Compute dtype.
        param_dtype: Stored dtype (default ``dtype``).
    """
    folder = Path(folder)
    spec = T5Spec.from_config_json(folder / CONFIG)
    param_dtype = dtype if param_dtype is None else param_dtype
    abstract = nnx.eval_shape(
        lambda: T5Encoder(spec, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)
    )
    graphdef, state = nnx.split(abstract)
    if mesh is None:
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
        rules = ()
    with sharding.axis_rules(rules):
        shardings = sharding.state_shardings(state, mesh)
    files = weight_files(folder)
    expected = expected_tensors(spec)
    names = _check_names(files, expected, folder)
    flat_state = dict(nnx.to_flat_state(state))
    flat_shardings = dict(nnx.to_flat_state(shardings))
    with contextlib.ExitStack() as stack:
        handles = {
            p: stack.enter_context(safe_open(str(p), framework="flax"))
            for p in sorted(set(files[n] for n in names.values()))
        }
        for name, (path, shape, layout) in expected.items():
            src = names[name]
            f = handles[files[src]]
            tensor = f.get_slice(src)
            got = tuple(tensor.get_shape())
            if got != shape:
                raise UserError(
                    f"{files[src]}: tensor {src!r} has shape {list(got)}, a T5 "
                    f"encoder with this config.json needs {list(shape)}"
                )
            var = flat_state[path]
            target = var.get_value() if isinstance(var, nnx.Variable) else var
            sh = flat_shardings[path]
            sh = sh.get_value() if isinstance(sh, nnx.Variable) else sh
            read = _reader(lambda idx, t=tensor: t[idx], layout, (spec.num_heads, spec.d_kv))
            value = jax.make_array_from_callback(
                target.shape,
                sh,
                lambda idx, r=read, s=target.shape: r(idx, s).astype(param_dtype),
            )
            if isinstance(var, nnx.Variable):
                var.set_value(value)
            else:
                flat_state[path] = value
    state = nnx.from_flat_state(flat_state)
    return nnx.merge(graphdef, state)


def save_t5(encoder: T5Encoder, folder: Path, *, shard_bytes: int | None = None) -> None:
    """Writes ``encoder`` as a Hugging Face folder (``config.json`` and safetensors, float32 or
    the parameters' dtype), the inverse of :func:`load_t5`; ``shard_bytes`` splits the
    weights into shards with an index. Benchmarks and tests use it to make checkpoints of
    any size without PyTorch."""
    from safetensors.flax import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = encoder.spec
    flat = dict(nnx.to_flat_state(nnx.state(encoder, nnx.Param)))
    tensors = {}
    for name, (path, shape, layout) in expected_tensors(spec).items():
        var = flat[path]
        x = jnp.asarray(var.get_value() if isinstance(var, nnx.Variable) else var)
        if layout == "t":
            x = x.T
        elif layout == "qkv":
            x = jnp.transpose(x, (1, 2, 0)).reshape(shape)
        elif layout == "o":
            x = jnp.transpose(x, (2, 0, 1)).reshape(shape)
        tensors[name] = x
    groups: list[dict] = [{}]
    size = 0
    for name, x in tensors.items():
        if shard_bytes and size and size + x.nbytes > shard_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = x
        size += x.nbytes
    if len(groups) == 1:
        save_file(groups[0], str(folder / WEIGHTS))
    else:
        weight_map = {}
        for i, group in enumerate(groups):
            file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            save_file(group, str(folder / file))
            weight_map.update({n: file for n in group})
        (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = {
        "model_type": spec.model_type, "vocab_size": spec.vocab_size, "d_model": spec.d_model,
        "d_kv": spec.d_kv, "d_ff": spec.d_ff, "num_layers": spec.num_layers,
        "num_heads": spec.num_heads, "relative_attention_num_buckets": spec.num_buckets,
        "relative_attention_max_distance": spec.max_distance,
        "layer_norm_epsilon": spec.eps, "feed_forward_proj": "gated-gelu",
    }  # fmt: skip
    (folder / CONFIG).write_text(json.dumps(cfg, indent=1))
