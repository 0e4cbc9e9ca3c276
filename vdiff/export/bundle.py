"""Export bundles: a trained workdir -> a folder a server runs without vdiff's model code.

``vdiff export --workdir W --out B`` writes::

    B/bundle.json            manifest (format version, dtype, tensors, function signatures,
                             sampler defaults, generation shapes, sha256 + size of every file)
    B/params.safetensors     the parameters the exported functions read
    B/params/                the same parameter trees as an Orbax checkpoint
                             ({"dit": ..., "vae": ..., "audio_ae": ...}, nested by attribute path)
    B/stats.safetensors      latent statistics (latent.<modality>.shift/scale) and mel
                             statistics (mel.mean, mel.std), float32
    B/config.json            the run config
    B/tokenizer.model        the sentencepiece model (a pretrained encoder's spiece.model)
    B/functions/*.bin        ``jax.export`` serialized functions (cpu and cuda):
        text_encode              tokens (b, L), mask (b, L) -> text features, pooled, mask;
                                 with a pretrained encoder: its embeddings (b, L, D)
                                 bfloat16, mask (b, L) -> the same
        text_embed               a pretrained encoder only: tokens (b, L), mask (b, L) ->
                                 embeddings (b, L, D) bfloat16
        denoise_step.<sampler>.<cfg|nocfg>@<bucket>
                                 ONE Euler/Heun step of the sampler, guided or not
        decode_video@<bucket>    normalised video latents -> uint8 video
        decode_audio@<bucket>    normalised audio latents -> log-mel (the audio stream only)

Every shape bucket of the config (``data.buckets``, e.g. ``32x48x16``) gets its own
sampler steps and decoders: the transformer's token grid, its RoPE positions and the
causal VAE's frame count are fixed per shape, which ``jax.export``'s symbolic dimensions
cannot express (the batch is symbolic). ``bundle.json`` lists them under
``generation.buckets`` with their clip and latent shapes; ``generation.default_bucket``
(the first) is what a server samples when it names none.

A bundle of a run with a pretrained caption encoder (``text.encoder="t5"``) carries that
encoder: its weights are module ``text`` in params.safetensors (in ``text.dtype``, the
numerics the run cached its embeddings with) and ``text_embed`` runs it. The bundle is then
the one folder a server needs, checked file by file against its sha256 like every other
weight, at the cost of a copy of the encoder (about 11 GB for UMT5-XXL in bfloat16).
``generation.text_encoder`` says which encoder a bundle has; the unconditional rows of a
guided step are then the encoded empty caption (its end token), not all-padding.

Tensor naming (params.safetensors and every function's parameter list): ``<module>.<path>``
where ``<module>`` is ``dit``, ``vae``, ``audio_ae`` or ``text`` and ``<path>`` is the attribute path of
the parameter inside that module joined with dots; list entries appear by index
(``dit.text_encoder.blocks.0.mlp.fc1.kernel``) and the transformer's stacked blocks keep their
leading ``depth`` axis (``dit.blocks.layers.video.q.kernel`` has shape ``(depth, width,
heads, head_dim)``). Only tensors some function reads are stored: the VAE and audio AE
encoders are left out.

Every function takes the parameters as explicit inputs — a list of arrays in the order
``bundle.json`` gives under ``functions.<name>.params`` — followed by its data inputs, so
weights live only in the tensor files. Batch is the symbolic dimension ``b`` (the guided
step's text inputs have ``2*b`` rows: the captions, then the empty captions). A parameter
list holds exactly the tensors the compiled function keeps: each function is exported once
with its module's whole parameter tree, and again with the subset ``jax.export`` reported
as used. :mod:`vdiff.serving` loads and runs a bundle.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax import export
from safetensors.numpy import save

import vdiff
from data_pipelines.buckets import check_buckets
from data_pipelines.pipeline import audio_frame_multiple, mel_frames
from vdiff import serving
from vdiff.diffusion.samplers import SAMPLERS, denoise_step
from vdiff.errors import UserError
from vdiff.manifest import file_sha256
from vdiff.models.dit import DiT
from vdiff.models.text_encoder import PAD_ID
from vdiff.sampling import Generator
from vdiff.train.stages import dit_sizes

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
TEXT_FUNCTIONS = ("text_encode", "text_embed")  # shared by every bucket
PLATFORMS = ("cpu", "cuda")


def export_workdir(
    workdir: Path,
    out: Path,
    *,
    dtype: str = "float32",
    use_ema: bool = True,
    buckets: list[str] | None = None,
) -> dict:
    """Exports a workdir written by ``vdiff train`` to bundle folder ``out``; returns the manifest."""

    workdir = Path(workdir)
    _check_out(Path(out))
    gen = Generator.from_workdir(workdir, use_ema=use_ema)
    config_json = (workdir / "config.json").read_text()
    return export_generator(
        gen, out, dtype=dtype, use_ema=use_ema, config_json=config_json, buckets=buckets
    )


def export_generator(
    gen,
    out: Path,
    *,
    dtype: str = "float32",
    use_ema: bool = True,
    config_json: str | None = None,
    buckets: list[str] | None = None,
) -> dict:
    """Exports a :class:`vdiff.sampling.Generator`'s models to bundle folder ``out``.

    Args:
        gen: the generator (its config, models, tokenizer and statistics).
        out: the bundle folder to create (must not exist).
        dtype: ``"float32"`` or ``"bfloat16"``: the stored parameters' dtype and the
            transformer's compute dtype (the sampler state and the decoders stay float32).
        use_ema: recorded in the manifest (which weights ``gen`` holds).
        config_json: the run config text to store (default: ``gen.config`` as JSON).
        buckets: the names of the config's buckets to export (``HxWxT``; default every
            one), in the config's order; the first is the bundle's default.

    Returns:
        The manifest written to ``out/bundle.json``.
    """
    if dtype not in DTYPES:
        raise UserError(f"--dtype={dtype!r} is not one of {sorted(DTYPES)}")
    out = Path(out)
    _check_out(out)
    t0 = time.time()
    c = gen.config
    with_audio = gen.audio_ae is not None and gen.dit.has_audio
    trained = check_buckets(c.data.buckets)
    if unknown := sorted(set(buckets or ()) - {b.name for b in trained}):
        raise UserError(
            f"--buckets {', '.join(unknown)}: not buckets of this run; it trained "
            f"{', '.join(b.name for b in trained)}"
        )
    buckets = [b for b in trained if not buckets or b.name in buckets]
    shapes = {b.name: _bucket_shapes(gen, b, with_audio) for b in buckets}
    dt = DTYPES[dtype]
    modules = {
        "dit": _module_parts(gen.dit, "dit", dt, _export_dit(c, dt)),
        "vae": _module_parts(gen.vae, "vae", dt),
    }
    if with_audio:
        modules["audio_ae"] = _module_parts(gen.audio_ae, "audio_ae", dt)
    text_features = None
    if gen.captions is not None:  # the pretrained encoder, in the dtype the run used
        t_dt = jnp.dtype(c.text.dtype)
        encoder = nnx.merge(gen.captions.graphdef, gen.captions.state)
        modules["text"] = _module_parts(encoder, "text", t_dt)
        text_features = gen.captions.width

    stats = {
        f"latent.{mod}.{k}": np.asarray(gen.latent_stats[mod][k], np.float32)
        for mod in (("video", "audio") if with_audio else ("video",))
        for k in ("shift", "scale")
    }
    if with_audio:
        stats.update(
            {f"mel.{k}": np.asarray(gen.mel_stats[k], np.float32) for k in ("mean", "std")}
        )

    functions = {}
    (b,) = export.symbolic_shape("b")
    (b2,) = export.symbolic_shape("2*b", scope=b.scope)
    for bucket, bshapes in shapes.items():
        spec_args = (c, bshapes, with_audio, stats, dt, text_features)
        symbolic = _function_specs(*spec_args, b, b2)
        # jax.export keeps every input of a shape-polymorphic function, so the parameters a
        # function reads are found on a batch-1 export (they do not depend on the batch).
        concrete = _function_specs(*spec_args, 1, 2)
        for name, (module, fn, inputs) in symbolic.items():
            if name not in TEXT_FUNCTIONS:
                name = f"{name}@{bucket}"
            elif name in functions:
                continue
            functions[name] = _export_function(
                modules[module], fn, inputs, concrete[name.split("@")[0]][2]
            )
            log.info("exported %s", name)

    used = sorted({n for f in functions.values() for n in f["params"]})
    tensors = {}
    for mod in modules.values():
        for n, x in zip(mod["names"], mod["leaves"]):
            if n in used:
                tensors[n] = np.asarray(jax.device_get(x)).astype(mod["dtype"])

    tmp = out.parent / f".{out.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / serving.FUNCTIONS_DIR).mkdir(parents=True)

    # Written with write_bytes (not save_file) so the files get the usual permissions.
    meta = {"naming": serving.TENSOR_NAMING}
    (tmp / serving.PARAMS_FILE).write_bytes(save(tensors, metadata=meta))
    (tmp / serving.STATS_FILE).write_bytes(save(stats))
    _save_orbax(tmp / serving.ORBAX_DIR, tensors)
    (tmp / serving.CONFIG_FILE).write_text(config_json or c.to_json(indent=2))
    (tmp / serving.TOKENIZER_FILE).write_bytes(gen.tokenizer.model_bytes())
    fn_manifest = {}
    for name, f in functions.items():
        rel = f"{serving.FUNCTIONS_DIR}/{name}.bin"
        (tmp / rel).write_bytes(f.pop("exported").serialize())
        fn_manifest[name] = {"file": rel, **f}

    s = c.sample
    manifest = {
        "format": serving.FORMAT,
        "format_version": serving.FORMAT_VERSION,
        "vdiff_version": vdiff.__version__,
        "jax_version": jax.__version__,
        "dtype": dtype,
        "weights": "ema" if use_ema else "raw",
        "platforms": list(PLATFORMS),
        "tensor_naming": serving.TENSOR_NAMING,
        "tensors": {
            "file": serving.PARAMS_FILE,
            "entries": {n: _spec(x) for n, x in tensors.items()},
        },
        "stats": {"file": serving.STATS_FILE, "entries": {n: _spec(x) for n, x in stats.items()}},
        "orbax_params": serving.ORBAX_DIR,
        "functions": fn_manifest,
        "sampler": {
            "sampler": s.sampler,
            "steps": int(s.steps),
            "cfg": float(s.cfg),
            "audio_cfg": None if s.audio_cfg is None else float(s.audio_cfg),
            "shift": float(s.shift),
        },
        "generation": {
            "fps": float(c.data.fps),
            "caption_len": int(c.text.max_len),
            "pad_id": _pad_id(),
            "text_encoder": c.text.encoder,
            "audio": with_audio,
            **(
                {"sample_rate": int(c.data.sample_rate), "hop": int(c.data.hop)}
                if with_audio
                else {}
            ),
            "default_bucket": buckets[0].name,
            "buckets": shapes,
        },
        "files": {
            p.relative_to(tmp).as_posix(): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        },
    }
    (tmp / serving.MANIFEST).write_text(json.dumps(manifest, indent=1))
    tmp.rename(out)
    size = sum(f["bytes"] for f in manifest["files"].values())
    log.info("bundle %s: %.1f MB in %.1f s", out, size / 1e6, time.time() - t0)
    return manifest


# ----------------------------------------------------------------------------- pieces


def _check_out(out: Path) -> None:
    if out.exists():
        raise UserError(f"--out {out} already exists; remove it or pick another folder")


def _export_dit(config, dtype):
    """The transformer rebuilt for export: the bundle's compute dtype and the portable
    "xla" attention (the "auto" backend picks per host, and cuDNN does not lower for cpu)."""

    return nnx.eval_shape(
        lambda: DiT.from_config(
            config.model, dit_sizes(config), nnx.Rngs(0), dtype=dtype, param_dtype=dtype,
            attention_backend="xla", remat="none",
        )
    )  # fmt: skip


def _module_parts(module, prefix: str, dtype, template=None) -> dict:
    """Parameter leaves with their bundle names, plus what rebuilds the module from them.

    ``dtype`` is the stored parameters' dtype (the exported functions take them so);
    ``template`` (an abstract module of the same parameter tree) supplies the graph
    definition to export; default: ``module``'s own.
    """
    _, params, _ = nnx.split(module, nnx.Param, ...)
    graphdef, abstract, rest = nnx.split(
        template if template is not None else module, nnx.Param, ...
    )
    with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    if treedef != jax.tree_util.tree_structure(abstract):
        raise RuntimeError(
            f"{prefix}: the export template's parameter tree differs from the model's"
        )
    names = [f"{prefix}.{_path_name(p)}" for p, _ in with_path]
    return {
        "names": names,
        "leaves": [x for _, x in with_path],
        "treedef": treedef,
        "graphdef": graphdef,
        "rest": rest,
        "dtype": dtype,
        "abstract": [jax.ShapeDtypeStruct(x.shape, dtype) for _, x in with_path],
    }


def _path_name(path) -> str:
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey) and k.name != "value":
            parts.append(k.name)
    return ".".join(parts)


def _bucket_shapes(gen, bucket, with_audio: bool) -> dict:
    """One bucket's clip and latent shapes (what ``Generator.generate`` uses for it)."""
    c = gen.config
    sd = c.vae.spatial_down
    out = {
        "num_frames": bucket.frames,
        "height": bucket.height,
        "width": bucket.width,
        "caption_len": int(c.text.max_len),
        "video_latent_shape": [
            int(gen.vae.latent_frames(bucket.frames)),
            bucket.height // sd,
            bucket.width // sd,
            int(c.vae.latent_channels),
        ],
    }
    if with_audio:
        mel_len = mel_frames(
            bucket.frames, c.data.fps, c.data.sample_rate, c.data.hop, audio_frame_multiple(c)
        )
        out["audio_latent_shape"] = [
            mel_len // c.audio_ae.time_down,
            int(c.audio_ae.latent_channels),
        ]
    return out


