"""The train step on one device: the loss definition, freezing, accumulation, optimizer details."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from llava_jax import sharding
from llava_jax.data.conversation import IGNORE_INDEX
from llava_jax.recipes.tiny import tiny_llava_config
from llava_jax.testing.batches import make_batch
from llava_jax.train import optim
from llava_jax.train import step as S
from llava_jax.train.defaults import base_config
from llava_jax.train.setup import train_setup

SEQ = 24


def _setup(stage, *, microbatches=1, loss_chunk=0, eps=1e-8, projector_lr=0.0, total=10):
    cfg = tiny_llava_config()
    c = base_config(cfg)
    c.optim.lr = 1e-3
    c.optim.projector_lr = projector_lr
    c.optim.warmup_ratio = 0.0
    c.optim.weight_decay = 0.1
    c.optim.eps = eps
    c.stage, c.global_batch_size, c.microbatch_size, c.loss_chunk_size = stage, 4, 4 // microbatches, loss_chunk
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    setup = train_setup(c, cfg, mesh, total)
    assert setup.spec.num_microbatches == microbatches
    state = setup.init_state()
    batch = make_batch(cfg, 4, SEQ, seed=1, packed_rows=2)
    bsh = sharding.tree_batch_shardings(mesh, batch)
    with jax.set_mesh(mesh):
        step = setup.jit_train_step(bsh)
    return cfg, mesh, setup.layout, state, step, batch


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _equal_trees(a, b):
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(x, y), a, b)))


def test_shifted_targets_mask_ignore_padding_and_segment_changes():
    labels = jnp.array([[IGNORE_INDEX, 5, 6, IGNORE_INDEX, 8, 9, 7, 0]])
    seg = jnp.array([[1, 1, 1, 2, 2, 2, 0, 0]])
    targets, mask = S.shifted_targets(labels, seg)
    # predicting position t -> label t+1; label 8 (first real target of segment 2) is predicted by
    # a segment-2 token; the label at position 6 is padding (segment 0) and never counts.
    np.testing.assert_array_equal(mask[0], [True, True, False, True, True, False, False])
    np.testing.assert_array_equal(targets[0][mask[0]], [5, 6, 8, 9])
    # a target whose predicting token is in another segment is masked even without IGNORE_INDEX
    _, mask2 = S.shifted_targets(jnp.array([[1, 2, 3, 4]]), jnp.array([[1, 1, 2, 2]]))
    np.testing.assert_array_equal(mask2[0], [True, False, True])


def test_optimizer_masks_schedule_and_groups():
    params = {"projector": {"linear_1": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}},
              "language_model": {"norm": {"scale": jnp.ones(2)},
                                 "layers": {"input_layernorm": {"scale": jnp.ones((3, 2))},
                                            "mlp": {"up_proj": {"kernel": jnp.ones((3, 2, 2))}}},
                                 "embed_tokens": {"embedding": jnp.ones((4, 2))}}}
    mask = optim.decay_mask(params)
    assert mask["projector"]["linear_1"] == {"kernel": True, "bias": False}
    assert mask["language_model"]["norm"]["scale"] is False
    assert mask["language_model"]["layers"]["input_layernorm"]["scale"] is False  # stacked (L, D)
    assert mask["language_model"]["layers"]["mlp"]["up_proj"]["kernel"] is True
    assert mask["language_model"]["embed_tokens"]["embedding"] is True

    c = base_config().optim
    c.lr, c.warmup_ratio = 2e-5, 0.03
    sched = optim.lr_schedule(c, 1000, c.lr)
    assert optim.warmup_steps(c, 1000) == 30
    assert float(sched(0)) == 0.0
    assert float(sched(15)) == pytest.approx(1e-5, rel=1e-5)
    assert float(sched(30)) == pytest.approx(2e-5, rel=1e-5)
    assert float(sched(515)) == pytest.approx(1e-5, rel=1e-3)  # cosine midpoint
    assert float(sched(1000)) == pytest.approx(0.0, abs=1e-12)

    # separate projector lr: with weight decay 0 and plain SGD-like first Adam step (eps large),
    # the projector moves 10x as far as the LLM for the same gradient.
    c.lr, c.projector_lr, c.warmup_ratio, c.eps, c.weight_decay, c.grad_clip = 1e-3, 1e-2, 0.0, 1e3, 0.0, 0.0
    tx, _ = optim.make_optimizer(c, 10)
    p = {"projector": {"w": jnp.zeros(2)}, "language_model": {"w": jnp.zeros(2)}}
    g = {"projector": {"w": jnp.ones(2)}, "language_model": {"w": jnp.ones(2)}}
    upd, _ = tx.update(g, tx.init(p), p)
    ratio = upd["projector"]["w"] / upd["language_model"]["w"]
    np.testing.assert_allclose(ratio, 10.0, rtol=1e-5)


def test_stage1_trains_only_the_projector_and_survives_an_all_masked_batch():
    cfg, mesh, layout, state, step, batch = _setup(1)
    assert set(state["params"]) == {"projector"}
    opt_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state["opt_state"])
                 if np.ndim(_) > 0]
    assert opt_paths and all("'projector'" in p for p in opt_paths), opt_paths
    initial = _host(S.merged_params(state))
    masked = make_batch(cfg, 4, SEQ, seed=2, all_masked=True)
    losses = []
    with jax.set_mesh(mesh):
        for b in (batch, masked, make_batch(cfg, 4, SEQ, seed=3)):
            state, metrics = step(state, b)
            losses.append(_host(metrics))
    assert losses[1]["all_masked"] == 1 and losses[1]["num_targets"] == 0
    assert losses[1]["loss"] == 0.0 and losses[1]["grad_norm"] == 0.0
    assert losses[0]["all_masked"] == 0 and np.isfinite(losses[2]["loss"]) and losses[2]["loss"] > 0
    final = _host(S.merged_params(state))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(final))
    assert _equal_trees(final["vision_tower"], initial["vision_tower"])
    assert _equal_trees(final["language_model"], initial["language_model"])
    assert not np.array_equal(final["projector"]["linear_1"]["kernel"], initial["projector"]["linear_1"]["kernel"])
    assert int(state["step"]) == 3


def test_stage2_step_loss_accumulation_and_frozen_vision():
    cfg, mesh, layout, state0, step, batch = _setup(2, eps=1e-3)
    assert set(state0["params"]) == {"projector", "language_model"}
    initial = _host(S.merged_params(state0))
    _, _, _, state_acc, step_acc, _ = _setup(2, eps=1e-3, microbatches=2, loss_chunk=7)

    # Reference loss from the public model call: mean NLL over all target tokens of the batch.
    model = nnx.merge(layout.graphdef, state0["params"], state0["frozen"])
    logits = np.asarray(model(batch["input_ids"], batch["pixel_values"], segment_ids=batch["segment_ids"],
                              positions=batch["positions"]), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    seg, labels = batch["segment_ids"], batch["labels"]
    nll, per_row = [], []
    for b in range(labels.shape[0]):
        row = [-logp[b, t, labels[b, t + 1]] for t in range(SEQ - 1)
               if labels[b, t + 1] != IGNORE_INDEX and seg[b, t + 1] == seg[b, t] != 0]
        nll += row
        per_row.append(np.mean(row))
    expected = float(np.mean(nll))
    assert abs(expected - float(np.mean(per_row))) > 1e-4  # rows differ in length: the definitions differ

    with jax.set_mesh(mesh):
        state1, metrics = step(state0, batch)
        state2, metrics_acc = step_acc(state_acc, batch)
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-5)
    assert int(metrics["num_targets"]) == len(nll)
    # 2 microbatches (and a chunked vocabulary projection) == one big batch
    assert float(metrics_acc["loss"]) == pytest.approx(float(metrics["loss"]), rel=1e-5)
    assert float(metrics_acc["grad_norm"]) == pytest.approx(float(metrics["grad_norm"]), rel=1e-5)
    one, acc = _host(S.merged_params(state1)), _host(S.merged_params(state2))
    for a, b in zip(jax.tree.leaves(acc), jax.tree.leaves(one)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

    assert _equal_trees(one["vision_tower"], initial["vision_tower"])
    assert not np.array_equal(one["language_model"]["lm_head"]["kernel"],
                              initial["language_model"]["lm_head"]["kernel"])
    assert not np.array_equal(one["projector"]["linear_2"]["kernel"], initial["projector"]["linear_2"]["kernel"])
