"""generate(): parity with transformers' generate, sampling, stopping, buckets, streaming, sharding."""
import os
import importlib
import textwrap

import numpy as np
import pytest
import torch

from llava_jax.infer.generate import Generator, generate
from llava_jax.recipes.tiny import tiny_llava_config
from llava_jax.testing.processes import run_python

# The module itself (llava_jax.infer may export the function `generate` under the same name).
gen = importlib.import_module("llava_jax.infer.generate")

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def models():
    from llava_jax.testing.hf_reference import hf_llava, ours_from_hf

    config = tiny_llava_config()
    hf = hf_llava(config, seed=0)
    return hf, ours_from_hf(hf, config), config


def _left_padded_batch(config, lengths, seed=0):
    """Rows of different lengths, each with one image somewhere inside, left-padded with the pad id."""
    rng = np.random.default_rng(seed)
    t, width = config.num_image_tokens, max(lengths)
    ids = np.full((len(lengths), width), config.pad_token_id, np.int32)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        tokens = rng.integers(3, config.image_token_id, n)
        start = rng.integers(1, n - t)
        tokens[start:start + t] = config.image_token_id
        ids[row, width - n:] = tokens
        mask[row, width - n:] = 1
    size = config.vision.image_size
    pixels = rng.normal(size=(len(lengths), size, size, 3)).astype(np.float32)
    return ids, mask, pixels


def _hf_generate(hf, ids, mask, pixels, max_new_tokens, eos, pad):
    from transformers import GenerationConfig
    from llava_jax.testing.hf_reference import nhwc_to_nchw, to_torch

    gc = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    with torch.no_grad():
        out = hf.generate(input_ids=to_torch(ids, torch.long), attention_mask=to_torch(mask, torch.long),
                          pixel_values=nhwc_to_nchw(pixels), generation_config=gc)
    return out[:, ids.shape[1]:].numpy()


def test_greedy_equals_transformers_generate_left_padded_batch(models):
    hf, ours, config = models
    ids, mask, pixels = _left_padded_batch(config, [9, 17, 13])
    ours_tokens = generate(ours, ids, pixels, mask, max_new_tokens=32, eos_token_id=[])
    assert ours_tokens.shape == (3, 32) and ours_tokens.dtype == np.int32
    # An EOS that row 0 produces mid-answer: rows that stop are padded, the others run on.
    eos = int(ours_tokens[0, 6])
    hf_free = _hf_generate(hf, ids, mask, pixels, 32, eos=None, pad=config.pad_token_id)
    np.testing.assert_array_equal(ours_tokens, hf_free)
    hf_eos = _hf_generate(hf, ids, mask, pixels, 32, eos=eos, pad=config.pad_token_id)
    ours_eos = generate(ours, ids, pixels, mask, max_new_tokens=32, eos_token_id=eos)
    padded = np.full_like(ours_eos, config.pad_token_id)
    padded[:, :hf_eos.shape[1]] = hf_eos
    np.testing.assert_array_equal(ours_eos, padded)
    first_eos = list(ours_eos[0]).index(eos)
    assert first_eos <= 6 and (ours_eos[0, first_eos + 1:] == config.pad_token_id).all()


def test_sampling_reproducible_and_top_k_one_is_greedy(models):
    _, ours, config = models
    ids, mask, pixels = _left_padded_batch(config, [9, 17, 13], seed=1)
    greedy = generate(ours, ids, pixels, mask, max_new_tokens=12, eos_token_id=[])
    kw = dict(max_new_tokens=12, eos_token_id=[], temperature=1.5)
    a = generate(ours, ids, pixels, mask, seed=7, **kw)
    b = generate(ours, ids, pixels, mask, seed=7, **kw)
    c = generate(ours, ids, pixels, mask, seed=8, **kw)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any() and (a != greedy).any()
    np.testing.assert_array_equal(generate(ours, ids, pixels, mask, seed=7, top_k=1, **kw), greedy)
    # A tiny nucleus keeps only the most likely token: greedy again.
    np.testing.assert_array_equal(generate(ours, ids, pixels, mask, seed=7, top_p=1e-6, **kw), greedy)
    # top_k=3: every sampled token is among the 3 most likely after its prefix (one forward pass
    # over prompt + answer gives the next-token logits at every step).
    k3 = generate(ours, ids, pixels, mask, seed=3, top_k=3, **kw)[0, :6]
    prompt = ids[0][mask[0] == 1]
    logits = np.asarray(ours(np.concatenate([prompt, k3])[None].astype(np.int32), pixels[:1]))[0]
    for i, token in enumerate(k3):
        assert token in np.argsort(logits[len(prompt) - 1 + i])[-3:]


def test_filter_top_k_top_p_masks_exactly():
    import jax.numpy as jnp

    logits = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]] * 3, jnp.float32))
    out = np.asarray(gen._filter_top_k_top_p(logits, jnp.asarray([2, 0, 0]), jnp.asarray([1.0, 0.6, 0.8])))
    kept = np.isfinite(out)
    np.testing.assert_array_equal(kept, [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])


