"""The inference layout (llava_jax.models.layout: unstacked decoder, per-layer KV cache updated in
place, fused projections, bf16/int8 language-model weights) and the pure conversions to it."""
import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llava_jax.models import layers as L
from llava_jax.models import layout as layout_lib
from llava_jax.models.layout import TRAINING, DecoderLayout
from llava_jax.models.llama import LayerCache, extend_cache
from llava_jax.models.llava import LlavaModel, with_layout
from llava_jax.recipes.tiny import tiny_llava_config
from llava_jax.testing import hf_reference as R

gen = importlib.import_module("llava_jax.infer.generate")


@pytest.fixture(scope="module")
def model():
    return LlavaModel(tiny_llava_config(), rngs=nnx.Rngs(5))


@pytest.fixture(scope="module")
def reference_logits(model):
    ids, mask, pixels = _prompt(model.config, seed=1)
    return np.asarray(R.jitted(model)(ids, pixels, mask))


def _unstacked_copy(model):
    return with_layout(model, DecoderLayout(stacked=False))


def _prompt(config, rows=2, length=14, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, config.image_token_id, (rows, length)).astype(np.int32)
    t = config.num_image_tokens
    ids[:, 4:4 + t] = config.image_token_id
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    ids = np.where(mask == 1, ids, config.pad_token_id)
    size = config.vision.image_size
    pixels = rng.normal(size=(rows, size, size, 3)).astype(np.float32)
    return ids, mask, pixels


