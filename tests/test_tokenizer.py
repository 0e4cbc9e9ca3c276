"""The sentencepiece caption tokenizer (data_pipelines.tokenizer)."""

import itertools
import pickle
import warnings

import numpy as np
import pytest

from data_pipelines.tokenizer import EOS_ID, PAD_ID, UNK_ID, Tokenizer, train_tokenizer

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle"]
MOVES = ["bounces to the left", "moves up", "drifts right", "falls down"]


def corpus() -> list[str]:
    return [
        f"a {c} {s} {m} on a {b} background"
        for c, s, m, b in itertools.product(COLOURS, SHAPES, MOVES, COLOURS[:3])
    ]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = train_tokenizer(corpus(), tmp_path_factory.mktemp("tok") / "spm", vocab_size=400)
    return Tokenizer(path)


UNSEEN = [
    "un cercle rouge — 赤い円 🎈",
    "Ωmega  double  spaces\tand a tab",
    " leading and trailing ",
    "a red circle bounces to the left on a blue background",
    "ñ é ü ß — ☃ 🫠 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


def test_any_unicode_round_trips_without_unk(tok):
    ids, mask = tok.encode(UNSEEN, 96)
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == (len(UNSEEN), 96)
    assert not mask[:, -1].any()  # long enough: nothing truncated
    assert UNK_ID not in ids
    assert tok.decode(ids) == UNSEEN
    assert all(tok.decode(row) == text for row, text in zip(ids, UNSEEN))


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_in_domain_captions_use_learned_pieces(tmp_path, model_type):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        path = train_tokenizer(corpus(), tmp_path / "spm", vocab_size=400, model_type=model_type)
    t = Tokenizer(path)
    text = corpus()[5]
    ids, mask = t.encode(text, 32)
    assert t.decode(ids[0]) == text
    if model_type == "bpe":  # learned pieces: far fewer tokens than UTF-8 bytes
        assert mask.sum() < len(text.encode()) // 3


def test_pad_truncate_and_mask(tok):
    ids, mask = tok.encode(["a red circle", "", corpus()[0] * 4], 12)
    assert (mask == (ids != PAD_ID)).all()
    n = mask[0].sum()
    assert ids[0, n - 1] == EOS_ID and not mask[0, n:].any()
    assert mask[1].sum() == 1 and ids[1, 0] == EOS_ID  # empty caption: just the end token
    assert mask[2].all() and ids[2, -1] == EOS_ID  # truncated, end token kept
    assert tok.decode(ids[1]) == ""
    assert corpus()[0].startswith(tok.decode(ids[2]))
    raw, raw_mask = tok.encode("a red circle", 12, add_eos=False)
    assert raw_mask.sum() == n - 1 and EOS_ID not in raw


def test_bytes_and_pickle_give_the_same_tokenizer(tok):
    clone = Tokenizer.from_bytes(tok.model_bytes())
    again = pickle.loads(pickle.dumps(tok))  # how grain hands it to worker processes
    assert len(pickle.dumps(tok)) < len(tok.model_bytes()) + 200  # no processor state inside
    for other in (clone, again):
        assert other.vocab_size == tok.vocab_size
        np.testing.assert_array_equal(other.encode(UNSEEN, 64)[0], tok.encode(UNSEEN, 64)[0])


def test_small_corpus_and_bad_arguments(tmp_path):
    with pytest.warns(UserWarning, match="too small"):
        path = train_tokenizer(["a red circle", "a blue square"], tmp_path / "small", 512)
    small = Tokenizer(path)
    assert 260 < small.vocab_size < 512
    ids, _ = small.encode(UNSEEN, 128)
    assert small.decode(ids) == UNSEEN
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(["abc"], tmp_path / "tiny", vocab_size=200)
    with pytest.raises(ValueError, match="non-empty"):
        train_tokenizer(["", ""], tmp_path / "none")
    with pytest.raises(ValueError, match="outside"):
        small.decode([5, small.vocab_size])
    with pytest.raises(ValueError, match="sentencepiece"):
        Tokenizer.from_bytes(b"not a model")


def test_rare_characters_fall_back_to_bytes(tmp_path):
    # More distinct characters than the vocabulary has room for: the rare ones become bytes.
    common = [chr(0x4E00 + i) for i in range(60)]
    rare = [chr(0x5000 + i) for i in range(200)]
    texts = ["".join(common[(i + j) % 60] for j in range(30)) for i in range(400)] + rare
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t = Tokenizer(train_tokenizer(texts, tmp_path / "cjk", vocab_size=400))
    assert t.vocab_size <= 400
    ids, _ = t.encode(texts, 64)
    assert UNK_ID not in ids and t.decode(ids) == texts
    # Frequent characters beyond the vocabulary cannot all fall back: a clear error.
    with pytest.raises(ValueError, match="raise vocab_size"):
        train_tokenizer(rare * 3, tmp_path / "many", vocab_size=400)
