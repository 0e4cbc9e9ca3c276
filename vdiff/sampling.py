"""From a trained workdir (or the main job's in-memory stages) to clips on disk.

A :class:`Generator` holds the three trained parts — video VAE, audio AE, diffusion
transformer — plus the tokenizer and the latent/mel statistics, and turns prompts into
uint8 video and a waveform: noise -> sampler (CFG) -> denormalise -> decode -> Griffin-Lim.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from vdiff.errors import UserError

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

    # ------------------------------------------------------------- building
    @classmethod
    def from_stages(cls, config, data, ae: dict, *, use_ema: bool = True) -> Generator:
        """From the main job's trained stages (engine, state) in memory."""
        vae_engine, vae_state = ae["vae"]
        dit_engine, dit_state, stats = ae["dit"]
        audio = None
        if "audio_ae" in ae:
            a_engine, a_state = ae["audio_ae"]
            audio = a_engine.model(a_state)
        return cls(
            config=config,
            vae=vae_engine.model(vae_state),
            dit=dit_engine.model(dit_state, ema=use_ema),
            tokenizer=data.tokenizer,
            latent_stats=stats,
            audio_ae=audio,
            mel_stats=data.mel_stats,
        )

    @classmethod
    def from_workdir(cls, workdir: Path, *, use_ema: bool = True) -> Generator:
        """Restores every stage's newest checkpoint from a workdir written by ``vdiff train``."""
        from data_pipelines.tokenizer import Tokenizer
        from vdiff.parallel.mesh import make_mesh
        from vdiff.train import stages
        from vdiff.train.checkpoint import Checkpointer
        from vdiff.train.data import data_root

        workdir = Path(workdir)
        cfg_path = workdir / "config.json"
        if not cfg_path.exists():
            raise UserError(
                f"{workdir} has no config.json; pass a workdir written by 'vdiff train'"
            )
        config = ml_collections.ConfigDict(json.loads(cfg_path.read_text()))
        _tuplify(config)
        for axis in config.mesh.shape:
            config.mesh.shape[axis] = -1 if axis == "data" else 1
        config.train.batch_size = config.vae.batch_size = config.audio_ae.batch_size = (
            jax.device_count()
        )
        mesh = make_mesh(config)

        def restore(name, engine):
            ckpt = Checkpointer(workdir / "checkpoints" / name)
            out = ckpt.restore(engine.abstract_state, engine.state_shardings)
            ckpt.close()
            if out is None:
                raise UserError(
                    f"{workdir}/checkpoints/{name} has no checkpoint; train that stage first"
                )
            return out[1]

        vae_engine = stages.video_vae_engine(config, mesh)
        dit_engine = stages.dit_engine(config, mesh)
        vae = vae_engine.model(restore("vae", vae_engine))
        dit = dit_engine.model(restore("dit", dit_engine), ema=use_ema)
        audio = None
        stats_meta = json.loads((workdir / "latents" / "latents.json").read_text())
        if "audio" in stats_meta["stats"]:
            a_engine = stages.audio_ae_engine(config, mesh)
            audio = a_engine.model(restore("audio_ae", a_engine))
        latent_stats = {
            mod: {
                k: np.load(workdir / "latents" / f"stats_{mod}_{k}.npy") for k in ("shift", "scale")
            }
            for mod in stats_meta["stats"]
        }
        data_stats = json.loads((workdir / "data_stats.json").read_text())
        tokenizer = Tokenizer(data_root(config, workdir) / "tokenizer.model")
        return cls(config, vae, dit, tokenizer, latent_stats, audio, data_stats["mel"])

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
    ) -> dict[str, np.ndarray]:
        """Prompts -> {"video": uint8 (N,T,H,W,3), "audio": float32 (N, S) or absent}.

        The starting noise of prompt i depends only on (seed, i), so the same prompt
        and seed give the same clip whatever the batch it is generated in.
        """

        c, s = self.config, self.config.sample
        num_frames = num_frames or c.data.frames
        height = height or c.data.resolution
        width = width or c.data.resolution
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
        mel_len = round(num_frames / c.data.fps * c.data.sample_rate / c.data.hop)
        mel_len -= mel_len % c.audio_ae.time_down
        audio_shape = (
            (mel_len // c.audio_ae.time_down, c.audio_ae.latent_channels) if with_audio else None
        )
        tokens, mask = self.tokenizer.encode(list(prompts), c.data.caption_len)
        videos, waves = [], []
        for i in range(0, len(prompts), batch_size):
            n = min(batch_size, len(prompts) - i)
            rngs = [jax.random.fold_in(jax.random.PRNGKey(seed), i + j) for j in range(n)]
            out = self._sample_batch(
                tokens[i : i + n],
                mask[i : i + n],
                rngs,
                video_shape,
                audio_shape,
                cfg,
                steps,
                sampler,
            )
            videos.append(out["video"])
            if with_audio:
                waves.append(out["audio"])
        result = {"video": np.concatenate(videos)[:, :num_frames]}
        if with_audio:
            result["audio"] = np.concatenate(waves)
        return result

    def _sample_batch(self, tokens, mask, rngs, video_shape, audio_shape, cfg, steps, sampler):
        from vdiff.diffusion.samplers import sample

        n = len(rngs)
        # One sampler call per example keeps each example's noise a function of its own key.
        lat_v, lat_a = [], []
        for j in range(n):
            out = sample(
                self.dit,
                jnp.asarray(tokens[j : j + 1]),
                jnp.asarray(mask[j : j + 1]),
                {
                    "video": (1, *video_shape),
                    "audio": None if audio_shape is None else (1, *audio_shape),
                },
                rngs[j],
                steps=steps,
                cfg=None if cfg == 1.0 else cfg,
                audio_cfg=self.config.sample.audio_cfg if cfg != 1.0 else None,
                sampler=sampler,
                shift=self.config.sample.shift,
            )
            lat_v.append(out["video"])
            if audio_shape is not None:
                lat_a.append(out["audio"])
        return self.decode(jnp.concatenate(lat_v), jnp.concatenate(lat_a) if lat_a else None)

    def decode(self, video_latents, audio_latents=None) -> dict[str, np.ndarray]:
        """Normalised latents -> uint8 video (+ waveform)."""
        from data_pipelines.audio import mel_to_wave

        s = self.latent_stats["video"]
        z = video_latents / s["scale"] + s["shift"]
        x = _decode_video(self.vae, z)
        out = {"video": np.asarray(jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255)).astype(np.uint8)}
        if audio_latents is not None:
            sa = self.latent_stats["audio"]
            za = audio_latents / sa["scale"] + sa["shift"]
            mel = (
                np.asarray(_decode_audio(self.audio_ae, za)) * self.mel_stats["std"]
                + self.mel_stats["mean"]
            )
            c = self.config.data
            out["audio"] = np.stack(
                [mel_to_wave(m, sample_rate=c.sample_rate, hop=c.hop) for m in mel]
            ).astype(np.float32)
            out["mel"] = mel
        return out


