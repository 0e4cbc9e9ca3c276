"""Attention masks as per-token ids: who may attend to whom without an ``Lq x Lk`` array.

A :class:`TokenMask` gives every query token a group id, every key token a group id, and a
small per-example table of which (query group, key group) pairs may attend:
``allowed[b, i, j] = table[b, q_groups[b, i], k_groups[b, j]]``. That covers every mask the
models build, in O(L) memory:

- key padding (an empty or short caption, clips without sound): padded keys get a group
  that no query row accepts (:meth:`key_padding`);
- the transformer's streams: video, audio and text tokens are groups, and the
  ``cross_modal=False`` ablation (per example in training) is a table that forbids the
  audio<->video pairs and text reading either (:func:`stream_mask`).

Backends that work block by block (blockwise, ring) build each block's mask from the ids
(:meth:`block`); :meth:`dense` gives the full boolean mask for the reference path and for
cuDNN, whose API takes a dense mask.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class TokenMask:
    """``q_groups (B, Lq)`` and ``k_groups (B, Lk)`` int32, ``table (B, G, G)`` bool.

    ``same_rows`` (static) says every query group reads the same key groups, so the mask
    is key padding only: what segment-id kernels (splash) can express.
    """

    q_groups: jax.Array
    k_groups: jax.Array
    table: jax.Array
    same_rows: bool = False

    def key_valid(self) -> jax.Array:
        """``(B, Lk)``: the keys every query may read (a same-rows mask's key padding)."""
        if not self.same_rows:
            raise ValueError("key_valid() needs a mask whose query groups all read the same keys")
        return self.block(self.q_groups[:, :1], self.k_groups)[:, 0]

    @classmethod
    def key_padding(cls, key_valid: jax.Array, lq: int) -> TokenMask:
        """Every query may attend to the keys where ``key_valid (B, Lk)`` is True."""
        b = key_valid.shape[0]
        table = jnp.broadcast_to(jnp.asarray([[True, False], [True, False]]), (b, 2, 2))
        k_groups = jnp.where(key_valid, 0, 1).astype(jnp.int32)
        return cls(jnp.zeros((b, lq), jnp.int32), k_groups, table, same_rows=True)

    def block(self, q_groups: jax.Array, k_groups: jax.Array) -> jax.Array:
        """``(B, bq, bk)`` bool for a block's query and key ids ``(B, bq)``, ``(B, bk)``."""
        b, g = self.table.shape[0], self.table.shape[-1]
        index = q_groups[:, :, None] * g + k_groups[:, None, :]
        flat = self.table.reshape(b, g * g)
        picked = jnp.take_along_axis(flat, index.reshape(b, -1), axis=1)
        return picked.reshape(index.shape)

    def dense(self) -> jax.Array:
        """The boolean mask ``(B, 1, Lq, Lk)`` (O(Lq x Lk): reference and cuDNN paths)."""
        return self.block(self.q_groups, self.k_groups)[:, None]

    def pad(self, lq: int, lk: int) -> TokenMask:
        """Queries and keys padded at the end to ``lq`` / ``lk``: padded keys are masked for
        every query (a new group no row accepts), padded queries see nothing."""
        g = self.table.shape[-1]
        table = jnp.pad(self.table, ((0, 0), (0, 1), (0, 1)))
        qg = jnp.pad(self.q_groups, ((0, 0), (0, lq - self.q_groups.shape[1])), constant_values=g)
        kg = jnp.pad(self.k_groups, ((0, 0), (0, lk - self.k_groups.shape[1])), constant_values=g)
        return TokenMask(qg, kg, table)  # padded query rows read nothing: rows now differ


# Stream groups of the transformer's joint sequence; PAD marks keys nobody reads.
VIDEO, AUDIO, TEXT, PAD = 0, 1, 2, 3
_STREAM_IDS = {"video": VIDEO, "audio": AUDIO, "text": TEXT}
_SEPARATE = np.array(
    [  # cross_modal=False: rows = query stream, columns = key stream (video, audio, text, pad)
        [True, False, True, False],
        [False, True, True, False],
        [False, False, True, False],
        [True, True, True, False],  # not a query group; kept square
    ]
)
_JOINT = np.array([[True, True, True, False]] * 4)


def stream_mask(
    lengths: dict[str, int],
    key_valid: dict[str, jax.Array],
    cross_modal,
    batch: int,
) -> TokenMask | None:
    """The joint [video, audio, text] sequence's mask (streams in that order); None when it
    masks nothing (every key valid, every stream reading every other).

    Args:
        lengths: tokens per stream present, e.g. ``{"video": 80, "audio": 25}``.
        key_valid: per stream, ``(B, L_stream)`` bool of the keys others may read (missing:
            all valid).
        cross_modal: True (every stream reads every other), False (the ablation: no
            audio<->video and text reads text only), or a ``(B,)`` bool array per example.
    """
    order = [s for s in ("video", "audio", "text") if s in lengths]
    if not key_valid and ("audio" not in lengths or cross_modal is True):
        return None
    q = np.concatenate([np.full(lengths[s], _STREAM_IDS[s], np.int32) for s in order])
    k_parts = []
    for s in order:
        ids = jnp.full((batch, lengths[s]), _STREAM_IDS[s], jnp.int32)
        if s in key_valid:
            ids = jnp.where(key_valid[s], ids, PAD)
        k_parts.append(ids)
    q_groups = jnp.broadcast_to(jnp.asarray(q), (batch, len(q)))
    k_groups = jnp.concatenate(k_parts, axis=1)
    if "audio" not in lengths or cross_modal is True:
        table = jnp.broadcast_to(jnp.asarray(_JOINT), (batch, 4, 4))
        return TokenMask(q_groups, k_groups, table, same_rows=True)
    if cross_modal is False:
        table = jnp.broadcast_to(jnp.asarray(_SEPARATE), (batch, 4, 4))
    else:
        joint = jnp.asarray(cross_modal, bool).reshape(batch, 1, 1)
        table = jnp.where(joint, jnp.asarray(_JOINT), jnp.asarray(_SEPARATE))
    return TokenMask(q_groups, k_groups, table)


jax.tree_util.register_dataclass(
    TokenMask, data_fields=["q_groups", "k_groups", "table"], meta_fields=["same_rows"]
)
