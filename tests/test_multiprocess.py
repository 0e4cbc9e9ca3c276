"""Multi-process runs on localhost: launch/local.py + jax.distributed + gloo.

The training runs are ``tests/_mp_worker.py`` (a small transformer stage through
``run_stage``, streaming latent shards that the processes wrote part by part) started by
``launch/local.py`` as 2 processes x 4 fake CPU devices sharing one checkpoint folder.
Also here: the launcher's failure handling and the environment -> jax.distributed parsing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_mp_worker.py"
LAUNCH = ROOT / "launch" / "local.py"
STEPS, CKPT_EVERY, SLEEP = 16, 4, 0.15
MODEL = "dit"  # the transformer stage's engine (small), reading latent shards as a stream
MESH = '{"fsdp": 8}'


def _cmd(workdir: Path, nproc: int = 2, model: str = MODEL) -> list[str]:
    return [
        sys.executable,
        str(LAUNCH),
        "--nproc",
        str(nproc),
        "--devices-per-proc",
        str(8 // nproc),
        "--grace",
        "2",
        "--",
        sys.executable,
        str(WORKER),
        "--workdir",
        str(workdir),
        "--steps",
        str(STEPS),
        "--ckpt-every",
        str(CKPT_EVERY),
        "--step-sleep",
        str(SLEEP),
        "--mesh",
        MESH,
        "--model",
        model,
    ]


def _env() -> dict:
    env = dict(os.environ)
    # The launcher sets the per-process device count; drop the test harness's 8.
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f
    )
    return env


def _start(workdir: Path, model: str = MODEL) -> subprocess.Popen:
    return subprocess.Popen(
        _cmd(workdir, model=model),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _run(workdir: Path, timeout: float = 180) -> tuple[int, str]:
    p = _start(workdir)
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, out


def _wait_for(predicate, timeout: float = 180, what: str = "") -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _committed_steps(workdir: Path, model: str = MODEL) -> list[int]:
    d = workdir / "checkpoints" / model
    if not d.exists():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit())


def _seen(workdir: Path, rank: int) -> list[dict]:
    """Every batch record of ``rank`` (a line cut short by SIGKILL is ignored)."""
    out = []
    for line in (workdir / f"seen.p{rank}.jsonl").read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted 2-process run of STEPS steps."""
    workdir = tmp_path_factory.mktemp("reference")
    code, out = _run(workdir)
    assert code == 0, out[-3000:]
    return workdir


@pytest.mark.multiprocess
def test_two_processes_match_one_process(reference, devices, tmp_path):
    """2 processes x 4 devices == 1 process x 8 devices: the same shards written by
    each process's part, the same streamed batches, the same parameters."""
    sys.path.insert(0, str(WORKER.parent))
    import _mp_worker as w

    from data_pipelines import latents as lc
    from vdiff.train.loop import run_stage

    workdir = tmp_path
    cfg, engine = w.build(json.loads(MESH), STEPS, model=MODEL)
    stream = w.dataset_stream(workdir / "data", 32, 0, 1, model=MODEL)
    ref_src, one_src = (lc.CacheSource(d / "data", "train") for d in (reference, workdir))
    assert ref_src.info["parts"] == 2 and one_src.info["parts"] == 1
    ref_rows, one_rows = (src.read(range(len(src))) for src in (ref_src, one_src))
    assert ref_rows["key"] == one_rows["key"]
    for k in ("video", "tokens", "index"):
        np.testing.assert_array_equal(ref_rows[k], one_rows[k])
    source = w.RecordingSource(stream, workdir / "seen.p0.jsonl")
    state, _ = run_stage(
        MODEL, engine, source, steps=STEPS, workdir=workdir, config=cfg, seed=0, log_every=STEPS
    )
    # The global batch of each step is process 0's rows followed by process 1's.
    one = [r["rows"] for r in _seen(workdir, 0)]
    two = [a["rows"] + b["rows"] for a, b in zip(_seen(reference, 0), _seen(reference, 1))]
    assert len(one) == STEPS and two == one
    final = np.load(reference / "final.npz")
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    assert sorted(final.files) == sorted(jax.tree_util.keystr(p) for p, _ in flat)
    for path, x in flat:
        ref = final[jax.tree_util.keystr(path)]
        if np.issubdtype(ref.dtype, np.floating):
            # Tolerance: cross-process gloo all-reduces sum in another order than one
            # process does (observed differences ~6e-8 after 16 steps).
            np.testing.assert_allclose(np.asarray(x), ref, rtol=1e-5, atol=1e-6)
        else:  # step, rng, counters
            np.testing.assert_array_equal(np.asarray(x), ref)


