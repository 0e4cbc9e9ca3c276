"""Oracle scores on ground-truth shapes clips decoded from mp4, and their fall to chance."""

import json
import re

import numpy as np
import pytest
from scipy import ndimage

from data_pipelines.audio import resample
from data_pipelines.mp4 import decode_mp4
from data_pipelines.shapes.scene import sample_scene, scene_rng
from data_pipelines.shapes.synth import synth_dataset
from vdiff.eval.oracle import analyze_video, parse_caption, score_clip, score_clips
from vdiff.eval.sync import aggregate, audio_onsets, sync_counts, sync_scores, video_bounces

NUM_CLIPS = 64
KEYS = ("colour_acc", "shape_acc", "direction_acc", "background_acc")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """64 val clips written by synth and read back from their mp4 files, analysed once."""
    root = tmp_path_factory.mktemp("shapes")
    synth_dataset(root, NUM_CLIPS, seed=123, split="val", progress=False)
    out = []
    for line in (root / "val" / "meta.jsonl").read_text().splitlines():
        meta = json.loads(line)
        frames, fps, audio, sr = decode_mp4((root / "val" / meta["video"]).read_bytes())
        det = analyze_video(frames)
        out.append(
            {
                "meta": meta,
                "frames": frames,
                "fps": fps,
                "audio": audio,
                "sr": sr,
                "det": det,
                "bounces": video_bounces(frames, fps, det),
            }
        )
    return out


def _oracle(clips, captions):
    rows = [score_clip(c["frames"], cap, c["det"]) for c, cap in zip(clips, captions)]
    return {k: float(np.mean([r[k] for r in rows])) for k in KEYS}


def _sync(clips, audios):
    return aggregate(
        [
            sync_counts(audio_onsets(a, c["sr"]), c["bounces"], c["fps"], a)
            for c, a in zip(clips, audios)
        ]
    )


def test_parse_caption_reads_every_template():
    for i in range(150):
        s = sample_scene(scene_rng(0, "val", i))
        attrs = parse_caption(s.caption)
        assert attrs["background"] == s.background
        assert attrs["shapes"] == [(x.colour, x.shape, x.direction) for x in s.shapes]
    assert parse_caption("an orange triangle slides leftwards on a gray background") == {
        "background": "gray",
        "shapes": [("orange", "triangle", "left")],
    }


def test_oracle_ground_truth(clips):
    scores = _oracle(clips, [c["meta"]["caption"] for c in clips])
    print("\noracle on ground truth:", {k: round(v, 4) for k, v in scores.items()})
    assert all(scores[k] >= 0.99 for k in KEYS)
    # Detections also agree with the stored ground truth.
    for c in clips:
        assert set(c["det"]["objects"]) == {s["colour"] for s in c["meta"]["shapes"]}
        assert c["det"]["background"] == c["meta"]["background"]


def test_oracle_shuffled_captions_fall_to_chance(clips):
    captions = [c["meta"]["caption"] for c in clips]
    shuffled = captions[7:] + captions[:7]
    scores = _oracle(clips, shuffled)
    print("\noracle on shuffled captions:", {k: round(v, 4) for k, v in scores.items()})
    # Chance: ~2 of 8 colours present, then 1/3 shapes and 1/4 directions.
    assert scores["colour_acc"] < 0.5
    assert scores["shape_acc"] < 0.3
    assert scores["direction_acc"] < 0.3
    assert scores["background_acc"] < 0.5


def _swap_shape_words(caption: str) -> str:
    swap = {"circle": "square", "square": "triangle", "triangle": "circle"}
    return re.sub(r"circle|square|triangle", lambda m: swap[m.group(0)], caption)


def test_oracle_swapped_shape_words_score_zero(clips):
    """Every shape named as another one: colour and direction stand, shape must not."""
    scores = _oracle(clips, [_swap_shape_words(c["meta"]["caption"]) for c in clips])
    assert scores["colour_acc"] >= 0.99
    assert scores["shape_acc"] <= 0.02


