"""LLaVA-1.5: CLIP ViT-L/14 at 336 px, mlp2x_gelu projector, Vicuna-13B v1.5.

Usage: llava-jax train --config configs/llava_v1_5_13b.py:stage1 --workdir W   (stage 1: projector only)
       llava-jax train --config configs/llava_v1_5_13b.py:stage2 --workdir W   (stage 2: projector + LLM; default)
"""
from llava_jax.recipes import llava


def get_config(arg="stage2"):
    return llava.llava_config("v1.5", "13b", arg)
