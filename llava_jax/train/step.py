"""The jitted train step: next-token cross-entropy over the trainable subset, accumulation, AdamW.

The train state is a plain dict of pytrees (what the checkpoint saves):
  step      () int32
  params    trainable parameters (nested dict, as nnx.to_pure_dict gives)
  frozen    everything else of the model state; passed through untouched
  opt_state optax state over `params` only
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from llava_jax import sharding
from llava_jax.data.conversation import IGNORE_INDEX
from llava_jax.keypaths import key_names
from llava_jax.train import target_loss

BATCH_KEYS = ("input_ids", "labels", "segment_ids", "positions", "pixel_values")


# ----- loss -----------------------------------------------------------------------------------

def shifted_targets(labels, segment_ids):
    """Targets for positions 0..S-2 (token t predicts label t+1) and their validity mask.

    A target counts when it is not IGNORE_INDEX, is a real token, and belongs to the same segment as the
    token predicting it (so a packed row never predicts across samples).
    """
    targets = labels[:, 1:]
    seg_next, seg_here = segment_ids[:, 1:], segment_ids[:, :-1]
    mask = (targets != IGNORE_INDEX) & (seg_next == seg_here) & (seg_next != 0)
    return jnp.where(mask, targets, 0), mask


def summed_nll(model, batch, *, loss_chunk: int = 0):
    """(sum of target-token NLL, number of target tokens) for one (micro)batch.

    The vocabulary projection runs over target positions only (llava_jax.train.target_loss); with
    loss_chunk > 0 it runs loss_chunk positions at a time, so at most (B, loss_chunk, V) logits
    exist at once.
    """
    hidden = model.hidden_states(batch["input_ids"], batch.get("pixel_values"),
                                 segment_ids=batch["segment_ids"], positions=batch["positions"],
                                 image_sizes=batch.get("image_sizes"))
    targets, mask = shifted_targets(batch["labels"], batch["segment_ids"])
    count = mask.sum(dtype=jnp.int32)
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)

    def logits_fn(values, h):
        return nnx.merge(graphdef, jax.tree.unflatten(treedef, values)).logits_from_hidden(h)

    total = target_loss.target_nll_sum(logits_fn, leaves, hidden[:, :-1], targets, mask, chunk=loss_chunk)
    return total, count


def count_targets(batch):
    return shifted_targets(batch["labels"], batch["segment_ids"])[1].sum(dtype=jnp.int32)


# ----- the step -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Static pieces the step closes over."""

    graphdef: Any
    tx: optax.GradientTransformation
    schedule: Callable
    num_microbatches: int = 1
    loss_chunk: int = 0
    dropout_seed: Optional[int] = None  # LoRA adapter dropout: masks from fold_in(seed, step, microbatch)


def _split_microbatches(batch, n: int):
    """(B, ...) -> (n, B/n, ...). Row j*n + i goes to microbatch i so each microbatch keeps the
    batch axis evenly split over the devices (the leading axis stays the sharded one)."""
    def one(x):
        b = x.shape[0]
        if b % n:
            raise ValueError(f"global batch {b} is not divisible into {n} microbatches")
        x = x.reshape(b // n, n, *x.shape[1:]).swapaxes(0, 1)
        spec = P(None, sharding.BATCH_AXES, *([None] * (x.ndim - 2)))
        return sharding.constrain_spec(x, spec)
    return jax.tree.map(one, batch)


def loss_and_grads(spec: StepSpec, params, frozen, batch, grad_shardings=None, step=None):
    """(mean loss over all target tokens of the batch, grads of that mean, target count)."""
    count = count_targets(batch)
    # An all-masked batch gives loss 0 and zero gradients instead of 0/0.
    denom = jnp.maximum(count, 1).astype(jnp.float32)

    def loss_fn(p, mb, index=0):
        model = nnx.merge(spec.graphdef, p, frozen)
        if spec.dropout_seed is None or step is None:
            total, _ = summed_nll(model, mb, loss_chunk=spec.loss_chunk)
        else:
            from llava_jax.models.lora import dropout_key

            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(spec.dropout_seed), step), index)
            with dropout_key(key):
                total, _ = summed_nll(model, mb, loss_chunk=spec.loss_chunk)
        return total / denom

    if spec.num_microbatches <= 1:
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        return loss, grads, count

    def body(carry, inputs):
        loss_acc, grad_acc = carry
        index, mb = inputs
        loss, grads = jax.value_and_grad(loss_fn)(params, mb, index)
        grad_acc = jax.tree.map(jnp.add, grad_acc, grads)
        if grad_shardings is not None:
            grad_acc = jax.lax.with_sharding_constraint(grad_acc, grad_shardings)
        return (loss_acc + loss, grad_acc), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    if grad_shardings is not None:
        zeros = jax.lax.with_sharding_constraint(zeros, grad_shardings)
    (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                    (jnp.arange(spec.num_microbatches),
                                     _split_microbatches(batch, spec.num_microbatches)))
    return loss, grads, count


