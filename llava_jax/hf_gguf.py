"""Kept for the name the README documented (`llava_jax.hf_gguf.smollm2_folder`); the GGUF converter
lives in llava_jax.hf.gguf."""
from llava_jax.hf.gguf import smollm2_folder

__all__ = ["smollm2_folder"]
