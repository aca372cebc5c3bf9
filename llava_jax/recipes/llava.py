"""Shapes and the two-stage recipe shared by the real-model configs (LLAVA_REFERENCE.md §1, §7)."""
from __future__ import annotations

import ml_collections

from llava_jax.models.config import LlavaConfig, TextConfig, VisionConfig
from llava_jax.train.defaults import base_config

STAGES = ("stage1", "stage2")

# The llava-hf `<image>` id. With the original 32000-token vocabulary it lies just past the
# vocabulary: like the original code's -200 it only marks where image features go and is never
# looked up in the embedding table.
IMAGE_TOKEN_ID = 32000
PAD_TOKEN_ID = 0  # the reference pads with <unk> (id 0) for the vicuna/llava templates


def clip_vit_l14(image_size: int) -> VisionConfig:
    """openai/clip-vit-large-patch14 (224) or clip-vit-large-patch14-336 vision tower."""
    return VisionConfig(image_size=image_size, patch_size=14, hidden_size=1024, intermediate_size=4096,
                        num_layers=24, num_heads=16, layer_norm_eps=1e-5, hidden_act="quick_gelu")


# size -> (hidden, intermediate, layers, heads)
_LLAMA_SHAPES = {"7b": (4096, 11008, 32, 32), "13b": (5120, 13824, 40, 40)}


def vicuna(size: str, version: str) -> TextConfig:
    """LLaMA/Vicuna decoder. v1 (Vicuna v1.1 on LLaMA-1): eps 1e-6, 2048 positions;
    v1.5 (Vicuna v1.5 on Llama-2): eps 1e-5, 4096 positions."""
    hidden, inter, layers, heads = _LLAMA_SHAPES[size]
    eps, positions = {"v1": (1e-6, 2048), "v1.5": (1e-5, 4096)}[version]
    return TextConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                      num_heads=heads, num_kv_heads=heads, rms_norm_eps=eps, rope_theta=10000.0,
                      max_position_embeddings=positions, tie_word_embeddings=False)


def llava_model(version: str, size: str) -> LlavaConfig:
    """v1: CLIP-L/14 at 224 + linear projector; v1.5: CLIP-L/14 at 336 + mlp2x_gelu."""
    image_size, projector = {"v1": (224, "linear"), "v1.5": (336, "mlp2x_gelu")}[version]
    return LlavaConfig(vision=clip_vit_l14(image_size), text=vicuna(size, version), projector_type=projector,
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       image_token_id=IMAGE_TOKEN_ID, pad_token_id=PAD_TOKEN_ID, dtype="bfloat16",
                       remat_policy="nothing_saveable")


def parse_stage(arg) -> int:
    arg = "stage2" if arg in (None, "") else str(arg)
    if arg not in STAGES:
        raise ValueError(f"unknown config argument {arg!r}; expected one of {STAGES}")
    return int(arg[-1])


# Each stage's recipe: (version, stage) -> overrides of the base schema.
_RECIPES = {
    ("v1.5", 1): dict(template="plain", lr=1e-3, batch=256, epochs=1, aspect="square",
                      json_path="data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json",
                      image_folder="data/LLaVA-Pretrain/images"),
    ("v1.5", 2): dict(template="vicuna_v1", lr=2e-5, batch=128, epochs=1, aspect="pad",
                      json_path="data/LLaVA-Instruct/llava_v1_5_mix665k.json",
                      image_folder="data/LLaVA-Instruct/images"),
    ("v1", 1): dict(template="plain", lr=2e-3, batch=128, epochs=1, aspect="square",
                    json_path="data/LLaVA-CC3M-Pretrain-595K/chat.json",
                    image_folder="data/LLaVA-CC3M-Pretrain-595K/images"),
    ("v1", 2): dict(template="vicuna_v1", lr=2e-5, batch=32, epochs=3, aspect="square",
                    json_path="data/LLaVA-Instruct-150K/llava_instruct_150k.json",
                    image_folder="data/coco/train2017"),
}


def llava_config(version: str, size: str, arg) -> ml_collections.ConfigDict:
    """The training config of LLaVA `version` ('v1' | 'v1.5') at `size` for stage `arg`.

    Data paths and init checkpoints are placeholders relative to the working directory; set them
    with --config.data.json_path=..., --config.init.base=... (a model folder made by
    convert/hf_to_orbax.py --clip ... --llm ...), --config.init.stage1=... (the stage-1 workdir).
    """
    stage = parse_stage(arg)
    recipe = _RECIPES[(version, stage)]
    c = base_config(llava_model(version, size))
    c.stage = stage
    c.total_steps = 0  # derived from num_epochs and the dataset size
    c.num_epochs = recipe["epochs"]
    c.global_batch_size = recipe["batch"]
    c.max_length = 2048
    c.optim.lr = recipe["lr"]
    c.optim.warmup_ratio = 0.03
    c.optim.schedule = "cosine"
    c.optim.weight_decay = 0.0
    c.optim.grad_clip = 1.0
    c.data.source = "json"
    c.data.json_path = recipe["json_path"]
    c.data.image_folder = recipe["image_folder"]
    c.data.template = recipe["template"]
    c.data.image_aspect = recipe["aspect"]
    c.checkpoint_every = 1000 if stage == 1 else 500
    c.log_every = 10
    name = f"llava-{version}-{size}"
    c.init.base = f"checkpoints/{name}-base"  # CLIP + Vicuna converted, projector freshly initialised
    if stage == 2:
        c.init.stage1 = f"workdirs/{name}-stage1"
    return c


# How a LoRA run holds its frozen base (the LoRA configs' argument; default bf16).
LORA_BASE_DTYPES = {"": "bfloat16", "bf16": "bfloat16", "fp32": "float32", "int8": "int8"}


def llava_lora_config(version: str, size: str, arg: str) -> ml_collections.ConfigDict:
    """Stage 2 with LoRA as the reference's scripts/v1_5/finetune_lora.sh: r=128, alpha=256, dropout
    0.05 on q/k/v/o/gate/up/down of the LLM, the projector trained fully at lr 2e-5, lr 2e-4."""
    if arg not in LORA_BASE_DTYPES:
        raise ValueError(f"unknown config argument {arg!r}; expected one of {sorted(LORA_BASE_DTYPES)} "
                         "(how the frozen base is held; default bf16)")
    c = llava_config(version, size, "stage2")
    c.lora.rank = 128
    c.lora.alpha = 256.0
    c.lora.dropout = 0.05
    c.lora.targets = "q,k,v,o,gate,up,down"
    c.lora.base_dtype = LORA_BASE_DTYPES[arg]
    c.lora.train_projector = True
    c.optim.lr = 2e-4
    c.optim.projector_lr = 2e-5
    return c
