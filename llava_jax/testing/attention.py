"""One tiny LLaVA run under two attention implementations: the model-level check shared by the
splash and blocked-attention tests (each keeps its own tolerance on the logits)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax.models.llava import LlavaModel
from llava_jax.recipes.tiny import tiny_llava_config
from llava_jax.testing.batches import make_batch


def logits_and_grads(impls=("xla",)) -> tuple:
    """(real-token mask, {impl: (logits, flat gradient leaves)}) of the tiny LLaVA (GQA decoder, a
    packed batch of 2 x 40 tokens) built with the same seed under each attention_impl in `impls`."""
    cfg = tiny_llava_config()
    batch = make_batch(cfg, 2, 40, seed=3, packed_rows=1)
    real = batch["segment_ids"] != 0

    def loss(model):
        logits = model(batch["input_ids"], batch["pixel_values"], segment_ids=batch["segment_ids"],
                       positions=batch["positions"])
        return jnp.sum(jax.nn.log_softmax(logits)[..., 5] * real), logits

    out = {}
    for impl in impls:
        model = LlavaModel(cfg.replace(attention_impl=impl), rngs=nnx.Rngs(0))
        (_, logits), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
        out[impl] = (np.asarray(logits), jax.tree.leaves(nnx.to_pure_dict(grads)))
    return np.asarray(real), out


def assert_grads_close(flat, flat_ref, rel: float = 1e-6) -> None:
    """Every gradient leaf within rel of its reference leaf's largest value (+1: gradients reach ~300)."""
    assert len(flat) == len(flat_ref) > 10
    for g, g_ref in zip(flat, flat_ref):
        scale = float(np.abs(np.asarray(g_ref)).max()) + 1.0
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=rel * scale, rtol=0)
