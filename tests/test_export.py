"""Export bundles: ``vdiff export`` writes a folder that :mod:`vdiff.serving` loads without
vdiff's model code, flax or pickle, and that samples what the training-side Generator
samples for the same prompt and seed."""

import json
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdiff import serving
from vdiff.errors import UserError

PROMPTS = ["a red circle bounces to the left on a blue background", "two green squares"]
SEED = 5
# bf16 bundles round every transformer weight and activation to 8 mantissa bits
# (relative error up to 2^-9 per rounding); through 4 blocks x 2 sampler steps x
# guidance the latents end up 1.1% (video) and 0.6% (audio) of their RMS away from the
# float32 ones (measured). The bound is ~5x that; a wrong weight, a missing guidance
# branch or a different noise draw gives errors of order 100%.
BF16_REL_RMS = 0.05
# The square training shape first (the default), then a portrait and a landscape bucket.
BUCKETS = ((32, 32, 16), (48, 32, 8), (32, 48, 8))


def _random_state(engine, rng):
    """A train state of random values, placed straight into the engine's shardings.

    Gaussian parameters (std 0.05, norm scales around 1) instead of the initialiser's:
    the zero-initialised output and adaLN layers of a fresh transformer would make its
    velocity exactly zero. Built on the host, which also skips compiling the initialiser.
    """

    def leaf(path, a, sharding):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key) or not jnp.issubdtype(
            a.dtype, jnp.floating
        ):
            x = np.zeros(a.shape, a.dtype)
        else:
            scale = jax.tree_util.keystr(path).endswith("['scale'].value")
            x = (scale + 0.05 * rng.standard_normal(a.shape)).astype(a.dtype)
        return jax.device_put(x, sharding)

    state = jax.tree_util.tree_map_with_path(leaf, engine.abstract_state, engine.state_shardings)
    state["ema"] = state["params"]
    return state


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny:smoke workdir laid out as ``vdiff train`` leaves it (every stage's checkpoint,
    latent and mel statistics, tokenizer, config) with random weights in place of trained
    ones: training would take minutes, and export needs only the files."""
    from data_pipelines import latents as lc
    from data_pipelines.tokenizer import train_tokenizer
    from vdiff.config import load_config
    from vdiff.parallel.mesh import make_mesh
    from vdiff.sampling import workdir_config
    from vdiff.train import stages
    from vdiff.train.checkpoint import Checkpointer

    wd = tmp_path_factory.mktemp("export_workdir")
    config = load_config("tiny:smoke")
    config.data.buckets = BUCKETS
    (wd / "config.json").write_text(config.to_json(indent=2))
    cfg = workdir_config(wd)
    mesh = make_mesh(cfg)
    rng = np.random.default_rng(0)
    engines = {
        "vae": stages.video_vae_engine,
        "audio_ae": stages.audio_ae_engine,
        "dit": stages.dit_engine,
    }
    for name, make in engines.items():
        ckpt = Checkpointer(wd / "checkpoints" / name)
        ckpt.save(1, _random_state(make(cfg, mesh), rng), config=config, force=True)
        ckpt.close()
    stats = {
        mod: {
            "shift": rng.normal(0.0, 0.3, c).astype(np.float32),
            "scale": rng.uniform(0.5, 2.0, c).astype(np.float32),
        }
        for mod, c in (
            ("video", config.vae.latent_channels),
            ("audio", config.audio_ae.latent_channels),
        )
    }
    lc.write_cache(wd / "latents", {}, {}, stats)
    (wd / "data_stats.json").write_text(json.dumps({"mel": {"mean": -11.5, "std": 0.4}}))
    captions = [
        f"{n} {c} {s} moves {d} on a {b} background"
        for n in ("a", "two") for c in ("red", "green", "blue") for s in ("circle", "square")
        for d in ("left", "up") for b in ("white", "black")
    ]  # fmt: skip
    (wd / "data").mkdir()
    train_tokenizer(captions, wd / "data" / "tokenizer", vocab_size=config.data.vocab_size)
    return wd


@pytest.fixture(scope="module")
def generator(workdir):
    from vdiff.sampling import Generator

    return Generator.from_workdir(workdir)


@pytest.fixture(scope="module")
def reference(generator):
    """The Generator's clips, plus the latents it decoded them from."""
    seen = {}
    decode = generator.decode

    def recording_decode(video_latents, audio_latents=None):
        seen["video_latents"] = np.asarray(video_latents)
        seen["audio_latents"] = np.asarray(audio_latents)
        out = decode(video_latents, audio_latents)
        seen["mel"] = out["mel"]
        return out

    generator.decode = recording_decode
    try:
        out = generator.generate(PROMPTS, seed=SEED)
    finally:
        del generator.decode
    return {**out, **seen}


