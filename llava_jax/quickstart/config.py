"""The quickstart's model and recipe: a LLaVA small enough to train end to end on a laptop CPU.

64 px images in 16 px patches (16 image tokens, four per quadrant), a 4-layer CLIP tower, a 4-layer LLaMA with a
768-token vocabulary, the mlp2x_gelu projector: a normal LlavaConfig, so every command loads it.
`stage_config(name, ...)` gives the ml_collections training config of each stage that runs
through `llava-jax train`'s loop; configs/quickstart.py exposes the same configs to the CLI.
"""
from __future__ import annotations

import os

import ml_collections

from llava_jax.models.config import LlavaConfig, TextConfig, VisionConfig
from llava_jax.train.defaults import base_config

VOCAB_SIZE = 768          # including <image>, the last id
IMAGE_SIZE = 64
STAGES = ("lm", "stage1", "stage2")


def model_config() -> LlavaConfig:
    vision = VisionConfig(image_size=IMAGE_SIZE, patch_size=16, hidden_size=128, intermediate_size=256,
                          num_layers=4, num_heads=4, layer_norm_eps=1e-5, hidden_act="quick_gelu")
    text = TextConfig(vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=344, num_layers=4, num_heads=4,
                      num_kv_heads=4, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    return LlavaConfig(vision=vision, text=text, projector_type="mlp2x_gelu", vision_feature_layer=-2,
                       vision_feature_select_strategy="default", image_token_id=VOCAB_SIZE - 1, pad_token_id=0,
                       dtype="float32", remat_policy="none")


# stage -> (trainable stage of the loop, template, data files, lr, steps, steps with --fast, max_length)
_RECIPES = {
    # Language-model pretraining ("Vicuna"): text-only chats; the projector sees no image, so only
    # the language model moves.
    "lm": dict(stage=2, template="vicuna_v1", data="text", lr=5e-3, steps=150, fast_steps=60, max_length=96),
    # Stage 1: projector only, caption pairs in the plain template.
    "stage1": dict(stage=1, template="plain", data="stage1", lr=2e-3, steps=100, fast_steps=40, max_length=64),
    # Stage 2: projector + language model on instructions + short-answer VQA, vicuna_v1. VQA is
    # drawn 4 times per pass (about 3/4 of the samples): the short answers are what is evaluated.
    "stage2": dict(stage=2, template="vicuna_v1", data="instruct,vqa", weights="1,4", lr=2e-3, steps=250,
                   fast_steps=100, max_length=160),
}


def stage_config(name: str, root: str = "quickstart_out", fast: bool = False, seed: int = 0,
                 batch_size: int = 32) -> ml_collections.ConfigDict:
    """The training config of stage `name` for a quickstart folder `root` (see world.py's layout)."""
    if name not in _RECIPES:
        raise ValueError(f"unknown quickstart stage {name!r}; expected one of {STAGES}")
    r = _RECIPES[name]
    c = base_config(model_config())
    c.stage = r["stage"]
    c.seed = seed
    c.total_steps = r["fast_steps" if fast else "steps"]
    c.global_batch_size = batch_size
    c.max_length = r["max_length"]
    c.optim.lr = r["lr"]
    c.optim.warmup_ratio = 0.05
    c.optim.schedule = "cosine"
    c.optim.weight_decay = 0.0
    c.optim.grad_clip = 1.0
    c.mesh.fsdp = -1
    c.log_every = 10
    c.checkpoint_every = 10 ** 6      # only the final step is saved
    c.keep_checkpoints = 1
    c.data.source = "json"
    c.data.json_path = ",".join(os.path.join(root, "data", f"{d}.json") for d in r["data"].split(","))
    c.data.image_folder = os.path.join(root, "world", "train")
    c.data.weights = r.get("weights", "")
    c.data.template = r["template"]
    c.data.image_aspect = "square" if name == "stage1" else "pad"
    c.data.packing = name == "lm"     # text-only rows pack several chats; image rows hold one image
    c.data.shuffle_seed = seed
    c.tokenizer = os.path.join(root, "tokenizer")
    c.init.base = os.path.join(root, "base")
    if name == "stage2":
        c.init.stage1 = os.path.join(root, "stage1")
    return c
