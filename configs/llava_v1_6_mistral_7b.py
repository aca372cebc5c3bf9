"""LLaVA-1.6 (NeXT) with Mistral-7B-Instruct-v0.2 (template mistral_instruct): AnyRes over CLIP ViT-L/14-336 tiles, mlp2x_gelu.

Usage: llava-jax info --config configs/llava_v1_6_mistral_7b.py
       llava-jax train --config configs/llava_v1_6_mistral_7b.py:stage2 --workdir W   (default stage)
Weights: python convert/hf_to_orbax.py --hf-llava llava-v1.6-mistral-7b-hf --out CKPT
"""
from llava_jax.recipes import llava_next


def get_config(arg="stage2"):
    return llava_next.config("mistral_7b", arg)
