"""A frozen bfloat16 or int8 base: the logits of a LoRA model (adapters at their no-op init) stay
close to the float32 model's, and the layer computes exactly the dequantized product."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llava_jax.models import lora as lora_lib
from llava_jax.models.llava import LlavaModel
from llava_jax.recipes.tiny import tiny_llava_config
from llava_jax.testing.batches import make_batch


def _model(cfg, params, lora=None):
    model = nnx.eval_shape(lambda: LlavaModel(cfg, rngs=nnx.Rngs(0), lora=lora))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model


def _logits(model, batch):
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))
    return np.asarray(run(state, batch["input_ids"], batch["pixel_values"][:, 0], batch["segment_ids"]))


@pytest.fixture(scope="module")
def reference():
    cfg = tiny_llava_config()
    plain = LlavaModel(cfg, rngs=nnx.Rngs(3))
    batch = make_batch(cfg, 2, 16, seed=2, packed_rows=0)
    return cfg, nnx.to_pure_dict(nnx.state(plain, nnx.Param)), batch, _logits(plain, batch)


# Max logit error relative to the logits' spread: float32 is exact; bfloat16 kernels (8 mantissa
# bits) and int8 per-channel kernels cost about 1e-3 and 1e-2 of it on this model.
@pytest.mark.parametrize("base_dtype, bound", [("float32", 1e-6), ("bfloat16", 1e-2), ("int8", 5e-2)])
def test_base_dtype_logit_error(reference, base_dtype, bound):
    cfg, plain, batch, ref = reference
    lora = lora_lib.LoraConfig(rank=4, alpha=8, base_dtype=base_dtype)
    fresh = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: LlavaModel(cfg, rngs=nnx.Rngs(0), lora=lora)),
                                       nnx.Param))
    adapters = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), lora_lib.adapter_params(fresh))
    base = lora_lib.base_params_for(plain, lora)
    kernel = base["language_model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert kernel.dtype == jnp.dtype(base_dtype)
    got = _logits(_model(cfg, _merge(base, adapters), lora), batch)
    real = batch["segment_ids"] != 0
    rel = float(np.abs(got[real] - ref[real]).max() / ref[real].std())
    assert rel <= bound, (base_dtype, rel)
    if base_dtype != "float32":
        assert rel > 1e-7  # the base really is held in the lower precision


def test_int8_layer_is_the_dequantized_product():
    lora = lora_lib.LoraConfig(rank=2, alpha=2, base_dtype="int8")
    layer = lora_lib.LoraDense(16, 8, axes=("embed", "mlp"), lora=lora, adapted=True, rngs=nnx.Rngs(0))
    layer.lora_b[...] = jnp.ones((2, 8)) * 0.1
    x = jax.random.normal(jax.random.key(1), (3, 16))
    w = lora_lib.base_kernel(layer.kernel[...], layer.kernel_scale[...])
    want = x @ w + x @ layer.lora_a[...] @ layer.lora_b[...] * lora.scaling
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(want), atol=1e-6)


def _merge(a, b):
    from llava_jax.train.step import _deep_merge

    return _deep_merge(a, b)
