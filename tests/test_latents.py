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
from data_pipelines.buckets import check_buckets
from vdiff.errors import UserError
from vdiff.models.video_vae import compute_latent_stats
from vdiff.parallel.mesh import make_mesh
from vdiff.train import stages
from vdiff.train.data import Data
from vdiff.train.trained import Trained, TrainedModel

CAPTION_LEN = 32
B = "32x32x16"  # the one bucket: cache splits are "<split>.<bucket>"
TRAIN = f"train.{B}"
NON_ASCII = "ein grüner Kreis — 緑の円が左へ 🎈"


def _config():
    c = get_base_config()
    c.text.max_len = CAPTION_LEN
    # A small transformer: the test is about its inputs, not its quality.
    m = c.model
    m.width, m.depth, m.heads, m.text_width, m.text_depth, m.text_heads = 32, 1, 2, 32, 1, 2
    t = c.train
    t.steps, t.batch_size, t.warmup, t.log_every, t.ckpt_every = 2, 8, 1, 1, 100
    return c


def _split(rng, n, name):
    """Random decoded-frame records of one split (what the frames cache holds)."""
    h, w, t = _config().data.buckets[0]
    mask = np.arange(CAPTION_LEN)[None] < rng.integers(3, CAPTION_LEN, size=(n, 1))
    tokens = np.where(mask, rng.integers(1, 300, size=(n, CAPTION_LEN)), 0).astype(np.int32)
    recs = []
    for i in range(n):
        recs.append(
            {
                "key": "val_ünï_001" if (name, i) == ("val", 1) else f"{name}_{i:03d}",
                "index": 2 * i + 1,
                "video": rng.integers(0, 256, size=(t, h, w, 3), dtype=np.uint8),
                "audio": rng.normal(size=(200, 64)).astype(np.float32),
                "has_audio": i % 3 != 0,
                "tokens": tokens[i],
                "mask": mask[i],
                "caption": NON_ASCII if (name, i) == ("val", 1) else f"clip {i} of {name}",
                "fps": 8.0,
            }
        )
    return recs


def _frames_data(root, splits) -> Data:
    """A Data over a frames cache of ``splits`` (raw log-mel statistics 0 / 1: identity)."""
    frames = root / "frames"
    lc.clear_cache(frames, lc.FRAMES)
    entries = {}
    for split, recs in splits.items():
        writer = lc.PartWriter(frames, f"{split}.{B}")
        for rec in recs:
            writer.write(rec)
        writer.close()
        entries[f"{split}.{B}"], _ = lc.merge_parts(frames, f"{split}.{B}", 1)
    mel = {"mean": 0.0, "std": 1.0}
    lc.write_meta(frames, {"test": True}, entries, {}, lc.FRAMES, {"mel_stats": mel})
    config = _config()
    return Data(
        config=config, root=root, records=root, frames=frames, tokenizer=None,
        mel_stats=mel, buckets=check_buckets(config.data.buckets), members={},
        bucket_counts={split: {B: len(recs)} for split, recs in splits.items()},
        tag={"test": True},
    )  # fmt: skip


def _rows(source, transform, rows):
    """Records ``rows`` of a cache source through ``transform``, stacked like a batch."""
    examples = [transform(source[i]) for i in rows]
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


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
    root = tmp_path_factory.mktemp("data")
    data = _frames_data(root, {"train": _split(rng, 24, "train"), "val": _split(rng, 8, "val")})
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
    s = data.head(split, data.counts[split])
    return stages._encode_padded(fns["video"], s.video), stages._encode_padded(
        fns["audio"], s.mel_norm
    )


def _read(cache_dir, split):
    src = lc.CacheSource(cache_dir, split)
    return src.read(range(len(src)))