@pytest.fixture(scope="module")
def bundles(workdir, generator, tmp_path_factory):
    from vdiff import cli
    from vdiff.export.bundle import export_generator

    root = tmp_path_factory.mktemp("bundles")
    assert cli.run(["export", "--workdir", str(workdir), "--out", str(root / "f32")]) == 0
    # The bf16 bundle: the default bucket only (what its comparison uses).
    export_generator(generator, root / "bf16", dtype="bfloat16", buckets=["32x32x16"])
    return {"f32": root / "f32", "bf16": root / "bf16"}


# Runs in a fresh interpreter: pickle is disabled before anything is imported, and the
# modules a server needs are checked after loading and sampling.
_SERVE = """
import json, pickle, sys
import numpy as np

def _no_pickle(*args, **kwargs):
    raise AssertionError("a bundle must load without pickle")

pickle.load = pickle.loads = pickle.Unpickler = _no_pickle
from vdiff.serving import load_bundle

for name, path in json.loads(sys.argv[1]).items():
    out = load_bundle(path).generate({prompts!r}, seed={seed})
    np.savez(sys.argv[2] + "/" + name + ".npz", **out)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("flax", "orbax", "optax"))
loaded += sorted(m for m in sys.modules if m.startswith("vdiff.models"))
print(json.dumps(loaded))
"""


