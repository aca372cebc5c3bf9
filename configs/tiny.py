"""A tiny LLaVA on the built-in synthetic data: the whole training path in seconds on a CPU.

Usage: llava-jax train --config configs/tiny.py:stage1 --workdir W
       llava-jax train --config configs/tiny.py:stage2 --workdir W   (default)
The model has the size of tests/conftest.py's tiny_llava_config: 2-layer CLIP at 28 px (4 image
tokens), 2-layer LLaMA with grouped-query attention.
"""
from llava_jax.models.config import LlavaConfig, TextConfig, VisionConfig
from llava_jax.recipes import llava
from llava_jax.train.defaults import base_config


def tiny_model() -> LlavaConfig:
    vision = VisionConfig(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64,
                          num_layers=3, num_heads=4)
    text = TextConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
    return LlavaConfig(vision=vision, text=text, projector_type="mlp2x_gelu", vision_feature_layer=-2,
                       vision_feature_select_strategy="default", image_token_id=127, pad_token_id=0,
                       dtype="float32", remat_policy="none")


def get_config(arg="stage2"):
    stage = llava.parse_stage(arg)
    c = base_config(tiny_model())
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
