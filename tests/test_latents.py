"""Latent cache: ArrayRecord shards round-trip bit-exactly, are reused or rebuilt by tag,
fail with a clear UserError when damaged, and the on-the-fly "clips" path trains on the
same normalised latents as the cached path.

Small random-init autoencoders on random clips (no dataset generation), shared by the
module."""

import dataclasses
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from configs.base import get_base_config
from data_pipelines import latents as lc
from vdiff.errors import UserError
from vdiff.models.video_vae import compute_latent_stats
from vdiff.parallel.mesh import make_mesh
from vdiff.train import stages
from vdiff.train.data import Data, Split
from vdiff.train.trained import Trained, TrainedModel

CAPTION_LEN = 32
NON_ASCII = "ein grüner Kreis — 緑の円が左へ 🎈"


def _config():
    c = get_base_config()
    c.data.caption_len = CAPTION_LEN
    # A small transformer: the test is about its inputs, not its quality.
    m = c.model
    m.width, m.depth, m.heads, m.text_width, m.text_depth, m.text_heads = 32, 1, 2, 32, 1, 2
    t = c.train
    t.steps, t.batch_size, t.warmup, t.log_every, t.ckpt_every = 2, 8, 1, 1, 100
    return c


def _split(rng, n, name):
    h, w, t = _config().data.buckets[0]
    captions = [f"clip {i} of {name}" for i in range(n)]
    keys = [f"{name}_{i:03d}" for i in range(n)]
    if name == "val":
        captions[1], keys[1] = NON_ASCII, "val_ünï_001"
    mel = rng.normal(size=(n, 200, 64)).astype(np.float32)
    mask = np.arange(CAPTION_LEN)[None] < rng.integers(3, CAPTION_LEN, size=(n, 1))
    return Split(
        video=rng.integers(0, 256, size=(n, t, h, w, 3), dtype=np.uint8),
        mel=mel,
        mel_norm=mel,
        has_audio=np.arange(n) % 3 != 0,
        tokens=np.where(mask, rng.integers(1, 300, size=(n, CAPTION_LEN)), 0).astype(np.int32),
        mask=mask,
        captions=captions,
        meta=[{} for _ in range(n)],
        keys=keys,
        indices=np.arange(n, dtype=np.int64) * 2 + 1,
    )


def _random_state(engine, seed, step=0):
    """A TrainedModel with random parameters from numpy: no init compile.

    Fan-in scaled kernels, biases and norm scales near 1: every layer mixes its inputs
    (a freshly initialised model starts some branches at zero).
    """
    leaves, treedef = jax.tree.flatten(engine.abstract_state["params"])
    rng = np.random.default_rng(seed)
    values = [
        rng.standard_normal(x.shape) / math.sqrt(math.prod(x.shape[:-1]))
        if x.ndim >= 2
        else 1.0 + 0.1 * rng.standard_normal(x.shape)
        for x in leaves
    ]
    params = jax.tree.unflatten(treedef, [jnp.asarray(v, jnp.float32) for v in values])
    return TrainedModel(engine, {"params": params, "step": jnp.asarray(step, jnp.int32)})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    config = _config()
    mesh = make_mesh(config)
    rng = np.random.default_rng(0)
    parts = {"train": _split(rng, 24, "train"), "val": _split(rng, 8, "val")}
    root = tmp_path_factory.mktemp("data")
    data = Data(root=root, records=root, tokenizer=None, mel_stats={}, parts=parts)
    ae = Trained(
        vae=_random_state(stages.video_vae_engine(config, mesh), 1),
        audio_ae=_random_state(stages.audio_ae_engine(config, mesh), 2),
    )
    workdir = tmp_path_factory.mktemp("work")
    # Several shards per split, so the reader's multi-file indexing is exercised.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lc, "SHARD_BYTES", 60_000)
        cache = stages.cache_latents(config, workdir, mesh, data, ae, shards=True)
    return config, mesh, data, ae, workdir, cache


def _encoded(ae, data, split):
    fns = stages.encoder_fns(ae)
    s = data.split(split)
    return stages._batched(fns["video"], [s.video], 64), stages._batched(
        fns["audio"], [s.mel_norm], 64
    )


