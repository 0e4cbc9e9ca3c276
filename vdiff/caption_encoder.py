"""A frozen pretrained caption encoder (``text.encoder="t5"``): captions -> embeddings.

:class:`CaptionEncoder` holds a :class:`~vdiff.models.t5.T5Encoder` loaded from
``text.path`` and the folder's ``spiece.model``. It runs where captions meet the
transformer without a gradient: the latent-cache step (every caption once, stored in the
latent records as bfloat16), sampling, eval sweeps and export (new prompts). The train
step never runs it.

Each process loads the encoder over its own devices, sharded ``fsdp``-wise (the
mesh rules' ``embed`` axis) on a mesh of its local devices: caching encodes each
process's own clips independently, and the encoder's weights are spread over the
devices instead of copied to each. Batches are padded to ``text.batch_size`` captions, so
one compiled shape serves every call.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import vdiff.parallel.sharding as sharding
from data_pipelines.tokenizer import PretrainedTokenizer
from vdiff.config import MESH_AXES
from vdiff.errors import UserError
from vdiff.manifest import file_sha256
from vdiff.models.t5 import T5Spec
from vdiff.models.t5_weights import CONFIG, load_t5, weight_files

log = logging.getLogger(__name__)

SPIECE = "spiece.model"
EMBEDDING_DTYPE = ml_dtypes.bfloat16  # cached embeddings: half the bytes of float32


def local_mesh(devices=None) -> Mesh:
    """This process's devices on the ``fsdp`` axis of a mesh with every vdiff axis name, so
    the config's logical rules apply unchanged."""
    devices = list(devices if devices is not None else jax.local_devices())
    shape = tuple(len(devices) if a == "fsdp" else 1 for a in MESH_AXES)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def load_tokenizer(folder: Path, vocab_size: int | None = None) -> PretrainedTokenizer:
    """The folder's ``spiece.model``, checked against the encoder's embedding rows
    (``vocab_size``; default: read from the folder's ``config.json``)."""
    if vocab_size is None:
        vocab_size = T5Spec.from_config_json(Path(folder) / CONFIG).vocab_size
    path = Path(folder) / SPIECE
    if not path.is_file():
        raise UserError(
            f"{path} is missing; text.path must hold the encoder's sentencepiece "
            "model next to config.json"
        )
    try:
        tok = PretrainedTokenizer(path)
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None
    if tok.vocab_size > vocab_size:
        raise UserError(
            f"{path} has {tok.vocab_size} pieces but the encoder embeds {vocab_size} ids "
            f"(vocab_size in {Path(folder) / CONFIG}); they belong to different models"
        )
    return tok


def encoder_identity(folder: Path) -> dict:
    """What names a pretrained encoder in cache tags: its config and tokenizer hashes and
    each weight file's size (hashing tens of GB of weights on every run would be slow)."""
    folder = Path(folder)
    files = sorted(set(weight_files(folder).values()))
    return {
        "path": str(folder.resolve()),
        "config": file_sha256(folder / CONFIG),
        "spiece": file_sha256(folder / SPIECE),
        "weights": {p.name: p.stat().st_size for p in files},
    }


@functools.partial(jax.jit, static_argnums=0)
def _embed(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask).astype(jnp.bfloat16)


class CaptionEncoder:
    """Captions -> ``(embeddings (N, L, width) bfloat16, mask (N, L) bool)``.

    Args:
        folder: ``text.path``.
        max_len: ``text.max_len``.
        batch_size: captions per compiled call (``text.batch_size``).
        dtype: parameter and compute dtype.
        rules: the logical -> mesh rules (``mesh.rules``).
        mesh: devices to shard over (default :func:`local_mesh`).
    """

    def __init__(self, folder, *, max_len, batch_size=64, dtype=jnp.bfloat16, rules=(), mesh=None):
        self.folder = Path(folder)
        self.spec = T5Spec.from_config_json(self.folder / CONFIG)
        self.tokenizer = load_tokenizer(self.folder, self.spec.vocab_size)
        self.max_len, self.batch_size = int(max_len), int(batch_size)
        self.mesh = local_mesh() if mesh is None else mesh
        self.rules = tuple(rules)
        model = load_t5(self.folder, mesh=self.mesh, rules=self.rules, dtype=dtype)
        self.graphdef, self.state = nnx.split(model)
        # The batch splits over the fsdp devices when it divides (FSDP: weights gathered
        # per layer); otherwise every device sees the whole batch.
        fsdp = self.mesh.shape["fsdp"]
        self.batch = self.batch_size
        spec = PartitionSpec("fsdp" if self.batch % fsdp == 0 else None, None)
        self._in_sharding = NamedSharding(self.mesh, spec)
        self._empty = None

    @classmethod
    def from_config(cls, config, mesh=None) -> CaptionEncoder:
        x = config.text
        return cls(
            x.path, max_len=x.max_len, batch_size=x.batch_size, dtype=jnp.dtype(x.dtype),
            rules=config.mesh.rules, mesh=mesh,
        )  # fmt: skip

    @property
    def width(self) -> int:
        return self.spec.d_model

    def encode_ids(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Token ids and mask ``(N, L)`` -> bfloat16 embeddings ``(N, L, width)`` (numpy)."""
        ids, mask = np.asarray(ids, np.int32), np.asarray(mask, bool)
        if not len(ids):
            return np.zeros((0, ids.shape[1], self.width), EMBEDDING_DTYPE)
        out = []
        with jax.set_mesh(self.mesh), sharding.axis_rules(self.rules):
            for start in range(0, len(ids), self.batch):
                i, m = ids[start : start + self.batch], mask[start : start + self.batch]
                k = len(i)
                if k < self.batch:  # one compiled shape: pad with copies of the last row
                    i = np.concatenate([i, np.repeat(i[-1:], self.batch - k, 0)])
                    m = np.concatenate([m, np.repeat(m[-1:], self.batch - k, 0)])
                put = lambda a: jax.device_put(a, self._in_sharding)  # noqa: E731
                emb = _embed(self.graphdef, self.state, put(i), put(m))
                out.append(np.asarray(jax.device_get(emb))[:k])
        return np.concatenate(out).astype(EMBEDDING_DTYPE)

    def encode(self, texts) -> tuple[np.ndarray, np.ndarray]:
        """Captions -> ``(embeddings, mask)``; ids from the folder's ``spiece.model``."""
        ids, mask = self.tokenizer.encode(list(texts), self.max_len)
        return self.encode_ids(ids, mask), mask

    def empty(self) -> tuple[np.ndarray, np.ndarray]:
        """The empty caption's ``(embedding (L, width), mask (L,))``: the unconditional input
        of classifier-free guidance (its end token is a real token). Encoded on first use;
        every guided sampling call reads it."""
        if self._empty is None:
            emb, mask = self.encode([""])
            self._empty = emb[0], mask[0]
        return self._empty

    def param_bytes_per_device(self) -> dict:
        """Parameter bytes each device holds: ``{device id: bytes}``."""
        per: dict[int, int] = {}
        for x in jax.tree.leaves(self.state):
            for shard in x.addressable_shards:
                per[shard.device.id] = per.get(shard.device.id, 0) + shard.data.nbytes
        return per

    def total_param_bytes(self) -> int:
        return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(self.state))
