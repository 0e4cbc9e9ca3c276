"""The main job's report: sample clips for val prompts, oracle scores, controls, HTML.

``WORKDIR/report/metrics.json`` holds flat keys:
- ``ae.*``: autoencoder reconstruction on held-out clips (video PSNR/SSIM, audio sync F1).
- ``oracle.*``: generated clips for val prompts at the configured guidance;
  ``oracle.heldout.*`` for held-out colour x shape pairs; ``oracle.cfg1.*`` with guidance off;
  ``oracle.renoised_<t>.*`` for the val clips' own latents re-noised to t and denoised from
  there (``sample.renoise_t``): the noise level from which an attribute is lost.
- ``control.recon.*``: the oracle on the VAE's reconstructions of those val clips (the
  decoder's ceiling); ``control.noisy_<t>.*``: the re-noised latents decoded without the
  transformer (what the noise alone leaves; see :func:`_decoder_references`).
- ``control.gt.*``: the oracle on ground-truth val clips (must be ~1);
  ``control.shuffled.*``: ground-truth clips scored against shuffled captions/audio (chance).
"""

from __future__ import annotations

import html
import json
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipelines.audio import mels_to_waves
from data_pipelines.pipeline import open_split
from data_pipelines.records import decode_record
from data_pipelines.video_io import decode_audio
from vdiff.eval.metrics import fixed_grid_flow_loss, flow_inputs
from vdiff.eval.oracle import parse_caption, score_clips
from vdiff.eval.sync import sync_scores_many
from vdiff.models.losses import psnr, ssim
from vdiff.models.video_vae import from_pixels
from vdiff.sampling import Generator, noise_key, write_clip
from vdiff.train.trained import Trained

log = logging.getLogger(__name__)
# Clips of a val split the report (and eval sweeps) read into memory: the first this many.
EVAL_CLIPS = 256
ATTRS = ("colour_acc", "shape_acc", "direction_acc", "background_acc")


def _prefixed(prefix: str, scores: dict) -> dict:
    return {
        f"{prefix}.{k}": float(v) for k, v in scores.items() if k in ATTRS or k.startswith("sync")
    }


# Fewer detected bounces than this make an F1 (and its shuffled floor) too coarse to
# compare: with 2 bounces one lucky onset moves F1 by ~0.3 of its range.
MIN_SYNC_BOUNCES = 20


def _sync(prefix: str, videos, audios, fps: float, sr: int) -> dict:
    """Sync scores plus event counts. With no onset and no bounce at all (e.g. blank
    generated clips) there is nothing to be in sync, so the scores are NaN, not 1.
    ``sync_measurable`` is 1.0 when at least :data:`MIN_SYNC_BOUNCES` bounces were
    detected in the video, else 0.0 (then read the scores as "not measured")."""
    s = sync_scores_many([(v, fps, a, sr) for v, a in zip(videos, audios)])
    keys = ("precision", "recall", "f1", "offset_ms", "binding_acc", "n_onsets", "n_bounces")
    out = {f"{prefix}.sync_{k}": float(s[k]) for k in keys}
    out[f"{prefix}.sync_measurable"] = float(s["n_bounces"] >= MIN_SYNC_BOUNCES)
    if s["n_onsets"] == 0 and s["n_bounces"] == 0:
        out.update({f"{prefix}.sync_{k}": float("nan") for k in ("precision", "recall", "f1")})
    return out


def _oracle(prefix: str, videos, captions: list[str]) -> dict:
    """The oracle's scores (``ATTRS``) of the clips whose captions name a coloured shape
    (the shapes data); on other data there is nothing for it to check, so none."""
    pairs = [(v, c) for v, c in zip(videos, captions) if parse_caption(c)["shapes"]]
    return _prefixed(prefix, score_clips(pairs)) if pairs else {}


def clip_scores(video, caption: str, fps: float, audio=None, sr: int = 16000) -> dict:
    """One clip's scores: the oracle's attributes (``ATTRS``) when the caption names a
    coloured shape, and with audio the sync scores (``sync_*``, see :func:`_sync`)."""

    out = {}
    if parse_caption(caption)["shapes"]:
        single = score_clips([(video, caption)])
        out.update({a: single[a] for a in ATTRS})
    if audio is not None:
        sync = _sync("clip", [video], [audio], fps, sr)
        out.update({k.removeprefix("clip."): v for k, v in sync.items()})
    return out


@nnx.jit
def _recon_scores(vae, x):
    x = from_pixels(x)
    mean, _ = vae.encode(x)
    y = vae.decode(mean, num_frames=x.shape[1])
    return psnr(y, x), ssim(y, x)


def vae_recon_scores(vae, videos, batch: int = 16) -> tuple[float, float]:
    """Mean PSNR (dB) and SSIM of the video VAE's reconstruction (encoder mean) of uint8 clips."""
    ps = ss = 0.0
    for i in range(0, len(videos), batch):
        chunk = jnp.asarray(videos[i : i + batch])
        p, s = _recon_scores(vae, chunk)
        ps, ss = ps + float(p) * len(chunk), ss + float(s) * len(chunk)
    return ps / len(videos), ss / len(videos)


