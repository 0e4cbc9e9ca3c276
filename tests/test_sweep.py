"""``vdiff eval --sweep``: spec parsing, the long-format table, plots, HTML, resume, and
the same starting noise per (prompt, seed) in every cell; on a tiny:smoke workdir (DiT
checkpoints at steps 2 and 4)."""

import csv
import json
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from vdiff.cli import run as cli_run
from vdiff.diffusion import samplers
from vdiff.errors import UserError
from vdiff.eval.metrics import frechet_distance, nfe, temporal_flicker
from vdiff.eval.sweep import COLUMNS, SweepSpec, parse_spec, run_sweep

SPEC = "checkpoints=all;cfg=1,3;steps=1,2;seeds=0;prompts=2;name=grid"
CELL_METRICS = {
    "colour_acc", "shape_acc", "direction_acc", "background_acc",
    "sync_f1", "sync_precision", "sync_recall", "flicker",
}  # fmt: skip


# ------------------------------------------------------------------ no workdir needed
def test_flicker_formula():
    const = np.full((6, 4, 4, 3), 77, np.uint8)
    assert temporal_flicker(const) == 1.0
    alternating = np.zeros((6, 4, 4, 3), np.uint8)
    alternating[1::2] = 255
    assert temporal_flicker(alternating) == 0.0
    half = alternating // 5  # 0 / 51 steps: (255 - 51) / 255
    assert temporal_flicker(half) == pytest.approx(0.8)


def test_frechet_distance_and_nfe():
    x = np.random.default_rng(0).normal(size=(200, 6))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    # A shift by c in every dimension, same covariance: FD = D c^2.
    assert frechet_distance(x, x + 0.5) == pytest.approx(6 * 0.25, rel=1e-4)
    assert np.isnan(frechet_distance(x[:1], x))
    assert (nfe(10, "euler", 1.0), nfe(10, "euler", 4.0), nfe(10, "heun", 4.0)) == (10, 20, 38)


def test_spec_forms_agree(tmp_path):
    compact = parse_spec("checkpoints=2,4;cfg=1,4.5;steps=10;seeds=0,1;prompts=3;name=a")
    inline = parse_spec(
        '{"checkpoints": [2, 4], "cfg": [1, 4.5], "steps": 10, "seeds": [0, 1], "prompts": 3, '
        '"name": "a"}'
    )
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"checkpoints": [2, 4], "cfg": [1, 4.5], "steps": [10],
                                "seeds": [0, 1], "prompts": 3, "name": "a"}))  # fmt: skip
    assert compact == inline == parse_spec(str(path))
    assert compact.cfg == (1.0, 4.5) and compact.steps == (10,) and compact.prompts == 3
    assert parse_spec("") == SweepSpec()
    assert parse_spec('{"prompts": ["a red circle", "a blue square"]}').prompts == (
        "a red circle",
        "a blue square",
    )
    assert parse_spec("checkpoints=follow").checkpoints == "follow"


@pytest.mark.parametrize(
    "spec, words",
    [
        ("cfgs=1,2", ["'cfgs'", "did you mean 'cfg'"]),
        ('{"seed": [0, 1]}', ["'seed'", "'seeds'"]),
        ("steps=ten", ["steps", "steps=10,25"]),
        ("steps=0", ["steps", ">= 1"]),
        ("sampler=ddim", ["sampler", "euler"]),
        ("cfg", ["KEY=VALUES"]),
        ("name=../x", ["name"]),
        ("missing.json", ["does not exist"]),
    ],
)
def test_bad_spec_names_the_problem(spec, words):
    with pytest.raises(UserError) as e:
        parse_spec(spec)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1
    for w in words:
        assert w in msg


def test_cli_rejects_bad_key_and_i3d_before_work(tmp_path):
    with pytest.raises(UserError, match="'bogus'"):
        cli_run(["eval", "--workdir", str(tmp_path), "--sweep", "bogus=1"])
    with pytest.raises(UserError, match="not supported"):
        cli_run(["eval", "--workdir", str(tmp_path), "--i3d", "i3d.npz"])


