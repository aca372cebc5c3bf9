"""LLaVA-1.6 (LLaVA-NeXT): the llava-hf `llava-v1.6-*-hf` shapes and the stage-2 recipe.

Shared by configs/llava_v1_6_{vicuna_7b,vicuna_13b,mistral_7b,34b}.py. The shapes are those of the
released llava-hf checkpoints (LLAVA_REFERENCE.md §10): CLIP ViT-L/14-336, mlp2x_gelu, AnyRes over
the five v1.6 grids, and a decoder whose vocabulary llava-hf grew by `<image>` and `<pad>` and then
padded to a multiple of 64 (32000 -> 32064, Yi's 64000 -> 64064), `<image>` being the first added id.
The reference never released LLaVA-1.6's training code; the recipe follows the LLaVA-NeXT release
notes (stage 2: lr 2e-5, global batch 128, 1 epoch, max length 4096).

Image-token budget per row: one image per row (data.max_images_per_row = 1). An AnyRes image takes
576 + rows * (cols + 1) placeholders, at most 2,928 (a 2 x 2 grid nothing is unpadded from), so a
4096-token row always keeps >= 1,168 tokens for the conversation; a second image could need 5,856.
The data pipeline gives each image its own run (docs/internals.md, "Training batches") and
`validate.check_train` refuses a max_length below the worst case.
"""
from __future__ import annotations

import ml_collections

from llava_jax.recipes import llava
from llava_jax.data.anyres import DEFAULT_GRID_PINPOINTS
from llava_jax.models.config import LlavaConfig, TextConfig
from llava_jax.train.defaults import base_config

# name -> (decoder, template, the conversion's <image> and <pad> ids)
_DECODERS = {
    # lmsys/vicuna-{7b,13b}-v1.5 (Llama-2)
    "vicuna_7b": (TextConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_layers=32,
                             num_heads=32, num_kv_heads=32, rms_norm_eps=1e-5, rope_theta=10000.0,
                             max_position_embeddings=4096), "vicuna_v1", 32000, 32001),
    "vicuna_13b": (TextConfig(vocab_size=32064, hidden_size=5120, intermediate_size=13824, num_layers=40,
                              num_heads=40, num_kv_heads=40, rms_norm_eps=1e-5, rope_theta=10000.0,
                              max_position_embeddings=4096), "vicuna_v1", 32000, 32001),
    # mistralai/Mistral-7B-Instruct-v0.2: GQA 32/8, rope_theta 1e6, no sliding window
    "mistral_7b": (TextConfig(vocab_size=32064, hidden_size=4096, intermediate_size=14336, num_layers=32,
                              num_heads=32, num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=1e6,
                              max_position_embeddings=32768, hf_model_type="mistral"), "mistral_instruct",
                   32000, 32001),
    # NousResearch/Nous-Hermes-2-Yi-34B (LLaMA-shaped, GQA 56/8); answers end with <|im_end|> (id 7)
    "34b": (TextConfig(vocab_size=64064, hidden_size=7168, intermediate_size=20480, num_layers=60,
                       num_heads=56, num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=5e6,
                       max_position_embeddings=4096, bos_token_id=1, eos_token_id=7), "chatml_direct",
            64000, 64001),
}
NAMES = tuple(_DECODERS)


def model(name: str) -> LlavaConfig:
    text, _, image_id, pad_id = _DECODERS[name]
    return LlavaConfig(vision=llava.clip_vit_l14(336), text=text, projector_type="mlp2x_gelu",
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       image_token_id=image_id, pad_token_id=pad_id, dtype="bfloat16",
                       remat_policy="nothing_saveable", image_grid_pinpoints=DEFAULT_GRID_PINPOINTS)


def config(name: str, arg) -> ml_collections.ConfigDict:
    """Stage 2 (the default) of LLaVA-1.6 `name`; stage 1 is LLaVA-1.5's (plain template, 336 px)."""
    stage = llava.parse_stage(arg)
    c = base_config(model(name))
    c.stage = stage
    c.total_steps = 0
    c.num_epochs = 1
    c.global_batch_size = 256 if stage == 1 else 128
    c.max_length = 4096
    c.optim.lr = 1e-3 if stage == 1 else 2e-5
    c.optim.warmup_ratio = 0.03
    c.optim.schedule = "cosine"
    c.optim.weight_decay = 0.0
    c.optim.grad_clip = 1.0
    c.data.source = "json"
    c.data.max_images_per_row = 1
    c.data.template = "plain" if stage == 1 else _DECODERS[name][1]
    c.data.image_aspect = "square" if stage == 1 else "pad"
    c.data.json_path = ("data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json" if stage == 1
                        else "data/LLaVA-NeXT/llava_next_760k.json")
    c.data.image_folder = "data/LLaVA-Pretrain/images" if stage == 1 else "data/LLaVA-NeXT/images"
    c.checkpoint_every = 1000 if stage == 1 else 500
    c.log_every = 10
    tag = f"llava-v1.6-{name.replace('_', '-')}"
    c.init.base = f"checkpoints/{tag}-base"
    if stage == 2:
        c.init.stage1 = f"workdirs/{tag}-stage1"
    return c
