"""Time and chip-hours of the whole LLaVA-1.5 recipe on TPU slices (`llava-jax plan` for each case),
next to the reference's 8 x A100 times.

Cases: 7B and 13B, stage 1 (558K BLIP-LAION-CC-SBU captions) and stage 2 (665K mix), on v5e-64
(v5e:8x8, 64 chips), v5p-64 (v5p:4x4x2, 32 chips: v5p and v4 slice names count TensorCores, two
per chip) and v4-64 (v4:4x4x2, 32 chips); the recipe's batch (256 / 128), 2048-token packed rows.
Packing efficiencies are measured with the real BatchIterator on assumed length distributions (the
datasets are not available offline; BENCHMARKS.md section 4 and section 5):
  stage 1: 576 image tokens + caption ~ lognormal(median 20, sigma 0.4) + 2, 3 image slots per row:
           token efficiency 0.878, 3 samples per row
  stage 2: the section-4 mix665K-like model, 2 image slots per row: token efficiency 0.746
With --compile each case also gets the compiled roofline step time (llava_jax.cost_model: three
shallow TPU compiles per case, one at a time).

  .venv/bin/python benchmarks/recipe_plan.py [--compile] [--mfu 0.4,0.55] [--json PATH]
"""
from __future__ import annotations

import argparse
import os
import sys

import _common as C  # noqa: E402

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

CONFIGS = {"7b": "configs/llava_v1_5_7b.py", "13b": "configs/llava_v1_5_13b.py"}
TOPOLOGIES = {"v5e-64": "v5e:8x8", "v5p-64": "v5p:4x4x2", "v4-64": "v4:4x4x2"}
# stage -> (samples, mean tokens per sample, image fraction, image slots per row, packing efficiency)
STAGES = {1: (558_128, 599, 1.0, 3, 0.878), 2: (665_298, 768, 0.94, 2, 0.746)}
# The reference's wall-clock on 8 x A100-80GB (LLaVA-1.5 paper / README): stage 1 3.5 h (7B) and
# 5.5 h (13B); whole recipe 13.5 h (7B) and 25.5 h (13B), so stage 2 10 h and 20 h.
REFERENCE_HOURS = {("7b", 1): 3.5, ("7b", 2): 10.0, ("13b", 1): 5.5, ("13b", 2): 20.0}


def one_case(size: str, stage: int, topology: str, band, compile_: bool) -> dict:
    from jax.experimental import topologies

    from llava_jax import cost_model, plan
    from llava_jax.config_files import load_config

    samples, tokens, image_fraction, slots, efficiency = STAGES[stage]
    config = load_config(f"{CONFIGS[size]}:stage{stage}")
    with config.unlocked():
        config.data.packing = True
        config.data.max_images_per_row = slots
    devices = list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
    chip = cost_model.Chip.of(devices[0].device_kind)
    roofline = (cost_model.step_cost(config, devices).roofline_seconds(cost_model.Chip.per_device(devices))
                if compile_ else None)
    work = plan.Workload(samples, tokens, image_fraction, float(config.num_epochs))
    p = plan.make_plan(config, work, chips=cost_model.num_chips(devices), peak_flops=chip.peak_flops, mfu_band=band,
                       packing_efficiency=efficiency, roofline_step_s=roofline)
    row = dict(model=f"llava-v1.5-{size}", stage=stage, topology=topology, chips=p.chips, rows=p.rows, steps=p.steps,
               step_flops=p.model_flops_per_step, roofline_step_s=roofline,
               roofline_hours=(p.steps * roofline / 3600) if roofline else None)
    for m in band:
        row[f"hours@{m:.0%}"] = p.hours(m)
        row[f"chip_hours@{m:.0%}"] = p.chip_hours(m)
    row["reference_hours_8xA100"] = REFERENCE_HOURS[(size, stage)]
    row["reference_A100_hours"] = 8 * REFERENCE_HOURS[(size, stage)]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--compile", action="store_true", help="add the compiled roofline (slow: TPU compiles)")
    ap.add_argument("--mfu", default="0.4,0.55")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    band = tuple(float(x) for x in args.mfu.split(","))
    rows = []
    for size in CONFIGS:
        for stage in STAGES:
            for name, topology in TOPOLOGIES.items():
                row = one_case(size, stage, topology, band, args.compile)
                row["slice"] = name
                rows.append(row)
                print(row, flush=True)
    C.print_table(rows, ["model", "stage", "slice", "chips", "rows", "steps", "roofline_step_s", "roofline_hours",
                         *[f"hours@{m:.0%}" for m in band], *[f"chip_hours@{m:.0%}" for m in band],
                         "reference_hours_8xA100", "reference_A100_hours"], "LLaVA-1.5 recipe time and cost")
    C.write_json("recipe_plan", dict(machine=C.machine_info(), mfu_band=band, stages=STAGES, rows=rows),
                 args.json or str(C.RESULTS / "recipe_plan.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
