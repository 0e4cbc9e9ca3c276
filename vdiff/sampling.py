"""From a trained workdir (or the main job's in-memory stages) to clips on disk.

A :class:`Generator` holds the three trained parts — video VAE, audio AE, diffusion
transformer — plus the tokenizer (and, with ``text.encoder="t5"``, the frozen pretrained
caption encoder loaded from ``text.path``) and the latent/mel statistics, and turns prompts
into uint8 video and a waveform: noise -> sampler (CFG) -> denormalise -> decode ->
Griffin-Lim.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.image
import ml_collections
import numpy as np
from flax import nnx

from data_pipelines.audio import mels_to_waves
from data_pipelines.buckets import Bucket
from data_pipelines.latents import load_stats
from data_pipelines.mp4 import encode_mp4
from data_pipelines.pipeline import audio_frame_multiple, mel_frames
from data_pipelines.tokenizer import Tokenizer
from vdiff.caption_encoder import CaptionEncoder
from vdiff.config import load_saved_config
from vdiff.diffusion import samplers

# Shared with export bundles (vdiff.serving), which draw the same noise.
from vdiff.diffusion.schedule import noise_key as noise_key
from vdiff.diffusion.schedule import per_example_noise
from vdiff.errors import UserError
from vdiff.models.video_vae import denormalize, from_pixels, normalize
from vdiff.parallel.mesh import make_mesh
from vdiff.train import stages
from vdiff.train.data import data_root
from vdiff.train.trained import Trained, restore_stage

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Generator:
    config: ml_collections.ConfigDict
    vae: nnx.Module
    dit: nnx.Module
    tokenizer: object
    latent_stats: dict[str, dict[str, np.ndarray]]
    audio_ae: nnx.Module | None = None
    mel_stats: dict[str, float] | None = None
    # A pretrained caption encoder (text.encoder="t5"); None: the DiT's internal one.
    captions: CaptionEncoder | None = None

    # ------------------------------------------------------------- building
    @classmethod
    def from_stages(cls, config, data, trained: Trained, *, use_ema: bool = True) -> Generator:
        """From the main job's trained stages in memory."""
        captions = caption_encoder(config)
        return cls(
            config=config,
            vae=trained.vae.model(),
            dit=trained.dit.model(ema=use_ema),
            tokenizer=data.tokenizer,
            latent_stats=trained.latent_stats,
            audio_ae=trained.audio_ae.model() if trained.audio_ae is not None else None,
            mel_stats=data.mel_stats,
            captions=captions,
        )

    @classmethod
    def from_workdir(
        cls, workdir: Path, *, use_ema: bool = True, dit_step: int | None = None
    ) -> Generator:
        """Restores every stage from a workdir written by ``vdiff train``.

        Each stage's newest readable checkpoint is used, except the transformer's when
        ``dit_step`` names one (see :func:`restore_dit`).
        """

        workdir = Path(workdir)
        config = workdir_config(workdir)
        mesh = make_mesh(config)
        vae_engine = stages.video_vae_engine(config, mesh)
        vae = restore_stage(workdir, "vae", vae_engine).model()
        dit = restore_dit(workdir, config, mesh, step=dit_step, use_ema=use_ema)
        audio = None

        latent_stats = load_stats(workdir / "latents")
        if "audio" in latent_stats:
            a_engine = stages.audio_ae_engine(config, mesh)
            audio = restore_stage(workdir, "audio_ae", a_engine).model()
        data_stats = json.loads((workdir / "data_stats.json").read_text())
        captions = caption_encoder(config)
        if captions is not None:
            tokenizer = captions.tokenizer
        else:
            tokenizer = Tokenizer(data_root(config, workdir) / "tokenizer.model")
        return cls(config, vae, dit, tokenizer, latent_stats, audio, data_stats["mel"], captions)

    # ------------------------------------------------------------ generating
    def generate(
        self,
        prompts: list[str],
        *,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        cfg: float | None = None,
        steps: int | None = None,
        sampler: str | None = None,
        seed: int = 0,
        batch_size: int = 16,
        audio: bool = True,
        cross_modal: bool | None = None,
        prompt_ids: list[int] | None = None,
        start_videos: np.ndarray | None = None,
        t_start: float = 1.0,
        fps: float | None = None,
        seconds: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Prompts -> {"video": uint8 (N,T,H,W,3), "audio": float32 (N, S) or absent}.

        The clip shape defaults to the config's first bucket (``data.buckets[0]``); any
        height and width the strides divide works, and any frame count. ``fps`` (default
        ``data.fps``) is the frame rate the clip is sampled at: its tokens' times in
        seconds; ``seconds`` gives the length instead of ``num_frames``
        (``round(seconds * fps)`` frames). Audio spans the clip's seconds.

        The starting noise of prompt i depends only on (seed, i) through
        :func:`noise_key` (``prompt_ids[i]`` instead of ``i`` when given), so the same prompt
        and seed give the same clip whatever the batch it is generated in (up to
        float rounding of the batched matmuls). ``cross_modal=False`` generates video
        and audio with their mutual attention masked (the sync ablation).

        ``start_videos`` (uint8 ``(N, T, H, W, 3)``, one per prompt) re-noises real
        clips' latents to ``t_start`` and samples from there, video only: a diagnostic
        of which noise level loses what (the report's ``oracle.renoised_*``).
        """

        c, s = self.config, self.config.sample
        first = default_bucket(c)
        rate = float(fps or c.data.fps)
        if rate <= 0:
            raise UserError(f"--fps={fps} must be positive")
        if seconds is not None:
            if num_frames is not None:
                raise UserError("give --num-frames or --seconds, not both")
            num_frames = max(1, round(seconds * rate))
        num_frames = num_frames or first.frames
        height = height or first.height
        width = width or first.width
        cfg = s.cfg if cfg is None else cfg
        steps = steps or s.steps
        sampler = sampler or s.sampler
        sd = c.vae.spatial_down
        if height % (sd * c.model.patch[1]) or width % (sd * c.model.patch[2]):
            raise UserError(
                f"--height/--width must be multiples of {sd * c.model.patch[1]} "
                "(VAE spatial factor x patch size)"
            )
        lt = self.vae.latent_frames(num_frames)
        if lt % c.model.patch[0]:
            raise UserError(
                f"--num-frames={num_frames} gives {lt} latent frames, not a multiple of patch {c.model.patch[0]}"
            )
        video_shape = (lt, height // sd, width // sd, c.vae.latent_channels)
        with_audio = audio and self.audio_ae is not None and self.dit.has_audio
        mel_len = mel_frames(
            num_frames, rate, c.data.sample_rate, c.data.hop, audio_frame_multiple(c)
        )
        audio_shape = (
            (mel_len // c.audio_ae.time_down, c.audio_ae.latent_channels) if with_audio else None
        )
        if start_videos is not None:
            if len(start_videos) != len(prompts):
                raise ValueError(f"{len(start_videos)} start_videos for {len(prompts)} prompts")
            if tuple(start_videos.shape[1:4]) != (num_frames, height, width):
                raise ValueError(
                    f"start_videos are {tuple(start_videos.shape[1:4])} (frames, height, width); "
                    f"sampling asks for {(num_frames, height, width)}"
                )
            with_audio, audio_shape = False, None
        empty = None
        if self.captions is not None:  # the pretrained encoder's embeddings
            tokens, mask = self.captions.encode(list(prompts))
            empty = self.captions.empty()
        else:
            tokens, mask = self.tokenizer.encode(list(prompts), c.text.max_len)
        videos, waves = [], []
        for i in range(0, len(prompts), batch_size):
            n = min(batch_size, len(prompts) - i)
            ids = range(i, i + n) if prompt_ids is None else prompt_ids[i : i + n]
            rngs = [noise_key(seed, int(k)) for k in ids]
            start = None
            if start_videos is not None:
                start = self.renoise(start_videos[i : i + n], t_start, rngs), t_start
            out = self._sample_batch(
                tokens[i : i + n],
                mask[i : i + n],
                rngs,
                video_shape,
                audio_shape,
                cfg,
                steps,
                sampler,
                cross_modal,
                start,
                None if fps is None else rate,
                empty,
            )
            videos.append(out["video"])
            if with_audio:
                waves.append(out["audio"])
        result = {"video": np.concatenate(videos)[:, :num_frames]}
        if with_audio:
            result["audio"] = np.concatenate(waves)
        return result

    def _sample_batch(
        self, tokens, mask, rngs, video_shape, audio_shape, cfg, steps, sampler, cross_modal,
        start=None, fps=None, empty=None,
    ):  # fmt: skip

        n = len(rngs)
        # Each example's noise comes from its own key; then one batched sampler call.
        noise = per_example_noise(rngs, video_shape, audio_shape)
        t_start = 1.0
        if start is not None:  # (video latents at t, t): sampling starts there
            noise["video"], t_start = start
        out = samplers.sample(
            self.dit,
            jnp.asarray(tokens),
            jnp.asarray(mask),
            {
                "video": (n, *video_shape),
                "audio": None if audio_shape is None else (n, *audio_shape),
            },
            None,
            steps=steps,
            cfg=None if cfg == 1.0 else cfg,
            audio_cfg=self.config.sample.audio_cfg if cfg != 1.0 else None,
            sampler=sampler,
            shift=self.config.sample.shift,
            noise=noise,
            cross_modal=cross_modal,
            t_start=t_start,
            fps=fps,
            empty_caption=empty,
        )
        return self.decode(out["video"], out["audio"] if audio_shape is not None else None)

    def renoise(self, videos: np.ndarray, t: float, rngs: list[jax.Array]) -> jax.Array:
        """uint8 clips -> their normalised latents at noise level t, ``(1 - t) x0 + t eps``.

        ``eps`` is each clip's starting noise from its key in ``rngs`` (one per clip,
        :func:`noise_key`), the same draw that :meth:`generate` would start from.
        """

        x0 = self.encode(videos)
        if len(rngs) != x0.shape[0]:
            raise ValueError(f"{len(rngs)} keys for {x0.shape[0]} clips")
        eps = per_example_noise(rngs, x0.shape[1:])["video"]
        return (1.0 - t) * x0 + t * eps

    def encode(self, videos: np.ndarray) -> jax.Array:
        """uint8 clips ``(B, T, H, W, 3)`` -> normalised video latents (the encoder mean)."""

        z = encode_video_mean(self.vae, jnp.asarray(videos))
        return normalize(z, self.latent_stats["video"])

    def decode(self, video_latents, audio_latents=None) -> dict[str, np.ndarray]:
        """Normalised latents -> uint8 video (+ waveform)."""

        s = self.latent_stats["video"]
        z = denormalize(video_latents, s)
        x = _decode_video(self.vae, z)
        out = {"video": np.asarray(jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255)).astype(np.uint8)}
        if audio_latents is not None:
            sa = self.latent_stats["audio"]
            za = denormalize(audio_latents, sa)
            mel = (
                np.asarray(_decode_audio(self.audio_ae, za)) * self.mel_stats["std"]
                + self.mel_stats["mean"]
            )
            c = self.config.data
            out["audio"] = mels_to_waves(mel, sample_rate=c.sample_rate, hop=c.hop)
            out["mel"] = mel
        return out


def caption_encoder(config) -> CaptionEncoder | None:
    """The pretrained caption encoder of ``text.encoder="t5"`` (loaded from ``text.path``);
    None for the internal encoder, which is part of the transformer."""
    return None if config.text.encoder == "internal" else CaptionEncoder.from_config(config)


def default_bucket(config) -> Bucket:
    """The clip shape sampling, export and the report default to: the first bucket."""
    return Bucket(*(int(x) for x in config.data.buckets[0]))


def workdir_config(workdir: Path) -> ml_collections.ConfigDict:
    """A workdir's training config, set up for sampling: a data-parallel mesh over every
    device (parameters replicated) and batch sizes of one example per device."""
    cfg_path = Path(workdir) / "config.json"
    if not cfg_path.exists():
        raise UserError(f"{workdir} has no config.json; pass a workdir written by 'vdiff train'")
    config = load_saved_config(cfg_path)
    for axis in config.mesh.shape:
        config.mesh.shape[axis] = -1 if axis == "data" else 1
    config.train.batch_size = config.vae.batch_size = config.audio_ae.batch_size = (
        jax.device_count()
    )
    return config


def restore_dit(
    workdir: Path,
    config: ml_collections.ConfigDict,
    mesh=None,
    *,
    step: int | None = None,
    use_ema: bool = True,
    engine=None,
) -> nnx.Module:
    """The transformer of checkpoint ``step`` of a workdir (default: the newest readable).

    Args:
        workdir: a workdir written by ``vdiff train``.
        config: :func:`workdir_config` of that workdir.
        mesh: mesh to restore onto (default: ``make_mesh(config)``).
        step: the checkpoint step; an explicit step that is missing or unreadable raises.
        use_ema: EMA weights (default) or the raw ones.
        engine: a ``stages.dit_engine`` to reuse (building one traces the model).
    """
    if engine is None:
        engine = stages.dit_engine(config, mesh if mesh is not None else make_mesh(config))
    if step is not None and not (Path(workdir) / "checkpoints" / "dit" / str(step)).is_dir():
        raise UserError(
            f"{workdir}/checkpoints/dit has no step {step}; pick one of "
            f"{dit_checkpoint_steps(workdir) or 'none (train the transformer first)'}"
        )
    return restore_stage(workdir, "dit", engine, step).model(ema=use_ema)


def dit_checkpoint_steps(workdir: Path) -> list[int]:
    """Completed transformer checkpoint steps of a workdir, ascending.

    Orbax writes a step under a temporary name and renames it when complete, so a
    folder named by a bare number is a finished save.
    """
    root = Path(workdir) / "checkpoints" / "dit"
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir())


@nnx.jit
def encode_video_mean(vae, videos):
    """uint8 clips ``(B, T, H, W, 3)`` -> the video VAE's latent means (not normalised)."""

    return vae.encode(from_pixels(videos))[0]


@nnx.jit
def _decode_video(vae, z):
    return vae.decode(z)


@nnx.jit
def _decode_audio(audio_ae, z):
    return audio_ae.decode(z)


def write_clip(
    path: Path,
    video: np.ndarray,
    fps: float,
    audio: np.ndarray | None = None,
    sample_rate: int = 16000,
) -> dict[str, Path]:
    """Writes ``path``.mp4 (H.264 + AAC) and ``path``.png (a strip of up to 8 frames)."""

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Append (not replace) suffixes: names like "oracle.heldout_003" contain dots.
    mp4 = path.parent / f"{path.name}.mp4"
    mp4.write_bytes(encode_mp4(video, fps, audio=audio, sample_rate=sample_rate))
    png = path.parent / f"{path.name}.png"
    strip = np.concatenate(list(video[:: max(1, len(video) // 8)]), axis=1)
    scale = max(1, 96 // video.shape[1])
    strip = strip.repeat(scale, 0).repeat(scale, 1)

    matplotlib.image.imsave(png, strip)
    return {"mp4": mp4, "png": png}


def sample_cli(args) -> list[Path]:
    gen = Generator.from_workdir(Path(args.workdir), use_ema=not args.no_ema)
    out = gen.generate(
        args.prompt,
        num_frames=args.num_frames,
        height=args.height,
        width=args.width,
        cfg=args.cfg,
        steps=args.steps,
        sampler=args.sampler,
        seed=args.seed,
        fps=args.fps,
        seconds=args.seconds,
    )
    fps = args.fps or gen.config.data.fps
    return write_prompt_clips(Path(args.out), args.prompt, out, fps, gen.config.data.sample_rate)


def write_prompt_clips(
    out_dir: Path, prompts: list[str], result: dict, fps: float, sample_rate: int
) -> list[Path]:
    """Writes clip i of ``result`` (``generate`` output) as ``out_dir/III_<prompt slug>``.mp4/.png."""
    paths = []
    for i, prompt in enumerate(prompts):
        slug = "".join(ch if ch.isalnum() else "_" for ch in prompt)[:40].strip("_")
        files = write_clip(
            Path(out_dir) / f"{i:03d}_{slug}",
            result["video"][i],
            fps,
            result["audio"][i] if "audio" in result else None,
            sample_rate,
        )
        paths.append(files["mp4"])
    return paths