@pytest.mark.multiprocess
def test_two_process_checkpoint_restores_on_one_process(reference, devices):
    """The 2-process job's newest checkpoint, read by one process onto other meshes."""
    sys.path.insert(0, str(WORKER.parent))
    import _mp_worker as w

    from vdiff.train.checkpoint import Checkpointer

    final = np.load(reference / "final.npz")
    ckpt = Checkpointer(reference / "checkpoints" / MODEL)
    for mesh in ({"data": 2, "fsdp": 2, "tensor": 2}, {"data": 1}):
        n = int(np.prod(list(mesh.values())))
        _, engine = w.build(mesh, STEPS, model=MODEL)
        assert len(engine.mesh.devices.flat) == n
        step, state, data = ckpt.restore(engine.abstract_state, engine.state_shardings)
        assert step == STEPS and [s["process_index"] for s in data["processes"]] == [0, 1]
        for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
            np.testing.assert_array_equal(np.asarray(x), final[jax.tree_util.keystr(path)])
    ckpt.close()
    # One process continues the two processes' stream at the same example: its next
    # global batch is the one an uninterrupted 1-process stream reads after STEPS.
    from data_pipelines import latents as lc
    from data_pipelines.stream import pick_state

    def stream():
        return lc.cache_stream(
            reference / "data", "train", lc.RecordFields({"x": "video"}),
            batch_size=32, seed=7, process_index=0, process_count=1,
        )  # fmt: skip

    with stream() as resumed, stream() as fresh:
        resumed.set_state(pick_state(data["processes"], 0, 1))
        for _ in range(STEPS):
            next(fresh)
        np.testing.assert_array_equal(next(resumed)["x"], next(fresh)["x"])


@pytest.mark.multiprocess
def test_two_processes_draw_the_same_bucket_at_every_step(tmp_path):
    """Two processes each read their rows of a three-bucket stream (landscape and portrait
    clips, landscape stills): at every step both draw the same bucket, its rows assemble
    into one global array, and the global batch is whole clips of that bucket alone."""
    import json

    from _mp_worker import BUCKETS

    cmd = _cmd(tmp_path, nproc=2)
    cmd = [*cmd[: cmd.index("--steps")], "--task", "buckets", "--steps", "24",
           "--global-batch", "8"]  # fmt: skip
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    drawn = [json.loads((tmp_path / f"drawn.{i}.json").read_text()) for i in (0, 1)]
    assert drawn[0] == drawn[1]  # the same bucket and the same global batch on both
    assert {name for name, _ in drawn[0]} == set(BUCKETS)  # every bucket within 24 steps
    for name, ids in drawn[0]:
        k = list(BUCKETS).index(name)
        assert len(ids) == 8 and all(1000 * k <= i < 1000 * k + BUCKETS[name][0] for i in ids)
        assert len(set(ids)) == 8  # eight different clips of the bucket


@pytest.mark.multiprocess
def test_latent_cache_by_two_processes_holds_the_records_of_one(tmp_path):
    """Each process encodes its own run of clips into its own part; process 0 merges: the
    cache lists the records, in order, and the statistics of the one-process cache."""
    from data_pipelines import latents as lc

    for nproc in (2, 1):
        cmd = _cmd(tmp_path / f"p{nproc}", nproc=nproc)
        cmd = [*cmd[: cmd.index("--steps")], "--task", "latents", "--mesh", MESH]
        p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    two, one = (tmp_path / f"p{n}" / "latents" for n in (2, 1))
    for split in ("train", "val"):
        a, b = (lc.CacheSource(d, f"{split}.16x16x8") for d in (two, one))  # the one bucket
        assert a.info["parts"] == 2 and b.info["parts"] == 1
        ra, rb = a.read(range(len(a))), b.read(range(len(b)))
        assert ra["key"] == rb["key"] and len(ra["key"]) == {"train": 20, "val": 6}[split]
        for k in ("index", "tokens", "mask"):
            np.testing.assert_array_equal(ra[k], rb[k])
        # Host copies of the weights on one device against the weights sharded over eight:
        # the same encoder up to float32 summation order.
        np.testing.assert_allclose(ra["video"], rb["video"], rtol=1e-5, atol=1e-5)
    sa, sb = lc.load_stats(two), lc.load_stats(one)
    for k in ("shift", "scale"):
        np.testing.assert_allclose(sa["video"][k], sb["video"][k], rtol=1e-5, atol=1e-6)


@pytest.mark.multiprocess
def test_sigkill_then_relaunch_is_bitwise_equal(reference, tmp_path):
    """SIGKILL one process mid-training; the same command again ends bit-identical."""
    p = _start(tmp_path)
    try:
        _wait_for(lambda: any(s >= 2 * CKPT_EVERY for s in _committed_steps(tmp_path)), what="ckpt")
        os.kill(int((tmp_path / "pid.p1").read_text()), signal.SIGKILL)
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    # The launcher stops process 0 and reports the killed process's code (128 + 9).
    assert p.returncode == 128 + signal.SIGKILL, out[-3000:]
    assert not (tmp_path / "final.npz").exists()
    killed_at = max(r["step"] for r in _seen(tmp_path, 1))
    assert killed_at < STEPS

    code, out = _run(tmp_path)
    assert code == 0, out[-3000:]
    start = json.loads((tmp_path / "summary.json").read_text())["start_step"]
    assert 2 * CKPT_EVERY <= start < STEPS, start
    # Parameters, optimiser state, EMA, RNG and step: bit for bit.
    ref, got = np.load(reference / "final.npz"), np.load(tmp_path / "final.npz")
    assert sorted(ref.files) == sorted(got.files)
    for k in ref.files:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    # Data: every batch either run drew equals the uninterrupted run's batch of that step
    # (the steps redone after the kill included), and every step was drawn.
    for rank in (0, 1):
        expected = {r["step"]: (r["rows"], r["sha"]) for r in _seen(reference, rank)}
        records = _seen(tmp_path, rank)
        assert {r["step"] for r in records} == set(range(1, STEPS + 1))
        for r in records:
            assert (r["rows"], r["sha"]) == expected[r["step"]], r["step"]


