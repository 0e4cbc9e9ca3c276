"""Training with a frozen pretrained caption encoder (text.encoder="t5", the UMT5 fixture):
caption embeddings are cached with the latents, the transformer trains on them, sampling
encodes new prompts with the loaded encoder, and the train step never runs the encoder."""

import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from _cli import vdiff as _vdiff

from data_pipelines import latents as lc
from vdiff.caption_encoder import CaptionEncoder
from vdiff.config import load_saved_config
from vdiff.parallel.mesh import make_mesh, to_global
from vdiff.train import stages
from vdiff.train.trained import LatentCache

pytestmark = pytest.mark.slow

FIXTURE = Path(__file__).parent / "fixtures" / "text_encoders" / "t5_v1_1"
SPEC = json.loads((FIXTURE / "config.json").read_text())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = tmp_path_factory.mktemp("t5_job")
    _vdiff(
        "train", "--config", "tiny:smoke", "--workdir", str(wd), "--no-report",
        "--config.text.encoder=t5", f"--config.text.path={FIXTURE}", "--config.text.max_len=16",
        "--config.data.audio=False",  # the audio stream is the same with either text encoder
    )  # fmt: skip
    return wd


def _latents(wd: Path) -> LatentCache:
    cache = wd / "latents"
    return LatentCache(cache, lc.load_stats(cache), lc.read_meta(cache))


def test_latent_records_carry_bfloat16_caption_embeddings(workdir):
    cache = _latents(workdir)
    src = lc.CacheSource(cache.dir, "train.32x32x16")
    rec = src[3]
    n = int(rec["mask"].sum())
    assert str(rec["text"].dtype) == "bfloat16"
    assert rec["text"].shape == (n, SPEC["d_model"])  # only the caption's real tokens
    enc = CaptionEncoder(FIXTURE, max_len=16, batch_size=4)
    want, mask = enc.encode([rec["caption"]])
    np.testing.assert_array_equal(mask[0], rec["mask"])
    np.testing.assert_array_equal(np.float32(want[0, :n]), np.float32(rec["text"]))
    empty, empty_mask = lc.load_empty_caption(cache.dir)
    np.testing.assert_array_equal(np.float32(empty), np.float32(enc.empty()[0]))
    assert empty_mask.sum() == 1


def test_train_step_takes_embeddings_and_runs_no_encoder(workdir):
    config = load_saved_config(workdir / "config.json")
    cache = _latents(workdir)
    fields = stages.dit_latent_fields(config, cache)
    assert "text" in fields and "tokens" not in fields
    norms = {k: cache.stats[f] for k, f in fields.items() if f in ("video", "audio")}
    src = lc.CacheSource(cache.dir, "train.32x32x16")
    to_example = lc.RecordFields(fields, norms)
    rows = [to_example(src[i]) for i in range(8)]
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    assert batch["text"].shape == (8, 16, SPEC["d_model"])
    mesh = make_mesh(config)
    engine = stages.dit_engine(config, mesh, empty_caption=stages.empty_caption(config, cache))
    state = engine.init(0)
    assert not any("text_encoder" in str(p) for p, _ in jax.tree_util.tree_leaves_with_path(state))
    step_hlo = engine.lower(state, to_global(batch, mesh)).as_text()
    enc = CaptionEncoder(FIXTURE, max_len=16, batch_size=8)
    enc_hlo = (
        jax.jit(lambda s, i, m: __import__("flax").nnx.merge(enc.graphdef, s)(i, m))
        .lower(enc.state, np.zeros((8, 16), np.int32), np.ones((8, 16), bool))
        .as_text()
    )

    def dims(hlo):
        return {
            int(d) for shape in re.findall(r"tensor<([0-9x]+)x[a-z]", hlo) for d in shape.split("x")
        }

    encoder_only = {SPEC["d_ff"], SPEC["vocab_size"]}  # the encoder's feed-forward and vocabulary
    assert encoder_only <= dims(enc_hlo)  # the check sees an encoder where there is one
    assert not encoder_only & dims(step_hlo)
    assert SPEC["d_model"] in dims(step_hlo)  # the embeddings do come in


def test_transformer_trained_and_sampling_encodes_new_prompts(workdir, tmp_path):
    dit = json.loads((workdir / "summary.json").read_text())["stages"]["dit"]
    assert dit["end_step"] == 4 and np.isfinite(dit["final_loss"]) and dit["final_finite"] == 1.0
    _vdiff(
        "sample", "--workdir", str(workdir), "--out", str(tmp_path), "--steps", "2",
        "--prompt", "a red ball", "--prompt", "Ein rotes Quadrat — 赤い四角",
    )  # fmt: skip
    clips = sorted(tmp_path.glob("*.mp4"))
    assert len(clips) == 2 and all(c.stat().st_size > 0 for c in clips)


def test_bundle_carries_the_encoder_and_matches_the_generator(workdir, tmp_path):
    from vdiff import serving
    from vdiff.export.bundle import export_generator
    from vdiff.sampling import Generator

    gen = Generator.from_workdir(workdir)
    out = tmp_path / "bundle"
    export_generator(gen, out)
    manifest = json.loads((out / serving.MANIFEST).read_text())
    assert manifest["generation"]["text_encoder"] == "t5"
    names = manifest["tensors"]["entries"]
    assert names["text.embed"]["shape"] == [SPEC["vocab_size"], SPEC["d_model"]]
    assert names["text.embed"]["dtype"] == "bfloat16"  # text.dtype, as the run cached with
    assert not any(n.startswith("dit.text_encoder") for n in names)
    bundle = serving.load_bundle(out)
    prompts = ["a red ball", "Ein rotes Quadrat — 赤い四角"]

    # The encoder inside the bundle gives the generator's embeddings, prompts and empty ones.
    # Both compute in bfloat16 (text.dtype), the generator on an fsdp mesh of the 8 devices
    # and the bundle on one, so they agree to bfloat16 rounding, not bit for bit.
    def close(a, b):
        a, b = np.float32(a), np.float32(b)
        assert np.sqrt(np.mean((a - b) ** 2)) < 0.01 * np.sqrt(np.mean(b**2))

    ids, mask = bundle.tokenizer.encode(prompts, 16)
    emb = np.float32(bundle.call("text_embed", ids, mask))
    close(emb, gen.captions.encode(prompts)[0])
    empty_ids, empty_mask = bundle._empty_captions(2, manifest["generation"])
    empty = np.float32(bundle.call("text_embed", empty_ids, empty_mask))
    close(empty[1], gen.captions.empty()[0])
    assert np.abs(empty[0] - emb[0]).max() > 0.1  # the empty caption is not a prompt's
    got = bundle.generate(prompts, seed=3, steps=3)
    want = gen.generate(prompts, seed=3, steps=3)
    # The embeddings' bfloat16 differences above reach the pixels as one level at most
    # (measured: 3% of the values); a wrong caption or empty caption moves them further.
    diff = np.abs(got["video"].astype(int) - want["video"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.1
