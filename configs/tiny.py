"""Tiny CPU recipe on the built-in "shapes" data: the main job (`vdiff train`).

32x32 pixels x 16 frames at 8 fps -> video VAE (4x4 spatial, 4x temporal, 8 latent
channels) -> 5x8x8 latents (latent frame 0 is frame 0 alone) -> 1x2x2 patches = 80 video
tokens, plus 50 audio latent tokens (25/s over the 2 s clip) and 32 caption tokens.
Transformer: width 128, depth 4, 4 heads: 4.19M parameters with the text encoder (video,
audio and text streams each have their own block weights); video VAE 0.09M.

Sized for a 2-core CPU: step counts are set so the whole job (data, both autoencoders,
transformer, report) takes about 20 minutes there; see docs/architecture.md for the
measured stage times and scores.

``tiny:smoke`` is a seconds-per-stage variant that the tests run end to end.
"""

from configs.base import get_base_config
from vdiff.errors import UserError


def get_config(arg=None):
    c = get_base_config()
    c.vae.steps = 2000
    c.audio_ae.steps = 600
    c.train.batch_size = 16
    c.train.steps = 1500
    c.train.log_every = 50
    c.sample.steps = 20
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
    elif arg is not None:
        raise UserError(f"configs/tiny.py takes no argument or 'smoke' (tiny:smoke), got '{arg}'")
    return c
