"""bfloat16 compute accumulates every product in float32 (issue #19 item 4): the forward pass and
both gradients of `layers.matmul`, and every dot of the bf16 train step under each remat policy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core

from llava_jax import sharding
from llava_jax.models import layers as L
from llava_jax.recipes.tiny import tiny_llava_config
from llava_jax.testing.batches import make_batch
from llava_jax.train.defaults import base_config
from llava_jax.train.setup import train_setup


def _bf16(shape, seed):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(jnp.bfloat16)


def _f32(x):
    return np.asarray(x.astype(jnp.float32))


def test_bf16_matmul_and_its_gradients_round_once_from_float32_sums():
    x, w, g = _bf16((64, 384), 0), _bf16((384, 48), 1), _bf16((64, 48), 2)
    y, vjp = jax.vjp(L.matmul, x, w)
    dx, dw = vjp(g)
    assert (y.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16,) * 3
    # float32 products of the same bf16 operands, rounded to bf16 once: equal up to one bf16 rounding
    # step (sum order); a bf16 running sum over 384 terms would be off by many steps.
    for got, want in ((y, _f32(x) @ _f32(w)), (dx, _f32(g) @ _f32(w).T), (dw, _f32(x).T @ _f32(g))):
        want_bf16 = _f32(jnp.asarray(want).astype(jnp.bfloat16))
        np.testing.assert_allclose(_f32(got), want_bf16, rtol=2 ** -7, atol=1e-6)


def test_float32_matmul_is_the_plain_product():
    x = jax.random.normal(jax.random.key(0), (5, 7))
    w = jax.random.normal(jax.random.key(1), (7, 3))
    np.testing.assert_array_equal(np.asarray(L.matmul(x, w)), np.asarray(jnp.dot(x, w)))
    assert "custom_vjp" not in str(jax.make_jaxpr(L.matmul)(x, w))


def _sub_jaxprs(value):
    if isinstance(value, jex_core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jex_core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def _dots(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for value in eqn.params.values():
            for sub in _sub_jaxprs(value):
                yield from _dots(sub)


@pytest.mark.parametrize("remat,attention", [("nothing_saveable", "xla"), ("dots_saveable", "xla_blocked"),
                                             ("save_qkv_proj", "xla")])
def test_every_dot_of_the_bf16_train_step_accumulates_in_float32(remat, attention):
    cfg = tiny_llava_config().replace(dtype="bfloat16", remat_policy=remat, attention_impl=attention)
    c = base_config(cfg)
    c.stage, c.global_batch_size, c.microbatch_size = 2, 2, 2
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    setup = train_setup(c, cfg, mesh, 10)
    state = setup.init_state()
    batch = make_batch(cfg, 2, 24, seed=1)
    with jax.set_mesh(mesh):
        step = setup.jit_train_step(sharding.tree_batch_shardings(mesh, batch))
        jaxpr = jax.make_jaxpr(step)(state, batch).jaxpr
    dots = list(_dots(jaxpr))
    low = [e for e in dots if any(v.aval.dtype != jnp.float32 for v in e.invars)]
    # forward and backward of the vision tower, projector, decoder layers, attention and the head
    assert len(low) >= 20, f"only {len(low)} bf16 products in the step: is it running in bf16?"
    bad = [e for e in low if e.params.get("preferred_element_type") != jnp.float32]
    assert not bad, "bf16 products without float32 accumulation:\n" + "\n".join(str(e)[:200] for e in bad[:5])
    mixed = [e for e in dots if len({v.aval.dtype for v in e.invars}) > 1]
    assert not mixed, "products of mixed dtypes (run at the float32 rate):\n" + "\n".join(str(e)[:200] for e in mixed[:5])