# ------------------------------------------------------------------ on a smoke workdir
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny:smoke workdir (trained in this process: no start-up cost, no subprocess timeout)."""
    from vdiff.config import load_config
    from vdiff.train import main_job

    wd = tmp_path_factory.mktemp("sweep")
    main_job.run(load_config("tiny:smoke"), wd, report=False)
    return wd


def _sweep(workdir, spec, **kw):
    """Runs a sweep in this process, recording every sampler call's captions and noise."""
    calls = []
    real = samplers.sample

    def recording(model, tokens, mask, shapes, rng, **kw):
        noise = kw.get("noise")
        calls.append(
            {
                "tokens": np.asarray(tokens),
                "noise": np.asarray(noise["video"]) if noise is not None else None,
                "rng": None if rng is None else np.asarray(jax.random.key_data(rng)),
            }
        )
        return real(model, tokens, mask, shapes, rng, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(samplers, "sample", recording)
        t = time.time()
        out = run_sweep(workdir, parse_spec(spec), progress=False, **kw)
    return out, calls, time.time() - t


@pytest.fixture(scope="module")
def grid(workdir):
    out, calls, seconds = _sweep(workdir, SPEC)
    print(f"2 ckpt x 2 cfg x 2 steps x 2 prompts sweep: {seconds:.1f} s")
    return out, calls


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_results_table_has_exactly_the_grid_rows(workdir, grid):
    out, _ = grid
    assert out == workdir / "eval" / "grid"
    rows = _rows(out)
    assert all(tuple(r) == COLUMNS for r in rows)
    prompts = {r["prompt"] for r in rows if r["prompt"] is not None}
    assert len(prompts) == 2
    expected = {
        (ck, cfg, st, "euler", p, 0, m)
        for ck in (2, 4) for cfg in (1.0, 3.0) for st in (1, 2) for p in prompts
        for m in CELL_METRICS
    }  # fmt: skip
    expected |= {(ck, None, None, None, None, None, m) for ck in (2, 4)
                 for m in ("flow_loss_val", "flow_loss_val_video", "flow_loss_val_audio")}  # fmt: skip
    expected |= {(ck, cfg, st, "euler", None, None, "fd_vae_features")
                 for ck in (2, 4) for cfg in (1.0, 3.0) for st in (1, 2)}  # fmt: skip
    expected |= {(None,) * 6 + (m,) for m in ("vae_psnr", "vae_ssim", "fvd")}
    keys = [tuple(r[c] for c in COLUMNS[:7]) for r in rows]
    assert len(keys) == len(set(keys)) == len(expected) == 145
    assert set(keys) == expected
    by = {k: r for k, r in zip(keys, rows)}
    for r in rows:
        if r["metric"] == "flicker":
            assert 0.0 <= r["value"] <= 1.0 and r["seconds"] > 0
            assert r["nfe"] == r["steps"] * (1 if r["cfg"] == 1.0 else 2)
    assert by[(None,) * 6 + ("fvd",)]["value"] is None
    assert all(by[(ck,) + (None,) * 5 + ("flow_loss_val",)]["value"] > 0 for ck in (2, 4))
    assert all(
        r["value"] is not None and r["value"] >= 0 for r in rows if r["metric"] == "fd_vae_features"
    )

    with (out / "results.csv").open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS
        table = list(reader)
    assert len(table) == len(rows)
    for r, c in zip(rows, table):
        assert c["metric"] == r["metric"]
        assert c["value"] == ("" if r["value"] is None else str(r["value"]))


@pytest.mark.slow
def test_plots_and_html_reference_the_clips(grid):
    out, _ = grid
    for name in ("vs_checkpoint.png", "heatmap_cfg_steps.png", "quality_vs_adherence.png"):
        data = (out / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    page = (out / "index.html").read_text()
    videos = [s.split('"')[0] for s in page.split('<video src="')[1:]]
    assert len(videos) == 16  # every cell of the first seed and first 8 prompts
    for v in videos:
        assert (out / v).stat().st_size > 0
    assert "controls" in page and "plots/heatmap_cfg_steps.png" in page
    assert "FVD: not computed" in page
    for prompt in {r["prompt"] for r in _rows(out) if r["prompt"]}:
        assert prompt in page


@pytest.mark.slow
def test_same_noise_for_a_prompt_and_seed_in_every_cell(grid):
    _, calls = grid
    noise_by_prompt: dict[bytes, list[np.ndarray]] = {}
    for call in calls:
        assert call["noise"] is not None, "the sampler should get per-example noise"
        for tok, noise in zip(call["tokens"], call["noise"]):
            noise_by_prompt.setdefault(tok.tobytes(), []).append(noise)
    assert len(noise_by_prompt) == 2
    for noises in noise_by_prompt.values():
        assert len(noises) == 8  # 2 checkpoints x 2 cfg x 2 steps
        for n in noises[1:]:
            np.testing.assert_array_equal(n, noises[0])
    a, b = (v[0] for v in noise_by_prompt.values())
    assert not np.array_equal(a, b)  # the prompt index keys the noise


@pytest.mark.slow
def test_rerun_computes_nothing_then_redoes_only_missing_cells(workdir, grid):
    out, _ = grid
    before = (out / "results.jsonl").read_text()
    _, calls, _ = _sweep(workdir, SPEC)
    assert calls == []
    assert (out / "results.jsonl").read_text() == before
    assert json.loads((out / "sweep.json").read_text())["cells_computed"] == 0
    # "follow" on a finished run: its final step (4) is there, so it returns without
    # waiting a poll interval.
    follow = SPEC.replace("checkpoints=all", "checkpoints=follow")
    _, calls, seconds = _sweep(workdir, follow, poll_seconds=600, follow_timeout=3600)
    assert calls == [] and seconds < 300
    assert (out / "results.jsonl").read_text() == before

    # Drop one (checkpoint, cfg, steps) group's cell rows: only those 2 cells are redone.
    shard = out / "shards" / "rows.0.jsonl"
    lines = shard.read_text().splitlines()
    gone = [x for x in lines if '"checkpoint": 4, "cfg": 3.0, "steps": 2' in x and '"seed": 0' in x]
    assert len(gone) == 2 * len(CELL_METRICS)
    shard.write_text("".join(x + "\n" for x in lines if x not in gone))
    _, calls, _ = _sweep(workdir, SPEC)
    assert sum(len(c["tokens"]) for c in calls) == 2
    after = {(r["prompt"], r["metric"], r["checkpoint"], r["cfg"], r["steps"]): r["value"]
             for r in _rows(out)}  # fmt: skip
    old = {(r["prompt"], r["metric"], r["checkpoint"], r["cfg"], r["steps"]): r["value"]
           for r in map(json.loads, before.splitlines())}  # fmt: skip
    assert after == old  # regenerated from the same noise: the same scores


@pytest.mark.slow
def test_missing_checkpoint_step_is_a_user_error(workdir):
    with pytest.raises(UserError, match=r"\[3\].*\[2, 4\]"):
        run_sweep(workdir, parse_spec("checkpoints=2,3"), progress=False)