def _pad_id() -> int:
    return int(PAD_ID)


def _function_specs(
    c, shapes: dict, with_audio: bool, stats: dict, text_dtype, text_features, b, b2
) -> dict:
    """name -> (module, fn(model, *inputs), [(input name, ShapeDtypeStruct)]).

    ``text_dtype``: the transformer's compute dtype, which its text features come in;
    ``text_features``: a pretrained caption encoder's width (None: the internal encoder);
    ``b``, ``b2``: the batch and the guided text batch (symbolic ``b`` and ``2*b``, or
    concrete sizes).
    """

    f32, L = jnp.float32, shapes["caption_len"]
    tw = text_features or c.model.text_width
    sds = jax.ShapeDtypeStruct
    xv = ("video_latents", sds((b, *shapes["video_latent_shape"]), f32))
    xa = [("audio_latents", sds((b, *shapes["audio_latent_shape"]), f32))] if with_audio else []
    ids = [("tokens", sds((b, L), jnp.int32)), ("mask", sds((b, L), jnp.bool_))]
    encode = lambda m, caption, mask: m.encode_text(caption, mask)  # noqa: E731
    if text_features is None:
        specs = {"text_encode": ("dit", encode, ids)}
    else:
        specs = {
            "text_embed": ("text", lambda m, t, mask: m(t, mask).astype(jnp.bfloat16), ids),
            "text_encode": (
                "dit",
                encode,
                [("caption", sds((b, L, tw), jnp.bfloat16)), ("mask", sds((b, L), jnp.bool_))],
            ),
        }
    for sampler in SAMPLERS:
        for guided in (True, False):
            rows = b2 if guided else b

            def step(m, xv, *rest, sampler=sampler, guided=guided):
                xa = rest[0] if with_audio else None
                feats, pooled, tmask, t, t_next, scales = rest[-6:]
                return denoise_step(
                    m, (feats, pooled, tmask), xv, xa, t, t_next, scales,
                    sampler=sampler, guided=guided,
                )  # fmt: skip

            specs[f"denoise_step.{sampler}.{'cfg' if guided else 'nocfg'}"] = (
                "dit",
                step,
                [
                    xv, *xa,
                    ("text_features", sds((rows, L, tw), text_dtype)),
                    ("text_pooled", sds((rows, tw), text_dtype)),
                    ("text_mask", sds((rows, L), jnp.bool_)),
                    ("t", sds((), f32)), ("t_next", sds((), f32)), ("scales", sds((2,), f32)),
                ],
            )  # fmt: skip
    num_frames = shapes["num_frames"]

    def decode_video(vae, z, shift, scale):
        x = vae.decode(z / scale + shift)[:, :num_frames]
        return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

    stat = lambda name: (name, sds(stats[name].shape, f32))  # noqa: E731
    specs["decode_video"] = (
        "vae", decode_video, [xv, stat("latent.video.shift"), stat("latent.video.scale")]
    )  # fmt: skip
    if with_audio:

        def decode_audio(ae, z, shift, scale, mel_mean, mel_std):
            return ae.decode(z / scale + shift) * mel_std + mel_mean

        specs["decode_audio"] = (
            "audio_ae",
            decode_audio,
            [*xa, *map(stat, ("latent.audio.shift", "latent.audio.scale", "mel.mean", "mel.std"))],
        )
    return specs


