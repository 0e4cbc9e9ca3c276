"""One model on clips of every shape: a mixed set, trained end to end across buckets.

Writes a small captioned set of landscape (48x32), portrait (32x48) and square (32x32)
clips of 1.5 to 6 s at 12, 24 and 30 fps (every other one with a tone), plus landscape
and portrait stills, ingests it, runs ``vdiff train`` (video VAE, audio AE, latent
cache, transformer) on five buckets (three video shapes, two image shapes), samples one
clip of every bucket's shape with ``vdiff sample``, exports a bundle and samples a
portrait and a landscape clip from it. Prints what each bucket got (clips, steps,
compile seconds) and the shapes written, and saves them as JSON.

    python benchmarks/mixed_buckets.py --out /tmp/mixed            # about 10 minutes on 2 cores

A check that the parts fit at every shape, not a quality run: the steps are few.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 210, 40),
}
BACKGROUNDS = {"black": (10, 10, 10), "white": (235, 235, 235), "grey": (120, 120, 120)}
SHAPES = {"landscape": (48, 32), "portrait": (32, 48), "square": (32, 32)}  # (width, height)
BUCKETS = ((32, 48, 16), (48, 32, 16), (32, 32, 16), (32, 48, 1), (48, 32, 1))
RATES = (12, 24, 30)


def _clip(rng, width, height, seconds, fps):
    """A square of one colour crossing a plain background, left or right; its caption."""
    colour, background = rng.choice(list(COLOURS)), rng.choice(list(BACKGROUNDS))
    direction = rng.choice(["left", "right"])
    n = max(1, round(seconds * fps))
    frames = np.empty((n, height, width, 3), np.uint8)
    frames[:] = BACKGROUNDS[background]
    size = 8
    for i in range(n):
        u = i / max(n - 1, 1)
        x = int((u if direction == "right" else 1 - u) * (width - size))
        y = (height - size) // 2
        frames[i, y : y + size, x : x + size] = COLOURS[colour]
    caption = f"a {colour} square moves {direction} on a {background} background"
    if n == 1:
        caption = f"a {colour} square on a {background} background"
    return frames, caption


def write_set(root: Path, split: str, count: int, stills: int, seed: int) -> Path:
    """``count`` clips (shapes, lengths and rates in turn) and ``stills`` stills per
    still shape, as mp4 / png files and a captions.jsonl."""
    from PIL import Image

    from data_pipelines.mp4 import encode_mp4

    rng = np.random.default_rng(seed)
    src = root / "src" / split
    src.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        kind = list(SHAPES)[i % 3]
        fps = RATES[(i // 3) % 3]
        seconds = 1.5 + 4.5 * rng.random()
        width, height = SHAPES[kind]
        frames, caption = _clip(rng, width, height, seconds, fps)
        audio = None
        if i % 2 == 0:
            t = np.arange(round(seconds * 16000)) / 16000
            audio = (0.3 * np.sin(2 * np.pi * 440 * (1 + i % 4) * t)).astype(np.float32)
        (src / f"{i:04d}.mp4").write_bytes(encode_mp4(frames, fps, audio=audio))
        lines.append({"video": f"{i:04d}.mp4", "caption": caption})
    for j in range(2 * stills):
        width, height = SHAPES["landscape" if j % 2 == 0 else "portrait"]
        frames, caption = _clip(rng, width, height, 0.0, 1)
        buf = io.BytesIO()
        Image.fromarray(frames[0]).save(buf, format="PNG")
        (src / f"still{j:04d}.png").write_bytes(buf.getvalue())
        lines.append({"video": f"still{j:04d}.png", "caption": caption})
    (src / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return src


def _vdiff(*args: str) -> float:
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "vdiff.cli", *args], check=True)
    return time.time() - t0


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--clips", type=int, default=120, help="train clips (val: a quarter)")
    p.add_argument("--stills", type=int, default=24, help="train stills per still shape")
    p.add_argument("--steps", type=int, default=60, help="steps of each stage")
    args = p.parse_args()
    from data_pipelines.ingest import ingest

    data = args.out / "data"
    for split, count, stills, seed in (
        ("train", args.clips, args.stills, 0),
        ("val", args.clips // 4, args.stills // 4, 1),
    ):
        if not (data / split / "manifest.json").exists():
            ingest(write_set(args.out, split, count, stills, seed), data / split, workers=2)
    buckets = repr(BUCKETS).replace(" ", "")
    overrides = [
        "--config.data.name=records", f"--config.data.root={data}", f"--config.data.buckets={buckets}",
        "--config.data.fps=12.0", "--config.data.vocab_size=300",
        f"--config.vae.steps={args.steps}", f"--config.audio_ae.steps={args.steps}",
        f"--config.train.steps={args.steps}", "--config.vae.batch_size=4",
        "--config.audio_ae.batch_size=8", "--config.train.batch_size=8",
        "--config.data.bucket_batch=(8,8,8,16,16)", f"--config.train.ckpt_every={args.steps}",
        "--config.train.log_every=10",
    ]  # fmt: skip
    work = args.out / "work"
    timings = {"train_s": _vdiff("train", "--workdir", str(work), "--no-report", *overrides)}
    shapes = {}
    for h, w, t in BUCKETS:
        out = args.out / "samples" / f"{h}x{w}x{t}"
        timings[f"sample_{h}x{w}x{t}_s"] = _vdiff(
            "sample", "--workdir", str(work), "--prompt", "a red square moves right on a black background",
            "--height", str(h), "--width", str(w), "--num-frames", str(t), "--steps", "10", "--out", str(out),
        )  # fmt: skip
        shapes[f"{h}x{w}x{t}"] = _mp4_shape(next(out.glob("*.mp4")))
    bundle = args.out / "bundle"
    if not bundle.exists():
        timings["export_s"] = _vdiff("export", "--workdir", str(work), "--out", str(bundle))
    for h, w, t in BUCKETS[:2]:
        out = args.out / "bundle_samples" / f"{h}x{w}x{t}"
        _vdiff(
            "sample", "--bundle", str(bundle), "--prompt", "a blue square moves left on a white background",
            "--height", str(h), "--width", str(w), "--num-frames", str(t), "--steps", "10", "--out", str(out),
        )  # fmt: skip
        shapes[f"bundle {h}x{w}x{t}"] = _mp4_shape(next(out.glob("*.mp4")))
    result = {"timings": timings, "written": shapes, "stages": _stage_summaries(work)}
    (args.out / "mixed_buckets.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


def _mp4_shape(path: Path) -> list[int]:
    from data_pipelines.mp4 import decode_mp4

    frames, fps, audio, _ = decode_mp4(path.read_bytes())
    return [*frames.shape[:3], round(fps, 2), audio is not None]


def _stage_summaries(work: Path) -> dict:
    path = work / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


if __name__ == "__main__":
    main()
