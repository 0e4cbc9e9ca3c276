"""DiT-S: width 384, depth 12, 6 heads, on 64x64x32 clips (`dit_s:128` for 128x128 buckets).

Parameters: 104.35M in the transformer + text encoder (video, audio and text streams each
have their own per-block weights, MMDiT-style; ``python benchmarks/param_counts.py``).
``ladder_config`` holds what the whole ladder shares, on shapes or ingested records
(docs/architecture.md, "The scale ladder"). Run e.g. ``vdiff train --config dit_s``.
"""

from configs.base import get_base_config

SIZES = {
    "s": dict(width=384, depth=12, heads=6),
    "b": dict(width=768, depth=12, heads=12),
    "l": dict(width=1024, depth=24, heads=16),
    "xl": dict(width=1152, depth=28, heads=16),
}


def ladder_config(size: str, arg=None):
    c = get_base_config()
    for k, v in SIZES[size].items():
        setattr(c.model, k, v)
    c.model.text_width = min(c.model.width, 512)
    c.model.text_depth = 4
    c.model.text_heads = max(4, c.model.text_width // 64)
    c.data.resolution = 64
    c.data.frames = 32
    c.data.buckets = ((64, 64, 32),)
    c.data.num_train = 8192
    c.data.num_workers = 4
    c.vae.channels = 64
    c.vae.latent_channels = 16
    c.audio_ae.latent_channels = 16
    c.train.batch_size = 64
    c.train.compute_dtype = "bfloat16"
    c.train.remat = "save_dots"
    c.train.lr = 3e-4
    c.train.steps = 100_000
    c.train.ckpt_every = 2000
    c.train.keep_every = 20_000
    c.mesh.shape.data = 1
    c.mesh.shape.fsdp = -1
    if arg == "128":
        c.data.resolution = 128
        c.data.buckets = ((128, 128, 32), (96, 128, 32), (128, 96, 32))
    return c


def get_config(arg=None):
    return ladder_config("s", arg)
