"""Names of pytree key paths: the one way a parameter's place in a tree becomes text.

A jax key path (from jax.tree_util.tree_leaves_with_path / tree_map_with_path) is a tuple of
DictKey(key=...), GetAttrKey(name=...), SequenceKey(idx=...) or FlattenedIndexKey(key=...); an nnx
path (nnx.to_flat_state) is a tuple of plain strings and ints. Both name a parameter alike:
('language_model', 'layers', 'mlp', 'up_proj', 'kernel'), or dotted
'language_model.layers.mlp.up_proj.kernel' (the names checkpoint errors and validation messages use).
"""
from __future__ import annotations


def key_names(path) -> tuple:
    """The names along a key path, as strings."""
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def dotted(path) -> str:
    """'a.b.c' for a key path."""
    return ".".join(key_names(path))
