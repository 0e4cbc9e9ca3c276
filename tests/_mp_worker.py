"""A small training run for the multi-process and resume tests (run as a script).

Trains a two-layer MLP through :func:`vdiff.train.loop.run_stage` on a stream of
ArrayRecord shards (:func:`data_pipelines.latents.cache_stream`), exactly as a ``vdiff
train`` stage does, in every process started by ``launch/local.py`` (or alone). The
shards are written first by every process for its own run of rows, and merged by
process 0, as the latent cache is. It records what it trains on and what it ends with,
for the tests to compare:

- ``WORKDIR/data``: the dataset's shards and ``latents.json``;
- ``WORKDIR/seen.pN.jsonl``: one line per step drawn by process N: the global step,
  the dataset rows of its batch and a hash of the batch bytes;
- ``WORKDIR/final.npz`` (process 0): every array of the final train state, gathered;
- ``WORKDIR/pid.pN``: process N's pid, for the tests' signals.

Exits 0 after a signal-triggered save (like ``vdiff train``), printing the reason.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

# The tests run this file by path; make the checkout importable like `pip install -e`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_mlp(rngs):
    """16 -> 64 -> 16 MLP with logical axis names (sharded by the config's rules)."""
    import jax
    from flax import nnx

    from vdiff.parallel.sharding import constrain

    class MLP(nnx.Module):
        def __init__(self, rngs):
            init = nnx.initializers.lecun_normal()
            self.a = nnx.Linear(
                16, 64, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")), rngs=rngs
            )
            self.b = nnx.Linear(
                64, 16, kernel_init=nnx.with_partitioning(init, ("mlp", "embed")), rngs=rngs
            )

        def __call__(self, x):
            return self.b(constrain(jax.nn.gelu(self.a(x)), ("batch", "mlp")))

    return MLP(rngs)


def mse_loss(model, batch, rng):
    import jax
    import jax.numpy as jnp

    # Input noise from the step's key: the train-state RNG must round-trip exactly.
    x = batch["x"] + 0.01 * jax.random.normal(rng, batch["x"].shape)
    y = model(x)
    return jnp.mean((y - batch["y"]) ** 2), {}


def dataset(n: int = 512):
    import numpy as np

    x = np.random.RandomState(0).randn(n, 16).astype(np.float32)
    return {"x": x, "y": np.sin(x)}


def build_config(mesh_spec: dict[str, int], *, keep: int = 2, keep_every: int = 0):
    from vdiff.config import load_config

    cfg = load_config("tiny")
    for axis in ("data", "fsdp", "tensor", "context"):
        cfg.mesh.shape[axis] = mesh_spec.get(axis, 1)
    cfg.train.keep, cfg.train.keep_every = keep, keep_every
    return cfg


def dit_config(cfg):
    """A transformer small enough for a test on 16x16x8 clips' latents, without audio."""
    m, d = cfg.model, cfg.data
    m.width, m.depth, m.heads, m.text_width, m.text_depth, m.text_heads = 32, 1, 2, 32, 1, 2
    d.audio, d.resolution, d.frames, d.buckets = False, 16, 8, ((16, 16, 8),)
    return cfg


def latent_shape(cfg) -> tuple[int, ...]:
    from vdiff.models.video_vae import latent_frames

    d, v = cfg.data, cfg.vae
    s = d.resolution // v.spatial_down
    return (latent_frames(d.frames, v.temporal_down), s, s, v.latent_channels)


def build(
    mesh_spec: dict[str, int],
    steps: int,
    *,
    keep: int = 2,
    keep_every: int = 0,
    devices=None,
    model: str = "mlp",
):
    """(config, engine) for ``mesh_spec`` over ``devices`` (default: the job's first N):
    the MLP, or (``model="dit"``) the transformer stage's engine on a small config."""
    import math

    import jax

    from vdiff.parallel.mesh import make_mesh
    from vdiff.train import stages
    from vdiff.train.engine import Engine, OptimConfig

    cfg = build_config(mesh_spec, keep=keep, keep_every=keep_every)
    mesh = make_mesh(cfg, devices or jax.devices()[: math.prod(mesh_spec.values())])
    if model == "dit":
        cfg = dit_config(cfg)
        cfg.train.steps, cfg.train.warmup, cfg.train.optimizer = steps, 2, "adamw"
        return cfg, stages.dit_engine(cfg, mesh)
    engine = Engine(
        make_mlp,
        mse_loss,
        mesh,
        cfg.mesh.rules,
        OptimConfig(lr=1e-2, warmup=2, steps=steps),
        ema_decay=0.9,
    )
    return cfg, engine


def _record(i: int, model: str) -> dict:
    """Row ``i``: the MLP's (x, y) as ``video`` / ``audio``, or random transformer latents."""
    import numpy as np

    if model == "mlp":
        d = dataset()
        x, y, tokens = d["x"][i], d["y"][i], np.zeros(1, np.int32)
    else:
        from vdiff.config import load_config

        rng = np.random.default_rng(i)
        x = rng.standard_normal(latent_shape(dit_config(load_config("tiny")))).astype(np.float32)
        y, tokens = None, rng.integers(4, 300, 8).astype(np.int32)
    return {"key": f"row{i:04d}", "index": i, "video": x, "audio": y, "has_audio": y is not None,
            "tokens": tokens, "mask": np.ones(len(tokens), bool), "caption": "", "fps": 8.0}  # fmt: skip


def write_dataset(out: Path, model: str = "mlp", n: int = 512) -> None:
    """Every process writes its consecutive run of the dataset's rows; process 0 merges."""
    import jax
    from jax.experimental import multihost_utils

    from data_pipelines import latents as lc

    pi, pc = jax.process_index(), jax.process_count()
    writer = lc.PartWriter(out, "train", pi, pc, records_per_shard=100)
    for i in range(n * pi // pc, n * (pi + 1) // pc):
        writer.write(_record(i, model))
    writer.close()
    multihost_utils.sync_global_devices("mp_worker_parts")
    if pi == 0:
        entry, _ = lc.merge_parts(out, "train", pc)
        lc.write_meta(out, {"dataset": "mlp"}, {"train": entry}, {})
    multihost_utils.sync_global_devices("mp_worker_meta")


FIELDS = {
    "mlp": {"x": "video", "y": "audio"},
    "dit": {"video_latents": "video", "tokens": "tokens", "mask": "mask"},
}


def dataset_stream(
    data: Path, batch_size: int, process_index=None, process_count=None, model: str = "mlp"
):
    """The model's dataset as a stream (its shards written first if ``data`` has none)."""
    import jax

    from data_pipelines import latents as lc

    if lc.read_meta(data) is None:
        write_dataset(data, model)
    return lc.cache_stream(
        data,
        "train",
        lc.RecordFields(FIELDS[model]),
        batch_size=batch_size,
        seed=7,
        process_index=jax.process_index() if process_index is None else process_index,
        process_count=jax.process_count() if process_count is None else process_count,
    )


class RecordingSource:
    """Wraps a stream; appends each drawn batch's rows and hash to a jsonl file."""

    def __init__(self, source, path: Path, step_sleep: float = 0.0):
        self.source, self.path, self.step_sleep = source, path, step_sleep
        self.step = 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.source)
        self.step += 1
        digest = hashlib.sha256(b"".join(batch[k].tobytes() for k in sorted(batch))).hexdigest()
        rows = self.source.last_indices.tolist()
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": self.step, "rows": rows, "sha": digest}) + "\n")
        if self.step_sleep:
            time.sleep(self.step_sleep)  # widens the window the kill tests aim at
        return batch

    def get_state(self):
        return self.source.get_state()

    def set_state(self, state):
        self.source.set_state(state)
        self.step = self.source.position // self.source.global_batch

    def close(self):
        self.source.close()


def cache_latents(args) -> int:
    """``--task latents``: the latent-cache stage of every process over a decoded-frames
    cache of random clips (written part by part by the processes), with a fresh VAE."""
    import jax
    import numpy as np

    from data_pipelines import latents as lc
    from data_pipelines.buckets import check_buckets
    from vdiff.train import distributed, stages
    from vdiff.train.data import Data
    from vdiff.train.distributed import barrier
    from vdiff.train.trained import Trained, TrainedModel

    distributed.initialize()
    cfg = dit_config(build_config(json.loads(args.mesh)))
    cfg.vae.channels = 8
    mesh = make_mesh_for(cfg)
    workdir = Path(args.workdir)
    frames = workdir / "frames"
    pi, pc = jax.process_index(), jax.process_count()
    if pi == 0:
        lc.clear_cache(frames, lc.FRAMES)
    barrier("worker_frames_clear")
    h, w, t = cfg.data.buckets[0]
    bucket = f"{h}x{w}x{t}"
    counts = {"train": 20, "val": 6}
    for split, n in counts.items():
        writer = lc.PartWriter(frames, f"{split}.{bucket}", pi, pc)
        for i in range(n * pi // pc, n * (pi + 1) // pc):
            rng = np.random.default_rng([i, len(split)])
            writer.write(
                {"key": f"{split}{i:03d}", "index": i, "caption": f"clip {i}",
                 "video": rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8), "audio": None,
                 "has_audio": False, "tokens": np.arange(8, dtype=np.int32) + i,
                 "mask": np.ones(8, bool), "fps": 8.0}
            )  # fmt: skip
        writer.close()
    barrier("worker_frames_parts")
    if pi == 0:
        entries = {f"{s}.{bucket}": lc.merge_parts(frames, f"{s}.{bucket}", pc)[0] for s in counts}
        lc.write_meta(frames, {}, entries, {}, lc.FRAMES, {"mel_stats": {"mean": 0, "std": 1}})
    barrier("worker_frames_meta")
    data = Data(
        config=cfg, root=workdir, records=workdir, frames=frames, tokenizer=None,
        mel_stats={"mean": 0.0, "std": 1.0}, buckets=check_buckets(cfg.data.buckets),
        members={}, bucket_counts={s: {bucket: n} for s, n in counts.items()},
        tag={"worker": True},
    )  # fmt: skip
    engine = stages.video_vae_engine(cfg, mesh)
    trained = Trained(vae=TrainedModel(engine, engine.init(0)))
    stages.ENCODE_BATCH = 4  # several encoder calls per process's part
    cache = stages.cache_latents(cfg, workdir, mesh, data, trained, shards=True)
    print(f"worker {pi}: latent cache {sorted(cache.meta['splits'])}", flush=True)
    return 0


def make_mesh_for(cfg):
    import math

    import jax

    from vdiff.parallel.mesh import make_mesh

    return make_mesh(cfg, jax.devices()[: math.prod(cfg.mesh.shape.values())])


def train(args) -> int:
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from vdiff.train import distributed
    from vdiff.train.loop import PreemptedError, run_stage

    distributed.initialize()
    mesh_spec = json.loads(args.mesh)
    cfg, engine = build(
        mesh_spec, args.steps, keep=args.keep, keep_every=args.keep_every, model=args.model
    )
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    pc, pi = jax.process_count(), jax.process_index()
    (workdir / f"pid.p{pi}").write_text(str(os.getpid()))  # lets the tests signal one process
    source = RecordingSource(
        dataset_stream(workdir / "data", args.global_batch // pc, model=args.model),
        workdir / f"seen.p{pi}.jsonl",
        args.step_sleep,
    )
    try:
        state, summary = run_stage(
            args.model,  # the stage's name: WORKDIR/checkpoints/<model>
            engine,
            source,
            steps=args.steps,
            workdir=workdir,
            config=cfg,
            seed=0,
            log_every=args.steps,
            ckpt_every=args.ckpt_every,
            sync_every=args.sync_every,
        )
    except PreemptedError as e:
        print(f"vdiff: {e}", flush=True)
        return 0
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    arrays = {
        jax.tree_util.keystr(path): np.asarray(multihost_utils.process_allgather(x, tiled=True))
        for path, x in flat
    }
    if pi == 0:
        np.savez(workdir / "final.npz", **arrays)
        (workdir / "summary.json").write_text(json.dumps(summary, default=float))
    print(f"worker {pi}: done, start_step={summary['start_step']}", flush=True)
    return 0


BUCKETS = {
    "32x48x16": (40, (16, 32, 48)),
    "48x32x16": (24, (16, 48, 32)),
    "32x48x1": (64, (1, 32, 48)),
}


def draw_buckets(args) -> int:
    """``--task buckets``: every process draws ``--steps`` batches from a three-bucket
    stream (clips of bucket ``k`` hold their index plus 1000 k), assembles each into one
    global array and writes the buckets it drew and each global batch's clip ids."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from data_pipelines.bucket_stream import bucketed_stream
    from data_pipelines.buckets import Bucket
    from data_pipelines.stream import BatchStream
    from vdiff.parallel.mesh import to_global
    from vdiff.train import distributed

    distributed.initialize()
    pi, pc = jax.process_index(), jax.process_count()
    buckets = [Bucket(*shape[1:], shape[0]) for _, shape in BUCKETS.values()]

    def make(k, bucket, batch, seed):
        def load(position, i, k=k, bucket=bucket):
            return {"x": np.full((bucket.frames, 2, 2), 1000 * k + i, np.int32)}

        return BatchStream(
            BUCKETS[bucket.name][0], load, batch_size=batch, seed=seed, process_index=pi,
            process_count=pc,
        )  # fmt: skip

    per_process = args.global_batch // pc
    sizes = {name: per_process for name in BUCKETS}
    counts = {name: n for name, (n, _) in BUCKETS.items()}
    stream = bucketed_stream(buckets, counts, make, batch_sizes=sizes, seed=5, process_count=pc)
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    drawn = []
    for _ in range(args.steps):
        batch = to_global(next(stream), mesh, ("data",))
        ids = np.asarray(multihost_utils.process_allgather(batch["x"], tiled=True))
        drawn.append([stream.names[stream.last_bucket], ids[:, 0, 0, 0].tolist()])
    (Path(args.workdir) / f"drawn.{pi}.json").write_text(json.dumps(drawn))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--ckpt-every", type=int, default=4)
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--mesh", default='{"data": 8}', help='JSON axis sizes, e.g. {"fsdp": 8}')
    p.add_argument("--task", choices=("train", "latents", "buckets"), default="train")
    p.add_argument("--model", choices=("mlp", "dit"), default="mlp")
    p.add_argument("--keep", type=int, default=2)
    p.add_argument("--keep-every", type=int, default=0)
    p.add_argument("--sync-every", type=int, default=1)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--devices", type=int, default=0, help="fake CPU devices (0: leave XLA_FLAGS)")
    args = p.parse_args()
    if args.devices:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={args.devices}"
        )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import logging

    logging.basicConfig(
        level=logging.INFO,
        format=f"[{os.environ.get('JAX_PROCESS_ID', '0')}] %(levelname).1s %(name)s: %(message)s",
    )
    for noisy in ("absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    task = {"latents": cache_latents, "buckets": draw_buckets}.get(args.task, train)
    return task(args)


if __name__ == "__main__":
    sys.exit(main())