def autoencoder_metrics(config, data, trained: Trained) -> dict:
    """Held-out reconstruction quality of the video VAE and the audio AE."""
    out = {}
    split = data.head("val", EVAL_CLIPS)
    fps, sr = config.data.fps, config.data.sample_rate
    if trained.vae is not None:
        vae = trained.vae.model()
        out["ae.video_psnr"], out["ae.video_ssim"] = vae_recon_scores(vae, split.video)
    if trained.audio_ae is not None and split.has_audio.any():
        model = trained.audio_ae.model()

        @nnx.jit
        def recon_mel(m, x):
            return m.decode(m.encode(x)[0])

        mel = np.concatenate(
            [
                np.asarray(recon_mel(model, jnp.asarray(split.mel_norm[i : i + 16])))
                for i in range(0, len(split), 16)
            ]
        )
        mel = mel * data.mel_stats["std"] + data.mel_stats["mean"]
        waves = mels_to_waves(mel, sample_rate=sr, hop=config.data.hop)
        out.update(_sync("ae.audio", split.video, waves, fps, sr))
        out["ae.audio_sync_f1"] = out.pop("ae.audio.sync_f1")
        gt_waves = mels_to_waves(split.mel, sample_rate=sr, hop=config.data.hop)
        out["control.gt_mel_griffinlim.sync_f1"] = _sync("x", split.video, gt_waves, fps, sr)[
            "x.sync_f1"
        ]
    return out


def write_report(config, workdir: Path, mesh, data, trained: Trained) -> dict:
    """Generates the report's clips and metrics; returns the metrics dict."""
    t0 = time.time()
    report = Path(workdir) / "report"
    clips_dir = report / "clips"
    metrics: dict = {}
    metrics.update(autoencoder_metrics(config, data, trained))
    gen = Generator.from_stages(config, data, trained, use_ema=config.sample.use_ema)
    # The sweeps' held-out loss, on the val clips: comparable with `vdiff eval` rows.
    metrics.update(
        fixed_grid_flow_loss(
            gen.dit,
            flow_inputs(gen, data.head("val", EVAL_CLIPS)),
            audio_weight=float(config.diffusion.audio_loss_weight),
        )
    )
    fps, sr = config.data.fps, config.data.sample_rate
    n = config.sample.num_prompts
    rng = np.random.default_rng(config.seed)
    rows = []

    def run(split_name: str, prefix: str, cfg: float, save: bool, cross_modal=None, t_start=1.0):
        if split_name not in data.counts:
            return
        split = data.head(split_name, EVAL_CLIPS)
        k = min(n, len(split))
        prompts = split.captions[:k]
        t = time.time()
        start = dict(start_videos=split.video[:k], t_start=t_start) if t_start < 1.0 else {}
        b = split.bucket  # the clips' shape (the first bucket that holds this split's clips)
        out = gen.generate(
            prompts, cfg=cfg, seed=config.sample.seed, cross_modal=cross_modal,
            height=b.height, width=b.width, num_frames=b.frames, **start,
        )  # fmt: skip
        metrics[f"{prefix}.seconds_per_clip"] = (time.time() - t) / k
        metrics.update(_oracle(prefix, out["video"], prompts))
        if "audio" in out:
            metrics.update(_sync(prefix, out["video"], out["audio"], fps, sr))
            # Chance floor for these very clips: each video with another clip's audio.
            rolled = [out["audio"][i] for i in np.roll(np.arange(k), 1)]
            metrics.update(_sync(f"{prefix}.shuffled_pairs", out["video"], rolled, fps, sr))
        if save and jax.process_index() == 0:
            for i in range(min(k, 16)):
                files = write_clip(
                    clips_dir / f"{prefix}_{i:03d}",
                    out["video"][i],
                    fps,
                    out["audio"][i] if "audio" in out else None,
                    sr,
                )
                single = clip_scores(out["video"][i], prompts[i], fps)
                rows.append(
                    {
                        "group": prefix,
                        "prompt": prompts[i],
                        "mp4": files["mp4"].name,
                        "png": files["png"].name,
                        **{a: single.get(a) for a in ATTRS},
                    }
                )

    cfg = config.sample.cfg
    run("val", "oracle", cfg, save=True)
    run("val_heldout", "oracle.heldout", cfg, save=True)
    run("val", "oracle.cfg1", 1.0, save=False)
    if gen.audio_ae is not None and gen.dit.has_audio:
        # Sync ablation: the same model and noise with audio<->video attention masked.
        run("val", "oracle.nocross", cfg, save=True, cross_modal=False)
    # Where the model loses what: the val clips' own latents re-noised to t and denoised
    # from there (t = 1 would be plain generation; small t keeps most of the real clip).
    renoise_t = [float(t) for t in config.sample.renoise_t]
    for t_start in renoise_t:
        run("val", f"oracle.renoised_{t_start:g}", cfg, save=False, t_start=t_start)
    metrics.update(
        _decoder_references(gen, data.head("val", EVAL_CLIPS), n, renoise_t, config.sample.seed)
    )

    # Controls on ground truth: the oracle itself, then shuffled captions / audio.
    split = data.head("val", EVAL_CLIPS)
    k = min(n, len(split))
    gt_videos = split.video[:k]
    metrics.update(_oracle("control.gt", gt_videos, split.captions[:k]))
    perm = rng.permutation(k)
    metrics.update(_oracle("control.shuffled", gt_videos, [split.captions[i] for i in perm]))
    if split.has_audio.any():
        waves = _gt_waves(data, "val", k)
        metrics.update(_sync("control.gt", gt_videos, waves, fps, sr))
        metrics.update(
            _sync(
                "control.shuffled", gt_videos, [waves[i] for i in np.roll(np.arange(k), 1)], fps, sr
            )
        )
    metrics["report.seconds"] = time.time() - t0
    if jax.process_index() == 0:
        report.mkdir(parents=True, exist_ok=True)
        clean = {
            k: (None if v != v else v) for k, v in metrics.items()
        }  # NaN -> null (strict JSON)
        (report / "metrics.json").write_text(json.dumps(clean, indent=2, sort_keys=True))
        _write_html(report, metrics, rows)
    log.info("report: %s", json.dumps({k: round(v, 3) for k, v in metrics.items()}, sort_keys=True))
    return metrics


