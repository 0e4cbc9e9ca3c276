"""The ``vdiff`` command: train, sample, eval, export, data.

Every user error (bad config, bad file, bad mesh) prints one line naming the problem
and the fix, and exits with code 2; no traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from vdiff.config import check_local_path
from vdiff.errors import UserError

CONFIG_HELP = (
    "config file: a path (configs/tiny.py), a name from configs/ (tiny, dit_s, ...), "
    "optionally with ':ARG' passed to get_config (tiny:smoke). Default: tiny"
)
OVERRIDE_HELP = """config overrides:
  Any key of the config can be set with --config.KEY=VALUE, e.g.
    --config.train.steps=200 --config.mesh.shape.fsdp=8 --config.model.patch="(1,2,2)"
  Unknown keys are rejected with the closest valid key; values are parsed to the
  type of the key's default."""


class _Parser(argparse.ArgumentParser):
    """argparse with vdiff's error style: one line, the fix, exit code 2."""

    def error(self, message: str):
        raise UserError(f"{message}; see '{self.prog} --help'")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, metavar="SPEC", help=CONFIG_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vdiff",
        description="Train, sample, evaluate and export text-to-video (+audio) latent diffusion "
        "transformers in JAX.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'vdiff COMMAND --help' for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="run the training stages of a config (default: the tiny recipe on built-in shapes data)",
        description="Runs the config's stages (train.stages: video VAE, audio AE, transformer) "
        "in WORKDIR, resuming from its checkpoints, then writes samples and an eval report "
        "to WORKDIR/report. With no --config this is the main job: the tiny recipe on the "
        "built-in 'shapes' dataset, generated into WORKDIR/data on first use.",
        epilog=OVERRIDE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_args(p)
    p.add_argument(
        "--workdir",
        default="workdir",
        help="output folder (checkpoints, metrics, report); default ./workdir",
    )
    p.add_argument(
        "--no-report", action="store_true", help="skip samples and report after training"
    )

    p = sub.add_parser(
        "sample",
        help="generate clips from a trained workdir or an export bundle",
        description="Generates an mp4 (and a PNG strip) for each prompt with the trained "
        "transformer in WORKDIR (EMA weights by default), or with an export bundle "
        "(--bundle, written by 'vdiff export'; needs no workdir and no model code).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a workdir written by 'vdiff train'")
    src.add_argument(
        "--bundle",
        help="a bundle folder written by 'vdiff export' (its buckets: pick one with --height/--width/--num-frames)",
    )
    p.add_argument(
        "--prompt", action="append", required=True, help="text prompt (repeat for several)"
    )
    p.add_argument(
        "--num-frames",
        type=int,
        default=None,
        help="frames to generate (default: the first bucket's; any count)",
    )
    p.add_argument("--height", type=int, default=None, help="pixels (default: the first bucket's)")
    p.add_argument("--width", type=int, default=None, help="pixels (default: the first bucket's)")
    p.add_argument(
        "--fps",
        type=float,
        default=None,
        help="frame rate of the clip (its tokens' times; default data.fps)",
    )
    p.add_argument(
        "--seconds", type=float, default=None, help="clip length (instead of --num-frames)"
    )
    p.add_argument(
        "--cfg", type=float, default=None, help="classifier-free guidance scale (1 = off)"
    )
    p.add_argument("--steps", type=int, default=None, help="sampler steps")
    p.add_argument("--sampler", choices=("euler", "heun"), default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw (non-EMA) weights")
    p.add_argument("--out", default="samples", help="output folder (default ./samples)")

    p = sub.add_parser(
        "eval",
        help="sweep checkpoints x guidance x steps x seeds x prompts into a results table and report",
        description="Generates a clip per cell of checkpoints x cfg x steps x seeds x prompts "
        "(the same starting noise for a (prompt, seed) in every cell), scores it, and writes "
        "WORKDIR/eval/NAME/: results.jsonl + results.csv (one row per cell and metric), "
        "plots/*.png and index.html with the clips. Rerunning resumes: done cells are skipped.",
        epilog="SPEC keys: checkpoints (all | follow | steps), cfg, steps, seeds, prompts (N first "
        "val prompts, or strings), sampler (euler | heun), name. Written as inline JSON, a .json "
        "file, or 'checkpoints=all;cfg=1,4;steps=10,25;seeds=0,1;prompts=8;name=cfg_sweep'. "
        "Defaults: the workdir config's sample.* values, checkpoints=all, name=sweep.",
    )
    p.add_argument("--workdir", required=True, help="a workdir written by 'vdiff train'")
    p.add_argument("--sweep", default="", metavar="SPEC", help="what to sweep (see below)")
    p.add_argument(
        "--follow-timeout",
        type=float,
        default=3600.0,
        help="checkpoints=follow: stop waiting for new checkpoints after this many seconds",
    )
    p.add_argument(
        "--poll-seconds", type=float, default=30.0, help="checkpoints=follow: polling interval"
    )
    p.add_argument("--batch-size", type=int, default=8, help="clips per sampler call")
    p.add_argument(
        "--i3d", default=None, metavar="PATH", help="I3D weights for FVD (not supported yet)"
    )

    p = sub.add_parser(
        "export",
        help="write a serving bundle (params, config, tokenizer, serialized functions)",
        description="Exports a trained workdir to a bundle folder that loads without vdiff's "
        "model code: params.safetensors (+ an Orbax copy in params/), statistics, config, "
        "tokenizer, jax.export functions (text encoder, one sampler step with a symbolic "
        "batch, decoders) for cpu and cuda, and bundle.json with every file's sha256. "
        "Sample from it with 'vdiff sample --bundle OUT'.",
    )
    p.add_argument("--workdir", required=True, help="a workdir written by 'vdiff train'")
    p.add_argument("--out", required=True, help="bundle folder to create (must not exist)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="stored parameters and transformer compute dtype (default float32)",
    )
    p.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="export the EMA weights (default) or the raw ones (--no-ema)",
    )
    p.add_argument(
        "--buckets",
        default=None,
        help="comma-separated HxWxT buckets of the run to export (default: every one)",
    )

    p = sub.add_parser("data", help="prepare data: synth, ingest, tokenizer, latents")
    dsub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    q = dsub.add_parser(
        "synth",
        help="render the built-in 'shapes' audio-video dataset to mp4 + captions",
        description="Renders 'shapes' clips (H.264 + AAC mp4, captions.jsonl, meta.jsonl) "
        "into OUT/{train,val,val_heldout}. Same seed -> byte-identical files.",
    )
    q.add_argument("--out", required=True)
    q.add_argument("--num-clips", type=int, default=1024, help="train clips (val gets 1/8 of that)")
    q.add_argument("--num-val", type=int, default=None, help="val clips (default num_clips/8)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--resolution", type=int, default=32)
    q.add_argument("--frames", type=int, default=16)
    q.add_argument("--fps", type=float, default=8.0)
    q.add_argument("--max-shapes", type=int, default=3)
    q.add_argument("--no-audio", action="store_true")
    q.add_argument("--workers", type=int, default=1)
    q = dsub.add_parser(
        "ingest",
        help="videos + captions (jsonl/csv of {video, caption}) -> ArrayRecord shards",
        description="Ingests a folder of videos with a captions file into ArrayRecord shards "
        "with a manifest. Corrupt/unreadable files are skipped and listed with reasons.",
    )
    q.add_argument("src", help="source folder (holding the videos and captions file)")
    q.add_argument("out", help="output folder for shards and manifest.json")
    q.add_argument("--captions", default=None, help="captions file (default: found in SRC)")
    q.add_argument("--split", default=None, help="for shapes layout: SRC/SPLIT/captions.jsonl")
    q.add_argument(
        "--max-resolution",
        type=int,
        default=None,
        help="re-encode so the shorter side is at most this",
    )
    q.add_argument("--gop", type=int, default=8, help="keyframe interval when re-encoding")
    q.add_argument("--workers", type=int, default=2)
    q.add_argument(
        "--records-per-shard",
        type=int,
        default=256,
        help="captions-file entries per shard (a shard holds the good ones)",
    )
    q.add_argument(
        "--shard",
        default=None,
        help="i/n: write this host's slice (shards j with j %% n == i); default: from "
        "JAX_PROCESS_ID / JAX_NUM_PROCESSES or SLURM_PROCID / SLURM_NTASKS when set, else "
        "0/1. A rerun keeps finished shards.",
    )
    q = dsub.add_parser(
        "tokenizer",
        help="train a sentencepiece model on captions",
        description="Trains a sentencepiece model (byte fallback, so any Unicode round-trips) "
        "on the captions of a captions file or an ingested ArrayRecord folder.",
    )
    q.add_argument("src", help="captions .jsonl/.csv, or a folder of ArrayRecord shards")
    q.add_argument("--out", required=True, help="model prefix (writes PREFIX.model)")
    q.add_argument("--vocab-size", type=int, default=512)
    q = dsub.add_parser(
        "latents",
        help="encode the dataset once with a workdir's trained autoencoders",
        description="Encodes every split with the workdir's trained video VAE / audio AE into "
        "WORKDIR/latents: ArrayRecord shards <split>-NNNNN-of-MMMMM.array_record (latent "
        "means, caption tokens and text per clip), stats.json (per-channel statistics) and "
        "latents.json; the cache the transformer stage trains from. A cache made from the "
        "same autoencoder checkpoints is reused as it is.",
    )
    _add_config_args(q)
    q.add_argument("--workdir", required=True, help="workdir with trained autoencoders")
    return parser


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separates ``--config.a.b=v`` / ``--config.a.b v`` from the other arguments."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            body = arg[len("--config.") :]
            if "=" not in body:
                if i + 1 >= len(argv):
                    raise UserError(f"{arg} needs a value; write it as {arg}=VALUE")
                body = f"{body}={argv[i + 1]}"
                i += 1
            overrides.append(body)
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def _setup_logging() -> None:
    rank = os.environ.get("JAX_PROCESS_ID") or os.environ.get("SLURM_PROCID") or "0"
    logging.basicConfig(
        level=logging.INFO,
        format=f"[{rank}] %(asctime)s %(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run(argv: list[str]) -> int:
    parser = build_parser()
    rest, overrides = _split_overrides(argv)
    args = parser.parse_args(rest)
    if args.command is None:
        parser.print_help()
        return 2
    if overrides and args.command not in ("train", "data"):
        raise UserError(f"--config.* overrides apply to 'vdiff train', not 'vdiff {args.command}'")
    for name in ("workdir", "out", "src", "bundle"):
        if isinstance(getattr(args, name, None), str):
            check_local_path(f"--{name}", getattr(args, name))
    _setup_logging()
    # Imported here, not at the top: `vdiff --help` and argument errors answer without
    # loading JAX and the models (seconds).
    from vdiff import commands

    if args.command == "data" and args.data_command is None:
        parser.parse_args(["data", "--help"])
    return commands.COMMANDS[args.command](args, overrides)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        code = run(argv)
    except UserError as e:
        print(f"vdiff: error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("vdiff: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
