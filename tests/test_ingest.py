"""Records, shards and `vdiff data ingest` (data_pipelines.records / ingest)."""

import json
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _media import frame_index, index_frames, make_audio_only, make_mp4, tone

from data_pipelines import ingest as ingest_mod
from data_pipelines import records, video_io
from data_pipelines.ingest import Manifest, ingest
from data_pipelines.records import (
    RecordError,
    RecordSource,
    ShardWriter,
    decode_record,
    encode_record,
    list_shards,
)
from data_pipelines.tokenizer import Tokenizer, captions_from, train_tokenizer
from vdiff.errors import UserError

UNICODE_CAPTION = "un cercle rouge — 赤い円 🎈"


def _record(i: int, **over) -> dict:
    rec = {
        "key": f"clip{i}",
        "video": bytes([i]) * 10,
        "caption": f"caption {i}",
        "fps": 8.0,
        "num_frames": 16,
        "width": 32,
        "height": 32,
        "duration": 2.0,
        "has_audio": i % 2 == 0,
        "meta": json.dumps({"i": i}),
    }
    return rec | over


def test_record_round_trip_and_validation():
    rec = _record(
        3,
        caption=UNICODE_CAPTION,
        fps=np.float32(7.5),
        num_frames=np.int64(12),
        has_audio=np.bool_(False),
    )
    back = decode_record(encode_record(rec))
    assert back == _record(3, caption=UNICODE_CAPTION, fps=7.5, num_frames=12, has_audio=False)
    assert type(back["fps"]) is float and type(back["num_frames"]) is int
    with pytest.raises(RecordError, match="missing"):
        encode_record({k: v for k, v in rec.items() if k != "caption"})
    with pytest.raises(RecordError, match="'width'"):
        encode_record(_record(1, width="32"))
    with pytest.raises(RecordError, match="'num_frames'"):
        encode_record(_record(1, num_frames=True))
    with pytest.raises(RecordError, match="meta"):
        encode_record(_record(1, meta="{not json"))
    with pytest.raises(RecordError):
        decode_record(b"\x00garbage\xff")
    with pytest.raises(RecordError, match="map"):
        decode_record(encode_record(rec)[:0] + b"\x93\x01\x02\x03")  # msgpack [1, 2, 3]


def test_shard_writer_and_record_source_over_two_shards(tmp_path):
    with ShardWriter(tmp_path, "train", records_per_shard=3) as w:
        for i in range(5):
            w.write(_record(i) if i % 2 else encode_record(_record(i)))
    names = [p.split("/")[-1] for p in list_shards(tmp_path, "train")]
    assert names == ["train-00000-of-00002.array_record", "train-00001-of-00002.array_record"]
    assert w.shard_sizes == [3, 2]
    source = RecordSource(tmp_path, "train")
    assert len(source) == 5
    assert [source[i]["key"] for i in range(5)] == [f"clip{i}" for i in range(5)]
    assert [r["video"] for r in source.__getitems__([4, 0])] == [bytes([4]) * 10, bytes([0]) * 10]
    # grain ships data sources to worker processes by pickling them.
    clone = pickle.loads(pickle.dumps(source))
    assert clone[3] == _record(3)

    with pytest.raises(FileExistsError):
        ShardWriter(tmp_path, "train")
    (tmp_path / names[1]).unlink()
    with pytest.raises(ValueError, match="incomplete"):
        list_shards(tmp_path, "train")
    with pytest.raises(FileNotFoundError):
        RecordSource(tmp_path, "val")


def test_shard_writer_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, "x", 2) as w:
        w.write(_record(0))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


# --- ingest -------------------------------------------------------------------------------

