"""`llava-jax aot --config configs/X.py:ARG --topology v5e:2x4 [--global-batch N] [--mesh d,f,t]
[--microbatch N] [--remat POLICY] [--max-length N]`

Compiles the real train step for a TPU topology on any machine (libtpu provides compile-only TPU
devices; nothing is allocated: the state and batch are ShapeDtypeStructs with shardings), prints the
per-device memory breakdown, and as its LAST line one JSON object:
  {"topology", "mesh", "per_device_peak_bytes", "hbm_bytes", "fits", ...}
A compile-time HBM out-of-memory gives fits: false with the size the compiler asked for.
Unless --no-cost, it also reports one device's compiled FLOPs and HBM bytes per step (XLA's cost
analysis scaled to the real depth, see llava_jax/cost_model.py) and the roofline step time.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

# libtpu may already be loaded by another process on a TPU VM; compiling only needs a second load.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

GiB = 1024 ** 3
# HBM per jax device (a chip; a TensorCore on v2/v3) by device_kind prefix.
HBM_BYTES = {
    "TPU v2": 8 * GiB,
    "TPU v3": 16 * GiB,
    "TPU v4": 32 * GiB,
    "TPU v5 lite": 16 * GiB,
    "TPU v5e": 16 * GiB,
    "TPU v5p": 95 * GiB,
    "TPU v5": 95 * GiB,
    "TPU v6 lite": 32 * GiB,
    "TPU v6e": 32 * GiB,
}

_SIZE_UNITS = {"": 1, "B": 1, "K": 1024, "KB": 1024, "KIB": 1024, "M": 1024 ** 2, "MB": 1024 ** 2,
               "MIB": 1024 ** 2, "G": GiB, "GB": GiB, "GIB": GiB, "T": 1024 ** 4, "TB": 1024 ** 4,
               "TIB": 1024 ** 4}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="llava-jax aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="configs/X.py[:ARG]")
    p.add_argument("--topology", required=True, help="TPU topology, e.g. v5e:2x4, v4:2x2x2, v5p:4x4x4")
    p.add_argument("--global-batch", type=int, default=0, help="rows per step (default: the config's)")
    p.add_argument("--mesh", default="", help="data,fsdp,tensor (one may be -1; default: the config's)")
    p.add_argument("--microbatch", type=int, default=None, help="rows per accumulation microbatch (0 = none)")
    p.add_argument("--remat", default="", help="remat policy: none | nothing_saveable | dots_saveable | "
                   "dots_with_no_batch_dims_saveable | save_qkv_proj | offload_qkv_proj "
                   "(llava_jax.models.layers.REMAT_POLICIES)")
    p.add_argument("--max-length", type=int, default=0, help="tokens per row (default: the config's)")
    p.add_argument("--hbm-bytes", type=int, default=0, help="override the per-device HBM size")
    p.add_argument("--attention", default="", choices=["", "auto", "xla", "xla_blocked", "splash"],
                   help="attention implementation (default: the config's model.attention_impl)")
    p.add_argument("--no-cost", action="store_true",
                   help="skip the cost model (three extra compiles of 1-2 layer models)")
    p.add_argument("--loss-chunk", type=int, default=None,
                   help="vocabulary projection over this many positions at a time (0 = all at once; "
                        "default: the config's loss_chunk_size)")
    return p.parse_args(argv)


def hbm_bytes(device) -> int:
    kind = getattr(device, "device_kind", "") or ""
    for name in sorted(HBM_BYTES, key=len, reverse=True):
        if kind.lower().startswith(name.lower()):
            return HBM_BYTES[name]
    return 0


def _to_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not m:
        raise ValueError(f"not a size: {text!r}")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])


def parse_oom(message: str):
    """(used, capacity) bytes from XLA's 'Ran out of memory in memory space hbm. Used X of Y hbm.'"""
    m = re.search(r"Used\s+([0-9.]+\s*[A-Za-z]*)\s+of\s+([0-9.]+\s*[A-Za-z]*)\s+hbm", message)
    if not m:  # 'the total memory required for HLO temporaries (X) exceeds available HBM (Y)'
        m = re.search(r"required[^(]*\(([0-9.]+\s*[A-Za-z]*)\)\s*exceeds available HBM\s*\(([0-9.]+\s*[A-Za-z]*)\)",
                      message)
    if m:
        return _to_bytes(m.group(1)), _to_bytes(m.group(2))
    m = re.search(r"(?:allocate|requires?)\s+([0-9.]+\s*[A-Za-z]*)", message)
    return (_to_bytes(m.group(1)) if m else None), None