@nnx.jit
def _decode_video(vae, z):
    return vae.decode(z)


@nnx.jit
def _decode_audio(audio_ae, z):
    return audio_ae.decode(z)


def _tuplify(config: ml_collections.ConfigDict) -> None:
    """JSON turns tuples into lists; the config's sequence values are tuples."""
    for k, v in config.items():
        if isinstance(v, ml_collections.ConfigDict):
            _tuplify(v)
        elif isinstance(v, list):
            config[k] = tuple(tuple(x) if isinstance(x, list) else x for x in v)


def write_clip(
    path: Path,
    video: np.ndarray,
    fps: float,
    audio: np.ndarray | None = None,
    sample_rate: int = 16000,
) -> dict[str, Path]:
    """Writes ``path``.mp4 (H.264 + AAC) and ``path``.png (a strip of up to 8 frames)."""
    from data_pipelines.mp4 import encode_mp4

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Append (not replace) suffixes: names like "oracle.heldout_003" contain dots.
    mp4 = path.parent / f"{path.name}.mp4"
    mp4.write_bytes(encode_mp4(video, fps, audio=audio, sample_rate=sample_rate))
    png = path.parent / f"{path.name}.png"
    strip = np.concatenate(list(video[:: max(1, len(video) // 8)]), axis=1)
    scale = max(1, 96 // video.shape[1])
    strip = strip.repeat(scale, 0).repeat(scale, 1)
    import matplotlib.image

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
    )
    paths = []
    for i, prompt in enumerate(args.prompt):
        slug = "".join(ch if ch.isalnum() else "_" for ch in prompt)[:40].strip("_")
        files = write_clip(
            Path(args.out) / f"{i:03d}_{slug}",
            out["video"][i],
            gen.config.data.fps,
            out["audio"][i] if "audio" in out else None,
            gen.config.data.sample_rate,
        )
        paths.append(files["mp4"])
    return paths