GOOD = [  # (file, frames, fps, caption, with audio)
    ("a.mp4", 12, 8.0, "a red circle bounces to the left", True),
    ("sub/b.mp4", 8, 4.0, UNICODE_CAPTION, False),
    ("c.mp4", 16, 8.0, "a green square moves up on a blue background", True),
    ("d.mp4", 10, 5.0, 'a "quoted" caption, with commas', False),
]
BAD = {  # file -> expected reason
    "truncated.mp4": "truncated",
    "random.mp4": "not_a_video",
    "empty.mp4": "empty_file",
    "audio.m4a": "no_video_stream",
    "badcap.mp4": "caption_not_utf8",
}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Four good clips mixed with the five kinds of bad input."""
    src = tmp_path_factory.mktemp("src")
    (src / "sub").mkdir()
    for name, n, fps, _, audio in GOOD:
        wave = tone(330.0, n / fps) if audio else None
        (src / name).write_bytes(make_mp4(index_frames(n, 32, 48), fps, audio=wave))
    full = make_mp4(index_frames(16), 8.0)
    (src / "truncated.mp4").write_bytes(full[: len(full) // 2])
    (src / "random.mp4").write_bytes(np.random.default_rng(1).bytes(3000))
    (src / "empty.mp4").write_bytes(b"")
    (src / "audio.m4a").write_bytes(make_audio_only(tone(300.0, 1.0)))
    (src / "badcap.mp4").write_bytes(full)

    lines = []
    entries = (
        [(g[0], g[3]) for g in GOOD[:2]]
        + [(b, "fine caption") for b in BAD]
        + [(g[0], g[3]) for g in GOOD[2:]]
    )
    for video, caption in entries:
        line = json.dumps({"video": video, "caption": caption}, ensure_ascii=False).encode()
        if video == "badcap.mp4":
            line = line.replace(b"fine caption", b"fine \xff\xfe caption")
        lines.append(line)
    (src / "captions.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    meta = [json.dumps({"video": v, "objects": i}) for i, (v, _) in enumerate(entries)]
    (src / "meta.jsonl").write_text("\n".join(meta) + "\n")
    return src


@pytest.fixture(scope="module")
def parallel_out(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("out_par")
    manifest = ingest(source, out, workers=2, records_per_shard=3, progress=False)
    return out, manifest


def test_ingest_skips_exactly_the_bad_files(parallel_out):
    out, manifest = parallel_out
    assert manifest.counts == {"total": 9, "written": 4, "skipped": 5}
    assert {s["video"]: s["reason"] for s in manifest.skipped} == BAD
    assert manifest.skip_reasons == {r: 1 for r in BAD.values()}
    assert Manifest.load(out) == manifest
    # Shards are chunks of 3 captions-file entries, each holding its good ones: (a, b,
    # truncated), (random, empty, audio), (badcap, c, d).
    assert [s["records"] for s in manifest.shards] == [2, 0, 2]

    source = RecordSource(manifest.shard_paths(out))
    recs = [source[i] for i in range(len(source))]
    assert [r["key"] for r in recs] == [g[0] for g in GOOD]  # input order
    assert [r["caption"] for r in recs] == [g[3] for g in GOOD]
    for rec, (_, n, fps, _, audio) in zip(recs, GOOD):
        assert (rec["num_frames"], rec["fps"], rec["has_audio"]) == (n, fps, audio)
        assert (rec["height"], rec["width"]) == (32, 48)
        assert frame_index(video_io.decode_clip(rec["video"], 0.0, n, fps)) == list(range(n))
    assert json.loads(recs[1]["meta"]) == {"video": "sub/b.mp4", "objects": 1}


def test_serial_ingest_writes_identical_shards(source, parallel_out, tmp_path):
    out, manifest = parallel_out
    serial = ingest(source, tmp_path, workers=1, records_per_shard=3, progress=False)
    assert serial.skipped == manifest.skipped and serial.shards == manifest.shards
    for shard in manifest.shards:
        assert (tmp_path / shard["path"]).read_bytes() == (out / shard["path"]).read_bytes()


def _shard_bytes(out: Path, manifest: Manifest) -> list[bytes]:
    return [(out / s["path"]).read_bytes() for s in manifest.shards]


def test_slices_on_two_hosts_write_what_one_host_writes(source, tmp_path):
    one = ingest(source, tmp_path / "one", workers=1, records_per_shard=2, progress=False)
    sliced = tmp_path / "sliced"
    first = ingest(source, sliced, workers=1, records_per_shard=2, shard=(1, 2), progress=False)
    assert first is None and not (sliced / "manifest.json").exists()  # slice 0 still missing
    assert len(list(sliced.glob("*.array_record"))) == 2  # shards 1 and 3 of 5
    both = ingest(source, sliced, workers=2, records_per_shard=2, shard=(0, 2), progress=False)
    assert both is not None and Manifest.load(sliced) == both
    assert both.shards == one.shards and both.skipped == one.skipped
    assert both.counts == one.counts == {"total": 9, "written": 4, "skipped": 5}
    assert _shard_bytes(sliced, both) == _shard_bytes(tmp_path / "one", one)


def test_rerun_keeps_finished_shards_and_rewrites_damaged_ones(source, tmp_path):
    first = ingest(source, tmp_path, workers=1, records_per_shard=2, progress=False)
    paths = [tmp_path / s["path"] for s in first.shards]
    want = [p.read_bytes() for p in paths]
    kept = paths[0].stat().st_mtime_ns
    paths[1].write_bytes(want[1][:-7])  # cut short: its size no longer matches
    paths[2].write_bytes(bytes([want[2][0] ^ 1]) + want[2][1:])  # same size, other digest
    (tmp_path / ".ingest" / f"{paths[3].name}.json").unlink()  # killed before its part
    again = ingest(source, tmp_path, workers=1, records_per_shard=2, progress=False)
    assert again == first
    assert [p.read_bytes() for p in paths] == want
    assert paths[0].stat().st_mtime_ns == kept  # a finished shard is not written again


@pytest.fixture(scope="module")
def many_clips(tmp_path_factory):
    src = tmp_path_factory.mktemp("many")
    lines = []
    for i in range(24):
        (src / f"c{i:02d}.mp4").write_bytes(make_mp4(index_frames(6, 16, 16), 6.0))
        lines.append(json.dumps({"video": f"c{i:02d}.mp4", "caption": f"clip {i}"}))
    (src / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return src


def test_ingest_killed_half_way_resumes_to_the_same_records(many_clips, tmp_path):
    whole = ingest(many_clips, tmp_path / "whole", workers=1, records_per_shard=1, progress=False)
    out = tmp_path / "killed"
    # The child stops for good once it has finished 4 shards; then it is SIGKILLed.
    code = (
        "import sys, time; from pathlib import Path; import data_pipelines.ingest as m\n"
        "real, n = m._write_shard, [0]\n"
        "def stop_after_four(*a, **k):\n"
        "    real(*a, **k); n[0] += 1\n"
        "    if n[0] == 4: Path(sys.argv[3]).touch(); time.sleep(600)\n"
        "m._write_shard = stop_after_four\n"
        "m.ingest(sys.argv[1], sys.argv[2], workers=1, records_per_shard=1, progress=False)\n"
    )
    marker = tmp_path / "four_done"
    proc = subprocess.Popen([sys.executable, "-c", code, str(many_clips), str(out), str(marker)])
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the ingest did not get going"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    parts = out / ".ingest"
    assert not (out / "manifest.json").exists()
    done = {p.name for p in parts.glob("*.json")}
    assert len(done) == 4
    mtimes = {n: (out / n.removesuffix(".json")).stat().st_mtime_ns for n in done}
    resumed = ingest(many_clips, out, workers=1, records_per_shard=1, progress=False)
    assert resumed == whole  # the same manifest (shards, sizes, digests, counts)
    assert _shard_bytes(out, resumed) == _shard_bytes(tmp_path / "whole", whole)
    assert [(out / n.removesuffix(".json")).stat().st_mtime_ns for n in mtimes] == list(
        mtimes.values()
    )  # what the killed run finished was kept
    assert not list(out.glob("*.partial"))


def test_a_repaired_video_is_ingested_on_rerun(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.mp4").write_bytes(b"not a video at all" * 50)
    (src / "b.mp4").write_bytes(make_mp4(index_frames(6, 16, 16), 6.0))
    lines = [json.dumps({"video": v, "caption": f"clip {v}"}) for v in ("a.mp4", "b.mp4")]
    (src / "captions.jsonl").write_text("\n".join(lines) + "\n")
    first = ingest(src, tmp_path / "out", workers=1, records_per_shard=1, progress=False)
    assert first.counts == {"total": 2, "written": 1, "skipped": 1}
    kept = (tmp_path / "out" / first.shards[1]["path"]).stat().st_mtime_ns
    (src / "a.mp4").write_bytes(make_mp4(index_frames(6, 16, 16), 6.0))  # the fix
    again = ingest(src, tmp_path / "out", workers=1, records_per_shard=1, progress=False)
    assert again.counts == {"total": 2, "written": 2, "skipped": 0}
    assert (tmp_path / "out" / again.shards[1]["path"]).stat().st_mtime_ns == kept


def test_ingest_slice_from_the_launcher_environment(monkeypatch):
    from vdiff.commands import _ingest_shard

    for name in ("JAX_PROCESS_ID", "JAX_NUM_PROCESSES", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert _ingest_shard(None) == (0, 1)
    assert _ingest_shard("2/4") == (2, 4)
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_PROCID", "5")
    assert _ingest_shard(None) == (5, 8)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")  # a JAX launcher's variables come first
    with pytest.raises(UserError, match="JAX_PROCESS_ID is not set"):
        _ingest_shard(None)
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    assert _ingest_shard(None) == (3, 4)
    with pytest.raises(UserError, match="0 <= i < n"):
        _ingest_shard("4/4")


def test_unicode_caption_round_trips_through_ingest_and_tokenizer(parallel_out, tmp_path):
    out, _ = parallel_out
    captions = captions_from(out)
    assert UNICODE_CAPTION in captions
    with pytest.warns(UserWarning, match="too small"):
        tok = Tokenizer(train_tokenizer(captions, tmp_path / "tok", vocab_size=512))
    ids, mask = tok.encode(captions, 48)
    assert mask.all(axis=1).sum() == 0  # nothing truncated at 48
    assert tok.decode(ids) == captions
    assert 1 not in ids  # no <unk>: byte fallback covers every character


def test_reencode_caps_resolution_and_stays_deterministic(source, tmp_path):
    kw = dict(max_resolution=16, gop=2, records_per_shard=8, progress=False)
    m1 = ingest(source, tmp_path / "one", workers=1, reencode=True, **kw)
    ingest(source, tmp_path / "two", workers=2, reencode=True, **kw)
    assert m1.counts["written"] == 4 and m1.options["reencode"]
    name = m1.shards[0]["path"]
    assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    recs = list(RecordSource(tmp_path / "one", m1.prefix))
    assert [(r["height"], r["width"]) for r in recs] == [(16, 24)] * 4
    assert [r["num_frames"] for r in recs] == [g[1] for g in GOOD]
    rec = recs[2]
    got = frame_index(video_io.decode_clip(rec["video"], 0.5, 6, rec["fps"]))
    assert got == list(range(4, 10))


def test_csv_captions_other_reasons_and_split_layout(tmp_path):
    src = tmp_path / "src"
    (src / "train").mkdir(parents=True)
    clip = make_mp4(index_frames(4), 8.0)
    (src / "train" / "x.mp4").write_bytes(clip)
    (src / "train" / "captions.jsonl").write_text(
        '{"video": "x.mp4", "caption": "x one"}\n\n{"video": "x.mp4", "caption": "x two"}\n'
        '{"video": "gone.mp4", "caption": "missing"}\n{"video": "x.mp4", "caption": "  "}\n'
        "not json\n"
    )
    m = ingest(src, tmp_path / "out", split="train", workers=1, progress=False)
    assert m.prefix == "train" and m.counts == {"total": 5, "written": 2, "skipped": 3}
    assert m.skip_reasons == {"missing_file": 1, "empty_caption": 1, "bad_caption_line": 1}
    assert [r["key"] for r in RecordSource(tmp_path / "out", "train")] == ["x.mp4", "x.mp4#1"]

    csv_src = tmp_path / "csv"
    csv_src.mkdir()
    (csv_src / "x.mp4").write_bytes(clip)
    (csv_src / "list.csv").write_text('video,caption\nx.mp4,"commas, and ""quotes"""\n')
    m = ingest(csv_src, tmp_path / "out_csv", workers=1, progress=False)
    assert [r["caption"] for r in RecordSource(tmp_path / "out_csv", m.prefix)] == [
        'commas, and "quotes"'
    ]
    (csv_src / "other.csv").write_text("file,text\n")
    with pytest.raises(UserError, match="several captions"):
        ingest_mod.find_captions(csv_src)
    with pytest.raises(UserError, match="columns"):
        ingest(csv_src, tmp_path / "o", captions=csv_src / "other.csv", progress=False)
    assert records.list_shards(tmp_path / "o", "clips") == []


def test_worker_module_does_not_import_jax():
    # Ingest workers are spawned and import this module; jax there would waste memory and
    # could grab an accelerator.
    code = "import sys, data_pipelines.ingest; print('jax' in sys.modules, 'grain' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    )
    assert out.stdout.split() == ["False", "False"]