def test_cache_round_trips(setup):
    _, _, data, ae, workdir, cache = setup
    assert cache.dir == workdir / "latents"
    train_shards = sorted(p.name for p in cache.dir.glob(f"{TRAIN}.*.array_record"))
    assert len(train_shards) > 1
    assert (
        train_shards[0] == f"{TRAIN}.p00000-of-00001-00000-of-{len(train_shards):05d}.array_record"
    )
    for split in ("train", "val"):
        video, audio = _encoded(ae, data, split)
        got = _read(cache.dir, f"{split}.{B}")
        s = data.head(split, data.counts[split])
        assert got["video"].dtype == np.float32 and np.array_equal(got["video"], video)
        assert np.array_equal(got["audio"], audio)
        for name in ("tokens", "mask", "has_audio"):
            assert got[name].dtype == getattr(s, name).dtype
            assert np.array_equal(got[name], getattr(s, name)), name
        assert np.array_equal(got["index"], s.indices)
        assert got["key"] == s.keys and got["caption"] == s.captions
        assert cache.meta["splits"][f"{split}.{B}"]["count"] == len(s)
    assert _read(cache.dir, f"val.{B}")["caption"][1] == NON_ASCII
    # Statistics: over the train split (float64 moments merged from every process's part,
    # so equal to the float32 reference up to its rounding), exact through stats.json; the
    # audio statistics over the clips that have sound.
    video, audio = _encoded(ae, data, "train")
    sound = data.head("train", data.counts["train"]).has_audio
    assert 0 < sound.sum() < len(sound)
    stats = lc.load_stats(cache.dir)
    for mod, z in (("video", video), ("audio", audio[sound])):
        want = compute_latent_stats(z)
        for k in ("shift", "scale"):
            assert stats[mod][k].dtype == np.float32
            np.testing.assert_allclose(stats[mod][k], np.asarray(want[k]), rtol=2e-5, atol=1e-6)
            assert np.array_equal(stats[mod][k], cache.stats[mod][k])
    tag = cache.meta["tag"]
    assert tag["vae_step"] == 0 and tag["audio_step"] == 0
    assert tag["data"]["clips"] == {"train": 24, "val": 8}


def test_two_parts_hold_the_records_of_one(setup, tmp_path):
    """Parts written by two processes merge into the records, order and moments of one."""
    cache = setup[-1]
    src = lc.CacheSource(cache.dir, TRAIN)
    recs = [src[i] for i in range(len(src))]
    moments = {}
    for parts in (1, 2):
        out = tmp_path / f"p{parts}"
        for p in range(parts):
            w = lc.PartWriter(out, "train", p, parts, moments=("video",))
            for rec in recs[len(recs) * p // parts : len(recs) * (p + 1) // parts]:
                w.write(rec)
            w.close()
        entry, moments[parts] = lc.merge_parts(out, "train", parts)
        lc.write_meta(out, {}, {"train": entry}, {})
        got = _read(out, "train")
        assert got["key"] == [r["key"] for r in recs]
        assert np.array_equal(got["video"], np.stack([r["video"] for r in recs]))
    np.testing.assert_allclose(moments[2]["video"].sum, moments[1]["video"].sum, rtol=1e-12)
    assert moments[2]["video"].count == moments[1]["video"].count
    with pytest.raises(UserError, match="process 1 did not finish"):
        (tmp_path / "p2" / "train.p00001-of-00002.json").unlink()
        lc.merge_parts(tmp_path / "p2", "train", 2)


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
        "fps": 12.5,
    }
    back = lc.decode_latent_record(lc.encode_latent_record(rec))
    assert back["audio"] is None and back["caption"] == NON_ASCII and back["fps"] == 12.5
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
    got = _read(wd / "latents", TRAIN)["video"]
    assert np.array_equal(got, video)
    assert not np.array_equal(got, _read(workdir / "latents", TRAIN)["video"])
    # One shard per split now (default shard size): the old, smaller shards are gone.
    assert sorted(p.name for p in (wd / "latents").glob("*.array_record")) == [
        f"train.{B}.p00000-of-00001-00000-of-00001.array_record",
        f"val.{B}.p00000-of-00001-00000-of-00001.array_record",
    ]