def test_cache_round_trips_bit_exactly(setup):
    _, _, data, ae, workdir, cache = setup
    assert cache.dir == workdir / "latents"
    train_shards = sorted(p.name for p in cache.dir.glob("train-*.array_record"))
    assert len(train_shards) > 1
    assert train_shards[0] == f"train-00000-of-{len(train_shards):05d}.array_record"
    for split in ("train", "val"):
        video, audio = _encoded(ae, data, split)
        got = lc.load_split(cache.dir, split)
        s = data.split(split)
        assert got["video"].dtype == np.float32 and np.array_equal(got["video"], video)
        assert np.array_equal(got["audio"], audio)
        for name in ("tokens", "mask", "has_audio"):
            assert got[name].dtype == getattr(s, name).dtype
            assert np.array_equal(got[name], getattr(s, name)), name
        assert np.array_equal(got["index"], s.indices)
        assert list(got["key"]) == s.keys and list(got["caption"]) == s.captions
        assert cache.meta["splits"][split]["count"] == len(s)
    assert lc.load_split(cache.dir, "val")["caption"][1] == NON_ASCII
    # Statistics: over the train split, exact through stats.json, and what the call returned.
    video, audio = _encoded(ae, data, "train")
    stats = lc.load_stats(cache.dir)
    for mod, z in (("video", video), ("audio", audio)):
        want = compute_latent_stats(z)
        for k in ("shift", "scale"):
            assert stats[mod][k].dtype == np.float32
            assert np.array_equal(stats[mod][k], np.asarray(want[k]))
            assert np.array_equal(stats[mod][k], cache.stats[mod][k])
    tag = cache.meta["tag"]
    assert tag["vae_step"] == 0 and tag["audio_step"] == 0
    assert tag["data"]["clips"] == {"train": 24, "val": 8}


def test_record_rejects_bad_bytes():
    rec = {
        "key": "k",
        "index": 3,
        "video": np.arange(6, dtype=np.float32).reshape(2, 3),
        "audio": None,
        "has_audio": False,
        "tokens": np.array([5, 0], np.int32),
        "mask": np.array([True, False]),
        "caption": NON_ASCII,
    }
    back = lc.decode_latent_record(lc.encode_latent_record(rec))
    assert back["audio"] is None and back["caption"] == NON_ASCII
    assert np.array_equal(back["video"], rec["video"]) and back["video"].dtype == np.float32
    with pytest.raises(lc.LatentRecordError, match="msgpack"):
        lc.decode_latent_record(b"\xc1 not msgpack")
    bad = lc.pack_array(rec["video"])
    bad["dtype"] = "|O"
    with pytest.raises(lc.LatentRecordError, match="numeric"):
        lc.unpack_array(bad)


def test_cache_reused_while_tag_matches_rebuilt_when_it_changes(setup, monkeypatch, tmp_path):
    config, mesh, data, ae, workdir, _ = setup
    wd = tmp_path / "w"
    shutil.copytree(workdir, wd)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (wd / "latents").iterdir()}

    def no_encoding(_):
        raise AssertionError("the cache should have been reused")

    with monkeypatch.context() as mp:
        mp.setattr(stages, "encoder_fns", no_encoding)
        again = stages.cache_latents(config, wd, mesh, data, ae)
    assert again.meta == lc.read_meta(wd / "latents")
    assert {p.name: p.stat().st_mtime_ns for p in (wd / "latents").iterdir()} == mtimes

    # Another VAE checkpoint (new weights at another step): the tag changes, the cache follows.
    new_ae = dataclasses.replace(ae, vae=_random_state(ae.vae.engine, seed=8, step=5))
    rebuilt = stages.cache_latents(config, wd, mesh, data, new_ae)
    assert rebuilt.meta["tag"]["vae_step"] == 5
    video, _ = _encoded(new_ae, data, "train")
    got = lc.load_split(wd / "latents", "train")["video"]
    assert np.array_equal(got, video)
    assert not np.array_equal(got, lc.load_split(workdir / "latents", "train")["video"])
    # One shard per split now (default shard size): the old, smaller shards are gone.
    assert sorted(p.name for p in (wd / "latents").glob("*.array_record")) == [
        "train-00000-of-00001.array_record",
        "val-00000-of-00001.array_record",
    ]


