"""3D RoPE on a shared physical time axis."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdiff.models.rope import (
    ABS_FEATURES,
    absolute_video_features,
    apply_rope,
    audio_positions,
    audio_token_times,
    rope_angles,
    rope_split,
    video_positions,
    video_token_times,
)

HD = 32
SCALE = 25.0


def logits(q, k, pos_q, pos_k):
    """All q.k dot products after rotating by their positions."""
    rq = apply_rope(q, rope_angles(pos_q, HD, time_scale=SCALE))
    rk = apply_rope(k, rope_angles(pos_k, HD, time_scale=SCALE))
    return jnp.einsum("bqhd,bkhd->bhqk", rq, rk)


def test_rope_split_covers_head_dim():
    for hd in (8, 16, 32, 48, 64, 128):
        parts = rope_split(hd)
        assert sum(parts) == hd and all(p % 2 == 0 and p > 0 for p in parts)
        assert parts[0] >= hd // 2  # time gets at least half
    with pytest.raises(ValueError, match="even head_dim"):
        rope_split(6)


def test_dot_products_depend_only_on_relative_position():
    kq, kk, kp = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (1, 10, 2, HD))
    k = jax.random.normal(kk, (1, 10, 2, HD))
    pos = jax.random.uniform(kp, (1, 10, 3), maxval=4.0)  # fractional seconds and grid positions
    ref = logits(q, k, pos, pos)
    shift = jnp.array([0.37, 3.0, -5.0])
    np.testing.assert_allclose(logits(q, k, pos + shift, pos + shift), ref, atol=2e-4, rtol=1e-4)
    # Moving only the keys changes the logits (the rotation is not a no-op).
    moved = logits(q, k, pos, pos + jnp.array([0.1, 0.0, 0.0]))
    assert float(jnp.abs(moved - ref).max()) > 1e-2


def test_video_and_audio_tokens_at_same_time_share_temporal_angle():
    fps = 8.0
    tv = video_token_times(4, 1, fps, 4)
    ta = audio_token_times(50, 1, 25.0)
    # Video token 1 sits at 2.5 / 8 = 0.3125 s; audio token 7 at 7.5 / 25 = 0.3 s.
    vpos = video_positions(tv, (2, 3))
    apos = audio_positions(jnp.asarray([tv[1], ta[7]]), (2, 3))
    va = rope_angles(vpos, HD, time_scale=SCALE)
    aa = rope_angles(apos, HD, time_scale=SCALE)
    nt = rope_split(HD)[0] // 2
    video_tok = 1 * 2 * 3  # first token of the second temporal slice
    np.testing.assert_allclose(aa[0, 0, :nt], va[0, video_tok, :nt], rtol=1e-6)
    assert float(jnp.abs(aa[0, 1, :nt] - va[0, video_tok, :nt]).max()) > 1e-3
    # Audio sits at the centre of the video grid, for every audio token.
    np.testing.assert_allclose(apos[0, :, 1:], np.full((2, 2), [0.5, 1.0]))


def test_cross_modal_logits_unchanged_when_both_modalities_shift_in_time():
    kq, kk = jax.random.split(jax.random.key(1))
    tv = jnp.asarray(video_token_times(4, 1, 8.0, 4))
    ta = jnp.asarray(audio_token_times(12, 1, 25.0))
    pos = jnp.concatenate([video_positions(tv, (2, 2)), audio_positions(ta, (2, 2))], axis=1)
    n = pos.shape[1]
    q = jax.random.normal(kq, (1, n, 2, HD))
    k = jax.random.normal(kk, (1, n, 2, HD))
    ref = logits(q, k, pos, pos)
    for dt in (0.5, 1.234, 10.0):
        shifted = pos.at[..., 0].add(dt)
        np.testing.assert_allclose(logits(q, k, shifted, shifted), ref, atol=5e-4, rtol=1e-4)
    # Shifting the audio alone changes video<->audio logits.
    audio_only = pos.at[:, 16:, 0].add(0.5)
    changed = logits(q, k, pos, audio_only)[..., :16, 16:]
    assert float(jnp.abs(changed - ref[..., :16, 16:]).max()) > 1e-2


def test_video_token_times_follow_causal_vae_layout():
    # Latent 0 covers frame 0; latent k covers frames 4k-3..4k.
    np.testing.assert_allclose(
        video_token_times(4, 1, 8.0, 4), np.array([0.0, 2.5, 6.5, 10.5]) / 8.0
    )
    # Two latents per token: frames 0..4 and 5..12.
    np.testing.assert_allclose(video_token_times(4, 2, 8.0, 4), np.array([2.0, 8.5]) / 8.0)
    np.testing.assert_allclose(video_token_times(3, 1, 24.0, 4), np.array([0.0, 2.5, 6.5]) / 24.0)
    with pytest.raises(ValueError, match="patch_t"):
        video_token_times(3, 2, 8.0, 4)


def test_audio_token_times_are_span_midpoints():
    np.testing.assert_allclose(audio_token_times(4, 1, 25.0), [0.02, 0.06, 0.10, 0.14], rtol=1e-6)
    np.testing.assert_allclose(audio_token_times(4, 2, 25.0), [0.04, 0.12], rtol=1e-6)
    with pytest.raises(ValueError, match="audio_patch"):
        audio_token_times(5, 2, 25.0)


def test_absolute_features_are_mirror_symmetric_and_flag_the_first_frame():
    times = np.array([0.0, 0.3125, 0.8125], np.float32)
    f = np.asarray(absolute_video_features(times, (4, 6)))[0].reshape(3, 4, 6, ABS_FEATURES)
    assert np.isfinite(f).all()
    np.testing.assert_array_equal(
        f[..., -1], np.broadcast_to(np.arange(3)[:, None, None] == 0, (3, 4, 6))
    )
    # time features depend on the temporal token only
    np.testing.assert_allclose(f[:, 0, 0, :10], f[:, 3, 5, :10])
    rows, cols = f[..., 10:14], f[..., 14:18]  # sin of row, sin of column
    np.testing.assert_allclose(rows, -rows[:, ::-1], atol=1e-6)  # row i mirrors row H-1-i
    np.testing.assert_allclose(cols, -cols[:, :, ::-1], atol=1e-6)
    np.testing.assert_allclose(f[..., 18:22], f[:, ::-1, :, 18:22], atol=1e-6)  # cos: even
    # normalised coordinates: a 3x finer grid has the same features at the same place
    # (token 3i+1 of 12 rows is centred where token i of 4 rows is)
    big = np.asarray(absolute_video_features(times, (12, 18)))[0].reshape(3, 12, 18, ABS_FEATURES)
    np.testing.assert_allclose(big[:, 1::3, 1::3], f, atol=1e-5)


def test_video_tokens_at_the_same_time_share_the_temporal_angle_whatever_the_fps():
    """Two clips in one batch at 12 and 31.2 fps (frame i at i / fps s): the 12 fps clip's
    token 1 (frames 1-4, midpoint 2.5 / 12 s) and the 31.2 fps clip's token 2 (frames 5-8,
    6.5 / 31.2 s) are both at 0.2083 s, so their temporal angles are equal; tokens at
    other times differ. The batch goes through the path the DiT takes (``clip_times``)."""
    from flax import nnx

    from vdiff.config import load_config
    from vdiff.models.dit import DiT
    from vdiff.train.stages import dit_sizes

    c = load_config("tiny")
    model = nnx.eval_shape(lambda: DiT.from_config(c.model, dit_sizes(c), nnx.Rngs(0)))
    assert model.patch[0] == 1 and model.temporal_down == 4
    fps = jnp.asarray([12.0, 31.2])
    times = model.clip_times(fps, 5)  # what flow_loss passes as video_times
    np.testing.assert_allclose(times[0], video_token_times(5, 1, 12.0, 4), rtol=1e-6)
    np.testing.assert_allclose(times[1], video_token_times(5, 1, 31.2, 4), rtol=1e-6)
    angles = rope_angles(video_positions(times, (1, 1)), HD, time_scale=SCALE)  # (2, 5, HD/2)
    dt = rope_split(HD)[0] // 2
    np.testing.assert_allclose(angles[0, 1, :dt], angles[1, 2, :dt], rtol=1e-5)
    np.testing.assert_allclose(angles[0, 0], angles[1, 0])  # both first frames at 0 s
    assert not np.allclose(angles[0, 2, :dt], angles[1, 2, :dt])
