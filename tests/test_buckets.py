"""Shape buckets on a mixed set: landscape, portrait and square clips at 12, 24 and 30 fps,
with and without audio, and still images, ingested and streamed one bucket per step."""

import io
import json
import math

import numpy as np
import pytest
from _media import make_mp4, tone
from PIL import Image

from data_pipelines import buckets as bk
from data_pipelines import clip_index, pipeline, records
from data_pipelines.bucket_stream import bucketed_stream
from data_pipelines.ingest import ingest
from data_pipelines.tokenizer import Tokenizer, train_tokenizer
from vdiff.config import check_static, load_config

FPS = 12.0  # data.fps: 12 fps clips keep every frame, 24 every 2nd, 30 every 2nd (15 fps)
BUCKETS = (
    (32, 48, 16),  # landscape, 16 frames
    (32, 48, 8),  # landscape, 8 frames (the short landscape clips)
    (48, 32, 16),  # portrait
    (32, 32, 16),  # square
    (32, 48, 1),  # landscape images
    (48, 32, 1),  # portrait images
)
# (width, height, seconds, fps, audio): 1.5 to 6 s, 12 / 24 / 30 fps.
CLIPS = [
    (48, 32, 6.0, 12, True),
    (48, 32, 4.0, 24, False),
    (48, 32, 3.0, 30, True),
    (48, 32, 1.0, 12, False),  # 12 frames: fills the 8-frame landscape bucket only
    (48, 32, 1.0, 24, True),  # 24 frames at stride 2: the same
    (32, 48, 6.0, 30, False),
    (32, 48, 2.0, 12, True),
    (32, 48, 5.0, 24, False),
    (32, 32, 1.5, 24, True),
    (32, 32, 4.5, 12, False),
    (32, 32, 3.5, 30, True),
    (40, 48, 2.0, 12, False),  # nearly square: the square bucket
    (32, 48, 0.5, 12, False),  # 6 frames: shorter than every portrait bucket
]
IMAGES = [(48, 32), (32, 48), (52, 30), (30, 50)]


