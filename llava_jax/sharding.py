"""Device mesh, the one table of logical-axis rules, and sharding helpers.

Parameters and activations are annotated with logical axis names; this table is the only place
that maps them onto the physical mesh axes ("data", "fsdp", "tensor").
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axis (or tuple of axes, or None = replicated)
LOGICAL_RULES = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "layers": None,
    "norm": None,
    "patch": None,
    "positions": None,
    # activations
    "act_batch": BATCH_AXES,
    "act_seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}


def logical_to_spec(names: Sequence[Optional[str]]) -> P:
    """PartitionSpec for a tuple of logical axis names (None stays replicated)."""
    out = []
    for name in names:
        if name is None:
            out.append(None)
        elif name not in LOGICAL_RULES:
            raise KeyError(f"logical axis {name!r} has no rule in llava_jax.sharding.LOGICAL_RULES")
        else:
            out.append(LOGICAL_RULES[name])
    return P(*out)


def parse_mesh(text: str) -> tuple:
    """'data,fsdp,tensor' -> (data, fsdp, tensor): the one reader of the `--mesh` option (aot, plan,
    chat, serve). Each size is a positive integer, or -1 (at most one) for the devices left.
    Anything else raises UsageError (a UserError: one line on the command line)."""
    from llava_jax.validate import UsageError

    try:
        sizes = tuple(int(x) for x in str(text).split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
        raise UsageError(f"--mesh takes three sizes data,fsdp,tensor, each a positive integer or -1 (at most "
                         f"one, for the devices left), e.g. --mesh 1,-1,1 (all fsdp) or 1,1,-1 (all tensor); "
                         f"got {text!r}")
    return sizes


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh; one size may be -1 to take the remaining devices (the rule is
    validate.resolve_mesh's, the one `llava-jax train` checks configs with)."""
    from llava_jax.validate import resolve_mesh

    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh((data, fsdp, tensor), len(devices))
    if sizes is None:
        raise ValueError(f"mesh data={data} fsdp={fsdp} tensor={tensor} does not cover the {len(devices)} devices "
                         f"(the product must be {len(devices)}; each size a positive integer, or -1 (at most "
                         f"one) for the devices left)")
    try:
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(sizes, devices=devices)
    except Exception:  # non-TPU topologies without a physical layout
        grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, MESH_AXES)


def _active_mesh():
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def constrain(x, names: Sequence[Optional[str]]):
    """Constrain an activation's sharding by logical names; a no-op outside `jax.set_mesh`."""
    if _active_mesh() is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names))


def variable_spec(variable) -> P:
    """PartitionSpec of an nnx Variable from its `out_sharding` logical-name metadata."""
    names = variable.get_metadata().get("out_sharding") if hasattr(variable, "get_metadata") else None
    if not names:
        return P()
    return logical_to_spec(names)


def state_shardings(state, mesh: Mesh):
    """NamedSharding tree (same structure as an nnx State) from the variables' logical names."""
    from flax import nnx

    def one(v):
        if isinstance(v, nnx.Variable):
            return v.replace(NamedSharding(mesh, variable_spec(v)))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Batches are split over ("data", "fsdp") on their leading axis."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def constrain_spec(x, spec: P):
    """Constrain with a PartitionSpec over mesh axes; a no-op outside `jax.set_mesh`."""
    if _active_mesh() is None:
        return x
    return jax.lax.with_sharding_constraint(x, spec)


def tree_batch_shardings(mesh: Mesh, batch) -> dict:
    """batch_sharding for every array of a batch pytree (arrays or ShapeDtypeStructs)."""
    return jax.tree.map(lambda x: batch_sharding(mesh, len(x.shape)), batch)


def mesh_from_config(mesh_config, devices=None) -> Mesh:
    """make_mesh from a config's mesh.{data,fsdp,tensor} (-1 = the remaining devices)."""
    return make_mesh(int(mesh_config.data), int(mesh_config.fsdp), int(mesh_config.tensor), devices=devices)
