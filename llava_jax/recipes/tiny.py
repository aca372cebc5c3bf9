"""The tiny LLaVA: the model of configs/tiny.py, of the tests and of the tiny benchmarks.

A 3-layer CLIP at 28 px / patch 14 (4 image tokens) and a 2-layer LLaMA with grouped-query
attention, float32, no remat: the whole training path runs in seconds on a CPU. `get_config` is
configs/tiny.py's recipe on the built-in synthetic data.
"""
from __future__ import annotations

from llava_jax.models.config import LlavaConfig, TextConfig, VisionConfig
from llava_jax.recipes import llava
from llava_jax.train.defaults import base_config


def tiny_llava_config(**overrides) -> LlavaConfig:
    """The tiny LlavaConfig; keyword arguments replace its fields (e.g. text=..., image_token_id=...)."""
    vision = VisionConfig(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64,
                          num_layers=3, num_heads=4)
    text = TextConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
    base = dict(vision=vision, text=text, projector_type="mlp2x_gelu", vision_feature_layer=-2,
                vision_feature_select_strategy="default", image_token_id=127, pad_token_id=0,
                dtype="float32", remat_policy="none")
    base.update(overrides)
    return LlavaConfig(**base)


def get_config(arg="stage2"):
    stage = llava.parse_stage(arg)
    c = base_config(tiny_llava_config())
    c.stage = stage
    c.total_steps = 4
    c.global_batch_size = 4
    c.max_length = 64
    c.optim.lr = 1e-3
    c.optim.warmup_ratio = 0.25
    c.mesh.fsdp = -1
    c.log_every = 1
    c.checkpoint_every = 2
    c.keep_checkpoints = 2
    c.data.source = "synthetic"
    c.data.synthetic_size = 32
    c.data.template = "plain" if stage == 1 else "vicuna_v1"
    c.data.image_aspect = "square" if stage == 1 else "pad"
    return c
