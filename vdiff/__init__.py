"""vdiff: text-to-video (and video+audio) latent diffusion transformers in JAX."""

__version__ = "0.1.0"