def test_damaged_cache_gives_user_error(setup, tmp_path):
    config, mesh, data, ae, workdir, _ = setup
    src = workdir / "latents"

    def fresh(name):
        d = tmp_path / name / "latents"
        shutil.copytree(src, d)
        return d, sorted(d.glob(f"{TRAIN}.*.array_record"))

    d, shards = fresh("missing")
    shards[1].unlink()
    with pytest.raises(
        UserError, match=r"train\.32x32x16\.p00000-of-00001-00001-of-\d+\.array_record is missing"
    ):
        lc.CacheSource(d, TRAIN)
    # The main job's reuse check says the same before training starts.
    with pytest.raises(UserError, match="is missing; remove"):
        stages.cache_latents(config, d.parent, mesh, data, ae)

    d, shards = fresh("truncated")
    shards[0].write_bytes(shards[0].read_bytes()[:70_000])
    with pytest.raises(UserError, match="truncated or replaced"):
        lc.CacheSource(d, TRAIN)

    d, shards = fresh("flipped")  # same size, damaged bytes: ArrayRecord's chunk hash
    raw = bytearray(shards[0].read_bytes())
    raw[100:400] = bytes(b ^ 0xFF for b in raw[100:400])
    shards[0].write_bytes(bytes(raw))
    with pytest.raises(UserError, match="damaged") as e:
        _read(d, TRAIN)
    assert "rebuild" in str(e.value)

    d, _ = fresh("meta")
    (d / "latents.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        lc.CacheSource(d, TRAIN)
    with pytest.raises(UserError, match="no cache in"):
        lc.CacheSource(tmp_path / "nothing", "train")
    with pytest.raises(UserError, match=r"no split 'val_heldout\.32x32x16'"):
        lc.CacheSource(src, f"val_heldout.{B}")


def _dit_inputs(config, data, cache, rows):
    """Rows of the transformer's inputs, as its latent stream and its clip stream make them."""
    fields = stages.dit_latent_fields(config, cache)
    norms = {k: cache.stats[f] for k, f in fields.items() if f in ("video", "audio")}
    cached = _rows(lc.CacheSource(cache.dir, TRAIN), lc.RecordFields(fields, norms), rows)
    clip_fields = stages.dit_clip_fields(config, cache.stats)
    mel = {k: data.mel_norm for k, f in clip_fields.items() if f == "audio"}
    clips = _rows(data.source("train"), lc.RecordFields(clip_fields, mel), rows)
    return cached, clips


def test_latent_stream_batches_are_the_cache_rows(setup):
    config, _, data, _, _, cache = setup
    stream = stages.dit_latent_stream(config, data, cache)({B: 4}, 11)
    batch = next(stream)
    fields = stages.dit_latent_fields(config, cache)
    norms = {k: cache.stats[f] for k, f in fields.items() if f in ("video", "audio")}
    want = _rows(
        lc.CacheSource(cache.dir, TRAIN), lc.RecordFields(fields, norms), stream.last_indices
    )
    assert batch.keys() == want.keys()
    for k in want:
        assert np.array_equal(batch[k], want[k]), k
    stream.close()


def test_clip_encoder_matches_cached_latents(setup):
    config, mesh, data, ae, _, cache = setup
    encode = stages.clip_encoder(config, ae, cache.stats)
    cached, raw = _dit_inputs(config, data, cache, range(8, 16))
    sharded = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    batch = {k: jax.device_put(v, sharded) for k, v in raw.items()}
    out = jax.jit(encode)(batch)
    for k in ("video_latents", "audio_latents"):
        np.testing.assert_allclose(np.asarray(out[k]), cached[k], rtol=0, atol=1e-5)
    for k in ("tokens", "mask", "has_audio"):
        assert np.array_equal(np.asarray(out[k]), cached[k])
    assert "video" not in out and "mel" not in out


def test_dit_loss_same_from_cache_or_clips(setup):
    """The transformer's loss in "clips" mode (encode inside the jit) equals the cached one."""
    config, mesh, data, ae, _, cache = setup
    cached, clips = _dit_inputs(config, data, cache, range(8))
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
