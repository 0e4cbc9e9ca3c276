"""DiT-XL: width 1152, depth 28, 16 heads, on 64x64x32 clips (`dit_xl:128` for 128x128 buckets).

Parameters: see the table in docs/architecture.md (computed by
``benchmarks/param_counts.py``). Sharded over fsdp by default.
"""

from configs.dit_s import ladder_config


def get_config(arg=None):
    return ladder_config("xl", arg)
