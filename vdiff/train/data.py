"""Data for the main job: shapes synth -> ArrayRecord ingest -> tokenizer -> decoded arrays.

The tiny recipe's clips are small enough to decode once into RAM (uint8 video, log-mel
audio, tokens), with the same decode functions as the streaming grain pipeline, and
to train the autoencoders and cache latents from there. Everything is written under
the data root (``data.root`` or ``WORKDIR/data``) and reused on the next run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from data_pipelines.ingest import MANIFEST, ingest
from data_pipelines.pipeline import decode_all, open_split
from data_pipelines.records import decode_record
from data_pipelines.shapes.synth import synth_splits
from data_pipelines.tokenizer import Tokenizer, train_tokenizer
from vdiff.errors import UserError

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "val_heldout")


@dataclasses.dataclass
class Split:
    """One split decoded into RAM. Video is uint8 (N, T, H, W, 3)."""

    video: np.ndarray
    mel: np.ndarray  # float32 (N, Tm, n_mels), raw log-mel
    mel_norm: np.ndarray  # (mel - mean) / std with train-split statistics
    has_audio: np.ndarray  # bool (N,)
    tokens: np.ndarray  # int32 (N, L)
    mask: np.ndarray  # bool (N, L)
    captions: list[str]
    meta: list[dict]
    keys: list[str]
    indices: np.ndarray  # int64 (N,): each clip's record index in its split's shards

    def __len__(self) -> int:
        return len(self.video)


@dataclasses.dataclass
class Data:
    root: Path
    records: Path  # the ArrayRecord splits (``records/<split>``)
    tokenizer: object
    mel_stats: dict[str, float]
    parts: dict[str, Split]

    def splits(self) -> list[str]:
        return list(self.parts)

    def split(self, name: str) -> Split:
        return self.parts[name]

    @property
    def train(self) -> Split:
        return self.parts["train"]


def data_root(config: ml_collections.ConfigDict, workdir: Path) -> Path:
    return Path(config.data.root) if config.data.root else Path(workdir) / "data"


def _on_process_zero(fn, name: str):
    """Runs ``fn`` on process 0 while the others wait (shared storage assumed)."""
    if jax.process_index() == 0:
        fn()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _synth(config, raw: Path) -> None:
    d = config.data
    log.info(
        "generating the shapes dataset into %s (%d train / %d val clips)",
        raw,
        d.num_train,
        d.num_val,
    )
    synth_splits(
        raw,
        num_train=d.num_train,
        num_val=d.num_val,
        seed=config.seed,
        resolution=d.resolution,
        frames=d.frames,
        fps=d.fps,
        max_shapes=d.max_shapes,
        audio=d.audio,
        workers=max(1, d.synth_workers),
    )


def _ingest(raw: Path, records: Path, split: str, workers: int) -> None:
    ingest(raw, records / split, split=split, workers=workers, progress=True)


def prepare_data(config: ml_collections.ConfigDict, workdir: Path) -> Data:
    """Makes sure the dataset, records and tokenizer exist, then decodes every split."""

    root = data_root(config, workdir)
    raw, records = root / "raw", root / "records"
    if config.data.name == "shapes":
        if not (raw / "train" / "captions.jsonl").exists():
            _on_process_zero(lambda: _synth(config, raw), "vdiff_synth")
        for split in SPLITS:
            if (raw / split / "captions.jsonl").exists() and not (
                records / split / "manifest.json"
            ).exists():
                _on_process_zero(
                    lambda s=split: _ingest(raw, records, s, config.data.synth_workers),
                    f"vdiff_ingest_{split}",
                )
    elif config.data.name == "records":
        records = root
        if not (records / "train").exists():
            raise UserError(
                f"data.root={root} has no train/ folder of ArrayRecord shards; run 'vdiff data ingest SRC {root}/train' first"
            )
        for split in SPLITS:
            if (records / split).is_dir() and not (records / split / MANIFEST).is_file():
                raise UserError(
                    f"{records / split} has no {MANIFEST}: its ingest has not finished; rerun "
                    "'vdiff data ingest' for it (every --shard slice) until it writes one"
                )
    else:
        raise UserError(f"data.name='{config.data.name}' is not known; use 'shapes' or 'records'")

    tok_path = root / "tokenizer.model"
    if not tok_path.exists():

        def make_tokenizer():
            src = open_split(records / "train")
            captions = [decode_record(src[i])["caption"] for i in range(len(src))]
            train_tokenizer(captions, str(root / "tokenizer"), vocab_size=config.data.vocab_size)

        _on_process_zero(make_tokenizer, "vdiff_tokenizer")
    tokenizer = Tokenizer(tok_path)

    parts: dict[str, Split] = {}
    for split in SPLITS:
        if not (records / split).exists():
            continue
        parts[split] = _decoded_split(config, root, records / split, split, tokenizer, decode_all)
    if "train" not in parts:
        raise UserError(f"no train split under {records}; check data.root")
    mel = parts["train"].mel
    stats = {"mean": float(mel.mean()), "std": float(mel.std() + 1e-6)}
    for s in parts.values():
        s.mel_norm = ((s.mel - stats["mean"]) / stats["std"]).astype(np.float32)
    return Data(root=root, records=records, tokenizer=tokenizer, mel_stats=stats, parts=parts)


def _decoded_split(
    config, root: Path, split_root: Path, split: str, tokenizer, decode_all
) -> Split:
    h, w, t = config.data.buckets[0]
    cache = (
        root
        / "cache"
        / f"{split}_{h}x{w}x{t}_{config.data.fps:g}fps_L{config.data.caption_len}.npz"
    )
    if not cache.exists():

        def decode():
            arrays = decode_all(split_root, config, tokenizer)
            arrays["video"] = np.round((arrays["video"] + 1.0) * 127.5).astype(np.uint8)
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp.npz")
            np.savez(tmp, **{k: v for k, v in arrays.items() if v.dtype != object})
            tmp.rename(cache)

        _on_process_zero(decode, f"vdiff_decode_{split}")
    with np.load(cache, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    src = open_split(split_root)
    recs = [decode_record(src[int(i)]) for i in arrays["index"]]
    n = len(arrays["video"])
    mel = arrays.get("mel", np.zeros((n, 1, config.data.n_mels), np.float32))
    return Split(
        video=arrays["video"],
        mel=mel,
        mel_norm=mel,
        has_audio=arrays.get("has_audio", np.zeros((n,), bool)),
        tokens=arrays["tokens"],
        mask=arrays["mask"],
        captions=[r["caption"] for r in recs],
        meta=[json.loads(r["meta"]) if r.get("meta") else {} for r in recs],
        keys=[r["key"] for r in recs],
        indices=arrays["index"],
    )
