"""The target-position loss (llava_jax.train.target_loss) equals the full-sequence loss, gradients too."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax.data.conversation import IGNORE_INDEX
from llava_jax.models.config import TextConfig
from llava_jax.models.llava import LlavaModel
from llava_jax.recipes.tiny import tiny_llava_config
from llava_jax.train import step as S
from llava_jax.train import target_loss as T


def test_bucket_sizes_and_choice():
    assert T.bucket_sizes(511) == (128, 256, 384, 511)
    assert T.bucket_sizes(40, chunk=8) == (16, 24, 32, 40)
    assert T.bucket_sizes(3) == (3,)
    sizes = T.bucket_sizes(511)
    for longest, expected in [(0, 0), (1, 0), (128, 0), (129, 1), (255, 1), (256, 1), (257, 2), (511, 3)]:
        mask = np.zeros((3, 511), bool)
        mask[1, :longest] = True
        mask[2, :min(longest, 5)] = True
        assert int(T.choose_bucket(sizes, jnp.asarray(mask))) == expected, longest


def test_compaction_keeps_each_rows_targets_in_order():
    mask = jnp.array([[False, True, False, True], [True, False, False, False]])
    targets = jnp.array([[0, 5, 0, 7], [9, 0, 0, 0]])
    hidden = jnp.arange(8, dtype=jnp.float32).reshape(2, 4, 1)
    h, t, m = T.compact_targets(hidden, targets, mask)
    np.testing.assert_array_equal(m, [[True, True, False, False], [True, False, False, False]])
    np.testing.assert_array_equal(t[:, :2], [[5, 7], [9, 0]])
    np.testing.assert_array_equal(h[0, :2, 0], [1, 3])


def _batch(cfg, length):
    """Rows whose targets differ in number and place: a short answer, a long one, none, a packed row."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.image_token_id, size=(4, length)).astype(np.int32)
    labels = np.full_like(ids, IGNORE_INDEX)
    labels[0, 30:34] = ids[0, 30:34]
    labels[1, 3:] = ids[1, 3:]
    labels[3, 5:12] = ids[3, 5:12]
    labels[3, 20:] = ids[3, 20:]
    seg = np.ones_like(ids)
    seg[3, 16:] = 2
    seg[1, length - 4:] = 0
    pos = np.broadcast_to(np.arange(length, dtype=np.int32), ids.shape).copy()
    return dict(input_ids=ids, labels=labels, segment_ids=seg, positions=pos)


def _full_loss(model, batch):
    """The reference: logits at every position, masked NLL summed."""
    h = model.hidden_states(batch["input_ids"], None, segment_ids=batch["segment_ids"],
                            positions=batch["positions"])
    targets, mask = S.shifted_targets(batch["labels"], batch["segment_ids"])
    return jnp.sum(jnp.where(mask, T.token_nll(model.logits_from_hidden(h[:, :-1]), targets), 0.0))


def _assert_close_trees(got, want, rtol):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        scale = float(np.max(np.abs(b)))
        err = float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        assert err <= rtol * scale, (jax.tree_util.keystr(path), err, scale)


def test_target_loss_and_gradients_equal_the_full_sequence_loss():
    # 39 target columns -> buckets 16, 24, 32, 39: the full batch's longest row (36 targets) needs the
    # whole row, `few` (row 1's targets dropped) the 32 bucket. Untied head, then a tied one (the
    # embedding's gradient then adds the head's to the lookup's).
    cases = [(False, "full", 0), (False, "full", 8), (False, "few", 0), (False, "few", 8), (True, "full", 0)]
    models = {}
    for tied, which, chunk in cases:
        if tied not in models:
            text = TextConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                              num_kv_heads=2, max_position_embeddings=64, tie_word_embeddings=tied)
            cfg = tiny_llava_config(text=text)
            models[tied] = (cfg,) + nnx.split(LlavaModel(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
        cfg, graphdef, params, rest = models[tied]
        batch = _batch(cfg, 40)
        if which == "few":
            batch["labels"] = np.where(np.arange(4)[:, None] == 1, IGNORE_INDEX, batch["labels"])
        want_loss, want_grads = jax.jit(jax.value_and_grad(
            lambda p: _full_loss(nnx.merge(graphdef, p, rest), batch)))(params)
        ours = lambda p: S.summed_nll(nnx.merge(graphdef, p, rest), batch, loss_chunk=chunk)[0]  # noqa: E731
        loss, grads = jax.jit(jax.value_and_grad(ours))(params)
        np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
        _assert_close_trees(grads, want_grads, rtol=1e-6)
        # without differentiation (the eval path) the same value
        np.testing.assert_allclose(float(jax.jit(ours)(params)), float(want_loss), rtol=1e-6)