@pytest.mark.multiprocess
def test_sigterm_to_one_process_saves_and_exits_zero(tmp_path):
    """A preemption notice on one host stops every host at the same step, after a save."""
    p = _start(tmp_path, model="mlp")  # the signal path does not depend on the model
    try:
        _wait_for(lambda: CKPT_EVERY in _committed_steps(tmp_path, "mlp"), what="first checkpoint")
        os.kill(int((tmp_path / "pid.p1").read_text()), signal.SIGTERM)
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, out[-3000:]
    stops = {}
    for line in out.splitlines():
        if "stopped by signal at step" in line:
            rank = int(line[1])
            stops[rank] = int(line.split("at step ")[1].split(";")[0])
    assert set(stops) == {0, 1} and stops[0] == stops[1], out[-3000:]
    stop = stops[0]
    assert CKPT_EVERY <= stop < STEPS
    assert stop in _committed_steps(tmp_path, "mlp")
    assert not (tmp_path / "final.npz").exists()
    # Both processes drew exactly the batches of the steps they trained.
    for rank in (0, 1):
        assert max(r["step"] for r in _seen(tmp_path, rank)) == stop


_CHILD = """
import os, sys, time
rank = int(os.environ["JAX_PROCESS_ID"])
print("env", os.environ["JAX_COORDINATOR_ADDRESS"], os.environ["JAX_NUM_PROCESSES"],
      os.environ["XLA_FLAGS"], flush=True)
if rank == 1:
    sys.exit(3)
time.sleep(60)
"""


def test_launcher_stops_the_rest_when_one_fails():
    """Rank 1 exits 3 at once; the launcher kills rank 0 (asleep) and exits 3."""
    t0 = time.time()
    run = subprocess.run(
        [
            sys.executable,
            str(LAUNCH),
            "--nproc",
            "2",
            "--devices-per-proc",
            "3",
            "--grace",
            "1",
            "--",
            sys.executable,
            "-c",
            _CHILD,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env=_env(),
    )
    assert run.returncode == 3, run.stdout
    assert time.time() - t0 < 20  # not the 60 s rank 0 would sleep
    lines = run.stdout.splitlines()
    for rank in (0, 1):
        env_line = next(x for x in lines if x.startswith(f"[{rank}] env"))
        _, _, address, nproc, *flags = env_line.split()
        assert address.startswith("localhost:") and nproc == "2"
        assert flags == ["--xla_force_host_platform_device_count=3"]
    assert "[launch] exit codes: [" in run.stdout


def test_environment_to_distributed_arguments():
    from vdiff.errors import UserError
    from vdiff.train.distributed import explicit_args, wants_auto_detect

    assert explicit_args({}) is None
    env = {
        "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
        "JAX_NUM_PROCESSES": "4",
        "JAX_PROCESS_ID": "3",
        "JAX_LOCAL_DEVICE_IDS": "0,1",
    }
    assert explicit_args(env) == {
        "coordinator_address": "10.0.0.1:1234",
        "num_processes": 4,
        "process_id": 3,
        "local_device_ids": [0, 1],
    }
    with pytest.raises(UserError, match="JAX_NUM_PROCESSES"):
        explicit_args({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "0"})
    with pytest.raises(UserError, match="HOST:PORT"):
        explicit_args({**env, "JAX_COORDINATOR_ADDRESS": "h"})
    with pytest.raises(UserError, match=r"JAX_PROCESS_ID=4 must be in \[0"):
        explicit_args({**env, "JAX_PROCESS_ID": "4"})
    with pytest.raises(UserError, match="comma-separated"):
        explicit_args({**env, "JAX_LOCAL_DEVICE_IDS": "0;1"})
    # Only an srun step of several tasks counts as SLURM multi-process, not the batch shell.
    assert wants_auto_detect({"SLURM_STEP_NUM_TASKS": "16", "SLURM_NTASKS": "16"})
    assert not wants_auto_detect({"SLURM_NTASKS": "16", "SLURM_JOB_ID": "7"})
    assert wants_auto_detect({"TPU_WORKER_HOSTNAMES": "a,b"})
    assert wants_auto_detect({"VDIFF_DISTRIBUTED": "auto"})
    assert not wants_auto_detect({})
