"""The main job end to end (tiny:smoke): data -> VAE -> audio AE -> latents -> DiT -> report,
then `vdiff sample` from the workdir and a rerun that resumes instead of retraining."""

import json
from pathlib import Path

import numpy as np
import pytest
from _cli import vdiff as _vdiff

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = tmp_path_factory.mktemp("main_job")
    _vdiff("train", "--config", "tiny:smoke", "--workdir", str(wd))
    return wd


def test_report_has_metrics_controls_and_clips(workdir):
    metrics = json.loads((workdir / "report" / "metrics.json").read_text())
    for key in (
        "ae.video_psnr",
        "ae.video_ssim",
        "ae.audio_sync_f1",
        "oracle.colour_acc",
        "oracle.heldout.colour_acc",
        "oracle.cfg1.colour_acc",
        "oracle.renoised_0.3.shape_acc",
        "oracle.renoised_0.6.direction_acc",
        "control.recon.shape_acc",
        "control.noisy_0.3.shape_acc",
        "control.noisy_0.6.direction_acc",
        "control.gt.colour_acc",
        "control.shuffled.colour_acc",
        "control.gt.sync_f1",
        "control.shuffled.sync_f1",
    ):
        assert key in metrics, key
    # The sweeps' held-out loss on the val clips: video + audio_loss_weight * audio.
    flow = {k: metrics[k] for k in ("flow_loss_val", "flow_loss_val_video", "flow_loss_val_audio")}
    assert all(np.isfinite(v) and v > 0 for v in flow.values()), flow
    assert flow["flow_loss_val"] == pytest.approx(
        flow["flow_loss_val_video"] + flow["flow_loss_val_audio"]
    )  # tiny:smoke keeps diffusion.audio_loss_weight at 1
    # The oracle must recognise ground truth and fall on shuffled captions.
    assert metrics["control.gt.colour_acc"] >= 0.99
    assert metrics["control.shuffled.colour_acc"] < 0.6
    html = (workdir / "report" / "index.html").read_text()
    clips = sorted((workdir / "report" / "clips").glob("*.mp4"))
    assert clips and all(c.stat().st_size > 0 for c in clips)
    assert clips[0].name in html
    # Sync groups say whether they saw enough bounces to mean anything, and the page warns.
    flags = {
        k.removesuffix(".sync_measurable"): v
        for k, v in metrics.items()
        if k.endswith(".sync_measurable")
    }
    assert "control.gt" in flags
    for group, flag in flags.items():
        assert flag == float(metrics[f"{group}.sync_n_bounces"] >= 20), group
    assert ("Sync not measurable" in html) == (0.0 in flags.values())


def test_every_stage_checkpointed_and_logged(workdir):
    for stage in ("vae", "audio_ae", "dit"):
        steps = [p.name for p in (workdir / "checkpoints" / stage).iterdir() if p.name.isdigit()]
        assert steps, stage
        lines = (workdir / "metrics" / stage / "metrics.jsonl").read_text().splitlines()
        assert all("loss" in json.loads(x) for x in lines)


def test_sample_writes_mp4_from_workdir(workdir, tmp_path):
    from data_pipelines.mp4 import decode_mp4

    r = _vdiff(
        "sample", "--workdir", str(workdir), "--prompt", "a red circle moves left on a blue background",
        "--steps", "2", "--out", str(tmp_path),
    )  # fmt: skip
    mp4 = Path(r.stdout.strip().splitlines()[-1])
    assert mp4.parent == tmp_path
    frames, fps, audio, sr = decode_mp4(mp4.read_bytes())
    assert frames.shape == (16, 32, 32, 3) and fps == pytest.approx(8.0)
    assert audio is not None and sr == 16000
    assert mp4.with_suffix(".png").exists()


def test_rerun_resumes_instead_of_retraining(workdir):
    before = {s: (workdir / "metrics" / s / "metrics.jsonl").read_text() for s in ("vae", "dit")}
    _vdiff("train", "--config", "tiny:smoke", "--workdir", str(workdir), "--no-report")
    for stage, text in before.items():
        assert (workdir / "metrics" / stage / "metrics.jsonl").read_text() == text


CAPTIONS = [
    "a slow pan over a wooden table",
    "rain on a window at night",
    "waves, seen from a pier",
]


def test_train_on_ingested_clips_whose_captions_name_no_shapes(tmp_path):
    """Every stage and the report on `vdiff data ingest` output that is not shapes data."""
    from _media import index_frames, make_mp4, tone

    root = tmp_path / "records"
    for split, n in (("train", 24), ("val", 8)):
        src = tmp_path / "src" / split
        src.mkdir(parents=True)
        lines = []
        for i in range(n):
            audio = tone(220.0 + 20 * i, 2.0) if i % 2 else None
            frames = np.roll(index_frames(16, 32, 32), i, axis=2)
            (src / f"v{i}.mp4").write_bytes(make_mp4(frames, 8.0, audio=audio))
            lines.append(json.dumps({"video": f"v{i}.mp4", "caption": CAPTIONS[i % 3]}))
        (src / "captions.jsonl").write_text("\n".join(lines) + "\n")
        _vdiff("data", "ingest", str(src), str(root / split), "--workers", "1")
    wd = tmp_path / "work"
    _vdiff(
        "train", "--config", "tiny:smoke", "--workdir", str(wd), "--config.data.name=records",
        f"--config.data.root={root}",
    )  # fmt: skip
    metrics = json.loads((wd / "report" / "metrics.json").read_text())
    assert np.isfinite(metrics["ae.video_psnr"]) and "ae.audio_sync_f1" in metrics
    assert not any(k.endswith("colour_acc") for k in metrics)  # no shapes: no oracle rows
    clips = sorted((wd / "report" / "clips").glob("oracle_*.mp4"))
    assert len(clips) == 8 and all(c.stat().st_size > 0 for c in clips)
    html = (wd / "report" / "index.html").read_text()
    assert CAPTIONS[0] in html