def train_step(spec: StepSpec, state, batch, grad_shardings=None):
    loss, grads, count = loss_and_grads(spec, state["params"], state["frozen"], batch, grad_shardings,
                                        step=state["step"])
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = spec.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = dict(loss=loss, grad_norm=grad_norm, lr=spec.schedule(state["step"]),
                   num_targets=count, all_masked=(count == 0).astype(jnp.int32),
                   num_tokens=(batch["segment_ids"] != 0).sum(dtype=jnp.int32))
    new_state = dict(step=state["step"] + 1, params=params, frozen=state["frozen"], opt_state=opt_state)
    return new_state, metrics


def eval_step(spec: StepSpec, state, batch):
    """(summed NLL, target count) of a held-out batch; the caller divides after summing batches."""
    model = nnx.merge(spec.graphdef, state["params"], state["frozen"])
    return summed_nll(model, batch, loss_chunk=spec.loss_chunk)


def jit_train_step(spec: StepSpec, mesh, state_shardings, batch_shardings):
    """jax.jit of train_step with donated state and explicit shardings (trace it under set_mesh)."""
    replicated = NamedSharding(mesh, P())
    grad_shardings = state_shardings["params"]
    return jax.jit(lambda s, b: train_step(spec, s, b, grad_shardings),
                   in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)


def jit_eval_step(spec: StepSpec, mesh, state_shardings, batch_shardings):
    replicated = NamedSharding(mesh, P())
    return jax.jit(lambda s, b: eval_step(spec, s, b), in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(replicated, replicated))


# ----- building the state: abstract first, then created directly in its shardings ------------

@dataclasses.dataclass(frozen=True)
class StateLayout:
    """The train state's structure: abstract values (ShapeDtypeStruct with .sharding) and shardings."""

    graphdef: Any
    abstract: dict
    shardings: dict


def _model_factory(model_config, seed: int, lora=None):
    from llava_jax.models.config import config_from_any
    from llava_jax.models.llava import LlavaModel

    cfg = config_from_any(model_config)
    return lambda: LlavaModel(cfg, rngs=nnx.Rngs(seed), lora=lora)


def _split_pure(model, stage: int, lora=None):
    from llava_jax.train.optim import split_trainable

    graphdef, state = nnx.split(model)
    trainable, frozen = split_trainable(state, stage, lora)
    return graphdef, nnx.to_pure_dict(trainable), nnx.to_pure_dict(frozen), (trainable, frozen)


def state_layout(model_config, stage: int, tx, mesh, seed: int = 0, lora=None) -> StateLayout:
    """Abstract train state and its shardings; nothing is allocated. lora: a LoraConfig (the
    trainable part is then the adapters and the projector)."""
    abstract_model = nnx.eval_shape(_model_factory(model_config, seed, lora))
    graphdef, params, frozen, (trainable_vars, frozen_vars) = _split_pure(abstract_model, stage, lora)
    replicated = NamedSharding(mesh, P())
    param_sh = nnx.to_pure_dict(sharding.state_shardings(trainable_vars, mesh))
    frozen_sh = nnx.to_pure_dict(sharding.state_shardings(frozen_vars, mesh))
    opt_abstract = jax.eval_shape(tx.init, params)
    # Optimizer moments mirror the parameters' shardings; counters and the like are replicated.
    opt_sh = _mirror_shardings(opt_abstract, params, param_sh, replicated)
    shardings = dict(step=replicated, params=param_sh, frozen=frozen_sh, opt_state=opt_sh)
    abstract = dict(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, frozen=frozen,
                    opt_state=opt_abstract)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return StateLayout(graphdef, abstract, shardings)


def _mirror_shardings(opt_abstract, params, param_shardings, default):
    """Shardings for an optax state: a leaf whose key path ends with a parameter's path (mu, nu,
    ... under any chain/multi_transform nesting) and has its shape takes that parameter's sharding."""
    by_path = {}
    for (path, leaf), sh in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(param_shardings)):
        by_path[key_names(path)] = (tuple(leaf.shape), sh)

    def one(path, leaf):
        names = key_names(path)
        for start in range(len(names)):
            hit = by_path.get(names[start:])
            if hit is not None and hit[0] == tuple(leaf.shape):
                return hit[1]
        return default

    return jax.tree_util.tree_map_with_path(one, opt_abstract)


def init_state(layout: StateLayout, model_config, stage: int, tx, mesh, seed: int = 0, lora=None) -> dict:
    """Random-init the model and optimizer directly into their shardings (one jit, out_shardings)."""
    factory = _model_factory(model_config, seed, lora)

    def create():
        _, params, frozen, _ = _split_pure(factory(), stage, lora)
        return dict(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen, opt_state=tx.init(params))

    with jax.set_mesh(mesh):
        return jax.jit(create, out_shardings=layout.shardings)()


def merged_params(state) -> dict:
    """The full model parameter tree (trainable + frozen) as one nested dict (no copies)."""
    return _deep_merge(state["frozen"], state["params"])


def split_params(full: dict, layout: StateLayout) -> tuple:
    """Inverse of merged_params: pick the trainable and frozen subtrees by the layout's structure."""
    return _pick(full, layout.abstract["params"]), _pick(full, layout.abstract["frozen"])


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _pick(full: dict, like: dict) -> dict:
    return {k: _pick(full[k], v) if isinstance(v, dict) else full[k] for k, v in like.items()}
