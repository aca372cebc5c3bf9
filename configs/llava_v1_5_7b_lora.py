"""LLaVA-1.5-7B stage 2 with LoRA (the reference's scripts/v1_5/finetune_lora.sh).

LoRA r=128, alpha=256, dropout 0.05 on every linear layer of the LLM (q/k/v/o/gate/up/down; not the
vision tower, the projector or lm_head); the projector trains fully with its own lr 2e-5; lr 2e-4,
1 epoch, global batch 128, warmup 3%, cosine, no weight decay (LLAVA_REFERENCE.md §7, §10).

Usage: llava-jax train --config configs/llava_v1_5_7b_lora.py --workdir W \
           --config.init.base=BASE --config.init.stage1=STAGE1_WORKDIR
       llava-jax train --config configs/llava_v1_5_7b_lora.py:int8 ...   (frozen base held in int8)
The checkpoints hold the adapters and the projector; `llava-jax chat --ckpt W` merges them into BASE,
`llava-jax merge --adapter W --out DIR` writes the merged model.
"""
from llava_jax.recipes import llava


def get_config(arg=""):
    return llava.llava_lora_config("v1.5", "7b", arg)
