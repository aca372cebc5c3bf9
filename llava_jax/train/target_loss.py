"""Summed next-token NLL computed only where there are targets, vocabulary projection fused in.

In a LLaVA batch most positions are never targets (the image placeholders, the prompt, padding),
yet the vocabulary projection (B, S, D) x (D, V) and its two backward products are the largest
matmuls of the step. Here:

1. Each row's target positions are moved to its front by a stable sort (the row's targets stay in
   order), so all of them lie in its first `max_row_targets` columns.
2. The projection + cross-entropy run over the first `capacity` columns only, where capacity is the
   smallest of a few static buckets (quarters of the row) that holds the longest row's targets.
   `lax.switch` picks the bucket on the device, so no target is ever dropped, no host round trip
   is needed and one compiled step serves every batch.
3. Under differentiation a custom VJP computes the gradients w.r.t. the hidden states and the head
   parameters already in the forward pass (d logits = softmax - onehot is known there), so only the
   chosen bucket's branch runs and no (B, C, V) array outlives it: residuals are the gradients,
   whose shapes do not depend on the bucket.

With `chunk` > 0 each bucket is processed `chunk` columns at a time (a scan), so at most
(B, chunk, V) logits exist at once (the memory knob for long rows and large vocabularies).

The result equals the full-sequence loss and gradients up to float32 summation order.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

NUM_BUCKETS = 4
_ROUND = 8  # bucket sizes are multiples of this (or of `chunk`), except the full row


def bucket_sizes(length: int, chunk: int = 0, num_buckets: int = NUM_BUCKETS) -> tuple:
    """Static capacities (ascending, distinct, the last == length) the head may run over."""
    step = chunk if chunk > 0 else _ROUND
    sizes = []
    for i in range(1, num_buckets + 1):
        size = min(length, -(-(length * i // num_buckets) // step) * step)
        if size > 0 and size not in sizes:
            sizes.append(size)
    if sizes[-1] != length:
        sizes.append(length)
    return tuple(sizes)


def choose_bucket(sizes: Sequence[int], mask):
    """Index of the smallest size that holds the row with the most targets (mask (B, S) bool)."""
    longest = jnp.max(jnp.sum(mask, axis=1, dtype=jnp.int32))
    return jnp.sum(jnp.asarray(sizes[:-1], jnp.int32) < longest, dtype=jnp.int32)


def compact_targets(hidden, targets, mask):
    """Move each row's target positions to its front (stable): the same (B, S, ...) shapes."""
    order = jnp.argsort(~mask, axis=1, stable=True)
    return (jnp.take_along_axis(hidden, order[..., None], axis=1),
            jnp.take_along_axis(targets, order, axis=1), jnp.take_along_axis(mask, order, axis=1))


def _nll_and_dlogits(logits, targets, mask):
    """(summed masked NLL, its gradient w.r.t. the float32 logits)."""
    logz = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)
    nll = jnp.sum(jnp.where(mask, (logz - picked)[..., 0], 0.0))
    onehot = jnp.arange(logits.shape[-1], dtype=targets.dtype) == targets[..., None]
    d_logits = jnp.where(mask[..., None], jnp.exp(logits - logz) - onehot, 0.0)
    return nll, d_logits


def token_nll(logits, targets):
    """Per-position NLL (B, S) of float32 logits (B, S, V)."""
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return logz - picked


def _nll(logits, targets, mask):
    return jnp.sum(jnp.where(mask, token_nll(logits, targets), 0.0))


def used_leaves(logits_fn: Callable, leaves: Sequence, hidden) -> tuple:
    """Indices of the parameter leaves that logits_fn(leaves, hidden) reads (traced, not run)."""
    jaxpr = jax.make_jaxpr(logits_fn)(list(leaves), hidden[:, :1]).jaxpr
    read = set()
    for eqn in jaxpr.eqns:
        read.update(v for v in eqn.invars if isinstance(v, jex_core.Var))
    read.update(v for v in jaxpr.outvars if isinstance(v, jex_core.Var))
    return tuple(i for i, v in enumerate(jaxpr.invars[:len(leaves)]) if v in read)


