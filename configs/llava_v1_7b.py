"""LLaVA v1 (paper): CLIP ViT-L/14 at 224 px, linear projector, Vicuna-7B v1.1.

Usage: llava-jax train --config configs/llava_v1_7b.py:stage1 --workdir W   (stage 1: projector only)
       llava-jax train --config configs/llava_v1_7b.py:stage2 --workdir W   (stage 2: projector + LLM; default)
"""
from llava_jax.recipes import llava


def get_config(arg="stage2"):
    return llava.llava_config("v1", "7b", arg)
