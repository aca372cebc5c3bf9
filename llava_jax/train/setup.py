"""The one train-state set-up: optimizer -> state layout -> step spec -> jitted step.

`llava-jax train`, `llava-jax aot`, the benchmarks and the sharded-step tests all build the step
through `train_setup`, so they train (or compile) the same optimizer over the same shardings with
the same StepSpec.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import optax

from llava_jax.train import optim
from llava_jax.train import step as step_lib
from llava_jax.train.config import TrainConfig, train_config


def num_microbatches(config: TrainConfig) -> int:
    """Accumulation microbatches per step from config.microbatch_size (0, or >= the global batch: 1)."""
    mb = config.microbatch_size
    if mb <= 0 or mb >= config.global_batch_size:
        return 1
    if config.global_batch_size % mb:
        raise ValueError(f"global_batch_size {config.global_batch_size} is not a multiple of "
                         f"microbatch_size {mb}")
    return config.global_batch_size // mb


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """What a run's train step is made of; `jit_train_step(batch_shardings)` gives the step itself."""

    tx: optax.GradientTransformation
    schedule: Callable                  # the default group's learning rate by step (logged as lr)
    layout: step_lib.StateLayout        # abstract train state and its shardings on `mesh`
    spec: step_lib.StepSpec
    mesh: Any
    model_config: Any
    stage: int
    seed: int
    lora: Optional[Any] = None          # a LoraConfig: adapters (+ projector) train over a frozen base

    def init_state(self) -> dict:
        """Random-initialised train state, created directly in its shardings."""
        return step_lib.init_state(self.layout, self.model_config, self.stage, self.tx, self.mesh,
                                   seed=self.seed, lora=self.lora)

    def jit_train_step(self, batch_shardings):
        """The jitted, state-donating train step for batches with these shardings."""
        return step_lib.jit_train_step(self.spec, self.mesh, self.layout.shardings, batch_shardings)

    def jit_eval_step(self, batch_shardings):
        return step_lib.jit_eval_step(self.spec, self.mesh, self.layout.shardings, batch_shardings)


def train_setup(config, model_config, mesh, total_steps: int, *, lora=None) -> TrainSetup:
    """The train step of training config `config` (a TrainConfig or its ConfigDict: its optim, stage,
    seed, microbatch_size and loss_chunk_size) for `model_config` on `mesh`, with the learning-rate
    schedule over total_steps. Nothing is allocated. lora: a LoraConfig (its adapter dropout is seeded
    by config.seed); the caller decides it, as config.adapters or not (a benchmark may try LoRA on a
    config that has none)."""
    config = train_config(config)
    stage, seed = config.stage, config.seed
    tx, schedule = optim.make_optimizer(config.optim, total_steps)
    layout = step_lib.state_layout(model_config, stage, tx, mesh, seed=seed, lora=lora)
    spec = step_lib.StepSpec(layout.graphdef, tx, schedule, num_microbatches(config), config.loss_chunk_size,
                             dropout_seed=seed if lora is not None and lora.dropout > 0 else None)
    return TrainSetup(tx, schedule, layout, spec, mesh, model_config, stage, seed, lora)
