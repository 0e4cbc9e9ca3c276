"""Serving: load an export bundle (``vdiff export``) and generate clips from it.

A server needs only jax, numpy, safetensors, sentencepiece and json: this module
never imports vdiff's model code or flax. Two small model-free helpers are shared with
the training side so that both draw the same noise and step through the same times:
:mod:`vdiff.diffusion.schedule` (time grid, per-example noise keys) and, for bundles
with audio, :func:`data_pipelines.audio.mel_to_wave` (Griffin-Lim, numpy/scipy);
the tokenizer is :class:`data_pipelines.tokenizer.Tokenizer` (sentencepiece).

Loading reads every file the manifest lists, checks its sha256 (a missing or altered
file is a :class:`~vdiff.errors.UserError`), and parses each one from the checked bytes:
JSON, safetensors, a sentencepiece model and ``jax.export`` flatbuffers; nothing is
unpickled. :meth:`Bundle.generate` then repeats :meth:`vdiff.sampling.Generator.generate`:
same tokens, same per-example noise (seed, prompt index), same time grid, one exported
sampler step per grid interval (the guidance combine is inside it), then the exported
decoders and Griffin-Lim. See :mod:`vdiff.export.bundle` for the layout and tensor naming.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
from jax import export

from data_pipelines.audio import mels_to_waves
from data_pipelines.tokenizer import PretrainedTokenizer, Tokenizer
from vdiff.diffusion.schedule import noise_key, per_example_noise, time_grid
from vdiff.errors import UserError
from vdiff.manifest import read_versioned_json

FORMAT = "vdiff-bundle"
FORMAT_VERSION = 3  # 2: sampler steps and decoders per shape bucket; 3: the caption encoder
MANIFEST = "bundle.json"
PARAMS_FILE = "params.safetensors"
STATS_FILE = "stats.safetensors"
ORBAX_DIR = "params"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
FUNCTIONS_DIR = "functions"
TENSOR_NAMING = (
    "<module>.<attribute path>: module is dit, vae, audio_ae or text; the path of the parameter "
    "inside the module joined with '.', list entries by index; the transformer's stacked "
    "blocks (dit.blocks.layers.*) keep a leading depth axis"
)
_FIX = "re-export it with 'vdiff export --workdir W --out B'"
_PLATFORMS = {"cpu": {"cpu"}, "gpu": {"cuda", "rocm"}, "tpu": {"tpu"}}
_SAFETENSORS_DTYPES = {
    "F32": np.dtype(np.float32),
    "BF16": np.dtype(jnp.bfloat16),
    "F16": np.dtype(np.float16),
}


def file_format(relpath: str) -> str | None:
    """The format of a bundle file by its path, or None for a file no bundle holds.

    Every format is a non-executable data format (none of them is pickle).
    """
    p = Path(relpath)
    if p.parts[0] == ORBAX_DIR and len(p.parts) > 1:
        return "orbax"  # JSON metadata and OCDBT/tensorstore chunks
    if p.parts[0] == FUNCTIONS_DIR and p.suffix == ".bin":
        return "jax-export"  # flatbuffer
    return {".json": "json", ".safetensors": "safetensors", ".model": "sentencepiece"}.get(p.suffix)


@dataclasses.dataclass
class Bundle:
    """A loaded bundle: parameters on the default device, exported functions, tokenizer.

    Attributes:
        path: the bundle folder.
        manifest: ``bundle.json``.
        params: tensor name -> array (see the module docstring of vdiff.export.bundle).
        stats: latent and mel statistics, float32.
        tokenizer: the sentencepiece tokenizer.
        functions: function name -> deserialized ``jax.export.Exported``.
    """

    path: Path
    manifest: dict
    params: dict[str, jax.Array]
    stats: dict[str, np.ndarray]
    tokenizer: object
    functions: dict[str, export.Exported]
    _jitted: dict = dataclasses.field(default_factory=dict, repr=False)

    def call(self, name: str, *inputs):
        """Runs exported function ``name`` on ``inputs`` (its parameters are passed for you)."""
        if name not in self.functions:
            raise UserError(
                f"bundle {self.path} has no function {name!r} (it has {sorted(self.functions)})"
            )
        if name not in self._jitted:
            self._jitted[name] = jax.jit(self.functions[name].call)
        params = [self.params[n] for n in self.manifest["functions"][name]["params"]]
        return self._jitted[name](params, *inputs)

    @property
    def has_audio(self) -> bool:
        return bool(self.manifest["generation"]["audio"])

    def generate(
        self,
        prompts: list[str],
        *,
        seed: int = 0,
        steps: int | None = None,
        cfg: float | None = None,
        sampler: str | None = None,
        batch_size: int = 16,
        prompt_ids: list[int] | None = None,
        bucket: str | None = None,
    ) -> dict[str, np.ndarray]:
        """Prompts -> clips of one trained shape bucket.

        Args:
            prompts: captions.
            seed: noise seed; prompt i's noise depends only on (seed, i), or on
                (seed, ``prompt_ids[i]``) when given.
            steps: sampler steps (default: the bundle's).
            cfg: guidance scale, 1 = off (default: the bundle's).
            sampler: ``"euler"`` or ``"heun"`` (default: the bundle's).
            batch_size: prompts per exported call (any size: batch is symbolic).
            prompt_ids: noise indices per prompt.
            bucket: the shape bucket, e.g. ``"48x32x16"`` (:meth:`buckets`; default the
                bundle's first).

        Returns:
            ``video`` uint8 (N, T, H, W, 3), ``video_latents`` (N, T', H', W', C) and, with
            audio, ``audio`` float32 waveform (N, S), ``mel`` (N, Tm, n_mels) and
            ``audio_latents`` (N, Ta, Ca).
        """
        g, s = self.manifest["generation"], self.manifest["sampler"]
        bucket = bucket or g["default_bucket"]
        if bucket not in g["buckets"]:
            raise UserError(f"bundle {self.path} has no bucket {bucket} (it has {self.buckets()})")
        shapes = g["buckets"][bucket]
        cfg = s["cfg"] if cfg is None else float(cfg)
        steps = steps or s["steps"]
        sampler = sampler or s["sampler"]
        guided = cfg != 1.0
        step_fn = f"denoise_step.{sampler}.{'cfg' if guided else 'nocfg'}@{bucket}"
        if step_fn not in self.functions:
            raise UserError(f"--sampler={sampler!r}: the bundle has no {step_fn} function")
        if steps < 1:
            raise UserError(f"--steps={steps} must be >= 1")
        if prompt_ids is not None and len(prompt_ids) != len(prompts):
            raise UserError(f"{len(prompt_ids)} prompt ids for {len(prompts)} prompts")
        audio_cfg = cfg if s["audio_cfg"] is None else s["audio_cfg"]
        scales = np.asarray([cfg, audio_cfg] if guided else [1.0, 1.0], np.float32)
        grid = time_grid(steps, s["shift"])
        video_shape = tuple(shapes["video_latent_shape"])
        audio_shape = tuple(shapes["audio_latent_shape"]) if self.has_audio else None
        tokens, mask = self.tokenizer.encode(list(prompts), g["caption_len"])
        parts: dict[str, list] = {}
        for i in range(0, len(prompts), batch_size):
            n = min(batch_size, len(prompts) - i)
            ids = range(i, i + n) if prompt_ids is None else prompt_ids[i : i + n]
            noise = per_example_noise(
                [noise_key(seed, int(k)) for k in ids], video_shape, audio_shape
            )
            tok, msk = tokens[i : i + n], mask[i : i + n]
            if guided:  # the unconditional rows: empty captions, after the captions
                etok, emsk = self._empty_captions(n, g)
                tok, msk = np.concatenate([tok, etok]), np.concatenate([msk, emsk])
            caption = (
                tok if "text_embed" not in self.functions else self.call("text_embed", tok, msk)
            )
            text = self.call("text_encode", caption, msk)
            xv, xa = noise["video"], noise.get("audio")
            for j in range(steps):
                state = (xv, xa) if self.has_audio else (xv,)
                out = self.call(step_fn, *state, *text, grid[j], grid[j + 1], scales)
                xv, xa = out if self.has_audio else (out[0], None)
            for k, v in self.decode(xv, xa, bucket=bucket).items():
                parts.setdefault(k, []).append(v)
        return {k: np.concatenate(v) for k, v in parts.items()}

    def _empty_captions(self, n: int, g: dict) -> tuple[np.ndarray, np.ndarray]:
        """``n`` unconditional captions: all padding for the internal encoder, the encoded
        empty string (its end token) for a pretrained one, as the run trained them."""
        if g["text_encoder"] == "internal":
            shape = (n, g["caption_len"])
            return np.full(shape, g["pad_id"], np.int32), np.zeros(shape, bool)
        return self.tokenizer.encode([""] * n, g["caption_len"])

    def buckets(self) -> list[str]:
        """The shape buckets the bundle samples (``HxWxT``), the default first."""
        g = self.manifest["generation"]
        return [g["default_bucket"], *(b for b in g["buckets"] if b != g["default_bucket"])]

    def decode(self, video_latents, audio_latents=None, *, bucket: str | None = None):
        """Normalised latents of ``bucket`` (default the first) -> uint8 video (+ log-mel
        and Griffin-Lim waveform)."""
        st = self.stats
        bucket = bucket or self.manifest["generation"]["default_bucket"]
        out = {
            "video": np.asarray(
                self.call(
                    f"decode_video@{bucket}",
                    video_latents,
                    st["latent.video.shift"],
                    st["latent.video.scale"],
                )
            ),
            "video_latents": np.asarray(video_latents),
        }
        if audio_latents is not None:
            g = self.manifest["generation"]
            mel = np.asarray(
                self.call(
                    f"decode_audio@{bucket}", audio_latents, st["latent.audio.shift"],
                    st["latent.audio.scale"], st["mel.mean"], st["mel.std"],
                )
            )  # fmt: skip
            out["audio"] = mels_to_waves(mel, sample_rate=g["sample_rate"], hop=g["hop"])
            out["mel"] = mel
            out["audio_latents"] = np.asarray(audio_latents)
        return out


def load_bundle(path: str | Path) -> Bundle:
    """Loads and checks a bundle folder written by ``vdiff export``.

    Raises:
        UserError: if the folder is not a bundle, a file is missing or does not match
            its sha256, or no function was exported for this platform.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    # Files parsed here are read once and parsed from the checked bytes; the others
    # (the config, the Orbax copy of the parameters) are only checked.
    parsed = {
        manifest["tensors"]["file"],
        manifest["stats"]["file"],
        TOKENIZER_FILE,
        *(f["file"] for f in manifest["functions"].values()),
    }
    data = {}
    for rel, meta in manifest["files"].items():
        blob = _read_checked(path, rel, meta, keep=rel in parsed)
        if blob is not None:
            data[rel] = blob
    if missing := sorted(parsed - set(data)):
        raise UserError(f"{path}/{MANIFEST} does not list {missing}; {_FIX}")

    tensors = _load_safetensors(path, manifest["tensors"]["file"], data)
    stats = _load_safetensors(path, manifest["stats"]["file"], data)
    for name, spec in manifest["tensors"]["entries"].items():
        if name not in tensors or list(tensors[name].shape) != spec["shape"]:
            raise UserError(f"{path}/{PARAMS_FILE} does not hold {name} {spec['shape']}; {_FIX}")
    kind = (
        Tokenizer if manifest["generation"]["text_encoder"] == "internal" else PretrainedTokenizer
    )
    try:
        tokenizer = kind.from_bytes(data[TOKENIZER_FILE])
    except ValueError as e:
        raise UserError(f"{path}/{TOKENIZER_FILE}: {e}; {_FIX}") from None
    here = _PLATFORMS.get(jax.default_backend(), {jax.default_backend()})
    functions = {}
    for name, spec in manifest["functions"].items():
        exp = export.deserialize(bytearray(data[spec["file"]]))
        if not here & set(exp.platforms):
            raise UserError(
                f"{path}/{spec['file']} was exported for {list(exp.platforms)}, not for "
                f"this {jax.default_backend()} backend; export again on a jax with that platform"
            )
        functions[name] = exp
    params = {n: jax.device_put(x) for n, x in tensors.items()}
    return Bundle(path, manifest, params, stats, tokenizer, functions)


def pick_bucket(bundle: Bundle, height=None, width=None, num_frames=None) -> str:
    """The bundle's bucket with the given shape (unset parts match any; the first bucket
    that matches, in the bundle's order)."""
    want = (height, width, num_frames)
    for name in bundle.buckets():
        shape = tuple(int(x) for x in name.split("x"))
        if all(w is None or w == v for w, v in zip(want, shape)):
            return name
    raise UserError(
        f"bundle {bundle.path} has no bucket of height {height}, width {width}, frames "
        f"{num_frames}; it samples {', '.join(bundle.buckets())} (height x width x frames)"
    )


def sample_cli(args) -> list[Path]:
    """``vdiff sample --bundle B``: clips of one of the bundle's buckets."""
    for flag, value in (("--fps", args.fps), ("--seconds", args.seconds)):
        if value is not None:
            raise UserError(f"{flag} does not apply to --bundle: its buckets fix the frames")
    if args.no_ema:
        raise UserError("--no-ema does not apply to --bundle; export with 'vdiff export --no-ema'")
    bundle = load_bundle(args.bundle)
    bucket = pick_bucket(bundle, args.height, args.width, args.num_frames)
    out = bundle.generate(
        args.prompt, seed=args.seed, steps=args.steps, cfg=args.cfg, sampler=args.sampler,
        bucket=bucket,
    )  # fmt: skip
    from vdiff.sampling import write_prompt_clips  # mp4/png writing (the CLI, not serving)

    g = bundle.manifest["generation"]
    return write_prompt_clips(
        Path(args.out), args.prompt, out, g["fps"], g.get("sample_rate", 16000)
    )


def _load_safetensors(path: Path, rel: str, data: dict) -> dict[str, np.ndarray]:
    """Parses a safetensors file from its checked bytes (bfloat16 included)."""

    try:
        entries = safetensors.deserialize(data[rel])
    except Exception as e:  # the parser's own error type is not part of its API
        raise UserError(f"{path}/{rel} is not a safetensors file ({e}); {_FIX}") from None
    out = {}
    for name, v in entries:
        if v["dtype"] not in _SAFETENSORS_DTYPES:
            raise UserError(f"{path}/{rel}: tensor {name} has unsupported dtype {v['dtype']}")
        dtype = _SAFETENSORS_DTYPES[v["dtype"]]
        out[name] = np.frombuffer(v["data"], dtype=dtype).reshape(v["shape"])
    return out


def _read_manifest(path: Path) -> dict:
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise UserError(f"{path} has no {MANIFEST}; pass a folder written by 'vdiff export'")
    return read_versioned_json(
        mpath,
        fmt=FORMAT,
        version_key="format_version",
        version=FORMAT_VERSION,
        what="vdiff bundle manifest",
        fix=_FIX,
    )


def _read_checked(path: Path, rel: str, meta: dict, *, keep: bool) -> bytes | None:
    """Checks one file's sha256; returns its bytes when ``keep``."""
    if file_format(rel) is None or ".." in Path(rel).parts:
        raise UserError(f"{path}/{MANIFEST} lists {rel!r}, which no bundle holds; {_FIX}")
    h, chunks = hashlib.sha256(), []
    try:
        with open(path / rel, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
                if keep:
                    chunks.append(chunk)
    except FileNotFoundError:
        raise UserError(f"{path}/{rel} is missing from the bundle; {_FIX}") from None
    if h.hexdigest() != meta["sha256"]:
        raise UserError(
            f"{path}/{rel} does not match its sha256 in {MANIFEST} (altered or truncated); {_FIX}"
        )
    return b"".join(chunks) if keep else None
