"""Tiny CPU recipe on the built-in "shapes" data: the main job (`vdiff train`).

32x32 pixels x 16 frames at 8 fps -> video VAE (2x2 spatial, 4x temporal, 4 channels) ->
5x16x16x4 latents -> 1x4x4 patches = 80 video tokens, plus 25 audio tokens (2 audio latents
of 40 ms each) and 32 caption tokens. Why each choice (records in docs/experiments.md):
- 2x spatial, 4 channels, whole frames: a 4x VAE blurs the 5-9 pixel objects, and the
  transformer fits crop-trained latents worse ("2026-11-21 — VAE compression for small
  objects", "2026-11-21 — crop-trained VAE").
- t_mean 0.5, shift 3 (also in the sampler): the caption decides a clip only near pure
  noise ("2026-11-21 — timestep distribution and EMA warm-up").
- Cross text attention: learns the caption far faster on this budget than joint
  ("2026-11-21 — cross vs joint text attention on the tiny budget").
- Muon, 1100 updates: the wall time of 1500 AdamW ones, with better colour and mid-noise
  motion ("2026-11-22 — Muon optimiser for the transformer").
Sized for a ~20 minute job on a 2-core CPU; ``tiny:smoke`` is the seconds-long test variant.
"""

from configs.base import get_base_config
from vdiff.errors import UserError


def get_config(arg=None):
    c = get_base_config()
    c.vae.steps = 2000
    c.vae.spatial_down = 2
    c.vae.latent_channels = 4
    c.model.patch = (1, 4, 4)
    c.diffusion.t_mean = 0.5
    c.diffusion.shift = 3.0
    c.sample.shift = 3.0
    c.train.lr = 3e-3
    c.model.text_attention = "cross"
    c.model.audio_patch = 2
    c.audio_ae.steps = 600
    c.train.batch_size = 16
    c.train.optimizer = "muon"
    c.train.steps = 1100
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