def test_unstacked_layers_give_the_same_logits(model):
    unstacked = _unstacked_copy(model)
    assert model.language_model.layout.stacked  # the original keeps its stacked layers
    ids, mask, pixels = _prompt(model.config)
    full = np.asarray(R.jitted(model)(ids, pixels, mask))
    np.testing.assert_allclose(np.asarray(R.jitted(unstacked)(ids, pixels, mask)), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("unstack", [False, True])
def test_cached_decode_through_an_extended_cache_equals_full_forward(model, unstack):
    """Both layouts of the one cache (a stacked LayerCache, or one per layer): prefill 8 tokens
    into a 10-slot cache, extend it to 16 slots (`extend_cache`), then one token at a time."""
    config = model.config
    ids, mask, pixels = _prompt(config)
    full = np.asarray(R.jitted(model)(ids, pixels, mask))
    decoder = _unstacked_copy(model) if unstack else model
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    graphdef, state = nnx.split(decoder)

    @jax.jit
    def step(state, ids, pixels, mask, positions, cache):
        return nnx.merge(graphdef, state)(ids, pixels, mask, positions=positions, cache=cache)

    kvh, hd, layers = config.text.num_kv_heads, config.text.head_dim, config.text.num_layers
    logits, cache = step(state, ids[:, :8], pixels, mask[:, :8], positions[:, :8], decoder.init_cache(2, 10))
    cache = extend_cache(cache, 16)
    if unstack:  # GQA: 4 heads, 2 KV heads
        assert len(cache["layers"]) == layers and isinstance(cache["layers"][0], LayerCache)
        assert cache["layers"][0].k.shape == (2 * kvh, 16, hd)
    else:
        assert isinstance(cache["layers"], LayerCache) and cache["layers"].v.shape == (layers, 2 * kvh, 16, hd)
    assert cache["segment"].shape == (2, 16) and not np.asarray(cache["segment"])[:, 8:].any()
    outs = [np.asarray(logits)]
    for t in range(8, ids.shape[1]):
        logits, cache = step(state, ids[:, t:t + 1], None, mask[:, t:t + 1], positions[:, t:t + 1], cache)
        outs.append(np.asarray(logits))
    real = mask == 1
    np.testing.assert_allclose(np.concatenate(outs, axis=1)[real], full[real], atol=1e-4, rtol=0)
    assert int(cache["index"]) == ids.shape[1]
    with pytest.raises(ValueError, match="cannot shrink a 16-slot cache to 12"):
        extend_cache(cache, 12)


def test_fused_projections_give_the_same_logits_and_cached_decode(model, reference_logits):
    """The generator's decode copy: q/k/v and gate/up as single matmuls, same values as separate."""
    from llava_jax.models.llama import FusedGatedMLP

    fused = with_layout(model, DecoderLayout(stacked=False, fused=True))
    layer = fused.language_model.layers[0]
    text = model.config.text
    assert not hasattr(layer.self_attn, "q_proj") and isinstance(layer.mlp, FusedGatedMLP)
    qkv_width = (text.num_heads + 2 * text.num_kv_heads) * text.head_dim
    assert layer.self_attn.qkv_proj.kernel.shape == (text.hidden_size, qkv_width)
    assert layer.mlp.gate_up_proj.kernel.shape == (text.hidden_size, 2 * text.intermediate_size)
    ids, mask, pixels = _prompt(model.config, seed=1)
    np.testing.assert_allclose(np.asarray(R.jitted(fused)(ids, pixels, mask)), reference_logits, atol=1e-5, rtol=0)
    # greedy decoding through the generator (which fuses) == the same loop on the unfused copy
    generator = gen.Generator(model)
    assert isinstance(nnx.merge(generator.graphdef, generator.state).language_model.layers[0].mlp, FusedGatedMLP)
    kw = dict(max_new_tokens=6, eos_token_id=[])
    tokens = generator.generate(ids, pixels, mask, **kw)
    unfused = gen.Generator(model, fuse_projections=False)
    assert hasattr(nnx.merge(unfused.graphdef, unfused.state).language_model.layers[0].self_attn, "q_proj")
    np.testing.assert_array_equal(unfused.generate(ids, pixels, mask, **kw), tokens)


@pytest.mark.parametrize("rows", [1, 3])
def test_decode_step_updates_the_cache_in_place(model, rows):
    """The compiled decode chunk aliases every cache buffer to its output and never copies one."""
    generator = gen.Generator(model)
    batch, length = gen.batch_bucket(rows), 64
    cache = nnx.merge(generator.graphdef, generator.state).init_cache(batch, length)
    tok = jnp.zeros((batch,), jnp.int32)
    sampling = (jnp.zeros(batch), jnp.zeros(batch, jnp.int32), jnp.ones(batch),
                jax.vmap(jax.random.key)(jnp.zeros(batch, jnp.uint32)))
    hlo = generator._decode_chunk.lower(generator.state, cache, tok, tok, jnp.zeros(batch, bool), tok, tok + 4,
                                        jnp.int32(1), sampling, jnp.asarray([-1]), jnp.int32(0),
                                        num_steps=4, sample=False).compile().as_text()
    k_shape = cache["layers"][0].k.shape
    shape = "f32[" + ",".join(map(str, k_shape)) + "]"
    copies = [ln for ln in hlo.splitlines() if re.search(r"= " + re.escape(shape) + r"\{[\d,]*\} copy\(", ln)]
    assert not copies, copies[:3]
    header = hlo.splitlines()[0]  # HloModule ..., input_output_alias={ {out}: (param, {}, may-alias), ... }
    aliased = header.count("may-alias") + header.count("must-alias")
    assert aliased >= 2 * model.config.text.num_layers, header[:500]


def test_quantize_int8_round_trip():
    kernel = jax.random.normal(jax.random.key(0), (64, 24)) * jnp.linspace(0.01, 1.0, 24)
    q, scale = L.quantize_int8(kernel)
    assert q.dtype == jnp.int8 and scale.shape == (24,)
    assert int(jnp.max(jnp.abs(q))) == 127  # each channel uses the full range
    error = jnp.abs(q.astype(jnp.float32) * scale - kernel)
    assert bool(jnp.all(error <= scale / 2 + 1e-7))


@pytest.mark.parametrize("dtype,max_rel_error,shrink", [("bfloat16", 0.02, 1.9), ("int8", 0.06, 3.5)])
def test_light_weights_close_to_float32(model, reference_logits, dtype, max_rel_error, shrink):
    config = model.config
    generator = gen.Generator(model, weights_dtype=dtype)
    light = nnx.merge(generator.graphdef, generator.state)
    layer = light.language_model.layers[0]
    expected = L.Bf16Dense if dtype == "bfloat16" else L.Int8Dense
    assert isinstance(layer.self_attn.qkv_proj, expected) and isinstance(layer.mlp.gate_up_proj, expected)
    assert isinstance(layer.self_attn.o_proj, expected) and isinstance(light.language_model.lm_head, expected)
    full_bytes = layout_lib.weight_bytes(_unstacked_copy(model))
    assert layout_lib.weight_bytes(light) * shrink <= full_bytes

    ids, mask, pixels = _prompt(config, seed=1)
    ref = reference_logits
    got = np.asarray(R.jitted(light)(ids, pixels, mask))
    real = mask == 1
    error = np.max(np.abs(got[real] - ref[real])) / np.max(np.abs(ref[real]))
    assert 0 < error < max_rel_error, error
    # One row goes through the two-row matmul path; it must agree with the same row in a batch.
    one = np.asarray(R.jitted(light)(ids[:1], pixels[:1], mask[:1]))
    np.testing.assert_allclose(one, got[:1], atol=1e-4 * np.max(np.abs(ref)), rtol=0)
    if dtype == "int8":  # the generation loop itself does not depend on the kernel type
        tokens = generator.generate(ids, pixels, mask, max_new_tokens=5, eos_token_id=[])
        assert tokens.shape == (2, 5) and np.all((tokens >= 0) & (tokens < config.text.vocab_size))


def test_tied_embeddings_get_a_converted_projection():
    import dataclasses

    config = tiny_llava_config()
    config = config.replace(text=dataclasses.replace(config.text, tie_word_embeddings=True))
    tied = LlavaModel(config, rngs=nnx.Rngs(1))
    light = with_layout(tied, DecoderLayout(stacked=False, weights="int8"))
    assert isinstance(light.language_model.lm_head, L.Int8Dense)
    assert light.language_model.embed_tokens.embedding[...].dtype == jnp.float32  # lookups unchanged
    hidden = jax.random.normal(jax.random.key(3), (2, 3, config.text.hidden_size))
    ref = np.asarray(tied.language_model.logits(hidden))
    got = np.asarray(light.language_model.logits(hidden))
    assert 0 < np.max(np.abs(got - ref)) < 0.06 * np.max(np.abs(ref))


def test_weight_dtype_errors_name_the_choices(model):
    with pytest.raises(ValueError, match="unknown weights dtype 'fp8'.*bfloat16"):
        gen.Generator(model, weights_dtype="fp8")
    light = DecoderLayout(stacked=False, weights="int8")
    params = layout_lib.convert_params(nnx.to_pure_dict(nnx.state(model)), model.config.text, TRAINING, light)
    with pytest.raises(ValueError, match="cannot convert int8 kernels to float32"):
        layout_lib.convert_params(params, model.config.text, light, TRAINING)


@pytest.mark.parametrize("target", [DecoderLayout(stacked=False), DecoderLayout(fused=True),
                                    DecoderLayout(stacked=False, fused=True)])
def test_layout_conversions_are_pure_and_invertible(model, target):
    """training -> target -> training gives the parameters back exactly; the source dict is untouched."""
    text = model.config.text
    params = nnx.to_pure_dict(nnx.state(model))
    before = jax.tree.map(np.asarray, params)
    there = layout_lib.convert_params(params, text, TRAINING, target)
    back = layout_lib.convert_params(there, text, target, TRAINING)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, back, before)
    jax.tree.map(np.testing.assert_array_equal, params, before)
    built = nnx.state(with_layout(model, target))  # the model built in that layout holds exactly that dict
    assert jax.tree.structure(nnx.to_pure_dict(built)) == jax.tree.structure(there)


def test_lora_models_refuse_fused_or_light_layouts_and_generate_merged():
    from llava_jax.models.lora import LoraConfig

    lora = LoraConfig(rank=2)
    with pytest.raises(ValueError, match="merge the adapters"):
        LlavaModel(tiny_llava_config(), rngs=nnx.Rngs(0), lora=lora, layout=DecoderLayout(stacked=False, fused=True))
    adapted = LlavaModel(tiny_llava_config(), rngs=nnx.Rngs(0), lora=lora)
    generator = gen.Generator(adapted)  # adapters merged into plain, fused kernels
    assert nnx.merge(generator.graphdef, generator.state).language_model.lora is None