@pytest.fixture(scope="module")
def served(bundles, tmp_path_factory):
    out = tmp_path_factory.mktemp("served")
    script = textwrap.dedent(_SERVE.format(prompts=PROMPTS, seed=SEED))
    paths = json.dumps({k: str(v) for k, v in bundles.items()})
    r = subprocess.run(
        [sys.executable, "-c", script, paths, str(out)], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    result = {"modules": json.loads(r.stdout.strip().splitlines()[-1])}
    for name in bundles:
        with np.load(out / f"{name}.npz", allow_pickle=False) as z:
            result[name] = dict(z)
    return result


def test_serving_loads_without_model_code_or_pickle(served):
    # The subprocess sampled with pickle disabled; it must not have pulled in training code.
    assert served["modules"] == []


def test_f32_bundle_matches_the_generator(served, reference, bundles):
    from vdiff.diffusion.schedule import noise_key, per_example_noise

    out = served["f32"]
    # The sampler moved the latents well away from the starting noise (measured RMS
    # 0.6), so the comparison covers the transformer and not only the noise draw.
    g = json.loads((bundles["f32"] / serving.MANIFEST).read_text())["generation"]
    assert g["default_bucket"] == "32x32x16" and list(g["buckets"]) == [
        "32x32x16",
        "48x32x8",
        "32x48x8",
    ]
    g = g["buckets"]["32x32x16"]
    keys = [noise_key(SEED, i) for i in range(len(PROMPTS))]
    noise = per_example_noise(keys, g["video_latent_shape"], g["audio_latent_shape"])
    assert np.sqrt(np.mean((out["video_latents"] - np.asarray(noise["video"])) ** 2)) > 0.3
    for key in ("video_latents", "audio_latents", "mel"):
        np.testing.assert_allclose(out[key], reference[key], atol=1e-4, rtol=0, err_msg=key)
    # Same latents decoded by the same weights: uint8 pixels can differ only where float
    # rounding crosses a .5 boundary.
    diff = np.abs(out["video"].astype(int) - reference["video"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    np.testing.assert_allclose(out["audio"], reference["audio"], atol=1e-4)


def test_heun_without_guidance_matches_the_generator(bundles, generator):
    # The other exported step variant (Heun, no guidance), run in this process.
    kw = dict(seed=SEED + 1, sampler="heun", cfg=1.0)
    out = serving.load_bundle(bundles["f32"]).generate(PROMPTS[:1], **kw)
    ref = generator.generate(PROMPTS[:1], **kw)
    diff = np.abs(out["video"].astype(int) - ref["video"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    np.testing.assert_allclose(out["audio"], ref["audio"], atol=1e-4)


def test_bf16_bundle_is_close_to_the_generator(served, reference, bundles):
    out, f32 = served["bf16"], served["f32"]
    for key in ("video_latents", "audio_latents"):
        err = np.sqrt(np.mean((out[key] - reference[key]) ** 2))
        rms = np.sqrt(np.mean(reference[key] ** 2))
        assert err / rms < BF16_REL_RMS, (key, err / rms)
        # It really computed in bfloat16 (not a float32 bundle under another name).
        assert np.abs(out[key] - f32[key]).max() > 1e-4, key
    size = {k: (p / serving.PARAMS_FILE).stat().st_size for k, p in bundles.items()}
    assert size["bf16"] < 0.55 * size["f32"]
    assert serving.load_bundle(bundles["bf16"]).buckets() == ["32x32x16"]  # as asked


def test_every_bundle_file_is_a_known_non_pickle_format(bundles):
    for path in bundles.values():
        manifest = json.loads((path / serving.MANIFEST).read_text())
        files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
        assert set(files) == set(manifest["files"]) | {serving.MANIFEST}
        for rel in files:
            assert serving.file_format(rel) is not None, rel
            head = (path / rel).read_bytes()[:6]
            # Pickle protocols 2-5 start with 0x80 and the protocol; .npy with \\x93NUMPY.
            assert not (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))
            assert not head.startswith(b"\x93NUMPY"), rel


def test_altered_or_missing_file_is_a_clear_error(bundles, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(bundles["f32"], bad)
    params = bad / serving.PARAMS_FILE
    data = bytearray(params.read_bytes())
    data[len(data) // 2] ^= 0x01
    params.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"params\.safetensors does not match its sha256"):
        serving.load_bundle(bad)
    shutil.copy(bundles["f32"] / serving.PARAMS_FILE, params)
    (bad / serving.TOKENIZER_FILE).unlink()
    with pytest.raises(UserError, match=r"tokenizer\.model is missing"):
        serving.load_bundle(bad)
    with pytest.raises(UserError, match=r"has no bundle\.json"):
        serving.load_bundle(tmp_path)


def test_export_refuses_an_existing_out_folder(workdir, bundles):
    from vdiff import cli

    with pytest.raises(UserError, match="already exists; remove it or pick another folder"):
        cli.run(["export", "--workdir", str(workdir), "--out", str(bundles["f32"])])
    with pytest.raises(UserError, match="--buckets 64x64x16: not buckets of this run; it trained"):
        cli.run(["export", "--workdir", str(workdir), "--out", str(bundles["f32"].parent / "x"),
                 "--buckets", "64x64x16"])  # fmt: skip


def test_denoise_step_is_batch_polymorphic(bundles):
    bundle = serving.load_bundle(bundles["f32"])
    spec = bundle.manifest["functions"]["denoise_step.euler.cfg@32x32x16"]
    assert spec["symbolic_dims"] == ["b"]
    assert spec["inputs"][0]["shape"][0] == "b" and spec["inputs"][2]["shape"][0] == "2*b"
    g = bundle.manifest["generation"]["buckets"]["32x32x16"]
    rng = np.random.default_rng(1)
    tokens, mask = bundle.tokenizer.encode(["a blue circle", "two red squares", "x"], 32)
    tokens = np.concatenate([tokens, np.zeros_like(tokens)])
    mask = np.concatenate([mask, np.zeros_like(mask)])
    xv = rng.normal(size=(3, *g["video_latent_shape"])).astype(np.float32)
    xa = rng.normal(size=(3, *g["audio_latent_shape"])).astype(np.float32)
    t = (np.float32(0.7), np.float32(0.4), np.asarray([3.0, 2.0], np.float32))
    text3 = bundle.call("text_encode", tokens, mask)
    out3 = bundle.call("denoise_step.euler.cfg@32x32x16", xv, xa, *text3, *t)
    rows = [0, 3]  # example 0 and its empty caption
    text1 = bundle.call("text_encode", tokens[rows], mask[rows])
    out1 = bundle.call("denoise_step.euler.cfg@32x32x16", xv[:1], xa[:1], *text1, *t)
    assert out3[0].shape == xv.shape and out1[0].shape == (1, *xv.shape[1:])
    np.testing.assert_allclose(out1[0], out3[0][:1], atol=1e-5)
    np.testing.assert_allclose(out1[1], out3[1][:1], atol=1e-5)
    assert np.abs(out3[0] - xv).max() > 0.1  # the step moved the latents


def test_manifest_documents_tensors_functions_and_defaults(bundles, generator):
    import orbax.checkpoint as ocp
    import safetensors.numpy

    path = bundles["f32"]
    m = json.loads((path / serving.MANIFEST).read_text())
    assert m["format_version"] == serving.FORMAT_VERSION and m["dtype"] == "float32"
    tensors = safetensors.numpy.load_file(path / serving.PARAMS_FILE)
    assert {n: [list(x.shape), str(x.dtype)] for n, x in tensors.items()} == {
        n: [e["shape"], e["dtype"]] for n, e in m["tensors"]["entries"].items()
    }
    # Naming rule: module prefix + attribute path; stacked blocks keep the depth axis.
    c = generator.config
    assert tensors["dit.blocks.layers.video.q.kernel"].shape[0] == c.model.depth
    assert "dit.text_encoder.blocks.0.mlp.fc1.kernel" in tensors
    assert all(n.split(".")[0] in ("dit", "vae", "audio_ae") for n in tensors)
    # Decoder-only autoencoders: the encoders are not needed to sample.
    assert any(n.startswith("vae.dec_") for n in tensors)
    assert not any(n.startswith(("vae.enc_", "audio_ae.enc_")) for n in tensors)
    for spec in m["functions"].values():
        assert set(spec["params"]) <= set(tensors)
        assert spec["platforms"] == ["cpu", "cuda"]
    assert m["sampler"] == {
        "sampler": c.sample.sampler, "steps": c.sample.steps, "cfg": c.sample.cfg,
        "audio_cfg": c.sample.audio_cfg, "shift": c.sample.shift,
    }  # fmt: skip
    # The Orbax copy holds the same arrays.
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore((path / serving.ORBAX_DIR).absolute())
    np.testing.assert_array_equal(
        restored["dit"]["blocks"]["layers"]["video"]["q"]["kernel"],
        tensors["dit.blocks.layers.video.q.kernel"],
    )


def test_sample_cli_from_bundle(bundles, tmp_path):
    from data_pipelines.mp4 import decode_mp4
    from vdiff import cli

    prompt = "a blue square moves up"
    args = ["sample", "--bundle", str(bundles["f32"]), "--prompt", prompt, "--out", str(tmp_path)]
    assert cli.run([*args, "--steps", "1"]) == 0
    mp4 = next(tmp_path.glob("000_*.mp4"))
    frames, fps, audio, sr = decode_mp4(mp4.read_bytes())
    assert frames.shape == (16, 32, 32, 3) and fps == pytest.approx(8.0)
    assert audio is not None and sr == 16000
    # A portrait bucket, picked by its shape.
    out = tmp_path / "portrait"
    assert cli.run([*args[:-1], str(out), "--steps", "1", "--height", "48"]) == 0
    frames, _, _, _ = decode_mp4(next(out.glob("000_*.mp4")).read_bytes())
    assert frames.shape == (8, 48, 32, 3)
    with pytest.raises(UserError, match=r"no bucket of height 64.*32x32x16, 48x32x8, 32x48x8"):
        cli.run([*args, "--height", "64"])
    with pytest.raises(UserError, match="--fps does not apply to --bundle"):
        cli.run([*args, "--fps", "12"])


@pytest.mark.parametrize("bucket", ["48x32x8", "32x48x8"])
def test_bundle_samples_portrait_and_landscape_as_the_generator(bundles, generator, bucket):
    h, w, t = (int(x) for x in bucket.split("x"))
    want = generator.generate(PROMPTS[:1], seed=SEED, steps=2, height=h, width=w, num_frames=t)
    got = serving.load_bundle(bundles["f32"]).generate(
        PROMPTS[:1], seed=SEED, steps=2, bucket=bucket
    )
    assert got["video"].shape == want["video"].shape == (1, t, h, w, 3)
    diff = np.abs(got["video"].astype(int) - want["video"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    np.testing.assert_allclose(got["audio"], want["audio"], atol=1e-4)


def test_renoised_start_mixes_the_clip_with_the_generation_noise(generator, monkeypatch):
    # Generator.renoise is where `generate(start_videos=..., t_start=t)` starts and what the
    # report's control.noisy_<t> rows decode: (1 - t) x0 + t eps, with eps the very noise
    # plain generation starts from for the same (seed, prompt index).
    import vdiff.diffusion.samplers as samplers
    from vdiff.sampling import noise_key

    d = generator.config.data
    shape = (len(PROMPTS), d.frames, d.resolution, d.resolution, 3)
    videos = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    rngs = [noise_key(SEED, i) for i in range(len(PROMPTS))]
    x0 = np.asarray(generator.encode(videos))
    eps = np.asarray(generator.renoise(videos, 1.0, rngs))
    np.testing.assert_allclose(generator.renoise(videos, 0.0, rngs), x0)
    mixed = generator.renoise(videos, 0.3, rngs)
    np.testing.assert_allclose(mixed, 0.7 * x0 + 0.3 * eps, rtol=1e-5, atol=1e-5)
    assert np.abs(eps - x0).mean() > 0.5  # the two ends differ: the check above has teeth

    seen = {}
    real = samplers.sample

    def recording(*args, noise, **kwargs):
        seen["noise"] = np.asarray(noise["video"])
        return real(*args, noise=noise, **kwargs)

    monkeypatch.setattr(samplers, "sample", recording)
    generator.generate(PROMPTS, seed=SEED, steps=1, audio=False)
    np.testing.assert_array_equal(seen["noise"], eps)
    with pytest.raises(ValueError, match="keys for"):
        generator.renoise(videos, 0.5, rngs[:1])
