"""DiT-XL: width 1152, depth 28, 16 heads, on 64x64x32 clips (`dit_xl:128` for 128x128 buckets).

Parameters: 2030.25M in the transformer + text encoder (video, audio and text streams each
have their own per-block weights, MMDiT-style; ``python benchmarks/param_counts.py``).
Sharded over fsdp by default; the shared settings are in ``configs/dit_s.py:ladder_config``.
"""

from configs.dit_s import ladder_config


def get_config(arg=None):
    return ladder_config("xl", arg)
