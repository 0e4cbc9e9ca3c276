"""DiT-B steered by a pretrained UMT5-XXL caption encoder, as Wan 2.x is.

    vdiff train --config dit_b_t5:/models/umt5-xxl --workdir W --config.data.name=records ...

The argument is a local Hugging Face folder of the encoder (``config.json``,
``model.safetensors`` or its shards with ``model.safetensors.index.json``, ``spiece.model``);
default ``/models/umt5-xxl``. The encoder is frozen: the latent-cache step embeds every
caption once (bfloat16, kept to each caption's tokens) and the transformer trains on the
cached embeddings through a two-layer projection from the encoder's width (4096 for
UMT5-XXL). Captions are cut at 512 tokens as in Wan. Everything else is ``dit_b``.
"""

from configs.dit_s import ladder_config


def get_config(arg=None):
    c = ladder_config("b")
    c.text.encoder = "t5"
    c.text.path = arg or "/models/umt5-xxl"
    c.text.max_len = 512
    c.text.dtype = "bfloat16"
    return c
