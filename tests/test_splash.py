"""The Pallas splash-attention path (llava_jax/models/splash.py) equals XLA's dense attention
(`layers.dot_product_attention` with a dense mask) on packed, padded, GQA and full (CLIP) cases,
values and gradients; on CPU the kernel runs in interpret mode. The TPU AOT compile of the train
step (libtpu compile-only devices) picks the kernel by itself and contains it.

Tolerances: float32 inputs, max abs error 2e-5 on outputs and gradients (unit-variance inputs,
outputs and gradients of order 1; the kernel's online softmax reorders the float32 sums).
bfloat16 inputs: 2e-2 absolute on outputs and 4e-2 on gradients of order 1 (both paths round q,
probabilities and products to bf16 at different points; bf16 has 8 significant bits, ~4e-3).
"""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llava_jax.models import layers as L
from llava_jax.recipes.tiny import tiny_llava_config
from llava_jax.testing.attention import assert_grads_close, logits_and_grads
from llava_jax.testing.processes import REPO, run_python, subprocess_env


def _qkv(b, s, h, kvh, hd, dtype, seed=0):
    rng = np.random.default_rng(seed)
    make = lambda n: jnp.asarray(rng.standard_normal((b, s, n, hd)), dtype)
    return make(h), make(kvh), make(kvh)


def _segments(kind: str, b: int, s: int):
    seg = np.ones((b, s), np.int32)
    if kind == "packed":  # three samples in row 0 (then padding), two in row 1, right padding
        seg[0, 70:150], seg[0, 150:180], seg[0, 180:] = 2, 3, 0
        seg[1, 90:], seg[1, 190:] = 2, 0
    elif kind == "left_padded":  # generation-style prompts: padding first
        seg[0, :37] = 0
        seg[1, :150] = 0
    return jnp.asarray(seg)


def _attention(impl, q, k, v, seg, causal):
    return L.dot_product_attention(q, k, v, L.self_attention_mask(seg, causal=causal, impl=impl))


def _loss(impl, seg, causal, weights):
    """A scalar over real (non-padding) query rows only: padding outputs are unspecified."""
    real = jnp.ones(weights.shape[:2]) if seg is None else (seg != 0).astype(jnp.float32)

    def f(q, k, v):
        out = _attention(impl, q, k, v, seg, causal).astype(jnp.float32)
        return jnp.sum(out * weights * real[:, :, None, None])
    return f


FP32, BF16 = (jnp.float32, 2e-5, 2e-5), (jnp.bfloat16, 2e-2, 4e-2)
CASES = [  # (segments, heads, kv_heads, causal, dtype): packed rows with GQA (fp32 and bf16);
    ("packed", 4, 2, True, FP32),  # left padding with one KV head (MQA); full CLIP-style attention
    ("packed", 4, 2, True, BF16),
    ("left_padded", 2, 1, True, FP32),
    (None, 2, 2, False, FP32),
]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """128-token blocks, so a 200-token sequence (padded to 256) is a 2 x 2 grid of blocks and the
    kernel's causal block skipping and partial blocks are exercised."""
    from llava_jax.models import splash

    monkeypatch.setattr(splash, "MAX_BLOCK", 128)


@pytest.mark.parametrize("segments,h,kvh,causal,tol", CASES)
def test_splash_equals_xla_attention(segments, h, kvh, causal, tol):
    dtype, atol_out, atol_grad = tol
    b, s, hd = 2, 200, 32  # 200 is not a multiple of the kernel's 128-token blocks: padded inside
    q, k, v = _qkv(b, s, h, kvh, hd, dtype)
    seg = None if segments is None else _segments(segments, b, s)
    real = np.ones((b, s), bool) if seg is None else np.asarray(seg) != 0

    ref = np.asarray(_attention("xla", q, k, v, seg, causal).astype(jnp.float32))
    out = _attention("splash", q, k, v, seg, causal)
    assert out.shape == q.shape and out.dtype == dtype
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32))[real], ref[real], atol=atol_out, rtol=0)

    weights = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
    grads_ref = jax.grad(_loss("xla", seg, causal, weights), argnums=(0, 1, 2))(q, k, v)
    grads = jax.jit(jax.grad(_loss("splash", seg, causal, weights), argnums=(0, 1, 2)))(q, k, v)
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        g, g_ref = np.asarray(g.astype(jnp.float32)), np.asarray(g_ref.astype(jnp.float32))
        assert np.abs(g_ref).max() > 0.1, name  # the comparison is not vacuous
        np.testing.assert_allclose(g, g_ref, atol=atol_grad, rtol=0, err_msg=f"d{name}")


