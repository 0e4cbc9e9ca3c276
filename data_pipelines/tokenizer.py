"""Caption tokenizers: sentencepiece models, ids padded and truncated to a fixed length.

- :class:`Tokenizer`: a small model trained on the dataset's own captions (the internal
  text encoder). Byte fallback is on and normalisation is off, so any Unicode caption
  encodes without unknown tokens and decodes back to exactly the same text. Ids:
  0 = pad, 1 = unk, 2 = bos, 3 = eos.
- :class:`PretrainedTokenizer`: the ``spiece.model`` a pretrained T5 / mT5 / UMT5 ships
  with, with that model's own pad and end ids, giving the ids of Hugging Face's
  ``T5Tokenizer`` (the end token appended, truncation keeping it).

:class:`Tokenizer` holds only the serialized model proto and loads the sentencepiece processor
lazily, so it pickles cheaply into grain worker processes and can be stored in checkpoints and
export bundles as plain bytes.
"""

import collections
import io
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
_NUM_SPECIAL = 4
_NUM_BYTES = 256  # byte-fallback pieces <0x00> ... <0xFF>
_MIN_COVERAGE = 0.98


def _coverage_for(captions: Sequence[str], vocab_size: int) -> float:
    """Character coverage that leaves room for the specials and 256 byte pieces.

    Characters outside the coverage fall back to bytes, which still round-trip.
    sentencepiece accepts coverages down to 0.98 only.
    """
    counts = collections.Counter(ch for text in captions for ch in text)
    room = vocab_size - _NUM_SPECIAL - _NUM_BYTES - 1
    if len(counts) <= room:
        return 1.0
    freqs = np.sort(np.fromiter(counts.values(), np.float64))[::-1]
    covered = freqs[: max(room, 1)].sum() / freqs.sum()
    # sentencepiece keeps characters while the running coverage is below the target, so aim
    # a little under the share of the `room` most frequent ones.
    return float(np.clip(covered * 0.999, _MIN_COVERAGE, 1.0))


def train_tokenizer(
    captions: Iterable[str],
    model_prefix,
    vocab_size: int = 512,
    *,
    model_type: str = "bpe",
) -> str:
    """Trains a sentencepiece model on captions and writes ``{model_prefix}.model``.

    Small corpora cannot fill a large vocabulary; the trainer then stops early
    (``hard_vocab_limit=False``) and the model is smaller than ``vocab_size``. BPE is the
    default because on small templated caption sets (the shapes dataset) it learns whole
    words, while unigram stops at a few dozen sub-word pieces once the 256 byte pieces are in.

    Args:
        captions: Caption strings.
        model_prefix: Output path without the ``.model`` suffix.
        vocab_size: Target vocabulary size (upper bound); at least 261.
        model_type: ``"unigram"`` or ``"bpe"``.

    Returns:
        The path of the written ``.model`` file.

    Raises:
        ValueError: If there are no captions or ``vocab_size`` is too small.
    """
    texts = [t for t in captions if t]
    if not texts:
        raise ValueError("train_tokenizer needs at least one non-empty caption")
    if vocab_size <= _NUM_SPECIAL + _NUM_BYTES:
        raise ValueError(
            f"vocab_size={vocab_size} too small: byte fallback needs "
            f"{_NUM_SPECIAL + _NUM_BYTES} ids plus room for pieces"
        )
    if model_type not in ("unigram", "bpe"):
        raise ValueError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
    proto = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=proto,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=True,
            character_coverage=_coverage_for(texts, vocab_size),
            hard_vocab_limit=False,
            # Identity normalisation and kept whitespace: decode(encode(x)) == x exactly.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            num_threads=min(8, os.cpu_count() or 1),
            minloglevel=2,
        )
    except RuntimeError as e:
        if "required_chars" in str(e):
            raise ValueError(
                f"vocab_size={vocab_size} is too small for the captions' characters: byte "
                "fallback can take only the rarest 2% of them; raise vocab_size"
            ) from e
        raise ValueError(f"sentencepiece training failed (vocab_size={vocab_size}): {e}") from e
    model = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    if model.vocab_size() < vocab_size:
        warnings.warn(
            f"caption corpus too small for vocab_size={vocab_size}; "
            f"trained {model.vocab_size()} pieces",
            stacklevel=2,
        )
    path = Path(f"{model_prefix}.model")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(proto.getvalue())
    return str(path)


