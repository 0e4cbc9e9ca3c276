"""Tiny CPU recipe on the built-in "shapes" data: the main job (`vdiff train`).

32x32 pixels x 16 frames at 8 fps -> video VAE (4x4 spatial, 4x temporal, 8 latent
channels) -> 4x8x8 latents -> 1x2x2 patches = 64 video tokens, plus 100 audio latent
frames (25/s) for the 2 s clip. Sized for many updates per minute on 2 CPU cores.
Transformer: width 128, depth 4, 4 heads (~1.1M parameters with the text encoder).
"""

from configs.base import get_base_config


def get_config(arg=None):
    c = get_base_config()
    if arg == "smoke":  # seconds-long end-to-end run for tests
        c.data.num_train = 64
        c.data.num_val = 16
        c.vae.steps = 4
        c.audio_ae.steps = 4
        c.train.steps = 4
        c.train.batch_size = 8
        c.vae.batch_size = 8
        c.audio_ae.batch_size = 8
        c.train.log_every = 2
        c.train.ckpt_every = 2
        c.sample.steps = 2
        c.sample.num_prompts = 8
        c.data.vocab_size = 300
    return c
