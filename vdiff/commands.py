"""What each ``vdiff`` subcommand does (argument parsing lives in :mod:`vdiff.cli`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import jax

from data_pipelines.ingest import ingest, parse_shard
from data_pipelines.shapes.synth import synth_splits
from data_pipelines.tokenizer import captions_from, train_tokenizer
from vdiff import sampling, serving
from vdiff.config import load_config, validate
from vdiff.errors import UserError
from vdiff.eval.sweep import parse_spec, run_sweep
from vdiff.export.bundle import export_workdir
from vdiff.train import distributed, main_job
from vdiff.train.loop import PreemptedError

log = logging.getLogger("vdiff")


def train(args: argparse.Namespace, overrides: list[str]) -> int:
    distributed.initialize()
    config = load_config(args.config, overrides)

    validate(config, jax.device_count())  # fail on a bad mesh before any work

    try:
        main_job.run(config, Path(args.workdir), report=not args.no_report)
    except PreemptedError as e:
        print(f"vdiff: {e}", flush=True)
        # 0 by default; schedulers that must tell "stopped early" from "finished" (a
        # requeueing sbatch, a Kubernetes Job) set a non-zero code, e.g. 143.
        return _preempted_exit_code()
    return 0


def _preempted_exit_code() -> int:
    value = os.environ.get("VDIFF_PREEMPTED_EXIT_CODE", "0")
    try:
        return int(value)
    except ValueError:
        raise UserError(f"VDIFF_PREEMPTED_EXIT_CODE={value!r} must be an integer") from None


def sample(args: argparse.Namespace, overrides: list[str]) -> int:
    if args.bundle:
        paths = serving.sample_cli(args)
    else:
        paths = sampling.sample_cli(args)
    for p in paths:
        print(p)
    return 0


def evaluate(args: argparse.Namespace, overrides: list[str]) -> int:
    if args.i3d:
        raise UserError(
            "--i3d (FVD with I3D weights) is not supported in this version; drop --i3d "
            "(the sweep reports fd_vae_features, a Fréchet distance on vdiff's own VAE features)"
        )
    spec = parse_spec(args.sweep)  # a bad spec fails before any JAX start-up

    distributed.initialize()

    out = run_sweep(
        Path(args.workdir),
        spec,
        follow_timeout=args.follow_timeout,
        poll_seconds=args.poll_seconds,
        batch_size=args.batch_size,
    )
    print(out / "index.html")
    return 0


def export(args: argparse.Namespace, overrides: list[str]) -> int:
    buckets = args.buckets.split(",") if args.buckets else None
    export_workdir(
        Path(args.workdir), Path(args.out), dtype=args.dtype, use_ema=args.ema, buckets=buckets
    )
    print(args.out)
    return 0


def _ingest_shard(text: str | None) -> tuple[int, int]:
    """``--shard i/n``; else this process's place as a launcher set it (``JAX_PROCESS_ID`` /
    ``JAX_NUM_PROCESSES``, or SLURM's ``SLURM_PROCID`` / ``SLURM_NTASKS``); else 0/1."""
    if text is not None:
        return parse_shard(text)
    for index, count in (("JAX_PROCESS_ID", "JAX_NUM_PROCESSES"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if int(os.environ.get(count, "1")) > 1:
            if index not in os.environ:
                raise UserError(
                    f"{count}={os.environ[count]} but {index} is not set: this host's slice is "
                    "unknown; pass --shard i/n"
                )
            return parse_shard(f"{os.environ[index]}/{os.environ[count]}")
    return 0, 1


def data(args: argparse.Namespace, overrides: list[str]) -> int:
    cmd = args.data_command
    if cmd == "synth":
        num_val = args.num_val if args.num_val is not None else max(1, args.num_clips // 8)
        counts = synth_splits(
            args.out,
            num_train=args.num_clips,
            num_val=num_val,
            seed=args.seed,
            resolution=args.resolution,
            frames=args.frames,
            fps=args.fps,
            max_shapes=args.max_shapes,
            audio=not args.no_audio,
            workers=args.workers,
        )
        print(json.dumps(counts))
        return 0
    if cmd == "ingest":
        src = Path(args.src)
        if not src.is_dir():
            raise UserError(
                f"ingest source '{src}' is not a folder; pass the folder holding the videos"
            )
        manifest = ingest(
            src,
            Path(args.out),
            captions=args.captions,
            split=args.split,
            max_resolution=args.max_resolution,
            reencode=args.max_resolution is not None,
            gop=args.gop,
            workers=args.workers,
            records_per_shard=args.records_per_shard,
            shard=_ingest_shard(args.shard),
        )
        if manifest is None:
            print("this slice is done; the manifest is written once every slice has run")
        else:
            print(json.dumps(manifest.counts))
        return 0
    if cmd == "tokenizer":
        path = train_tokenizer(captions_from(Path(args.src)), args.out, vocab_size=args.vocab_size)
        print(path)
        return 0
    if cmd == "latents":
        config = load_config(args.config, overrides)
        out = main_job.cache_latents_cli(config, Path(args.workdir))
        print(out)
        return 0
    raise UserError(f"unknown data command '{cmd}'; use one of synth, ingest, tokenizer, latents")


# ``vdiff COMMAND`` -> the function that runs it.
COMMANDS = {"train": train, "sample": sample, "eval": evaluate, "export": export, "data": data}
