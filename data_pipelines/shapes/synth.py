"""Writes the shapes dataset to disk as mp4 files plus caption and ground-truth jsonl.

Layout under ``out_dir`` (paths inside the jsonl files are relative to the split folder,
so each split folder is a self-contained dataset)::

    {split}/videos/{split}_{i:06d}.mp4  H.264 video (+ AAC click track)
    {split}/captions.jsonl              {"video": "videos/...mp4", "caption": "..."} per line
    {split}/meta.jsonl                  ground truth per clip (shapes, trajectories, bounces)

This is the generic ``{video, caption}`` jsonl layout that ingest reads. Every clip is a pure
function of ``(seed, split, index)``, so the same arguments give byte-identical files, with
any number of workers.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
from pathlib import Path

from tqdm import tqdm

from data_pipelines.mp4 import encode_mp4
from data_pipelines.shapes.render import render_audio, render_video
from data_pipelines.shapes.scene import HELDOUT_PAIRS, sample_scene, scene_metadata, scene_rng

SPLITS = ("train", "val", "val_heldout")
HELDOUT_SPLIT = "val_heldout"


def _make_clip(job: tuple) -> tuple[dict, dict, bytes]:
    """Builds one clip: (caption line, meta line, mp4 bytes). Runs in worker processes."""
    i, seed, split, resolution, frames, fps, max_shapes, audio, sample_rate = job
    heldout = "require" if split == HELDOUT_SPLIT else "exclude"
    scene = sample_scene(scene_rng(seed, split, i), resolution, frames, fps, max_shapes, heldout)
    wave = render_audio(scene, sample_rate) if audio else None
    data = encode_mp4(render_video(scene), fps, wave, sample_rate)
    video = f"videos/{split}_{i:06d}.mp4"
    meta = {
        "video": video,
        "split": split,
        "seed": seed,
        "index": i,
        "sample_rate": sample_rate if audio else 0,
        **scene_metadata(scene),
    }
    return {"video": video, "caption": scene.caption}, meta, data


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    """Writes via a temporary file so a crashed run never leaves a complete-looking file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def synth_dataset(
    out_dir,
    num_clips: int,
    seed: int = 0,
    resolution: int = 32,
    frames: int = 16,
    fps: float = 8.0,
    max_shapes: int = 3,
    split: str = "train",
    audio: bool = True,
    workers: int = 1,
    progress: bool = True,
    sample_rate: int = 16000,
) -> dict:
    """Renders one split of the shapes dataset.

    Args:
        out_dir: Dataset root (created if missing).
        num_clips: Clips in this split.
        seed: Dataset seed; clip i of a split depends only on (seed, split, i).
        resolution: Square frame side in pixels (even, for H.264 yuv420p).
        frames: Frames per clip.
        fps: Frame rate.
        max_shapes: Up to this many shapes per clip.
        split: Split name; "val_heldout" clips each contain a held-out colour x shape pair,
            every other split contains none.
        audio: Whether to add the click track.
        workers: Processes rendering clips (1 = in this process).
        progress: Show a tqdm bar.
        sample_rate: Audio sample rate in Hz.

    Returns:
        Counts: ``{"split", "clips", "shapes", "bounces", "heldout_clips", "bytes"}``.

    Raises:
        ValueError: on a bad split name, count, odd resolution or worker count.
    """
    if not split or "/" in split or split.startswith("."):
        raise ValueError(f"bad split name {split!r}; use e.g. 'train', 'val', 'val_heldout'")
    if num_clips < 0:
        raise ValueError(f"num_clips must be >= 0, got {num_clips}")
    if resolution % 2:
        raise ValueError(f"resolution must be even for H.264 yuv420p, got {resolution}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    root = Path(out_dir)
    (root / split / "videos").mkdir(parents=True, exist_ok=True)
    jobs = [
        (i, seed, split, resolution, frames, fps, max_shapes, audio, sample_rate)
        for i in range(num_clips)
    ]
    captions, metas = [], []
    counts = {"split": split, "clips": 0, "shapes": 0, "bounces": 0, "heldout_clips": 0, "bytes": 0}
    held = {tuple(p) for p in HELDOUT_PAIRS}

    def consume(results):
        for caption, meta, data in tqdm(
            results, total=num_clips, desc=f"synth {split}", disable=not progress, unit="clip"
        ):
            (root / split / meta["video"]).write_bytes(data)
            captions.append(caption)
            metas.append(meta)
            counts["clips"] += 1
            counts["shapes"] += len(meta["shapes"])
            counts["bounces"] += len(meta["bounces"])
            counts["heldout_clips"] += any(
                (s["colour"], s["shape"]) in held for s in meta["shapes"]
            )
            counts["bytes"] += len(data)

    if workers == 1:
        consume(map(_make_clip, jobs))
    else:
        # spawn, not fork: the parent may already run JAX threads.
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            consume(pool.map(_make_clip, jobs, chunksize=16))
    _write_jsonl(root / split / "meta.jsonl", metas)
    _write_jsonl(root / split / "captions.jsonl", captions)
    return counts


def synth_splits(
    out_dir,
    num_train: int,
    num_val: int,
    seed: int = 0,
    num_heldout: int | None = None,
    **kwargs,
) -> dict:
    """Renders train, val and val_heldout (``num_heldout`` clips, default ``num_val``).

    Returns:
        ``{split: counts}`` as returned by :func:`synth_dataset`.
    """
    sizes = {
        "train": num_train,
        "val": num_val,
        HELDOUT_SPLIT: num_val if num_heldout is None else num_heldout,
    }
    return {
        split: synth_dataset(out_dir, n, seed=seed, split=split, **kwargs)
        for split, n in sizes.items()
    }
