"""TPU memory of LLaVA-1.5 stage 2 with LoRA vs a full fine-tune, compiled ahead of time here.

Cases (seq 2048, global batch 128, accumulation allowed, fsdp over all chips, the configs' remat):
full fine-tune (configs/llava_v1_5_{size}.py:stage2) and LoRA r=128 on every LLM projection
(configs/llava_v1_5_{size}_lora.py, bf16 or int8 frozen base). For each case the smallest
microbatch (one row per chip) is compiled first, then doubled while it fits (at most --max-tries
compiles per case). Results are merged into benchmarks/results/lora_aot_memory.json after every
compile; a rerun skips what is recorded.

  ALLOW_MULTIPLE_LIBTPU_LOAD=1 .venv/bin/python benchmarks/lora_aot_memory.py [--cases a,b] [--max-tries 3]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import _common as C  # noqa: E402

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

GLOBAL_BATCH, SEQ = 128, 2048
# name -> (config spec, topology)
CASES = {
    "7b-lora-bf16-v5e:2x4": ("configs/llava_v1_5_7b_lora.py", "v5e:2x4"),
    "7b-lora-bf16-v4:2x2x1": ("configs/llava_v1_5_7b_lora.py", "v4:2x2x1"),
    "7b-lora-int8-v5e:2x4": ("configs/llava_v1_5_7b_lora.py:int8", "v5e:2x4"),
    "7b-full-v5e:2x4": ("configs/llava_v1_5_7b.py:stage2", "v5e:2x4"),
    "13b-lora-bf16-v5e:4x4": ("configs/llava_v1_5_13b_lora.py", "v5e:4x4"),
    "13b-lora-int8-v5e:2x4": ("configs/llava_v1_5_13b_lora.py:int8", "v5e:2x4"),
}


def compile_step(config, devices):
    """The real train step (LoRA when config.lora.rank > 0) lowered from abstract values and compiled."""
    import jax
    import jax.numpy as jnp

    from llava_jax import sharding
    from llava_jax.models import lora as lora_lib
    from llava_jax.models.config import config_from_any
    from llava_jax.train.setup import train_setup

    model_config = config_from_any(config.model)
    lora = lora_lib.from_config(config.lora)
    mesh = sharding.make_mesh(1, -1, 1, devices=devices)
    setup = train_setup(config, model_config, mesh, 1000, lora=lora)  # the cases' configs: stage 2, seed 0
    layout = setup.layout
    b, s, size = GLOBAL_BATCH, SEQ, model_config.vision.image_size
    shapes = dict(input_ids=((b, s), jnp.int32), labels=((b, s), jnp.int32), segment_ids=((b, s), jnp.int32),
                  positions=((b, s), jnp.int32), pixel_values=((b, 1, size, size, 3), jnp.float32))
    batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
             for k, (shape, dtype) in shapes.items()}
    with jax.set_mesh(mesh):
        step = setup.jit_train_step({k: v.sharding for k, v in batch.items()})
        compiled = step.lower(layout.abstract, batch).compile()
    counts = {part: sum(int(x.size) for x in jax.tree.leaves(layout.abstract[part])) for part in ("params", "frozen")}
    return compiled, counts


def run_case(spec: str, topology: str, microbatch: int) -> dict:
    from jax.experimental import topologies

    from llava_jax import aot
    from llava_jax.config_files import load_config

    config = load_config(spec)
    with config.unlocked():
        config.global_batch_size, config.max_length = GLOBAL_BATCH, SEQ
        config.microbatch_size = 0 if microbatch >= GLOBAL_BATCH else microbatch
    devices = list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
    capacity = aot.hbm_bytes(devices[0])
    out = dict(config=spec, topology=topology, microbatch=microbatch, hbm_bytes=capacity,
               device_kind=devices[0].device_kind)
    t0 = time.time()
    try:
        compiled, counts = compile_step(config, devices)
    except Exception as e:  # noqa: BLE001 - an out-of-memory is an answer; anything else re-raises
        if not aot.is_oom(e):
            raise
        used, _ = aot.parse_oom(str(e))
        return dict(out, fits=False, per_device_peak_bytes=used, compile_s=round(time.time() - t0, 1),
                    error=str(e).strip().splitlines()[0][:300])
    mem = aot.memory_breakdown(compiled)
    return dict(out, fits=mem["peak"] <= capacity, per_device_peak_bytes=mem["peak"], memory=mem,
                trainable_params=counts["params"], frozen_params=counts["frozen"],
                compile_s=round(time.time() - t0, 1))


def chips(topology: str) -> int:
    n = 1
    for d in topology.split(":")[1].split("x"):
        n *= int(d)
    return n


def summarize(results: dict) -> list:
    rows = []
    for name, (spec, topology) in CASES.items():
        runs = results.get(name, {})
        if not runs:
            continue
        good = [int(mb) for mb, r in runs.items() if r.get("fits")]
        best = max(good) if good else None
        shown = runs[str(best)] if best else runs[min(runs, key=int)]
        rows.append(dict(case=name, config=spec, topology=topology, largest_fitting_microbatch=best,
                         peak_gib=round((shown.get("per_device_peak_bytes") or 0) / 2**30, 2),
                         hbm_gib=round(shown["hbm_bytes"] / 2**30, 2), fits=bool(best),
                         tried=",".join(f"{mb}:{'y' if r.get('fits') else 'n'}"
                                        for mb, r in sorted(runs.items(), key=lambda kv: int(kv[0])))))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--max-tries", type=int, default=3)
    args = ap.parse_args(argv)
    path = str(C.RESULTS / "lora_aot_memory.json")
    previous = json.loads(open(path).read()) if os.path.exists(path) else {}
    results = previous.get("results", {})
    info = previous.get("machine") or C.machine_info()
    wanted = set(filter(None, args.cases.split(",")))
    for name, (spec, topology) in CASES.items():
        if wanted and name not in wanted:
            continue
        runs = results.setdefault(name, {})
        mb = chips(topology)
        for _ in range(args.max_tries):
            r = runs.get(str(mb)) or run_case(spec, topology, mb)
            runs[str(mb)] = r
            # Re-read before writing: another process may have recorded other cases meanwhile.
            latest = json.loads(open(path).read()).get("results", {}) if os.path.exists(path) else {}
            latest.setdefault(name, {}).update(runs)
            results.update(latest)
            C.write_json("lora_aot_memory", dict(machine=info, global_batch=GLOBAL_BATCH, seq=SEQ, results=results,
                                                 summary=summarize(results)), path)
            print(f"{name} microbatch {mb}: fits={r['fits']} peak={r['per_device_peak_bytes'] / 2**30:.2f} GiB "
                  f"of {r['hbm_bytes'] / 2**30:.2f} (compile {r['compile_s']}s)", flush=True)
            if not r["fits"] or mb >= GLOBAL_BATCH:
                break
            mb *= 2
    for row in summarize(results):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
