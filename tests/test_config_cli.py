"""Config loading, overrides, validation, and the CLI's one-line error style."""

import subprocess
import sys

import pytest

from vdiff.cli import build_parser, run
from vdiff.config import load_config, resolve_mesh_shape, validate
from vdiff.errors import UserError


def test_tiny_is_default_and_overrides_apply():
    c = load_config(
        None, ["train.steps=7", "model.patch=(1,2,2)", "train.lr=3e-4", "data.audio=false"]
    )
    assert c.train.steps == 7 and c.model.patch == (1, 2, 2)
    assert c.train.lr == pytest.approx(3e-4) and c.data.audio is False


def test_typo_names_the_valid_key():
    with pytest.raises(UserError, match=r"train\.steps"):
        load_config(None, ["trian.steps=1"])
    with pytest.raises(UserError, match=r"train\.steps"):
        load_config(None, ["train.stpes=1"])


def test_wrong_type_rejected():
    with pytest.raises(UserError, match="expected a value of type int"):
        load_config(None, ["train.steps=ten"])
    with pytest.raises(UserError, match="expected a value of type bool"):
        load_config(None, ["data.audio=maybe"])


def test_group_cannot_be_overridden_by_value():
    with pytest.raises(UserError, match="group of settings"):
        load_config(None, ["train=3"])


def test_mesh_must_fit_devices():
    c = load_config(None, ["mesh.shape.data=3", "mesh.shape.fsdp=1"])
    with pytest.raises(UserError, match=r"data=3.*8 devices"):
        validate(c, 8)
    c = load_config(None, ["mesh.shape.data=-1", "mesh.shape.fsdp=3"])
    with pytest.raises(UserError, match=r"fsdp=3.*8 devices"):
        validate(c, 8)
    c = load_config(None, ["mesh.shape.data=-1", "mesh.shape.fsdp=2"])
    assert resolve_mesh_shape(c, 8) == {"data": 4, "fsdp": 2, "tensor": 1, "context": 1}
    with pytest.raises(UserError, match="only one axis may be -1"):
        load_config(None, ["mesh.shape.data=-1", "mesh.shape.fsdp=-1"])


def test_batch_must_divide_batch_axes():
    c = load_config(None, ["mesh.shape.data=8", "train.batch_size=12"])
    with pytest.raises(UserError, match=r"train\.batch_size=12.*data x fsdp = 8"):
        validate(c, 8)


def test_vae_train_crop_must_fit_the_stride_and_frame():
    for bad in ("vae.train_crop=15", "vae.train_crop=64", "vae.train_crop=-8"):
        with pytest.raises(UserError, match=r"vae\.train_crop=.*multiple of vae\.spatial_down"):
            load_config("tiny", [bad])
    assert load_config("tiny", ["vae.train_crop=16"]).vae.train_crop == 16


def test_unknown_config_file():
    with pytest.raises(UserError, match="not found"):
        load_config("no_such_config")


def test_every_config_in_repo_loads():
    from vdiff.config import REPO_CONFIGS

    names = [p.stem for p in REPO_CONFIGS.glob("*.py") if p.stem not in ("__init__", "base")]
    assert "tiny" in names
    for name in names:
        assert load_config(name).model.width > 0


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "vdiff.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_typo_is_one_line_exit_2():
    r = _cli("train", "--config.trian.steps=1")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.steps" in lines[0] and "Traceback" not in r.stderr


def test_cli_bad_mesh_names_sizes_and_devices():
    r = _cli("train", "--config.mesh.shape.data=3", "--workdir", "/tmp/vdiff_never_used")
    assert r.returncode == 2
    msg = r.stderr.strip()
    assert len(msg.splitlines()) == 1 and "data=3" in msg and "device" in msg


def test_cli_bad_argument_is_one_line():
    with pytest.raises(UserError, match="--help"):
        run(["sample", "--no-such-flag"])


def test_help_describes_every_command():
    parser = build_parser()
    text = parser.format_help()
    for cmd in ("train", "sample", "eval", "export", "data"):
        assert cmd in text
    sub = {a.dest: a for a in parser._actions}["command"].choices
    assert "--workdir" in sub["train"].format_help()
    assert "--prompt" in sub["sample"].format_help()
    data_sub = {a.dest: a for a in sub["data"]._actions}["data_command"].choices
    assert set(data_sub) == {"synth", "ingest", "tokenizer", "latents"}
    assert "--num-clips" in data_sub["synth"].format_help()


def test_diffusion_fractions_must_be_probabilities():
    for bad in ("diffusion.t_uniform=1.5", "diffusion.caption_dropout=-0.1"):
        with pytest.raises(UserError, match=r"diffusion\.\w+=.*use a value in \[0, 1\]"):
            load_config("tiny", [bad])
    with pytest.raises(UserError, match=r"p_clean_audio \+ diffusion\.p_clean_video = 1\.2"):
        load_config("tiny", ["diffusion.p_clean_audio=0.6", "diffusion.p_clean_video=0.6"])
    assert load_config("tiny", ["diffusion.t_uniform=0.3"]).diffusion.t_uniform == 0.3


def test_renoise_levels_must_lie_strictly_inside_zero_one():
    # t = 1 would divide by 1 - t in the report's control.noisy_<t> rows; t = 0 is the clip.
    for bad in ("(0.3, 1.0)", "(0.0,)"):
        with pytest.raises(UserError, match=r"sample\.renoise_t has .*strictly between 0"):
            load_config("tiny", [f"sample.renoise_t={bad}"])
    assert tuple(load_config("tiny", ["sample.renoise_t=(0.2,)"]).sample.renoise_t) == (0.2,)


def test_unknown_optimizer_names_the_key_and_choices():
    with pytest.raises(UserError, match=r"train\.optimizer='sgd': use 'adamw' or 'muon'"):
        load_config("tiny", ["train.optimizer=sgd"])
    assert load_config("tiny", ["train.optimizer=muon"]).train.optimizer == "muon"


def test_object_store_paths_fail_naming_the_fix():
    r = _cli("train", "--workdir", "gs://bucket/run1")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "--workdir=gs://bucket/run1" in r.stderr
    assert "mount the bucket" in r.stderr
    with pytest.raises(UserError, match=r"data\.root=s3://b/clips: .*mount the bucket"):
        load_config("tiny", ["data.root=s3://b/clips"])


def test_records_split_without_manifest_is_one_line(tmp_path):
    """A split whose ingest has not finished (no manifest.json yet) is refused, not read."""
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "clips-00000-of-00002.array_record").write_bytes(b"")
    r = _cli(
        "train", "--config", "tiny:smoke", "--workdir", str(tmp_path / "w"),
        "--config.data.name=records", f"--config.data.root={tmp_path}",
    )  # fmt: skip
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "has no manifest.json" in lines[0] and "--shard" in lines[0]
