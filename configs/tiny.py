"""A tiny LLaVA on the built-in synthetic data: the whole training path in seconds on a CPU.

Usage: llava-jax train --config configs/tiny.py:stage1 --workdir W
       llava-jax train --config configs/tiny.py:stage2 --workdir W   (default)
The model (llava_jax.recipes.tiny.tiny_llava_config, the tests' tiny model): 3-layer CLIP at 28 px
(4 image tokens), 2-layer LLaMA with grouped-query attention.
"""
from llava_jax.recipes import tiny


def get_config(arg="stage2"):
    return tiny.get_config(arg)
