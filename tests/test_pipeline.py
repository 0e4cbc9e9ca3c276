"""The grain pipeline: determinism, checkpoint/restore, sharding, bad records, buckets, audio."""

import itertools
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from _media import make_mp4, tone
from jax.sharding import PartitionSpec

from data_pipelines import pipeline, records
from data_pipelines.buckets import Bucket, check_buckets
from data_pipelines.tokenizer import Tokenizer, train_tokenizer
from vdiff.config import load_config
from vdiff.errors import UserError
from vdiff.parallel.mesh import to_global

REPO = Path(__file__).resolve().parent.parent
NUM_CLIPS = 24
SRC_FRAMES, SRC_FPS = 24, 8.0  # 3 s sources, so a 2 s clip has 9 valid starts
TONE_AT = 1.5  # seconds; even clips are silent before this, a 1 kHz tone after
BAD_KEYS = ("bad-mp4", "bad-msgpack")


def _frames(r: int) -> np.ndarray:
    """Clip r: red = 40 + 8 r (which clip), green = 8 k (which frame k)."""
    f = np.zeros((SRC_FRAMES, 32, 32, 3), np.uint8)
    f[..., 0] = 40 + 8 * r
    f[..., 1] = (8 * np.arange(SRC_FRAMES))[:, None, None]
    f[..., 2] = 128
    return f


def _record_caption(r: int) -> str:
    return f"clip number {r} in red level {40 + 8 * r}"


def _record(r: int) -> dict:
    audio = None
    if r % 2 == 0:
        audio = np.concatenate(
            [np.zeros(round(TONE_AT * 16000), np.float32), tone(1000, 3 - TONE_AT)]
        )
    return {
        "key": f"clip-{r:02d}",
        "video": make_mp4(_frames(r), SRC_FPS, audio=audio),
        "caption": _record_caption(r),
        "fps": SRC_FPS,
        "num_frames": SRC_FRAMES,
        "width": 32,
        "height": 32,
        "duration": SRC_FRAMES / SRC_FPS,
        "has_audio": audio is not None,
        "meta": "",
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    recs = [_record(r) for r in range(NUM_CLIPS)]
    with records.ShardWriter(root / "good", "train", records_per_shard=7) as w:
        for rec in recs:
            w.write(rec)
    # The same clips plus a record whose video bytes are garbage and one that is not msgpack.
    bad_video = dict(recs[0], key=BAD_KEYS[0], video=b"\x00\x00\x00\x18ftypisom" + b"\x00" * 64)
    with records.ShardWriter(root / "bad", "train", records_per_shard=7) as w:
        for i, rec in enumerate(recs):
            w.write(rec)
            if i == 5:
                w.write(bad_video)
            if i == 17:
                w.write(b"this is not a record")
    train_tokenizer([r["caption"] for r in recs], root / "tok", vocab_size=300)
    return root


def _config(buckets=((32, 32, 16),)):
    c = load_config("tiny")
    c.data.buckets = buckets
    c.text.max_len = 16
    return c


def build(root, *, seed=0, batch_size=4, buckets=((32, 32, 16),), split="good", **kw):
    """Builds a pipeline over the test data (also used by the restore subprocess)."""
    root = Path(root)
    kw.setdefault("worker_count", 0)
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    tok = Tokenizer(root / "tok.model")
    return pipeline.make_pipeline(
        _config(buckets), root / split, tokenizer=tok, batch_size=batch_size, seed=seed, **kw
    )


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _check_content(batch, root):
    """Each example is its key's clip (frames from start_s * fps on) and caption."""
    tok = Tokenizer(Path(root) / "tok.model")
    for i, key in enumerate(batch["key"]):
        r = int(key.split("-")[1])
        assert batch["index"][i] == r
        caption = tok.decode(batch["tokens"][i])
        assert len(caption) > 10 and _record_caption(r).startswith(caption)  # may be truncated
        pixels = (batch["video"][i] + 1) * 127.5  # back to 0..255
        assert abs(pixels[..., 0].mean() - (40 + 8 * r)) < 4
        first = round(float(batch["start_s"][i]) * SRC_FPS)
        frame_ids = np.round(pixels[..., 1].mean(axis=(1, 2)) / 8)
        np.testing.assert_array_equal(frame_ids, first + np.arange(len(frame_ids)))


def test_batches_have_documented_shapes_and_content(data):
    with build(data) as it:
        b = next(it)
    assert b["video"].shape == (4, 16, 32, 32, 3) and b["video"].dtype == np.float32
    assert b["video"].min() >= -1 and b["video"].max() <= 1
    assert b["mel"].shape == (4, 200, 64) and b["mel"].dtype == np.float32
    assert b["tokens"].shape == (4, 16) and b["tokens"].dtype == np.int32
    assert b["mask"].dtype == bool and b["mask"][:, 0].all()
    np.testing.assert_array_equal(b["has_audio"], [int(k[-2:]) % 2 == 0 for k in b["key"]])
    assert not b["mel"][~b["has_audio"]].any()  # no audio -> zeros
    _check_content(b, data)


def test_same_seed_same_batches_other_seed_differs(data):
    with build(data, seed=3) as a, build(data, seed=3) as b, build(data, seed=4) as c:
        xs, ys, zs = _take(a, 3), _take(b, 3), _take(c, 3)
    for x, y in zip(xs, ys):
        _assert_same(x, y)
    keys = lambda bs: [list(x["key"]) for x in bs]  # noqa: E731
    assert keys(xs) != keys(zs)


def test_state_restores_in_a_new_process(data, tmp_path):
    it = build(data, seed=1)
    _take(it, 2)
    state = it.get_state()
    (tmp_path / "state.json").write_text(json.dumps(state))
    expected = _take(it, 2)
    it.close()
    assert it.stats["examples"] == 16  # 4 batches of 4
    # A fresh interpreter rebuilds the pipeline (with worker processes this time) and resumes.
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        sys.path[:0] = [{str(REPO)!r}, {str(REPO / "tests")!r}]
        from test_pipeline import build
        it = build({str(data)!r}, seed=1, worker_count=2)
        it.set_state(json.loads(open({str(tmp_path / "state.json")!r}).read()))
        for i in range(2):
            for k, v in next(it).items():
                np.save({str(tmp_path)!r} + f"/b{{i}}_{{k}}.npy", v)
        it.close()
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, timeout=120)
    for i, batch in enumerate(expected):
        got = {k: np.load(tmp_path / f"b{i}_{k}.npy") for k in batch}
        _assert_same(batch, got)