@pytest.mark.slow
def test_model_logits_and_gradients_equal_with_splash():
    """The whole tiny LLaVA (CLIP + GQA decoder, packed batch) with attention_impl='splash' vs 'xla'."""
    real, out = logits_and_grads(("xla", "splash"))
    (logits_ref, grads_ref), (logits, grads) = out["xla"], out["splash"]
    np.testing.assert_allclose(logits[real], logits_ref[real], atol=2e-5, rtol=0)
    assert_grads_close(grads, grads_ref)


def test_attention_impl_names():
    assert L.resolve_attention_impl("auto") == "xla"  # this CPU: XLA's attention
    assert L.resolve_attention_impl("splash") == "splash"
    with pytest.raises(ValueError, match="attention_impl 'flash'"):
        L.resolve_attention_impl("flash")
    with pytest.raises(ValueError, match="attention_impl"):
        tiny_llava_config(attention_impl="flash")


@pytest.mark.slow
def test_splash_under_a_mesh_matches_on_8_devices():
    """shard_map over batch (data, fsdp) and heads (tensor): the sharded kernel equals the dense path,
    and a head count the tensor axis does not divide falls back to replicated heads."""
    out = run_python("""
        import jax, jax.numpy as jnp, numpy as np
        from llava_jax import sharding
        from llava_jax.models import layers as L
        rng = np.random.default_rng(0)
        results = []
        for h, kvh in ((4, 2), (3, 3)):
            q = jnp.asarray(rng.standard_normal((4, 130, h, 16)), jnp.float32)
            k = jnp.asarray(rng.standard_normal((4, 130, kvh, 16)), jnp.float32)
            v = jnp.asarray(rng.standard_normal((4, 130, kvh, 16)), jnp.float32)
            seg = np.ones((4, 130), np.int32); seg[0, 60:] = 2; seg[3, 100:] = 0
            seg = jnp.asarray(seg)
            ref = L.dot_product_attention(q, k, v, L.self_attention_mask(seg, causal=True, impl="xla"))
            mesh = sharding.make_mesh(2, 2, 2)
            with jax.set_mesh(mesh):
                f = jax.jit(lambda q, k, v, s: L.dot_product_attention(
                    q, k, v, L.self_attention_mask(s, causal=True, impl="splash")))
                got = f(q, k, v, seg)
            real = np.asarray(seg) != 0
            results.append(float(np.abs(np.asarray(got) - np.asarray(ref))[real].max()))
        print("ERR", results)
    """, num_devices=8, timeout=300)
    errors = json.loads(out.split("ERR", 1)[1].strip())
    assert max(errors) < 2e-5, errors


libtpu_missing = pytest.mark.skipif(
    __import__("importlib").util.find_spec("libtpu") is None, reason="libtpu is needed for compile-only TPU topologies")


@libtpu_missing
def test_tpu_aot_train_step_uses_the_splash_kernel():
    """attention_impl 'auto' traced for a TPU topology (from this CPU) compiles the Pallas kernel
    (a tpu_custom_call) into the train step: CLIP forward, decoder forward, its remat recompute,
    and the dq / dkv backward kernels."""
    code = """
        import os
        from jax.experimental import topologies
        from llava_jax import aot
        from llava_jax.config_files import load_config
        c = load_config("configs/tiny.py:stage2")
        with c.unlocked():
            c.global_batch_size, c.microbatch_size, c.max_length = 16, 8, 256
            c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
            c.model.dtype, c.model.remat_policy = "bfloat16", "nothing_saveable"
        devices = list(topologies.get_topology_desc(topology_name="v5e:2x4", platform="tpu").devices)
        _, compiled = aot.compile_train_step(c, devices)
        print("CALLS", compiled.as_text().count("tpu_custom_call"))
    """
    proc = subprocess.run([sys.executable, "-c", __import__("textwrap").dedent(code)], cwd=REPO, timeout=300,
                          env=subprocess_env(1, ALLOW_MULTIPLE_LIBTPU_LOAD=1), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    calls = int(proc.stdout.split("CALLS", 1)[1].split()[0])
    assert calls >= 5, proc.stdout