def test_two_stage_argmax_is_argmax():
    rng = np.random.default_rng(0)
    for vocab in (300, 32000):  # a partial last block, and whole blocks
        logits = rng.normal(size=(5, vocab)).astype(np.float32)
        logits[1, [7, vocab - 1]] = 10.0  # a tie: the first index wins
        logits[2, [200, 260]] = 10.0  # a tie across blocks
        logits[3, -1] = 10.0
        np.testing.assert_array_equal(np.asarray(gen.greedy_tokens(logits)), np.argmax(logits, -1))


def test_bounded_filter_equals_the_full_sort():
    import jax.numpy as jnp

    vocab = 32000
    assert gen.filter_width([0.0, 0.0], [5, 0], [0.5, 1.0], vocab) == 0  # greedy rows do not filter
    assert gen.filter_width([1.0, 0.0], [0, 9], [1.0, 0.5], vocab) == 0
    assert gen.filter_width([1.0, 1.0], [3, 40], [1.0, 0.9], vocab) == 64
    assert gen.filter_width([1.0, 1.0], [3, 0], [1.0, 0.9], vocab) == 1024  # a nucleus without top-k
    assert gen.filter_width([1.0], [4000], [1.0], vocab) == 4096
    assert gen.filter_width([1.0], [40000], [1.0], vocab) == vocab

    rng = np.random.default_rng(1)
    peaked = jnp.asarray(rng.normal(size=(5, 5000)) * 3, jnp.float32)
    top_k, top_p = jnp.asarray([5, 50, 0, 0, 0]), jnp.asarray([1.0, 0.9, 0.5, 0.2, 1.0])
    width = gen.filter_width(np.ones(5), np.asarray(top_k), np.asarray(top_p), 5000)
    assert width == 1024
    bounded = np.isfinite(np.asarray(gen._filter_top_k_top_p(peaked, top_k, top_p, width)))
    full = np.isfinite(np.asarray(gen._filter_top_k_top_p(peaked, top_k, top_p)))
    np.testing.assert_array_equal(bounded, full)
    kept = full.sum(-1)
    assert kept[0] == 5 and kept[1] <= 50 and 1 <= kept[3] <= kept[2] < 5000 and kept[4] == 5000
    # A nucleus wider than the ranked width: the filter ranks the whole vocabulary instead.
    flat = jnp.asarray(rng.normal(size=(2, 5000)) * 0.01, jnp.float32)
    wide_k, wide_p = jnp.asarray([0, 3]), jnp.asarray([0.99, 1.0])
    bounded = np.isfinite(np.asarray(gen._filter_top_k_top_p(flat, wide_k, wide_p, 64)))
    np.testing.assert_array_equal(bounded, np.isfinite(np.asarray(gen._filter_top_k_top_p(flat, wide_k, wide_p))))
    assert bounded[0].sum() > 4000 and bounded[1].sum() == 3


def test_growing_cache_gives_the_same_tokens(models):
    """A cache that starts with room for 8 new tokens and grows 8 slots at a time decodes as one
    allocated for the whole answer at once."""
    _, ours, config = models
    ids, mask, pixels = _left_padded_batch(config, [9, 17, 13], seed=4)
    kw = dict(max_new_tokens=30, eos_token_id=[])
    whole = Generator(ours).generate(ids, pixels, mask, **kw)
    growing = Generator(ours, chunk_size=4, cache_growth=8)
    lengths = []
    extend = growing._extend_cache
    growing._extend_cache = lambda cache, max_length: lengths.append(max_length) or extend(cache, max_length=max_length)
    np.testing.assert_array_equal(growing.generate(ids, pixels, mask, **kw), whole)
    assert lengths == [48, 56, 64], lengths  # 32 prompt slots + 8, then 8 more whenever a chunk needs them


def test_no_recompilation_within_a_bucket(models):
    _, ours, config = models
    generator = Generator(ours)
    lengths = [[9, 17, 13], [12, 20, 30], [25]]  # all in the 32-token bucket, batch bucket 4 or 1
    generator.generate(*_args(config, lengths[0]), max_new_tokens=10, eos_token_id=[])
    before = dict(gen.TRACE_COUNTS)
    generator.generate(*_args(config, lengths[1]), max_new_tokens=10, eos_token_id=[])
    generator.generate(*_args(config, lengths[1]), max_new_tokens=30, eos_token_id=[])  # same 64 rounding
    assert dict(gen.TRACE_COUNTS) == before
    generator.generate(*_args(config, [40, 33]), max_new_tokens=10, eos_token_id=[])  # next bucket
    assert gen.TRACE_COUNTS["prefill"] == before["prefill"] + 1


