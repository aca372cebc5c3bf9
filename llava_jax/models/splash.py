"""Pallas splash attention (TPU flash attention with block-sparse masks) behind our attention rule.

`layers.dot_product_attention` materialises (rows x heads x S x T) float32 scores and computes the
fully masked causal half; the splash kernel streams key/value blocks through VMEM with an online
softmax, never stores the scores, and skips blocks the causal mask removes entirely. It runs on
TPU; `interpret=True` runs the same kernel on CPU (slowly), which is how the tests check it.

Semantics against ours (token q sees k iff segment[q] == segment[k] != 0 and k <= q when causal):
splash only asks segment[q] == segment[k], so padding tokens (segment 0) attend to each other.
Their outputs differ from ours, but no real token ever reads a padding key, so the outputs and
gradients of every real token are the same; callers already ignore padding outputs (the loss masks
them), exactly as with the finite garbage the XLA path leaves there.

Sharding: the kernel is a per-device program, so under a mesh it runs in `shard_map` with the batch
split over ("data", "fsdp") and the heads over "tensor" (each device keeps whole sequences, which
the kernel needs); an axis that does not divide stays replicated for this call.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as sa
from jax.sharding import PartitionSpec as P

from llava_jax import sharding

# The kernel tiles sequences in blocks that are multiples of the 128-wide TPU lane dimension;
# longer blocks amortise the per-block overhead (MaxText's defaults are 512).
LANES = 128
MAX_BLOCK = 512


def padded_length(n: int) -> int:
    return -(-n // LANES) * LANES


def block_size(n: int) -> int:
    """The largest of MAX_BLOCK, 256, 128 that divides n (n is a multiple of 128)."""
    for b in (MAX_BLOCK, 256, LANES):
        if n % b == 0:
            return b
    raise ValueError(f"sequence length {n} is not a multiple of {LANES}")


def _kernel(num_heads: int, seq_len: int, b: int, causal: bool, interpret: bool):
    """A splash kernel for (num_heads, seq_len, hd) queries in blocks of b tokens. Built per trace
    (a scanned layer traces once): its block-mask arrays become constants of that trace, so a
    kernel cached across traces would leak them."""
    shape = (seq_len, seq_len)
    one = sa.CausalMask(shape) if causal else sa.FullMask(shape)
    blocks = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                           block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    return sa.make_splash_mha(sa.MultiHeadMask([one] * num_heads), block_sizes=blocks, head_shards=1,
                              q_seq_shards=1, interpret=interpret)


def _local_attention(q, k, v, segment_ids, *, causal: bool, interpret: bool):
    """One device's share: q (B, H, S, hd), k/v (B, KVH, S, hd), segment_ids (B, S) -> (B, H, S, hd).
    GQA is native to the kernel (query head h reads key/value head h // (H / KVH))."""
    kernel = _kernel(q.shape[1], q.shape[2], block_size(q.shape[2]), causal, interpret)
    segments = sa.SegmentIds(q=segment_ids, kv=segment_ids)
    return jax.vmap(kernel)(q, k, v, segments)


def _axis_if_divides(mesh, axes, n: int):
    names = axes if isinstance(axes, tuple) else (axes,)
    size = int(np.prod([mesh.shape[a] for a in names if a in mesh.shape]))
    return axes if size > 1 and n % size == 0 else None


def splash_attention(q, k, v, segment_ids=None, *, causal: bool, interpret: bool = False):
    """q (B, S, H, hd); k, v (B, S, KVH, hd); segment_ids (B, S) int (0 = padding; None = one
    segment) -> (B, S, H, hd) in q's dtype, the softmax(q k^T / sqrt(hd)) v of `dot_product_attention`.

    Sequences are padded to a multiple of 128 with segment 0 (kept apart from every real token)."""
    b, s, h, hd = q.shape
    if k.shape[1] != s:
        raise ValueError(f"splash attention is self-attention: {s} queries but {k.shape[1]} keys")
    if segment_ids is None:
        segment_ids = jnp.ones((b, s), jnp.int32)
    n = padded_length(s)
    # The kernel leaves the 1/sqrt(hd) scaling to the caller; scale in float32, then round once.
    q = (q.astype(jnp.float32) * (1.0 / math.sqrt(hd))).astype(q.dtype)

    def heads_major(x):  # (B, S, N, hd) -> (B, N, n, hd), the kernel's layout
        return jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, n - s), (0, 0)))

    qh, kh, vh = heads_major(q), heads_major(k), heads_major(v)
    seg = jnp.pad(jnp.asarray(segment_ids, jnp.int32), ((0, 0), (0, n - s)))
    run = functools.partial(_local_attention, causal=causal, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is not None and not mesh.empty:
        batch_axes = _axis_if_divides(mesh, sharding.BATCH_AXES, b)
        head_axis = _axis_if_divides(mesh, "tensor", math.gcd(h, k.shape[2]))
        heads_spec = P(batch_axes, head_axis, None, None)
        run = jax.shard_map(run, mesh=mesh, in_specs=(heads_spec, heads_spec, heads_spec, P(batch_axes, None)),
                            out_specs=heads_spec, check_vma=False)
    out = run(qh, kh, vh, seg)
    return out[:, :, :s].transpose(0, 2, 1, 3).astype(q.dtype)