def target_nll_sum(logits_fn: Callable, leaves: Sequence, hidden, targets, mask, *, chunk: int = 0):
    """Sum of the NLL over positions where mask is True.

    logits_fn(leaves, h) -> float32 logits (B, C, V) for hidden states h (B, C, D); `leaves` are
    the parameters it may read (a flat list; the ones it does not read get no gradient from here).
    hidden (B, S, D); targets (B, S) int; mask (B, S) bool.
    """
    leaves = list(leaves)
    used = used_leaves(logits_fn, leaves, hidden)
    if chunk > 0 and hidden.shape[1] % chunk:  # whole chunks: pad with non-target columns
        pad = ((0, 0), (0, (-hidden.shape[1]) % chunk))
        hidden, targets, mask = jnp.pad(hidden, pad + ((0, 0),)), jnp.pad(targets, pad), jnp.pad(mask, pad)
    sizes = bucket_sizes(hidden.shape[1], chunk)
    hidden, targets, mask = compact_targets(hidden, targets, mask)
    bucket = choose_bucket(sizes, mask)

    def head(all_leaves, used_vals, h):
        full = list(all_leaves)
        for i, value in zip(used, used_vals):
            full[i] = value
        return logits_fn(full, h)

    def chunks(x):  # (B, C, ...) -> (C / chunk, B, chunk, ...)
        return x.reshape(x.shape[0], x.shape[1] // chunk, chunk, *x.shape[2:]).swapaxes(0, 1)

    def loss_only(size, all_leaves, h, t, m):
        h, t, m = h[:, :size], t[:, :size], m[:, :size]
        used_vals = [all_leaves[i] for i in used]
        if chunk <= 0:
            return _nll(head(all_leaves, used_vals, h), t, m)

        def body(total, xs):
            return total + _nll(head(all_leaves, used_vals, xs[0]), xs[1], xs[2]), None

        return jax.lax.scan(body, jnp.zeros((), jnp.float32), (chunks(h), chunks(t), chunks(m)))[0]

    def with_grads(size, all_leaves, h_all, t, m):
        """(nll, d used leaves, d hidden (B, S, D)) of the first `size` columns."""
        used_vals = [all_leaves[i] for i in used]

        def one(h, t, m):
            logits, vjp = jax.vjp(lambda v, x: head(all_leaves, v, x), used_vals, h)
            nll, d_logits = _nll_and_dlogits(logits, t, m)
            d_vals, d_h = vjp(d_logits)
            return nll, d_vals, d_h

        h, t, m = h_all[:, :size], t[:, :size], m[:, :size]
        if chunk <= 0:
            nll, d_vals, d_h = one(h, t, m)
        else:
            def body(carry, xs):
                total, acc = carry
                nll, d_vals, d_h = one(*xs)
                return (total + nll, jax.tree.map(jnp.add, acc, d_vals)), d_h

            zeros = jax.tree.map(jnp.zeros_like, used_vals)
            (nll, d_vals), d_h = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                              (chunks(h), chunks(t), chunks(m)))
            d_h = d_h.swapaxes(0, 1).reshape(h.shape)
        d_h = jnp.pad(d_h, ((0, 0), (0, h_all.shape[1] - size), (0, 0)))
        return nll, d_vals, d_h

    @jax.custom_vjp
    def fused(all_leaves, h, t, m, b):
        return jax.lax.switch(b, [lambda *a, s=s: loss_only(s, *a) for s in sizes], all_leaves, h, t, m)

    def fused_fwd(all_leaves, h, t, m, b):
        nll, d_vals, d_h = jax.lax.switch(b, [lambda *a, s=s: with_grads(s, *a) for s in sizes],
                                          all_leaves, h, t, m)
        return nll, (d_vals, d_h)

    def fused_bwd(residuals, g):
        d_vals, d_h = residuals
        d_leaves = [None] * len(leaves)  # leaves the head does not read: no gradient from here
        for i, d in zip(used, d_vals):
            d_leaves[i] = d * g
        return d_leaves, (d_h * g).astype(hidden.dtype), None, None, None

    fused.defvjp(fused_fwd, fused_bwd)
    return fused(leaves, hidden, targets, mask, bucket)