def is_oom(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text or "out of memory" in text.lower()


def apply_overrides(config, args) -> None:
    """The command-line settings `aot` and `plan` share, onto a loaded ConfigDict before it is typed
    (a command without one of these options leaves the config's value)."""
    from llava_jax.sharding import parse_mesh

    with config.unlocked():
        if getattr(args, "global_batch", 0):
            config.global_batch_size = args.global_batch
        if getattr(args, "max_length", 0):
            config.max_length = args.max_length
        if getattr(args, "microbatch", None) is not None:
            config.microbatch_size = args.microbatch
        if getattr(args, "remat", ""):
            config.model.remat_policy = args.remat
        if getattr(args, "attention", ""):
            config.model.attention_impl = args.attention
        if getattr(args, "loss_chunk", None) is not None:
            config.loss_chunk_size = args.loss_chunk
        if getattr(args, "mesh", ""):
            config.mesh.data, config.mesh.fsdp, config.mesh.tensor = parse_mesh(args.mesh)


def topology_devices(name: str) -> list:
    """The compile-only devices of a TPU topology name; a one-line UserError when libtpu is missing or
    does not know the name."""
    from jax.experimental import topologies

    from llava_jax.validate import UserError

    try:
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
    except Exception as e:  # noqa: BLE001 - libtpu missing or a topology name it does not know
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise UserError(f"cannot make the TPU topology {name!r} (names look like v5e:2x4, v4:2x2x2, v5p:4x4x4; "
                        f"libtpu must be installed: pip install -e '.[tpu]'): {first}") from e


def compile_train_step(config, devices):
    """Lower and compile the train step of `config` (a TrainConfig or its ConfigDict) for `devices` from
    abstract values -> (mesh, compiled)."""
    import jax
    import jax.numpy as jnp

    from llava_jax import sharding
    from llava_jax.train.config import train_config
    from llava_jax.train.setup import train_setup

    config = train_config(config)
    model_config = config.model
    mesh = sharding.mesh_from_config(config.mesh, devices=devices)
    lora = config.adapters  # adapters only trained, the base frozen (models/lora.py)
    if lora is not None:
        lora.check_shapes(model_config.text)
    setup = train_setup(config, model_config, mesh, config.total_steps or 1000, lora=lora)
    b, s = config.global_batch_size, config.max_length
    m = max(1, config.data.max_images_per_row)
    size = model_config.vision.image_size
    shapes = dict(input_ids=((b, s), jnp.int32), labels=((b, s), jnp.int32), segment_ids=((b, s), jnp.int32),
                  positions=((b, s), jnp.int32), pixel_values=((b, m, size, size, 3), jnp.float32))
    if model_config.anyres:  # LLaVA-1.6: P tile slots per image and each slot's layout (docs/internals.md)
        from llava_jax.data import anyres

        tiles = anyres.max_tiles(model_config.image_grid_pinpoints, size)
        shapes.update(pixel_values=((b, m, tiles, size, size, 3), jnp.float32), image_sizes=((b, m, 5), jnp.int32))
    batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
             for k, (shape, dtype) in shapes.items()}
    with jax.set_mesh(mesh):
        lowered = setup.jit_train_step({k: v.sharding for k, v in batch.items()}).lower(setup.layout.abstract, batch)
        return mesh, lowered.compile()


def memory_breakdown(compiled) -> dict:
    ma = compiled.memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes")
    out = {f: int(getattr(ma, f, 0) or 0) for f in fields}
    # Arguments and outputs alias (the state is donated), so count aliased buffers once.
    out["peak"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"] - out["alias_size_in_bytes"]
                   + out["temp_size_in_bytes"] + out["generated_code_size_in_bytes"])
    return out


