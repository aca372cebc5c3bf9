"""`llava-jax plan --config configs/X.py:ARG --topology v5e:8x8 --samples N --avg-tokens T`:
how long a training stage takes on a TPU slice, and how many chip-hours, before booking it.

    rows   packing on:  max(samples x avg_tokens / (max_length x packing_efficiency),
                            samples with an image / max_images_per_row)
           packing off: samples (one sample per row, padded to max_length)
    steps  = ceil(rows x epochs / global_batch)
    step   = model FLOPs per step (llava_jax.train.flops: the step's padded shapes) / (chips x peak x MFU)
             for each MFU of the band; the compiled step's roofline time (llava_jax.cost_model, from
             XLA's cost analysis) is printed beside it as a floor no MFU can beat.
The packing efficiency (real tokens / row slots of a packed row) depends on the length mix:
`benchmarks/data_pipeline.py` measures it with the real BatchIterator (BENCHMARKS.md section 4).
Prints a table and, as its LAST line, one JSON object.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Optional

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

DEFAULT_MFU_BAND = (0.40, 0.55)  # MaxText-class dense LLM training on TPU with a flash kernel
# Measured: next-fit packing of a LLaVA-mix665K-like length mix into 2048-token rows with 2 image
# slots per row (BENCHMARKS.md section 4: token efficiency 0.746).
DEFAULT_PACKING_EFFICIENCY = 0.75


@dataclasses.dataclass(frozen=True)
class Workload:
    samples: int
    avg_tokens: float
    image_fraction: float = 1.0  # samples that carry an image
    epochs: float = 1.0


@dataclasses.dataclass(frozen=True)
class Plan:
    chips: int
    rows: int
    steps: int
    model_flops_per_step: float
    seconds_per_step: dict  # MFU -> seconds
    roofline_step_s: Optional[float]

    def hours(self, mfu: float) -> float:
        return self.steps * self.seconds_per_step[mfu] / 3600.0

    def chip_hours(self, mfu: float) -> float:
        return self.hours(mfu) * self.chips


def rows_needed(work: Workload, *, max_length: int, packing: bool, packing_efficiency: float,
                max_images_per_row: int) -> int:
    if not packing:
        return work.samples
    by_tokens = work.samples * work.avg_tokens / (max_length * packing_efficiency)
    by_images = work.samples * work.image_fraction / max(1, max_images_per_row)
    return math.ceil(max(by_tokens, by_images))


def make_plan(config, work: Workload, *, chips: int, peak_flops: float, mfu_band, packing_efficiency: float,
              roofline_step_s: Optional[float] = None) -> Plan:
    """The plan of `config` (a TrainConfig or its ConfigDict) for `work`."""
    from llava_jax.train import flops as flops_lib
    from llava_jax.train.config import train_config

    config = train_config(config)
    batch, length = config.global_batch_size, config.max_length
    images = max(1, config.data.max_images_per_row)
    rows = rows_needed(work, max_length=length, packing=config.data.packing,
                       packing_efficiency=packing_efficiency, max_images_per_row=images)
    steps = math.ceil(rows * work.epochs / batch)
    model_flops = flops_lib.step_flops(config.model, config.stage, batch, length, images).total
    seconds = {m: model_flops / (chips * peak_flops * m) for m in mfu_band}
    return Plan(chips, rows, steps, model_flops, seconds, roofline_step_s)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="llava-jax plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="configs/X.py[:ARG]")
    p.add_argument("--topology", required=True, help="TPU topology, e.g. v5e:8x8, v4:4x4x4, v5p:4x4x4")
    p.add_argument("--samples", type=int, required=True, help="training samples in the stage's data")
    p.add_argument("--avg-tokens", type=float, required=True, help="mean tokens per sample, image tokens included")
    p.add_argument("--image-fraction", type=float, default=1.0, help="fraction of samples with an image")
    p.add_argument("--epochs", type=float, default=0, help="default: the config's num_epochs")
    p.add_argument("--packing", choices=["config", "on", "off"], default="config",
                   help="pack samples into rows (default: the config's data.packing)")
    p.add_argument("--max-images-per-row", type=int, default=0, help="with packing (default: the config's)")
    p.add_argument("--packing-efficiency", type=float, default=DEFAULT_PACKING_EFFICIENCY,
                   help="real tokens / row slots of packed rows (measure it on your data)")
    p.add_argument("--mfu", default=",".join(str(m) for m in DEFAULT_MFU_BAND), help="MFU band, e.g. 0.4,0.55")
    p.add_argument("--global-batch", type=int, default=0)
    p.add_argument("--mesh", default="", help="data,fsdp,tensor (for the compile)")
    p.add_argument("--microbatch", type=int, default=None)
    p.add_argument("--attention", default="", choices=["", "auto", "xla", "splash"])
    p.add_argument("--no-compile", action="store_true",
                   help="skip the compiled roofline (no XLA compile; the MFU band needs none)")
    return p.parse_args(argv)


def _check(args):
    from llava_jax.validate import UserError

    try:
        band = tuple(float(x) for x in args.mfu.split(","))
    except ValueError:
        band = ()
    if not band or not all(0 < m <= 1 for m in band):
        raise UserError(f"--mfu takes fractions in (0, 1] separated by commas, e.g. 0.4,0.55; got {args.mfu!r}")
    if args.samples <= 0 or args.avg_tokens <= 0:
        raise UserError("--samples and --avg-tokens must be positive")
    if not 0 < args.packing_efficiency <= 1 or not 0 <= args.image_fraction <= 1:
        raise UserError("--packing-efficiency must be in (0, 1] and --image-fraction in [0, 1]")
    return band


def main(argv) -> int:
    args = parse_args(argv)
    band = _check(args)
    from llava_jax import aot, cost_model, validate
    from llava_jax.config_files import load_config
    from llava_jax.train.config import train_config

    config = load_config(args.config)
    aot.apply_overrides(config, args)
    with config.unlocked():
        if args.packing != "config":
            config.data.packing = args.packing == "on"
        if args.max_images_per_row:
            config.data.max_images_per_row = args.max_images_per_row
    config = train_config(config)  # typed once, after every override; passed down as it is
    devices = aot.topology_devices(args.topology)
    validate.check_train(config, len(devices), style="aot", check_paths=False)
    chip = cost_model.Chip.of(devices[0].device_kind)
    roofline = None
    if not args.no_compile:
        roofline = cost_model.step_cost(config, devices).roofline_seconds(cost_model.Chip.per_device(devices))
    work = Workload(args.samples, args.avg_tokens, args.image_fraction, args.epochs or config.num_epochs)
    plan = make_plan(config, work, chips=cost_model.num_chips(devices), peak_flops=chip.peak_flops, mfu_band=band,
                     packing_efficiency=args.packing_efficiency, roofline_step_s=roofline)

    packing = (f"packed, efficiency {args.packing_efficiency:g}" if config.data.packing
               else "one sample per row (packing off)")
    print(f"{args.topology}: {plan.chips} x {chip.kind}; {work.samples} samples x {work.avg_tokens:g} tokens, "
          f"{work.epochs:g} epoch(s); rows of {config.max_length} tokens, {packing}")
    print(f"rows {plan.rows}, global batch {config.global_batch_size}, steps {plan.steps}, "
          f"model FLOPs/step {plan.model_flops_per_step:.3e}")
    if roofline is not None:
        print(f"compiled roofline step time {roofline:.2f} s (lower bound; "
              f"{plan.steps * roofline / 3600:.2f} h)")
    print(f"{'MFU':>6} {'step s':>8} {'hours':>8} {'chip-hours':>11}")
    for m in band:
        print(f"{m:>6.0%} {plan.seconds_per_step[m]:>8.2f} {plan.hours(m):>8.2f} {plan.chip_hours(m):>11.1f}")
    print(json.dumps(dict(topology=args.topology, chips=plan.chips, device_kind=chip.kind, rows=plan.rows,
                          steps=plan.steps, global_batch=config.global_batch_size,
                          max_length=config.max_length, packing=config.data.packing,
                          packing_efficiency=args.packing_efficiency if config.data.packing else None,
                          model_flops_per_step=plan.model_flops_per_step, roofline_step_s=roofline,
                          mfu={str(m): dict(step_s=plan.seconds_per_step[m], hours=plan.hours(m),
                                            chip_hours=plan.chip_hours(m)) for m in band})))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