class Tokenizer:
    """Encodes captions to fixed-length id arrays and back.

    Args:
        path: A ``.model`` file written by :func:`train_tokenizer`.
    """

    def __init__(self, path):
        self._init_from_proto(Path(path).read_bytes())

    @classmethod
    def from_bytes(cls, model_bytes: bytes) -> "Tokenizer":
        """Builds a tokenizer from serialized model bytes (see :meth:`model_bytes`)."""
        tok = cls.__new__(cls)
        tok._init_from_proto(bytes(model_bytes))
        return tok

    pad_id, eos_id, bos_id = PAD_ID, EOS_ID, BOS_ID

    def _init_from_proto(self, proto: bytes) -> None:
        self._proto = proto
        self._sp = None
        self._check_ids()

    def _check_ids(self) -> None:
        if self.sp.pad_id() != PAD_ID or self.sp.eos_id() != EOS_ID:
            raise ValueError(
                f"tokenizer model has pad id {self.sp.pad_id()} and eos id {self.sp.eos_id()}; "
                f"vdiff needs pad={PAD_ID}, eos={EOS_ID} (train it with train_tokenizer)"
            )

    @property
    def sp(self) -> spm.SentencePieceProcessor:
        """The sentencepiece processor, loaded on first use (also after unpickling)."""
        if self._sp is None:
            try:
                self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
            except RuntimeError as e:
                raise ValueError(f"not a sentencepiece model: {e}") from e
        return self._sp

    def model_bytes(self) -> bytes:
        """The serialized model, for checkpoints and export bundles."""
        return self._proto

    @property
    def vocab_size(self) -> int:
        """Number of ids (every id is below this)."""
        return self.sp.vocab_size()

    def encode(
        self, texts: str | Sequence[str], length: int, *, add_eos: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Tokenizes, truncates and pads captions.

        An end token is kept even after truncation, so an empty caption still has one real
        token and no row is all padding (attention over an all-masked row is undefined).

        Args:
            texts: One caption or a sequence of captions.
            length: Output length per caption.
            add_eos: Append the end-of-caption id.

        Returns:
            ids int32 (N, length) and mask bool (N, length), True on real tokens.
        """
        if length <= 0:
            raise ValueError(f"length must be positive, got {length}")
        if isinstance(texts, str):
            texts = [texts]
        pieces = self.sp.encode(list(texts)) if len(texts) else []
        ids = np.full((len(pieces), length), self.pad_id, np.int32)
        mask = np.zeros((len(pieces), length), bool)
        for row, seq in enumerate(pieces):
            seq = [*seq[: length - 1], self.eos_id] if add_eos else seq[:length]
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = True
        return ids, mask

    def decode(self, ids) -> str | list[str]:
        """Turns ids back into text, stopping at the first end token and dropping padding.

        Args:
            ids: One id sequence (1-D) or a batch (2-D).

        Returns:
            A string for 1-D input, a list of strings for 2-D input.
        """
        arr = np.asarray(ids)
        if arr.ndim == 2:
            return [self.decode(row) for row in arr]
        if arr.ndim != 1:
            raise ValueError(f"decode expects 1-D or 2-D ids, got shape {arr.shape}")
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(
                f"ids outside [0, {self.vocab_size}): min {arr.min()}, max {arr.max()}"
            )
        out = []
        for i in arr.tolist():
            if i == self.eos_id:
                break
            if i not in (self.pad_id, self.bos_id):
                out.append(i)
        return self.sp.decode(out)

    def __getstate__(self) -> dict:
        return {"proto": self._proto}

    def __setstate__(self, state: dict) -> None:
        self._proto = state["proto"]
        self._sp = None
        self._check_ids()


class PretrainedTokenizer(Tokenizer):
    """A pretrained encoder's ``spiece.model`` (T5 / mT5 / UMT5), with its own special ids.

    Args:
        path: The ``spiece.model`` file.

    Raises:
        ValueError: If the file is not a sentencepiece model or has no pad or end id.
    """

    def _check_ids(self) -> None:
        self.pad_id, self.eos_id, self.bos_id = self.sp.pad_id(), self.sp.eos_id(), -1
        if self.pad_id < 0 or self.eos_id < 0:
            raise ValueError(
                f"sentencepiece model has pad id {self.pad_id} and end id {self.eos_id}; a T5 "
                "tokenizer defines both"
            )


def captions_from(src) -> list[str]:
    """Collects training captions from a captions file, a source folder or ingested shards.

    Args:
        src: A captions ``.jsonl``/``.csv`` file; a folder with ingested shards (its
            ``manifest.json``, else every complete shard set); or a source folder holding a
            captions file.

    Returns:
        The captions that ingest would keep, in file order.
    """
    # Imported here: a server loads Tokenizer from this module and needs neither PyAV nor
    # ArrayRecord, which ingest and records bring.
    from data_pipelines import ingest, records

    src = Path(src)
    if src.is_file():
        return [it.caption for it in ingest.read_captions(src) if not it.reason]
    if (src / ingest.MANIFEST).is_file():
        paths = ingest.Manifest.load(src).shard_paths(src)
    else:
        prefixes = sorted({p.name.split("-")[0] for p in src.glob(f"*-of-*{records.SUFFIX}")})
        paths = [p for prefix in prefixes for p in records.list_shards(src, prefix)]
    if not paths:
        return [
            it.caption for it in ingest.read_captions(ingest.find_captions(src)) if not it.reason
        ]
    return [rec["caption"] for rec in records.RecordSource(paths)]
