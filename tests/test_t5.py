"""Pretrained T5 v1.1 / UMT5 caption encoders: parity with the Hugging Face reference, the
sharded loader, the tokenizer, and the one-line errors of a bad folder.

The fixtures in tests/fixtures/text_encoders were written by make_fixtures.py there with
PyTorch and transformers (which this suite does not need): tiny random encoders, their
safetensors (UMT5 sharded with an index), spiece.model, and the reference's token ids and
hidden states for a few captions (empty, non-ASCII, whitespace, truncated ones included).
"""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from vdiff.caption_encoder import CaptionEncoder, load_tokenizer, local_mesh
from vdiff.errors import UserError
from vdiff.models.t5 import relative_buckets
from vdiff.models.t5_weights import load_t5

FIXTURES = Path(__file__).parent / "fixtures" / "text_encoders"
ENCODERS = ("t5_v1_1", "umt5")


def _reference(name):
    folder = FIXTURES / name
    return (
        folder,
        load_file(folder / "reference.safetensors"),
        json.loads((folder / "reference.json").read_text()),
    )


@pytest.mark.parametrize("name", ENCODERS)
def test_hidden_states_and_token_ids_match_the_reference(name):
    folder, ref, meta = _reference(name)
    model = load_t5(folder, dtype=jnp.float32)
    tok = load_tokenizer(folder, model.spec.vocab_size)
    ids, mask = tok.encode(meta["captions"], meta["max_len"])
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(mask, ref["attention_mask"].astype(bool))
    assert not mask[:, -1].all() and mask[:, -1].any()  # padded and truncated captions
    out = model(jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(out), ref["hidden_states"], rtol=0, atol=1e-5)


def test_umt5_learns_a_position_bias_per_block_and_t5_shares_one():
    t5 = load_t5(FIXTURES / "t5_v1_1", dtype=jnp.float32)
    umt5 = load_t5(FIXTURES / "umt5", dtype=jnp.float32)
    assert [b.attn.relative_bias is not None for b in t5.blocks] == [True, False]
    assert all(b.attn.relative_bias is not None for b in umt5.blocks)


def test_relative_buckets_are_bidirectional_and_log_spaced():
    b = relative_buckets(40, num_buckets=8, max_distance=20)
    assert b[0, 0] == 0 and b[0, 1] == 5 and b[1, 0] == 1  # keys after the query: upper half
    assert b[0, 39] == 7 and b[39, 0] == 3  # far keys share the last bucket of each half
    assert np.array_equal(b[5, 5:30], b[10, 10:35])  # depends on the offset only


@pytest.mark.parametrize("name", ENCODERS)
def test_fsdp8_sharded_encoder_matches_one_device(devices, name):
    folder, ref, meta = _reference(name)
    kw = dict(max_len=meta["max_len"], batch_size=8, dtype=jnp.float32)
    one = CaptionEncoder(folder, mesh=local_mesh(devices[:1]), **kw)
    rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"))
    eight = CaptionEncoder(folder, mesh=local_mesh(devices), rules=rules, **kw)
    embed = eight.state["embed"].get_value()
    assert embed.sharding.shard_shape(embed.shape)[1] == embed.shape[1] // 8  # split, not copied
    per_device = eight.param_bytes_per_device()
    assert len(per_device) == 8 and max(per_device.values()) < one.total_param_bytes() / 4
    a, mask_a = one.encode(meta["captions"])
    b, mask_b = eight.encode(meta["captions"])
    np.testing.assert_array_equal(mask_a, mask_b)
    np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=0, atol=1e-2)  # bfloat16 out
    # float32 before the bfloat16 rounding: same numbers within float32 reassociation.
    ids, mask = one.tokenizer.encode(meta["captions"], meta["max_len"])
    full = [
        np.asarray(
            jax.jit(lambda g, s, i, m: __import__("flax").nnx.merge(g, s)(i, m))(
                e.graphdef, e.state, jnp.asarray(ids), jnp.asarray(mask)
            )
        )
        for e in (one, eight)
    ]
    np.testing.assert_allclose(full[0], full[1], rtol=0, atol=1e-5)
    np.testing.assert_allclose(full[0], ref["hidden_states"], rtol=0, atol=1e-5)


def test_empty_caption_is_one_end_token():
    folder, _, _ = _reference("umt5")
    enc = CaptionEncoder(folder, max_len=16, batch_size=4, dtype=jnp.float32)
    emb, mask = enc.empty()
    assert emb.shape == (16, enc.width) and mask.tolist() == [True] + [False] * 15
    full, _ = enc.encode(["", "a red ball"])
    np.testing.assert_array_equal(np.float32(full[0]), np.float32(emb))


# ----------------------------------------------------------------------------- errors


def _copy(name, tmp_path) -> Path:
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst)
    return dst


def _rewrite(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_missing_tensor_names_file_and_key(tmp_path):
    folder = _copy("t5_v1_1", tmp_path)
    key = "encoder.block.1.layer.1.DenseReluDense.wi_1.weight"
    _rewrite(folder, lambda t: t.pop(key))
    with pytest.raises(UserError, match=f"model.safetensors: tensor '{key}' is missing"):
        load_t5(folder)


def test_wrong_shape_names_file_key_and_shapes(tmp_path):
    folder = _copy("t5_v1_1", tmp_path)
    key = "encoder.block.0.layer.0.SelfAttention.o.weight"
    _rewrite(folder, lambda t: t.__setitem__(key, t[key][:, :16].copy()))
    with pytest.raises(
        UserError, match=r"tensor '.*o\.weight' has shape \[32, 16\].*needs \[32, 32\]"
    ):
        load_t5(folder)


def test_unexpected_tensor_is_refused_but_a_decoder_is_skipped(tmp_path):
    folder = _copy("t5_v1_1", tmp_path)
    _rewrite(
        folder, lambda t: t.update({"decoder.final_layer_norm.weight": np.ones(32, np.float32)})
    )
    load_t5(folder)  # a whole encoder-decoder checkpoint loads its encoder
    _rewrite(
        folder,
        lambda t: t.update({"encoder.block.2.layer.0.layer_norm.weight": np.ones(32, np.float32)}),
    )
    with pytest.raises(
        UserError, match=r"unexpected tensor 'encoder\.block\.2\.layer\.0\.layer_norm\.weight'"
    ):
        load_t5(folder)


def test_vocabulary_that_does_not_fit_the_embedding(tmp_path):
    folder = _copy("t5_v1_1", tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vocab_size"] = 100
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        UserError, match=r"spiece.model has \d+ pieces but the encoder embeds 100 ids"
    ):
        CaptionEncoder(folder, max_len=8)


def test_missing_spiece_model(tmp_path):
    folder = _copy("umt5", tmp_path)
    (folder / "spiece.model").unlink()
    with pytest.raises(UserError, match=r"spiece\.model is missing"):
        CaptionEncoder(folder, max_len=8)


def test_missing_shard_and_unsupported_model(tmp_path):
    folder = _copy("umt5", tmp_path)
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(UserError, match=f"{shard.name} is missing"):
        load_t5(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "feed_forward_proj": "relu"}))
    with pytest.raises(UserError, match="feed_forward_proj='relu'"):
        load_t5(folder)