def cost_report(config, devices) -> dict:
    """The cost-model fields of the JSON line (printed too); nulls with cost_error when the shallow
    compiles run out of memory."""
    from llava_jax import cost_model

    chip = cost_model.Chip.per_device(devices)
    try:
        cost = cost_model.step_cost(config, devices)
    except Exception as e:  # noqa: BLE001 - an out-of-memory is an answer; anything else re-raises
        if not is_oom(e):
            raise
        return dict(xla_flops_per_device=None, hbm_bytes_accessed_per_device=None, roofline_step_s=None,
                    cost_error=str(e).strip().splitlines()[0][:300])
    seconds = cost.roofline_seconds(chip)
    print(f"per-device cost of one step (XLA cost analysis, scaled to {config.model.text.num_layers} decoder "
          f"layers): {cost.flops:.4g} FLOPs, {cost.hbm_bytes:.4g} HBM bytes")
    if seconds is not None:
        print(f"roofline step time on {chip.kind} ({chip.peak_flops:.3g} FLOP/s bf16, "
              f"{chip.hbm_bandwidth:.3g} B/s HBM per device): {seconds:.3f} s ({cost.bound(chip)}-bound; "
              f"a lower bound)")
    return dict(xla_flops_per_device=cost.flops, hbm_bytes_accessed_per_device=cost.hbm_bytes,
                peak_flops_per_device=chip.peak_flops or None, hbm_bandwidth=chip.hbm_bandwidth or None,
                roofline_step_s=seconds, roofline_bound=cost.bound(chip) if seconds is not None else None)


def main(argv) -> int:
    args = parse_args(argv)
    from llava_jax import validate
    from llava_jax.config_files import load_config
    from llava_jax.train import flops as flops_lib
    from llava_jax.train.config import train_config

    config = load_config(args.config)
    apply_overrides(config, args)
    config = train_config(config)  # typed once, after every override; passed down as it is

    devices = topology_devices(args.topology)
    # Same checks as `llava-jax train`, for this topology's device count (data paths live elsewhere).
    validate.check_train(config, len(devices), style="aot", check_paths=False)
    capacity = args.hbm_bytes or hbm_bytes(devices[0])
    model_config = config.model
    images = max(1, config.data.max_images_per_row)
    if model_config.anyres:  # every AnyRes image runs its tiles through the tower (x max tiles)
        from llava_jax.data import anyres

        images *= anyres.max_tiles(model_config.image_grid_pinpoints, model_config.vision.image_size)
    # A LoRA run computes no weight gradients for the frozen LLM: stage 1's accounting (as train does).
    step_flops = flops_lib.step_flops(model_config, 1 if config.adapters is not None else config.stage,
                                      config.global_batch_size, config.max_length, images)
    result = dict(topology=args.topology, device_kind=devices[0].device_kind, num_devices=len(devices),
                  mesh=None, global_batch=config.global_batch_size, max_length=config.max_length,
                  microbatch=config.microbatch_size, remat=model_config.remat_policy,
                  loss_chunk=config.loss_chunk_size, attention=model_config.attention_impl,
                  per_device_peak_bytes=None, hbm_bytes=capacity, fits=None,
                  model_flops_per_step=step_flops.total)
    try:
        mesh, compiled = compile_train_step(config, devices)
    except Exception as e:  # noqa: BLE001 - only an out-of-memory is an answer; anything else re-raises
        if not is_oom(e):
            raise
        used, reported_capacity = parse_oom(str(e))
        first_line = str(e).strip().splitlines()[0][:400]
        print(f"compile ran out of HBM: {first_line}")
        from llava_jax import sharding

        shape = sharding.mesh_from_config(config.mesh, devices=devices).shape
        result.update(mesh=[int(v) for v in shape.values()], per_device_peak_bytes=used, fits=False,
                      hbm_bytes=capacity or reported_capacity, error=first_line)
        if not args.no_cost:
            result.update(cost_report(config, devices))
        print(json.dumps(result))
        return 0
    mem = memory_breakdown(compiled)
    print(f"topology {args.topology}: {len(devices)} x {devices[0].device_kind}, mesh {dict(mesh.shape)}")
    print("per-device memory (bytes):")
    for key in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                "generated_code_size_in_bytes", "peak"):
        print(f"  {key:<32} {mem[key]:>16,d}  ({mem[key] / GiB:.3f} GiB)")
    result.update(mesh=[int(mesh.shape[a]) for a in mesh.axis_names], per_device_peak_bytes=mem["peak"],
                  memory=mem, fits=bool(capacity == 0 or mem["peak"] <= capacity))
    if not args.no_cost:
        result.update(cost_report(config, devices))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