def test_damaged_cache_gives_user_error(setup, tmp_path):
    config, mesh, data, ae, workdir, _ = setup
    src = workdir / "latents"

    def fresh(name):
        d = tmp_path / name / "latents"
        shutil.copytree(src, d)
        return d, sorted(d.glob("train-*.array_record"))

    d, shards = fresh("missing")
    shards[1].unlink()
    with pytest.raises(UserError, match=r"train-00001-of-\d+\.array_record is missing"):
        lc.load_split(d, "train")
    # The main job's reuse check says the same before training starts.
    with pytest.raises(UserError, match="is missing; remove"):
        stages.cache_latents(config, d.parent, mesh, data, ae)

    d, shards = fresh("truncated")
    shards[0].write_bytes(shards[0].read_bytes()[:70_000])
    with pytest.raises(UserError, match="truncated or replaced"):
        lc.load_split(d, "train")

    d, shards = fresh("flipped")  # same size, damaged bytes: ArrayRecord's chunk hash
    raw = bytearray(shards[0].read_bytes())
    raw[100:400] = bytes(b ^ 0xFF for b in raw[100:400])
    shards[0].write_bytes(bytes(raw))
    with pytest.raises(UserError, match="damaged") as e:
        lc.load_split(d, "train")
    assert "rebuild" in str(e.value)

    d, _ = fresh("meta")
    (d / "latents.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        lc.LatentSource(d, "train")
    with pytest.raises(UserError, match="no latent cache"):
        lc.load_split(tmp_path / "nothing", "train")
    with pytest.raises(UserError, match="no split 'val_heldout'"):
        lc.load_split(src, "val_heldout")


def test_clip_encoder_matches_cached_latents(setup):
    config, mesh, data, ae, _, cache = setup
    encode = stages.clip_encoder(config, ae, cache.stats)
    cached = stages.dit_arrays(config, cache)
    raw = stages.dit_clip_arrays(config, data, cache.stats)
    rows = np.arange(8, 16)
    sharded = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    batch = {k: jax.device_put(v[rows], sharded) for k, v in raw.items()}
    out = jax.jit(encode)(batch)
    for k in ("video_latents", "audio_latents"):
        np.testing.assert_allclose(np.asarray(out[k]), cached[k][rows], rtol=0, atol=1e-5)
    for k in ("tokens", "mask", "has_audio"):
        assert np.array_equal(np.asarray(out[k]), cached[k][rows])
    assert "video" not in out and "mel" not in out


def test_dit_loss_same_from_cache_or_clips(setup):
    """The transformer's loss in "clips" mode (encode inside the jit) equals the cached one."""
    config, mesh, data, ae, _, cache = setup
    cached = {k: v[:8] for k, v in stages.dit_arrays(config, cache).items()}
    clips = {k: v[:8] for k, v in stages.dit_clip_arrays(config, data, cache.stats).items()}
    engines = {
        "latents": stages.dit_engine(config, mesh),
        "clips": stages.dit_engine(
            config, mesh, encode=stages.clip_encoder(config, ae, cache.stats)
        ),
    }
    state = _random_state(engines["latents"], 3).state
    gdef, params = nnx.split(engines["latents"].model(state))
    rng = jax.random.PRNGKey(3)
    losses = {}
    for mode, batch in (("latents", cached), ("clips", clips)):
        loss_fn = engines[mode].loss_fn
        with jax.set_mesh(mesh):
            losses[mode] = float(
                jax.jit(lambda p, b, fn=loss_fn: fn(nnx.merge(gdef, p), b, rng)[0])(params, batch)
            )
    assert np.isfinite(losses["latents"])
    assert losses["clips"] == pytest.approx(losses["latents"], rel=1e-5)


def test_dit_input_is_checked(setup):
    config, mesh, data, _, _, cache = setup
    bad = config.copy_and_resolve_references()
    bad.data.dit_input = "pixels"
    with pytest.raises(UserError, match="dit_input"):
        stages.dit_input(bad)
    clips = config.copy_and_resolve_references()
    clips.data.dit_input = "clips"
    with pytest.raises(UserError, match="autoencoders"):
        stages.train_dit(clips, data.root, mesh, data, cache, Trained())