def test_restore_rejects_state_of_another_pipeline(data):
    with build(data, seed=1) as a, build(data, seed=2) as b:
        next(a)
        with pytest.raises(ValueError, match="seed"):
            b.set_state(a.get_state())


def test_two_processes_read_their_rows_of_one_global_stream(data):
    """Process p reads rows [4p, 4p + 4) of each global batch of 8: the two together are
    the one-process stream, and each epoch visits every record once, reshuffled."""
    per_epoch = NUM_CLIPS // 8  # global batches per epoch
    with build(data, batch_size=8) as one:
        single = [list(b["key"]) for b in _take(one, 2 * per_epoch)]
    parts = []
    for p in range(2):
        with build(data, process_index=p, process_count=2) as it:
            parts.append([list(b["key"]) for b in _take(it, 2 * per_epoch)])
    assert [a + b for a, b in zip(*parts)] == single
    epochs = [list(itertools.chain(*single[e * per_epoch : (e + 1) * per_epoch])) for e in (0, 1)]
    for keys in epochs:
        assert sorted(keys) == sorted(_record_keys())
    assert epochs[0] != epochs[1]  # reshuffled per epoch


def _record_keys():
    return [f"clip-{r:02d}" for r in range(NUM_CLIPS)]


def test_bad_records_are_skipped_and_counted(data):
    with build(data, split="bad", batch_size=2) as it:
        batches = _take(it, (NUM_CLIPS + 2) // 2)  # one epoch
        stats = it.stats
    assert len(batches) == (NUM_CLIPS + 2) // 2  # every batch full: bad ones were refilled
    keys = [k for b in batches for k in b["key"]]
    assert set(keys) == set(_record_keys())
    assert stats["skipped"] >= 2  # both bad records met (a refill may meet one again)
    # The count survives a checkpoint.
    with build(data, split="bad", batch_size=2) as again:
        again.set_state(it.get_state())
        assert again.stats["skipped"] == stats["skipped"]


def test_a_bucket_decodes_alike_in_every_process_and_worker(data):
    """A non-square bucket of the square sources (resize to cover, centre crop), read by
    process 1 of 2 in this process and in grain workers: the same batches."""
    bucket = Bucket(16, 24, 8)
    steps = 4
    runs = {}
    for name, p, workers in (("p0", 0, 0), ("p1", 1, 0), ("p1_workers", 1, 2)):
        with build(
            data, bucket=bucket, process_index=p, process_count=2, worker_count=workers
        ) as it:
            runs[name] = _take(it, steps)
    for name, batches in runs.items():
        for step, b in enumerate(batches):
            assert b["video"].shape == (4, 8, 16, 24, 3), (name, step)
            # 1 s of log-mel (100 frames) in whole transformer audio tokens: 96
            mel = pipeline.mel_frames(8, 8.0, 16000, 160, pipeline.audio_frame_multiple(_config()))
            assert b["mel"].shape == (4, mel, 64) and mel == 96, (name, step)
            np.testing.assert_array_equal(b["fps"], SRC_FPS)
            _check_content(b, data)
    for a, b in zip(runs["p1"], runs["p1_workers"]):  # worker processes change nothing
        _assert_same(a, b)
    assert not set(runs["p0"][0]["key"]) & set(runs["p1"][0]["key"])


def test_audio_window_matches_video_window(data):
    with build(data, batch_size=8, seed=5) as it:
        batches = _take(it, 3)
    checked = set()
    for b in batches:
        for i in np.flatnonzero(b["has_audio"]):
            start = float(b["start_s"][i])
            energy = b["mel"][i].max(axis=1)  # the tone fills one band
            onset = round((TONE_AT - start) * 100)  # mel frame where the tone begins
            quiet, loud = energy[: onset - 5].mean(), energy[onset + 5 :].mean()
            assert loud > quiet + 3, (start, quiet, loud)
            # The jump happens within +-2 mel frames (20 ms) of the expected frame.
            mid = (quiet + loud) / 2
            assert abs(int(np.argmax(energy > mid)) - onset) <= 2, (
                start,
                energy[onset - 8 : onset + 8],
            )
            checked.add(start)
    assert len(checked) >= 3  # several different windows were sampled


def _frames_parts(data, tmp_path, num_parts, buckets=((32, 32, 16),)):
    """The decoded-frames cache of the "bad" split, written as ``num_parts`` processes do."""
    from vdiff.train.data import _decode_part

    c, tok = _config(buckets), Tokenizer(data / "tok.model")
    members = np.arange(len(pipeline.open_split(data / "bad")))
    for p in range(num_parts):
        _decode_part(
            c, data / "bad", tmp_path, "train", Bucket(*buckets[0]), members, tok, p, num_parts
        )
    return tmp_path


def test_frames_cache_holds_the_pipeline_decode_in_record_order(data, tmp_path):
    from data_pipelines import latents as cache

    caches = {}
    for parts in (1, 2):
        out = _frames_parts(data, tmp_path / f"p{parts}", parts)
        entry, moments = cache.merge_parts(out, "train.32x32x16", parts)
        cache.write_meta(out, {}, {"train.32x32x16": entry}, {}, cache.FRAMES)
        caches[parts] = cache.CacheSource(out, "train.32x32x16", cache.FRAMES)
        assert "audio" in moments  # the train split's log-mel moments, for normalising
    src = caches[1]
    keys = [src[i]["key"] for i in range(len(src))]
    assert keys == _record_keys()  # the two bad records left out, order kept
    for i in range(len(src)):  # two processes' parts hold the same records
        a, b = src[i], caches[2][i]
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    c, tok = _config(), Tokenizer(data / "tok.model")
    one = pipeline.decode_example(
        records.decode_record(records.RecordSource(data / "good", "train").raw[3]),
        height=32,
        width=32,
        frames=16,
        window=(c.seed, 0, 3),
        **pipeline.decode_settings(c, tok),
    )  # fmt: skip (the cache holds each clip's epoch-0 window)
    rec = src[keys.index("clip-03")]
    np.testing.assert_array_equal(rec["video"], np.round((one["video"] + 1) * 127.5))
    np.testing.assert_array_equal(rec["audio"], one["mel"])
    np.testing.assert_array_equal(rec["tokens"], one["tokens"])
    assert rec["index"] == 3 and rec["caption"] == _record_caption(3)


@pytest.mark.parametrize("mesh_shape", [(8, 1), (4, 2)])
def test_to_global_shards_the_batch(devices, mesh_shape):
    mesh = jax.make_mesh(mesh_shape, ("data", "fsdp"))
    rng = np.random.default_rng(0)
    batch = {
        "video": rng.normal(size=(16, 4, 8, 8, 3)).astype(np.float32),
        "tokens": rng.integers(0, 100, (16, 6)).astype(np.int32),
        "key": np.array([f"k{i}" for i in range(16)]),
    }
    out = to_global(batch, mesh)
    assert set(out) == {"video", "tokens"}
    for k, arr in out.items():
        assert arr.shape == batch[k].shape  # one process: global = local
        assert arr.sharding.spec == PartitionSpec(("data", "fsdp"), *[None] * (arr.ndim - 1))
        assert {s.data.shape[0] for s in arr.addressable_shards} == {2}  # 16 rows / 8 devices
        np.testing.assert_array_equal(np.asarray(arr), batch[k])


def test_bad_config_and_missing_data_raise_clear_errors(data, tmp_path):
    with pytest.raises(ValueError, match=r"\(32, 32, 0\)"):
        check_buckets(((32, 32, 16), (32, 32, 0)))
    with pytest.raises(FileNotFoundError, match="no ArrayRecord shards"):
        pipeline.open_split(tmp_path)
    # Two shard sets in one folder: pick one with folder/prefix.
    with records.ShardWriter(tmp_path, "val") as w:
        w.write(_record(0))
    with records.ShardWriter(tmp_path, "train") as w:
        w.write(_record(1))
        w.write(_record(2))
    with pytest.raises(ValueError, match="several shard sets"):
        pipeline.open_split(tmp_path)
    assert len(pipeline.open_split(tmp_path / "train")) == 2
    with pytest.raises(ValueError, match="cannot fill a batch"):
        build(data, batch_size=NUM_CLIPS + 1)


def test_frames_cache_names_the_split_and_reasons_when_nothing_is_usable(data, tmp_path):
    """Clips shorter than the bucket everywhere: one line with the split and the counts."""
    from vdiff.train.data import _frames_cache, _split_buckets

    root = tmp_path / "root"
    split = root / "records" / "train"
    split.mkdir(parents=True)
    for shard in (data / "bad").glob("*.array_record"):
        (split / shard.name).symlink_to(shard)
    (split / "manifest.json").write_text("{}")  # what an ingest leaves; its digest tags the index
    (root / "tokenizer.model").symlink_to(data / "tok.model")
    c = _config(buckets=((32, 32, 64),))  # 8 s at 8 fps from 3 s sources
    members = {
        "train": _split_buckets(c, root, root / "records", "train", check_buckets(c.data.buckets))
    }
    with pytest.raises(UserError) as e:
        tok = Tokenizer(data / "tok.model")
        _frames_cache(c, root, root / "records", ["train"], tok, {}, members)
    text = str(e.value)
    assert "\n" not in text and text.startswith("split train (")
    assert "any bucket of data.buckets at 8 fps" in text and "1 bad_record" in text
    assert int(re.search(r"(\d+) shorter_than_its_buckets", text).group(1)) == NUM_CLIPS + 1
