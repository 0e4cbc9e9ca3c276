"""The shapes dataset: scene rules, rendering, mp4 round trip and byte-identical synthesis."""

import functools
import json

import numpy as np
import pytest

from data_pipelines.mp4 import decode_mp4, encode_mp4
from data_pipelines.shapes.render import render_audio, render_video
from data_pipelines.shapes.scene import (
    BACKGROUNDS,
    COLOURS,
    HELDOUT_PAIRS,
    MIN_GAP_FRAMES,
    MIN_LUMA_CONTRAST,
    NO_BOUNCE_END,
    NO_BOUNCE_START,
    PITCHES,
    bounce_events,
    luma,
    sample_scene,
    scene_rng,
    shape_positions,
    trajectory,
)
from data_pipelines.shapes.synth import synth_dataset, synth_splits


@functools.cache
def _scenes(split, n, heldout="exclude", seed=0):
    return tuple(sample_scene(scene_rng(seed, split, i), heldout=heldout) for i in range(n))


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_dataset(tmp_path):
    kw = dict(num_train=6, num_val=3, num_heldout=3, progress=False)
    synth_splits(tmp_path / "a", seed=11, **kw)
    synth_splits(tmp_path / "b", seed=11, **kw)
    synth_splits(tmp_path / "c", seed=12, **kw)
    a, b, c = (_files(tmp_path / d) for d in "abc")
    assert len(a) == 12 + 6  # 12 mp4 files + captions/meta per split
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_worker_processes_give_the_same_bytes(tmp_path):
    synth_dataset(tmp_path / "one", 6, seed=5, progress=False)
    synth_dataset(tmp_path / "two", 6, seed=5, workers=2, progress=False)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")


def test_jsonl_layout_and_counts(tmp_path):
    counts = synth_dataset(tmp_path, 5, seed=3, split="val", progress=False)
    lines = (tmp_path / "val" / "captions.jsonl").read_text().splitlines()
    metas = [json.loads(x) for x in (tmp_path / "val" / "meta.jsonl").read_text().splitlines()]
    assert counts["clips"] == len(lines) == len(metas) == 5
    for i, (line, meta) in enumerate(zip(lines, metas)):
        row = json.loads(line)
        assert set(row) == {"video", "caption"}
        assert row["video"] == f"videos/val_{i:06d}.mp4" == meta["video"]
        assert row["caption"] == meta["caption"]
        # Video paths are relative to the split folder.
        frames, fps, audio, sr = decode_mp4((tmp_path / "val" / row["video"]).read_bytes())
        assert frames.shape == (16, 32, 32, 3) and fps == 8.0
        assert sr == 16000 and audio.shape == (32000,)
        assert len(meta["shapes"][0]["trajectory"]) == 16
    assert counts["bounces"] == sum(len(m["bounces"]) for m in metas)


def test_heldout_pairs_never_in_train_and_always_in_heldout():
    held = set(HELDOUT_PAIRS)
    for split, n in (("train", 200), ("val", 100)):
        for s in _scenes(split, n):
            assert not any((x.colour, x.shape) in held for x in s.shapes)
    for s in _scenes("val_heldout", 50, heldout="require"):
        assert (s.shapes[0].colour, s.shapes[0].shape) in held


def test_scene_rules():
    per_shape, clips_with_bounce = [], 0
    for s in _scenes("train", 200):
        colours = [x.colour for x in s.shapes]
        assert 1 <= len(colours) <= 3 and len(set(colours)) == len(colours)
        assert s.background in BACKGROUNDS and s.background not in colours
        bg = luma(BACKGROUNDS[s.background])
        assert all(abs(bg - luma(COLOURS[c])) >= MIN_LUMA_CONTRAST for c in colours)
        events = bounce_events(s)
        times = [e["frame"] for e in events]
        assert all(NO_BOUNCE_START < t < s.num_frames - NO_BOUNCE_END for t in times)
        assert all(np.diff(times) >= MIN_GAP_FRAMES)
        clips_with_bounce += bool(events)
        traj = trajectory(s)
        for i, x in enumerate(s.shapes):
            per_shape.append(sum(e["shape"] == i for e in events))
            # The caption's direction is the main motion over the first frames.
            dx, dy = traj[3, i] - traj[0, i]
            expect = {"left": -dx, "right": dx, "up": -dy, "down": dy}[x.direction]
            assert expect > 0 and expect >= max(abs(dx), abs(dy)) - 1e-9
            # Shapes stay on the canvas.
            assert np.all(traj[:, i] >= x.size / 2 - 1e-9)
            assert np.all(traj[:, i] <= s.resolution - x.size / 2 + 1e-9)
    per_shape = np.asarray(per_shape)
    assert np.mean((per_shape >= 1) & (per_shape <= 3)) >= 0.95
    assert clips_with_bounce == 200


