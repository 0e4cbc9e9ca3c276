"""Checkpoints in one process on 8 fake CPU devices: retention, corruption, other meshes,
exact resume of the train state and data position, and the stop-on-signal path."""

from __future__ import annotations

import glob
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _mp_worker as w

from data_pipelines.stream import BatchStream, pick_state
from vdiff.errors import UserError
from vdiff.train.checkpoint import Checkpointer, state_digest
from vdiff.train.loop import PreemptedError, run_stage


def _leaves(state) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def _assert_equal(a, b) -> None:
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(x, y)


def _train(engine, workdir: Path, steps: int, *, ckpt_every=4, source=None):
    cfg = w.build_config({"fsdp": 8}, keep=3)
    source = source or w.dataset_stream(workdir / "data", 32, 0, 1)
    state, summary = run_stage(
        "mlp",
        engine,
        source,
        steps=steps,
        workdir=workdir,
        config=cfg,
        seed=0,
        log_every=steps,
        ckpt_every=ckpt_every,
    )
    return state, summary, source


def _data_files(step_dir: Path) -> list[str]:
    """The state's array-data files (OCDBT: per-process files and the merged tree)."""
    return sorted(glob.glob(str(step_dir / "state" / "**" / "d" / "*"), recursive=True))


def _damage(step_dir: Path, how: str) -> None:
    files = _data_files(step_dir)
    assert files
    for f in files:
        if how == "truncate":
            os.truncate(f, os.path.getsize(f) // 2)
        elif how == "delete":
            os.remove(f)
        elif how == "flip_byte":  # same size, one byte altered in each file
            data = bytearray(Path(f).read_bytes())
            data[len(data) // 2] ^= 0xFF
            Path(f).write_bytes(bytes(data))


@pytest.fixture(scope="module")
def engine8(devices):
    return w.build({"fsdp": 8}, 24)[1]


def test_keeps_last_n_and_every_kth(engine8, tmp_path):
    state = engine8.init(0)
    ckpt = Checkpointer(tmp_path, keep=2, keep_every=4)
    for step in range(1, 12):
        ckpt.save(step, state, data_state={"step": step}, force=True)
    ckpt.wait()
    assert ckpt.all_steps() == [4, 8, 10, 11]
    ckpt.close()
    # A reopened manager applies the same policy to what is on disk.
    ckpt = Checkpointer(tmp_path, keep=2, keep_every=4)
    ckpt.save(12, state, force=True)
    ckpt.close()
    assert ckpt.all_steps() == [4, 8, 11, 12]


def test_bad_retention_settings_are_rejected(tmp_path):
    with pytest.raises(UserError, match=r"train\.keep"):
        Checkpointer(tmp_path, keep=0)
    with pytest.raises(UserError, match=r"train\.keep_every"):
        Checkpointer(tmp_path, keep=1, keep_every=-2)


@pytest.mark.parametrize(
    "damage", ["truncate", "delete", "flip_byte", "truncate_metadata", "other_contents"]
)
def test_damaged_newest_checkpoint_falls_back(engine8, tmp_path, caplog, damage):
    states = {}
    ckpt = Checkpointer(tmp_path, keep=3)
    state = engine8.init(0)
    for step in (1, 2):
        state = engine8.init(step)
        states[step] = jax.tree.map(np.asarray, state)
        ckpt.save(step, state, data_state={"pos": step}, force=True)
    ckpt.close()
    newest = tmp_path / "2"
    if damage == "truncate_metadata":
        os.truncate(newest / "state" / "_METADATA", 10)
    elif damage == "other_contents":
        # Well-formed files holding other values: readable, so only the digest can tell.
        shutil.rmtree(newest / "state")
        shutil.copytree(tmp_path / "1" / "state", newest / "state")
    else:
        _damage(newest, damage)
    ckpt = Checkpointer(tmp_path, keep=3)
    with caplog.at_level(logging.WARNING, logger="vdiff.train.checkpoint"):
        step, restored, data = ckpt.restore(engine8.abstract_state, engine8.state_shardings)
    assert step == 1 and data == {"pos": 1}
    _assert_equal(restored, states[1])
    assert any("step 2" in r.message and "unreadable" in r.message for r in caplog.records)
    assert newest.is_dir()  # restoring alone never changes the folder (readers are safe)
    with pytest.raises(UserError, match="step 2"):  # an explicit step does not fall back
        ckpt.restore(engine8.abstract_state, engine8.state_shardings, step=2)
    ckpt.close()


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(engine8, tmp_path):
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, engine8.init(0), force=True)
    ckpt.close()
    _damage(tmp_path / "1", "delete")
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(UserError, match="no readable checkpoint"):
        ckpt.restore(engine8.abstract_state, engine8.state_shardings)
    ckpt.close()
    assert (
        Checkpointer(tmp_path / "empty").restore(engine8.abstract_state, engine8.state_shardings)
        is None
    )


_CRASH_MID_SAVE = """
import os, sys
import jax.numpy as jnp
from vdiff.train.checkpoint import Checkpointer
ckpt = Checkpointer(sys.argv[1])
ckpt.save(4, {"w": jnp.full((1024, 1024), 4.0)}, data_state={"pos": 4}, force=True)
ckpt.wait()
ckpt.save(8, {"w": jnp.full((1024, 1024), 8.0)}, data_state={"pos": 8}, force=True)
os._exit(3)  # dies while the background thread is writing step 8
"""


def test_crash_mid_save_leaves_last_good_checkpoint(devices, tmp_path):
    """A process dying during an async save leaves step 8 as a temporary folder only:
    the next run restores step 4, and its own save of step 8 clears the leftover."""
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    run = subprocess.run(
        [sys.executable, "-c", _CRASH_MID_SAVE, str(tmp_path)], env=env, capture_output=True
    )
    assert run.returncode == 3, run.stderr.decode()[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["4", "8.orbax-checkpoint-tmp"]
    ckpt = Checkpointer(tmp_path)
    assert ckpt.all_steps() == [4]
    target = {"w": jax.ShapeDtypeStruct((1024, 1024), np.float32)}
    one = {"w": jax.sharding.SingleDeviceSharding(jax.devices()[0])}
    step, restored, data = ckpt.restore(target, one)
    assert step == 4 and data == {"pos": 4}
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.full((1024, 1024), 4.0))
    ckpt.save(8, {"w": restored["w"] + 1}, data_state={"pos": 8}, force=True)
    ckpt.close()
    assert sorted(os.listdir(tmp_path)) == ["4", "8"]
    step, restored, _ = Checkpointer(tmp_path).restore(target, one)
    assert step == 8 and float(restored["w"][0, 0]) == 5.0


def test_restore_onto_other_meshes_and_device_counts(engine8, tmp_path):
    """Saved on fsdp=8; restored on data=2 x fsdp=2 x tensor=2 and on 1 device."""
    state = engine8.init(3)
    saved = jax.tree.map(np.asarray, state)
    ckpt = Checkpointer(tmp_path)
    ckpt.save(5, state, force=True)
    ckpt.close()
    for mesh, shard_shape in (
        ({"data": 2, "fsdp": 2, "tensor": 2}, (8, 32)),
        ({"data": 1}, (16, 64)),
    ):
        _, engine = w.build(mesh, 24)
        step, restored, _ = Checkpointer(tmp_path).restore(
            engine.abstract_state, engine.state_shardings
        )
        assert step == 5
        _assert_equal(restored, saved)
        # Read straight into the target layout, on the target devices.
        targets = jax.tree.leaves(engine.state_shardings)
        assert len(targets) == len(jax.tree.leaves(restored))
        for x, sh in zip(jax.tree.leaves(restored), targets):
            assert x.sharding == sh
            assert len(x.sharding.device_set) == int(np.prod(list(mesh.values())))
        kernel = restored["params"]["a"]["kernel"].value  # (16, 64): embed x mlp
        assert kernel.addressable_shards[0].data.shape == shard_shape
        # The digest is a property of the values, not of the layout.
        assert state_digest(restored) == state_digest(state)


def test_digest_sees_a_moved_value(engine8):
    state = engine8.init(0)
    kernel = np.asarray(state["params"]["a"]["kernel"])
    swapped = kernel.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    a = state_digest({"k": jax.numpy.asarray(kernel)})
    b = state_digest({"k": jax.numpy.asarray(swapped)})
    assert a != b


def test_resume_after_damage_matches_uninterrupted_run(engine8, tmp_path, caplog):
    """Train 8 steps (checkpoints 4, 8), truncate 8, resume to 12: resumes at 4 and ends
    bit-identical (state and data position) to a straight 12-step run."""
    ref_state, _, ref_source = _train(engine8, tmp_path / "ref", 12)
    _train(engine8, tmp_path / "run", 8)
    _damage(tmp_path / "run" / "checkpoints" / "mlp" / "8", "truncate")
    with caplog.at_level(logging.WARNING, logger="vdiff.train.checkpoint"):
        state, summary, source = _train(engine8, tmp_path / "run", 12)
    assert summary["start_step"] == 4
    assert any("unreadable" in r.message for r in caplog.records)
    # The damaged step was set aside (kept for inspection) and written anew.
    ckdir = tmp_path / "run" / "checkpoints" / "mlp"
    assert (ckdir / "8.unreadable").is_dir()
    assert Checkpointer(ckdir).all_steps() == [4, 8, 12]
    _assert_equal(state, ref_state)
    assert source.get_state() == ref_source.get_state()
    np.testing.assert_array_equal(source.last_indices, ref_source.last_indices)


def test_signal_finishes_step_saves_and_raises(engine8, tmp_path):
    """SIGTERM mid-step (one process: the Python handler) -> checkpoint at that step."""

    class SignalAt:
        def __init__(self, stream):
            self.stream = stream

        def __iter__(self):
            return self

        def __next__(self):
            batch = next(self.stream)
            if self.stream.position == 3 * self.stream.global_batch:  # during the 3rd step
                os.kill(os.getpid(), signal.SIGTERM)
            return batch

        def get_state(self):
            return self.stream.get_state()

        def set_state(self, state):
            self.stream.set_state(state)

    source = SignalAt(w.dataset_stream(tmp_path / "data", 32, 0, 1))
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(PreemptedError, match="stopped by signal at step 3"):
        _train(engine8, tmp_path, 12, source=source)
    assert signal.getsignal(signal.SIGTERM) is before  # handler restored
    ckpt = Checkpointer(tmp_path / "checkpoints" / "mlp")
    assert ckpt.latest_step() == 3
    step, _, data = ckpt.restore(engine8.abstract_state, engine8.state_shardings)
    assert step == 3 and data["processes"][0]["position"] == 3 * 32
    ckpt.close()


def _ids(pos, rec):
    return {"i": np.int64(rec)}


def test_data_stream_is_global_across_process_counts():
    """Process p's batch is rows [p*B, (p+1)*B) of the one-process global batch; a
    position saved with 1 process continues the same global stream on 2."""

    def stream(b, p, n):
        return BatchStream(100, _ids, batch_size=b, seed=3, process_index=p, process_count=n)

    one = stream(20, 0, 1)
    two = [stream(10, p, 2) for p in (0, 1)]
    for _ in range(7):  # crosses an epoch boundary (5 global batches per epoch)
        np.testing.assert_array_equal(next(one)["i"], np.concatenate([next(s)["i"] for s in two]))
    saved = [one.get_state()]
    resumed = [stream(10, p, 2) for p in (0, 1)]
    for p, s in enumerate(resumed):
        s.set_state(pick_state(saved, p, 2))
    for _ in range(4):
        np.testing.assert_array_equal(
            next(one)["i"], np.concatenate([next(s)["i"] for s in resumed])
        )
    # Another global batch: the stream continues at the same example, none replayed.
    other = stream(30, 0, 1)
    other.set_state(one.get_state())
    np.testing.assert_array_equal(
        next(other)["i"], np.concatenate([next(one)["i"], next(one)["i"][:10]])
    )


def test_resume_on_other_data_is_a_one_line_error(engine8, tmp_path):
    """A checkpoint's stream position refers to its dataset: resuming on another says so."""
    _train(engine8, tmp_path, 4)
    other = tmp_path / "other"
    w.write_dataset(other, n=256)  # other records: the saved position would mean nothing
    with pytest.raises(UserError) as e:
        _train(engine8, tmp_path, 8, source=w.dataset_stream(other, 32, 0, 1))
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("mlp: the checkpoint's data stream does not match")
    assert "num_records: saved 512, now 256" in str(e.value)