def test_one_line_generate_reuses_its_generator_until_the_weights_change():
    from flax import nnx

    from llava_jax.models.llava import LlavaModel

    config = tiny_llava_config()
    model = LlavaModel(config, rngs=nnx.Rngs(5))
    args = _args(config, [9, 17])
    first = generate(model, *args, max_new_tokens=6, eos_token_id=[])
    before = dict(gen.TRACE_COUNTS)
    np.testing.assert_array_equal(generate(model, *args, max_new_tokens=6, eos_token_id=[]), first)
    assert dict(gen.TRACE_COUNTS) == before  # the same compiled code
    # new parameter arrays (a training step, a load): a new Generator sees them
    head = model.language_model.lm_head
    head.kernel[...] = -head.kernel[...]
    changed = generate(model, *args, max_new_tokens=6, eos_token_id=[])
    assert gen.TRACE_COUNTS["prefill"] == before["prefill"] + 1
    np.testing.assert_array_equal(changed, Generator(model).generate(*args, max_new_tokens=6, eos_token_id=[]))
    assert not np.array_equal(changed, first)


def _args(config, lengths):
    ids, mask, pixels = _left_padded_batch(config, lengths, seed=len(lengths) + sum(lengths))
    return ids, pixels, mask


def test_stop_sequences_strings_streaming_and_per_row_limits(models):
    _, ours, config = models
    ids, mask, pixels = _left_padded_batch(config, [9, 17, 13], seed=2)
    free = generate(ours, ids, pixels, mask, max_new_tokens=16, eos_token_id=[])
    stop_seq = [int(free[1, 4]), int(free[1, 5])]
    streamed = []
    out = generate(ours, ids, pixels, mask, max_new_tokens=16, eos_token_id=[], stop=[stop_seq],
                   pad_token_id=-1, stream_callback=lambda t, a: streamed.append((t.copy(), a.copy())))
    for row in range(3):
        n = next((i + 1 for i in range(1, 16) if list(free[row, i - 1:i + 1]) == stop_seq), 16)
        np.testing.assert_array_equal(out[row, :n], free[row, :n])
        assert (out[row, n:] == -1).all()
    assert len(streamed) == max(int((out[r] != -1).sum()) for r in range(3))
    tokens = np.stack([t for t, _ in streamed], 1)
    active = np.stack([a for _, a in streamed], 1)
    np.testing.assert_array_equal(np.where(active, tokens, -1), out[:, :len(streamed)])

    class CharTokenizer:  # each token id decodes to one letter
        def decode(self, tokens):
            return "".join(chr(ord("a") + t % 26) for t in tokens)

    target = CharTokenizer().decode(free[0, 3:5])
    by_string = generate(ours, ids[:1], pixels[:1], mask[:1], max_new_tokens=16, eos_token_id=[],
                         stop=[target], tokenizer=CharTokenizer())
    cut = CharTokenizer().decode(free[0]).index(target) + len(target)
    np.testing.assert_array_equal(by_string[0, :cut], free[0, :cut])
    assert (by_string[0, cut:] == config.pad_token_id).all()

    limited = generate(ours, ids, pixels, mask, max_new_tokens=np.array([3, 16, 7]), eos_token_id=[],
                       pad_token_id=-1)
    for row, n in enumerate([3, 16, 7]):
        np.testing.assert_array_equal(limited[row, :n], free[row, :n])
        assert (limited[row, n:] == -1).all()


def test_input_errors_name_the_problem(models):
    _, ours, config = models
    ids, mask, pixels = _left_padded_batch(config, [9, 13])
    with pytest.raises(ValueError, match="placeholders for 2 image"):
        generate(ours, ids, pixels[:1], mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="left-padded"):
        generate(ours, ids[:, ::-1], pixels, mask[:, ::-1], max_new_tokens=2)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        generate(ours, ids, pixels, mask, max_new_tokens=2, stop=["x"])


# Run with tests/ as the working folder: `python -c` puts it first on sys.path, so the child
# imports this module for its helpers.
_SHARDED = textwrap.dedent("""
    import numpy as np
    from flax import nnx
    from llava_jax.infer.generate import Generator
    from llava_jax.models.llava import LlavaModel
    from llava_jax.recipes.tiny import tiny_llava_config
    from llava_jax.sharding import make_mesh
    import test_generate as T
    config = tiny_llava_config()
    model = LlavaModel(config, rngs=nnx.Rngs(3))
    ids, mask, pixels = T._left_padded_batch(config, [9, 17, 13])
    single = Generator(model).generate(ids, pixels, mask, max_new_tokens=12, eos_token_id=[])
    mesh = make_mesh(data=1, fsdp=2, tensor=2)
    sharded_gen = Generator(model, mesh=mesh)
    kernel = sharded_gen.state["language_model"]["layers"][0]["mlp"]["up_proj"]["kernel"]
    assert len(kernel.sharding.device_set) == 4, kernel.sharding
    sharded = sharded_gen.generate(ids, pixels, mask, max_new_tokens=12, eos_token_id=[])
    np.testing.assert_array_equal(single, sharded)
    print("OK", single[0, :6])
""")


def test_sharded_over_a_mesh_matches_single_device():
    out = run_python(_SHARDED, num_devices=4, timeout=240, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert "OK" in out, out[-2000:]