def _export_function(mod: dict, fn, inputs, concrete_inputs) -> dict:
    """Exports ``fn(model, *inputs)`` with the module's parameters as its first input.

    Exported twice: at the concrete shapes with every parameter, then at the symbolic
    shapes with only the parameters that the first export kept.
    """
    leaves = mod["abstract"]

    def build(keep: list[int], specs):
        def wrapped(params, *args):
            full = [
                params[keep.index(i)] if i in keep else jnp.zeros(a.shape, a.dtype)
                for i, a in enumerate(leaves)
            ]
            model = nnx.merge(
                mod["graphdef"], jax.tree.unflatten(mod["treedef"], full), mod["rest"]
            )
            return fn(model, *args)

        return export.export(jax.jit(wrapped), platforms=PLATFORMS)(
            [leaves[i] for i in keep], *specs
        )

    first = build(list(range(len(leaves))), [s for _, s in concrete_inputs])
    keep = [i for i in first.module_kept_var_idx if i < len(leaves)]
    exported = build(keep, [s for _, s in inputs])
    return {
        "exported": exported,
        "platforms": list(exported.platforms),
        "symbolic_dims": ["b"],
        "params": [mod["names"][i] for i in keep],
        "inputs": [
            {"name": n, **_aval_spec(a)}
            for (n, _), a in zip(inputs, exported.in_avals[len(keep) :])
        ],
        "outputs": [_aval_spec(a) for a in exported.out_avals],
    }


def _aval_spec(a) -> dict:
    return {"shape": [d if isinstance(d, int) else str(d) for d in a.shape], "dtype": str(a.dtype)}


def _spec(x: np.ndarray) -> dict:
    return {"shape": list(x.shape), "dtype": str(x.dtype)}


def _save_orbax(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """The stored tensors as an Orbax checkpoint, nested by name (``dit.blocks.x`` ->
    ``{"dit": {"blocks": {"x": ...}}}``), for tools that restore Orbax trees."""

    tree: dict = {}
    for name, x in tensors.items():
        node = tree
        *parents, leaf = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = x
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path.absolute(), tree)
        ckpt.wait_until_finished()