@pytest.mark.parametrize("corrupt", ["noise", "blur"])
def test_oracle_reads_shapes_through_noise_and_blur(clips, corrupt):
    """Pixel noise (std 12 of 255) or a 0.8 px blur leave the shapes plain to see; the oracle
    must still read them (a bounding-box fill rule read 20% of them wrong under this noise)."""
    rng = np.random.default_rng(0)
    frames = [c["frames"][:8].astype(np.float32) for c in clips]
    if corrupt == "noise":
        frames = [f + rng.normal(0.0, 12.0, f.shape) for f in frames]
    else:
        frames = [ndimage.gaussian_filter(f, (0, 0.8, 0.8, 0)) for f in frames]
    frames = [np.clip(np.round(f), 0, 255).astype(np.uint8) for f in frames]
    scores = score_clips(list(zip(frames, [c["meta"]["caption"] for c in clips])))
    assert scores["colour_acc"] >= 0.99
    assert scores["shape_acc"] >= 0.97


def test_score_clips_mean_and_errors(clips):
    pairs = [(c["frames"], c["meta"]["caption"]) for c in clips[:4]]
    out = score_clips(pairs)
    assert out["n"] == 4 and all(0.99 <= out[k] <= 1.0 for k in KEYS)
    with pytest.raises(ValueError, match="no coloured shape"):
        score_clip(clips[0]["frames"], "a blue background")
    with pytest.raises(ValueError, match="uint8"):
        analyze_video(clips[0]["frames"].astype(np.float32))


def test_video_bounces_match_ground_truth(clips):
    found = truth = 0
    for c in clips:
        for e in c["meta"]["bounces"]:
            truth += 1
            found += any(
                b["colour"] == e["colour"] and abs(b["frame"] - e["frame"]) <= 0.25
                for b in c["bounces"]
            )
        assert len(c["bounces"]) == len(c["meta"]["bounces"])
    assert truth > NUM_CLIPS and found == truth


def test_sync_ground_truth_and_shifted_audio(clips):
    exact = _sync(clips, [c["audio"] for c in clips])
    print("\nsync on ground truth:", {k: round(v, 4) for k, v in exact.items()})
    assert exact["f1"] >= 0.99 and exact["binding_acc"] >= 0.99
    assert exact["offset_ms"] < 20
    f1 = [exact["f1"]]
    for k in (1, 2, 4):
        shifted = []
        for c in clips:
            n = round(k / c["fps"] * c["sr"])
            shifted.append(np.concatenate([np.zeros(n, np.float32), c["audio"][:-n]]))
        f1.append(_sync(clips, shifted)["f1"])
    print("sync F1 at audio shifts of 0, 1, 2, 4 frames:", [round(f, 4) for f in f1])
    assert f1[0] > f1[1] > f1[2] >= f1[3]


def test_sync_shuffled_pairs_are_low(clips):
    audios = [c["audio"] for c in clips]
    shuffled = _sync(clips, audios[5:] + audios[:5])
    print("\nsync on shuffled audio/video:", {k: round(v, 4) for k, v in shuffled.items()})
    assert shuffled["f1"] < 0.6 and shuffled["binding_acc"] < 0.5


def test_sync_scores_single_clip(clips):
    c = clips[0]
    out = sync_scores(c["frames"], c["fps"], c["audio"], c["sr"])
    assert out["f1"] == 1.0 and out["n_bounces"] == len(c["meta"]["bounces"])
    # Resampled audio gives the same answer.
    out44 = sync_scores(c["frames"], c["fps"], resample(c["audio"], c["sr"], 44100), 44100)
    assert out44["f1"] == 1.0
    silent = sync_scores(c["frames"], c["fps"], np.zeros_like(c["audio"]), c["sr"])
    assert silent["recall"] == 0.0 and silent["n_onsets"] == 0