def _frames(w, h, seconds, fps, i):
    n = round(seconds * fps)
    f = np.zeros((n, h, w, 3), np.uint8)
    f[..., 0] = 20 + 10 * i
    f[..., 1] = (np.arange(n) * 255 // max(n - 1, 1))[:, None, None]
    return f


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    src = tmp_path_factory.mktemp("mixed_src")
    lines = []
    for i, (w, h, seconds, fps, audio) in enumerate(CLIPS):
        wave = tone(300 + 100 * i, seconds) if audio else None
        (src / f"clip{i:02d}.mp4").write_bytes(
            make_mp4(_frames(w, h, seconds, fps, i), fps, audio=wave)
        )
        lines.append({"video": f"clip{i:02d}.mp4", "caption": f"clip {i} of {w}x{h} at {fps} fps"})
    for j, (w, h) in enumerate(IMAGES):
        buf = io.BytesIO()
        Image.fromarray(np.full((h, w, 3), 60 + 40 * j, np.uint8)).save(buf, format="PNG")
        (src / f"still{j}.png").write_bytes(buf.getvalue())
        lines.append({"video": f"still{j}.png", "caption": f"a still image number {j}"})
    (src / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path_factory.mktemp("mixed") / "train"
    ingest(src, out, workers=1, progress=False)
    train_tokenizer([x["caption"] for x in lines], out.parent / "tok", vocab_size=300)
    return out


def _config():
    c = load_config("tiny")
    c.data.buckets = BUCKETS
    c.data.fps = FPS
    c.text.max_len = 12
    return c


def _split_buckets(root):
    src = pipeline.open_split(root)
    facts = clip_index.read_facts(src, range(len(src)))
    return clip_index.SplitBuckets.assign(facts, bk.check_buckets(BUCKETS), FPS), facts


def test_each_clip_is_in_the_bucket_nearest_its_aspect_then_the_longest_it_fills(mixed):
    split, facts = _split_buckets(mixed)
    assert len(facts["width"]) == len(CLIPS) + len(IMAGES)
    images = facts["num_frames"] == 1
    assert images.sum() == len(IMAGES)
    assert (facts["fps"][images] == 0).all()  # a still has no time
    where = {int(i): bk.Bucket(*BUCKETS[k]) for k, m in enumerate(split.members) for i in m}
    for i, b in where.items():
        w, h = int(facts["width"][i]), int(facts["height"][i])
        kind = [bk.Bucket(*x) for x in BUCKETS if (x[2] == 1) == bool(images[i])]
        nearest = min(abs(math.log(x.aspect) - math.log(w / h)) for x in kind)
        assert abs(math.log(b.aspect) - math.log(w / h)) == pytest.approx(nearest), (i, b)
        if h > w:
            assert b.width <= b.height, (i, b)  # no portrait clip in a landscape bucket
        if w > h:
            assert b.height <= b.width, (i, b)
    assert where[0].name == "32x48x16" and where[3].name == "32x48x8"  # longest it fills
    assert where[4].name == "32x48x8" and where[11].name == "32x32x16"  # 40x48: nearest square
    assert split.skipped == {bk.TOO_SHORT: 1}  # the 0.5 s portrait clip, counted
    assert {b.name for b in where.values()} == {bk.Bucket(*b).name for b in BUCKETS}


def test_windows_vary_and_frames_keep_their_own_time(mixed):
    _, facts = _split_buckets(mixed)
    c, tok = _config(), Tokenizer(mixed.parent / "tok.model")
    settings = pipeline.decode_settings(c, tok)
    raw = pipeline.open_split(mixed)
    src = [records.decode_record(raw[i]) for i in range(len(raw))]
    starts, rates = set(), {}
    for epoch in range(6):
        ex = pipeline.decode_example(
            src[0], height=32, width=48, frames=16, window=(0, epoch, 0), **settings
        )
        starts.add(float(ex["start_s"]))
        # frame i is source frame first + i (12 fps: stride 1): green ramps by 255/71 a frame
        green = ((ex["video"][..., 1] + 1) * 127.5).mean(axis=(1, 2))
        assert np.allclose(np.diff(green), 255 / 71, atol=2.5)
    assert len(starts) >= 4  # a 6 s clip's 16-frame window starts at varied times
    for i, (_, _, _, fps, _) in enumerate(CLIPS[:3]):
        b = bk.Bucket(32, 48, 16)
        ex = pipeline.decode_example(
            src[i], height=32, width=48, frames=16, window=(0, 0, i), **settings
        )
        rates[fps] = float(ex["fps"])
        assert ex["video"].shape == (16, 32, 48, 3) and b.frames == 16
    assert rates == {12: 12.0, 24: 12.0, 30: 15.0}  # whole frames at the nearest stride
    still = next(i for i in range(len(facts["width"])) if facts["num_frames"][i] == 1)
    ex = pipeline.decode_example(src[still], height=32, width=48, frames=1, **settings)
    assert ex["video"].shape == (1, 32, 48, 3) and not ex["has_audio"]


def _streams(mixed, process_index, process_count=2, batch=1, steps=40):
    split, _ = _split_buckets(mixed)
    c, tok = _config(), Tokenizer(mixed.parent / "tok.model")
    counts = split.counts()
    sizes = {b.name: batch for b in split.buckets}

    def make(k, bucket, b, seed):
        return pipeline.make_pipeline(
            c, mixed, tokenizer=tok, batch_size=b, seed=seed, bucket=bucket,
            members=split.members[k], process_index=process_index,
            process_count=process_count, worker_count=0,
        )  # fmt: skip

    stream = bucketed_stream(
        split.buckets, counts, make, batch_sizes=sizes, seed=3, process_count=process_count
    )
    with stream:
        out = []
        for _ in range(steps):
            batch = next(stream)
            out.append((stream.names[stream.last_bucket], batch))
        return out, stream.get_state()


def test_every_bucket_is_drawn_and_two_processes_agree_at_every_step(mixed):
    runs = [_streams(mixed, p)[0] for p in (0, 1)]
    names = [[n for n, _ in run] for run in runs]
    assert names[0] == names[1]  # both processes draw the same bucket at every step
    split, _ = _split_buckets(mixed)
    held = {b.name for b in split.buckets}
    assert all(len(m) >= 2 for m in split.members)  # a global batch of 2 in every bucket
    assert set(names[0]) == held  # every bucket is drawn within the first 40 steps
    for run in runs:
        for name, batch in run:
            h, w, t = map(int, name.split("x"))
            assert batch["video"].shape == (1, t, h, w, 3)
            assert batch["fps"].shape == (1,)
    # The two processes split each bucket's stream: together they read every clip of it.
    keys = {str(k) for run in runs for _, b in run for k in b["key"]}
    members = {int(i) for b, m in zip(split.buckets, split.members) if b.name in held for i in m}
    assert len(keys) == len(members)
    assert [n for n, _ in runs[0]].count("32x32x16") >= 2


def test_bucketed_stream_resumes_where_it_stopped(mixed):
    full, _ = _streams(mixed, 0, process_count=1, steps=12)
    _, state = _streams(mixed, 0, process_count=1, steps=5)
    split, _ = _split_buckets(mixed)
    c, tok = _config(), Tokenizer(mixed.parent / "tok.model")

    def make(k, bucket, b, seed):
        return pipeline.make_pipeline(
            c, mixed, tokenizer=tok, batch_size=b, seed=seed, bucket=bucket,
            members=split.members[k], process_index=0, process_count=1, worker_count=0,
        )  # fmt: skip

    with bucketed_stream(
        split.buckets, split.counts(), make, batch_sizes={b.name: 1 for b in split.buckets},
        seed=3, process_count=1,
    ) as again:  # fmt: skip
        again.peek(0)  # a warm-up read ahead changes nothing
        with pytest.raises(ValueError, match="saved before shape buckets"):
            again.set_state(again.streams[0].get_state())  # one stream's state, not a bucketed one
        with pytest.raises(ValueError, match=r"buckets .* differ from this run's"):
            again.set_state({**state, "buckets": dict(list(state["buckets"].items())[1:])})
        again.set_state(state)
        again.peek(len(again.names) - 1)
        rest = [next(again) for _ in range(7)]
    for (name, a), b in zip(full[5:], rest):
        assert list(a["key"]) == list(b["key"]), name
        np.testing.assert_array_equal(a["video"], b["video"])


def test_batch_sizes_keep_the_token_budget_and_buckets_validate():
    strides = bk.Strides(4, 4, (1, 2, 2))
    buckets = bk.check_buckets(((32, 32, 16), (32, 48, 16), (64, 64, 16), (32, 32, 1)), strides)
    sizes = bk.batch_sizes(buckets, 32, strides, divisor=4)
    tokens = [b.tokens(strides) for b in buckets]
    assert sizes[0] == 32
    for n, t in zip(sizes, tokens):
        assert n % 4 == 0 and n * t <= 32 * tokens[0] < (n + 4) * t
    assert bk.batch_sizes(buckets, 32, strides, divisor=4, explicit=(8, 8, 4, 64)) == (8, 8, 4, 64)
    with pytest.raises(ValueError, match="one batch per bucket"):
        bk.batch_sizes(buckets, 32, strides, divisor=4, explicit=(8, 6, 4, 64))
    c = _config()
    c.data.buckets = ((32, 44, 16),)
    with pytest.raises(Exception, match=r"\(32, 44, 16\).*nearest valid bucket is \(32, 48, 16\)"):
        check_static(c)
    w = bk.step_weights([10, 10, 30], [False, False, True], 0.5)
    assert w[2] / sum(w) == pytest.approx(0.5)
    schedule = bk.BucketSchedule([1, 3], seed=0)
    draws = [schedule(s) for s in range(4000)]
    assert abs(np.mean(draws) - 0.75) < 0.03  # steps follow the weights