def test_bounce_events_are_exactly_the_turns():
    for s in _scenes("train", 200)[:40]:
        # Sample the motion finely: velocity flips sign exactly at the listed contact times.
        t = np.linspace(0, s.num_frames, 64001)
        flips = []
        for i, x in enumerate(s.shapes):
            p = shape_positions(x, s.resolution, t)
            for ax, name in enumerate("xy"):
                sign = np.sign(np.diff(p[:, ax]))
                for j in np.nonzero(sign[1:] * sign[:-1] < 0)[0]:
                    flips.append((i, name, t[j + 1]))
        events = [(e["shape"], e["axis"], e["frame"]) for e in bounce_events(s)]
        assert len(flips) == len(events)
        for (i, ax, tf), (j, bx, te) in zip(sorted(flips, key=lambda f: f[2]), events):
            assert (i, ax) == (j, bx) and abs(tf - te) < 1e-3


def test_captions_vary():
    captions = [s.caption for s in _scenes("train", 200)]
    assert len(set(captions)) >= 180  # single-shape captions may repeat
    assert any(c.startswith("on a") or c.startswith("on an") for c in captions)
    assert any(c.endswith("background") for c in captions)
    assert any(" and " in c for c in captions)


def test_render_video_draws_shapes_at_their_positions():
    s = sample_scene(scene_rng(0, "train", 5))
    frames = render_video(s)
    assert frames.dtype == np.uint8 and frames.shape == (16, 32, 32, 3)
    traj = trajectory(s)
    bg = np.asarray(BACKGROUNDS[s.background])
    checked = 0
    for t in (0, 7, 15):
        # Shapes cover well under half the canvas: most pixels are exactly the background.
        assert np.mean(np.all(frames[t] == bg, axis=-1)) > 0.5
        for i, x in enumerate(s.shapes):
            cx, cy = traj[t, i]
            if any(
                np.all(np.abs(traj[t, i] - traj[t, j]) < (x.size + o.size) / 2)
                for j, o in enumerate(s.shapes)
                if j != i
            ):
                continue  # shapes may overlap away from the first frames and the bounces
            if x.shape == "triangle":
                cy += x.size / 4  # the centre is near the apex; the base half is solid
            assert np.array_equal(frames[t, int(cy), int(cx)], COLOURS[x.colour])
            checked += 1
    assert checked >= 2


def test_render_audio_clicks_at_bounces():
    s = sample_scene(scene_rng(0, "train", 9))
    wave = render_audio(s)
    assert wave.dtype == np.float32 and wave.shape == (32000,)
    events = bounce_events(s)
    assert events
    for e in events:
        start = int(np.ceil(e["time_s"] * 16000))
        assert np.abs(wave[max(0, start - 40) : start]).max() < 1e-6  # silent before
        assert np.abs(wave[start : start + 160]).max() > 0.2  # loud right after
        assert e["pitch_hz"] == PITCHES[e["colour"]]
    assert np.abs(wave).max() <= 0.5 + 1e-6


def test_encode_mp4_deterministic_and_checked():
    s = sample_scene(scene_rng(4, "train", 0))
    frames, audio = render_video(s), render_audio(s)
    a = encode_mp4(frames, 8.0, audio)
    assert a == encode_mp4(frames, 8.0, audio)
    decoded, fps, wave, sr = decode_mp4(a)
    assert fps == 8.0 and sr == 16000 and decoded.shape == frames.shape
    # H.264 + yuv420p: edges smear, interiors stay close.
    assert np.median(np.abs(decoded.astype(int) - frames)) <= 2
    peak = int(np.argmax(np.abs(audio)))
    assert abs(int(np.argmax(np.abs(wave))) - peak) < 80  # AAC keeps click timing (< 5 ms)
    with pytest.raises(ValueError, match="even"):
        encode_mp4(np.zeros((2, 31, 32, 3), np.uint8), 8.0)
    with pytest.raises(ValueError, match="uint8"):
        encode_mp4(np.zeros((2, 32, 32, 3), np.float32), 8.0)
    with pytest.raises(ValueError, match="fps"):
        encode_mp4(frames, 0.0)
    with pytest.raises(ValueError, match="mp4"):
        decode_mp4(b"not an mp4 at all")


def test_bad_arguments_raise(tmp_path):
    with pytest.raises(ValueError, match="heldout"):
        sample_scene(scene_rng(0, "train", 0), heldout="sometimes")
    with pytest.raises(ValueError, match="even"):
        synth_dataset(tmp_path, 1, resolution=33, progress=False)
    with pytest.raises(ValueError, match="more frames"):
        sample_scene(scene_rng(0, "train", 0), num_frames=3, fps=1.0)
