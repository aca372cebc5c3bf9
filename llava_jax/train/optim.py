"""Which parameters train in each stage, and the optax optimizer over that trainable subset.

Frozen parameters never reach the optimizer: the model state is split by path into a trainable
part (differentiated, with optimizer state) and a frozen part (passed through untouched).
"""
from __future__ import annotations

import math
from typing import Callable

import optax
from flax import nnx

from llava_jax.keypaths import key_names

# Top-level model attributes that train in each stage. The vision tower is always frozen.
TRAINABLE_ROOTS = {1: ("projector",), 2: ("projector", "language_model")}

# Leaves named like this are never weight-decayed (LayerNorm/RMSNorm scales and all biases),
# matching the reference Trainer's decay-parameter rule.
NO_DECAY_NAMES = ("bias", "scale")


def trainable_roots(stage: int) -> tuple:
    if stage not in TRAINABLE_ROOTS:
        raise ValueError(f"config.stage must be one of {sorted(TRAINABLE_ROOTS)}, got {stage!r}")
    return TRAINABLE_ROOTS[stage]


def trainable_filter(stage: int, lora=None) -> Callable:
    """nnx filter: Params under the stage's trainable roots; with a LoraConfig (stage 2), the
    adapters (and the projector unless lora.train_projector is off) instead of the whole LLM."""
    roots = trainable_roots(stage)
    if lora is not None:
        from llava_jax.models.lora import is_trainable

        return is_trainable(lora)

    def is_trainable(path, value) -> bool:
        return isinstance(value, nnx.Param) and len(path) > 0 and str(path[0]) in roots

    return is_trainable


def split_trainable(state: nnx.State, stage: int, lora=None):
    """(trainable, frozen) nnx States; frozen holds everything else (vision tower, non-Params, ...)."""
    return nnx.split_state(state, trainable_filter(stage, lora), ...)


def decay_mask(params):
    """True where weight decay applies: kernels and embeddings, never norms or biases."""
    import jax

    def decays(path, _):
        names = key_names(path)
        return not (names[-1] in NO_DECAY_NAMES or any("norm" in n for n in names))

    return jax.tree_util.tree_map_with_path(decays, params)


def param_groups(params):
    """'projector' for the projector's leaves, 'default' for the rest (for a separate projector lr)."""
    import jax

    return jax.tree_util.tree_map_with_path(
        lambda path, _: "projector" if key_names(path)[0] == "projector" else "default", params)


def warmup_steps(optim_config, total_steps: int) -> int:
    # The reference (HF Trainer) rounds warmup_ratio * total up.
    return int(math.ceil(optim_config.warmup_ratio * total_steps))


def lr_schedule(optim_config, total_steps: int, peak_lr: float) -> optax.Schedule:
    """Linear warmup from 0, then cosine decay to 0 at total_steps (or constant after warmup)."""
    warmup = warmup_steps(optim_config, total_steps)
    if optim_config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=peak_lr, warmup_steps=warmup,
            decay_steps=max(total_steps, warmup + 1), end_value=0.0)
    if optim_config.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak_lr, max(warmup, 1)), optax.constant_schedule(peak_lr)],
            [warmup])
    raise ValueError(f"config.optim.schedule must be 'cosine' or 'constant', got {optim_config.schedule!r}")


def make_optimizer(optim_config, total_steps: int):
    """-> (tx, schedule): global-norm clipping, then AdamW (one lr group, or projector + default).

    `schedule(step)` is the default group's learning rate (what the loop logs as lr).
    """
    schedule = lr_schedule(optim_config, total_steps, optim_config.lr)

    def adamw(sched):
        return optax.adamw(sched, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps,
                           weight_decay=optim_config.weight_decay, mask=decay_mask)

    if optim_config.projector_lr and optim_config.projector_lr != optim_config.lr:
        projector_schedule = lr_schedule(optim_config, total_steps, optim_config.projector_lr)
        update = optax.multi_transform({"projector": adamw(projector_schedule), "default": adamw(schedule)},
                                       param_groups)
    else:
        update = adamw(schedule)
    if optim_config.grad_clip and optim_config.grad_clip > 0:
        update = optax.chain(optax.clip_by_global_norm(optim_config.grad_clip), update)
    return update, schedule
