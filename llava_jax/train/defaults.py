"""The training config schema: every key a training config may set, with its default.

configs/*.py start from `base_config()` and set the model and the recipe's hyperparameters.
"""
from __future__ import annotations

import ml_collections

from llava_jax.models.config import LlavaConfig


def base_config(model: LlavaConfig | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict((model or LlavaConfig()).to_dict())
    c.stage = 2                      # 1: projector only (plain template); 2: projector + LLM
    c.seed = 0
    c.total_steps = 100              # optimizer steps; 0 = derive from num_epochs and the dataset size
    c.num_epochs = 1
    c.global_batch_size = 128        # samples per optimizer step, over all hosts
    c.microbatch_size = 0            # samples per accumulation microbatch (global); 0 = no accumulation
    c.max_length = 2048              # tokens per row, image tokens included

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 2e-5
    c.optim.projector_lr = 0.0       # 0 = same as lr
    c.optim.warmup_ratio = 0.03
    c.optim.schedule = "cosine"      # linear warmup, then cosine decay to 0
    c.optim.weight_decay = 0.0       # never applied to norms and biases
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.grad_clip = 1.0

    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))

    c.log_every = 10
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.eval_every = 0                 # held-out loss every N steps when data.eval_* is set
    c.eval_batches = 16              # held-out batches per evaluation (0 = the whole eval split)
    c.loss_chunk_size = 0            # >0: vocabulary projection + loss over sequence chunks of this size
    c.peak_flops_per_device = 0.0    # for MFU; 0 = from the device kind (unknown kinds log mfu null)
    c.profile_steps = ""             # "a,b": jax.profiler trace of steps a..b into WORKDIR/profile

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"      # synthetic | json | arrayrecord
    c.data.json_path = ""            # LLaVA JSON/JSONL (comma-separated for a mixture)
    c.data.weights = ""              # mixture weights, comma-separated, same order as json_path
    c.data.image_folder = ""
    c.data.arrayrecord_dir = ""
    c.data.eval_json_path = ""
    c.data.eval_arrayrecord_dir = ""
    c.data.template = "vicuna_v1"    # plain | v0 | vicuna_v1 | llava_v1 | chatml | chatml_direct | tokenizer
    c.data.image_aspect = "pad"      # pad | square
    c.data.packing = False           # pack several samples per row (segment ids) instead of padding
    c.data.group_by_modality_length = False  # batches of one modality, similar lengths (the reference's sampler)
    c.data.max_images_per_row = 1
    c.data.num_workers = 0
    c.data.shuffle_seed = 0
    c.data.strict = False            # bad records raise instead of being skipped and counted
    c.data.synthetic_size = 256      # samples in the built-in synthetic dataset

    # LoRA (stage 2): adapters on the LLM's projections over a frozen base; rank 0 = off (full fine-tune).
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0
    c.lora.alpha = 16.0              # the update is A @ B * alpha / rank
    c.lora.dropout = 0.0             # on the adapters' input, training only
    c.lora.targets = "q,k,v,o,gate,up,down"  # LLM projections that get adapters
    c.lora.base_dtype = "float32"    # frozen base kernels: float32 | bfloat16 | int8 (per-output-channel scales)
    c.lora.train_projector = True    # the reference trains the projector fully beside the adapters (optim.projector_lr)

    c.tokenizer = ""                 # folder with tokenizer files; "" = from init.base
    c.init = ml_collections.ConfigDict(dict(base="", stage1=""))
    return c