def _decoder_references(gen, split, n: int, renoise_t, seed: int) -> dict:
    """Oracle scores of val latents decoded without the transformer.

    ``control.recon.*``: the VAE's reconstructions, the most any generated clip can score
    through this decoder. ``control.noisy_<t>.*``: the latents the ``oracle.renoised_<t>``
    rows start from (same noise), decoded as they are after undoing the ``1 - t`` scale,
    ``x0 + t / (1 - t) eps``: what that noise alone leaves. The transformer's denoising
    from t adds something only where ``oracle.renoised_<t>`` beats ``control.noisy_<t>``.
    """
    k = min(n, len(split))
    videos, prompts = split.video[:k], split.captions[:k]
    out = {}
    for t in (0.0, *renoise_t):
        clips = []
        for i in range(0, k, 16):
            rngs = [noise_key(seed, j) for j in range(i, min(i + 16, k))]
            z = gen.renoise(videos[i : i + 16], t, rngs) / (1.0 - t)
            clips.append(gen.decode(z)["video"])
        name = "control.recon" if t == 0.0 else f"control.noisy_{t:g}"
        out.update(_oracle(name, np.concatenate(clips), prompts))
    return out


def _gt_waves(data, split_name: str, k: int) -> list[np.ndarray]:
    """Ground-truth audio of the first k clips, decoded from their records."""

    src = open_split(data.records / split_name)
    waves = []
    for index in data.head(split_name, EVAL_CLIPS).indices[:k]:
        rec = decode_record(src[int(index)])
        waves.append(decode_audio(rec["video"], 0.0, rec["num_frames"] / rec["fps"], 16000))
    return waves


def _write_html(report: Path, metrics: dict, rows: list[dict]) -> None:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))

    def scores(r):  # the oracle's reading of a clip, on shapes captions
        if r["colour_acc"] is None:
            return ""
        return (f"<br>colour {r['colour_acc']:.2f} shape {r['shape_acc']:.2f} "
                f"direction {r['direction_acc']:.2f} bg {r['background_acc']:.2f}")  # fmt: skip

    groups = sorted({k.rsplit(".", 1)[0] for k in metrics})
    table = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{fmt(v)}</td></tr>" for k, v in sorted(metrics.items())
    )
    cards = "".join(
        f"""<figure><video src="clips/{r["mp4"]}" controls loop muted autoplay width="192"></video>
<img src="clips/{r["png"]}" width="384"><figcaption><b>{html.escape(r["group"])}</b>: {html.escape(r["prompt"])}{scores(r)}</figcaption></figure>"""
        for r in rows
    )
    thin = sorted(k.removesuffix(".sync_measurable") for k, v in metrics.items()
                  if k.endswith(".sync_measurable") and v == 0.0)  # fmt: skip
    warn = (
        f"<p><b>Sync not measurable</b> (fewer than {MIN_SYNC_BOUNCES} bounces detected in the "
        f"video) for: {html.escape(', '.join(thin))}. Their sync scores are not evidence either way.</p>"
        if thin
        else ""
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>vdiff report</title>
<style>body{{font-family:sans-serif;margin:2em}} figure{{display:inline-block;margin:8px;vertical-align:top;width:400px}}
video{{image-rendering:pixelated}} img{{image-rendering:pixelated;display:block}} td{{padding:2px 8px}}</style></head>
<body><h1>vdiff report</h1><p>Groups: {html.escape(", ".join(groups))}</p>
{warn}<h2>Metrics</h2><table>{table}</table><h2>Samples</h2>{cards}</body></html>"""
    (report / "index.html").write_text(page)
