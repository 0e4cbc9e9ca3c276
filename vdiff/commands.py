"""What each ``vdiff`` subcommand does (argument parsing lives in :mod:`vdiff.cli`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from vdiff.errors import UserError

log = logging.getLogger("vdiff")


def train(args: argparse.Namespace, overrides: list[str]) -> int:
    from vdiff.config import load_config
    from vdiff.train import distributed

    distributed.initialize()
    config = load_config(args.config, overrides)
    import jax

    from vdiff.config import validate

    validate(config, jax.device_count())  # fail on a bad mesh before any work
    from vdiff.train import main_job
    from vdiff.train.loop import PreemptedError

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
        from vdiff import serving

        paths = serving.sample_cli(args)
    else:
        from vdiff import sampling

        paths = sampling.sample_cli(args)
    for p in paths:
        print(p)
    return 0


def eval(args: argparse.Namespace, overrides: list[str]) -> int:
    from vdiff.eval.sweep import parse_spec

    if args.i3d:
        raise UserError(
            "--i3d (FVD with I3D weights) is not supported in this version; drop --i3d "
            "(the sweep reports fd_vae_features, a Fréchet distance on vdiff's own VAE features)"
        )
    spec = parse_spec(args.sweep)  # a bad spec fails before any JAX start-up
    from vdiff.train import distributed

    distributed.initialize()
    from vdiff.eval.sweep import run_sweep

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
    from vdiff.export.bundle import export_workdir

    export_workdir(Path(args.workdir), Path(args.out), dtype=args.dtype, use_ema=args.ema)
    print(args.out)
    return 0


def data(args: argparse.Namespace, overrides: list[str]) -> int:
    cmd = args.data_command
    if cmd == "synth":
        from data_pipelines.shapes.synth import synth_splits

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
        from data_pipelines.ingest import ingest

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
        )
        counts = manifest["counts"] if isinstance(manifest, dict) else manifest.counts
        print(json.dumps(counts))
        return 0
    if cmd == "tokenizer":
        from data_pipelines.tokenizer import captions_from, train_tokenizer

        path = train_tokenizer(captions_from(Path(args.src)), args.out, vocab_size=args.vocab_size)
        print(path)
        return 0
    if cmd == "latents":
        from vdiff.config import load_config
        from vdiff.train import main_job

        config = load_config(args.config, overrides)
        out = main_job.cache_latents_cli(config, Path(args.workdir))
        print(out)
        return 0
    raise UserError(f"unknown data command '{cmd}'; use one of synth, ingest, tokenizer, latents")
