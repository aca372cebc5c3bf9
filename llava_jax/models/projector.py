"""The multimodal projector: vision features -> language-model embeddings.

Types (the reference's mm_projector_type names): 'linear', 'mlp{N}x_gelu' (N linears with exact-erf
GELU between them; llava-hf's projector is mlp2x_gelu) and 'identity'.
"""
from __future__ import annotations

import re

import jax
from flax import nnx

from llava_jax.models import layers as L

_MLP_TYPE = re.compile(r"^mlp(\d+)x_gelu$")
ACCEPTED = "'linear', 'identity' or 'mlp{N}x_gelu' with N >= 1 (e.g. 'mlp2x_gelu')"


def projector_depth(projector_type: str) -> int:
    """Number of linear layers (0 for 'identity'); ValueError for an unknown type."""
    if projector_type == "identity":
        return 0
    if projector_type == "linear":
        return 1
    m = _MLP_TYPE.match(projector_type)
    if m and int(m.group(1)) >= 1:
        return int(m.group(1))
    raise ValueError(f"unknown projector type {projector_type!r}; accepted forms: {ACCEPTED}")


class Projector(nnx.Module):
    def __init__(self, projector_type: str, in_features: int, out_features: int, *, dtype="float32",
                 rngs: nnx.Rngs):
        self.depth = projector_depth(projector_type)
        if self.depth == 0 and in_features != out_features:
            raise ValueError(f"identity projector needs equal feature sizes; vision features are {in_features} "
                             f"wide but the language model's hidden size is {out_features}")
        dtype = L.resolve_dtype(dtype)
        for i in range(1, self.depth + 1):
            last = i == self.depth
            setattr(self, f"linear_{i}", L.Dense(
                in_features if i == 1 else out_features, out_features,
                axes=("mlp", "embed") if last else ("embed", "mlp"), use_bias=True, dtype=dtype, rngs=rngs))
        self.dtype = dtype

    def __call__(self, x):
        x = x.astype(self.dtype)
        for i in range(1, self.depth + 1):
            if i > 1:
                x = jax.nn.gelu(x, approximate=False)
            x = getattr(self, f"linear_{i}")(x)
        return x
