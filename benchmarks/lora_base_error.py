"""What a bfloat16 or int8 frozen base costs in logits: the LoRA model (adapters at their no-op
init) against the float32 model, on the benchmark model (benchmarks/_common.bench_config, random
init) and a batch of 2 x 512 tokens with one image each. Reports the max and mean absolute logit
error relative to the logits' standard deviation, and how often the argmax token changes.

  .venv/bin/python benchmarks/lora_base_error.py [--json PATH]
"""
from __future__ import annotations

import argparse
import sys

import _common as C  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from train_throughput import make_batch  # noqa: E402


def logits(cfg, params, batch, lora=None):
    from llava_jax.models.llava import LlavaModel

    model = nnx.eval_shape(lambda: LlavaModel(cfg, rngs=nnx.Rngs(0), lora=lora))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda s, ids, px: nnx.merge(graphdef, s)(ids, px))
    return np.asarray(run(state, batch["input_ids"], batch["pixel_values"][:, 0]))


def main(argv=None) -> int:
    from llava_jax.models import lora as lora_lib
    from llava_jax.models.llava import LlavaModel
    from llava_jax.train.step import _deep_merge

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    cfg = C.bench_config()
    batch = make_batch(cfg, 2, 512)
    plain = nnx.to_pure_dict(nnx.state(LlavaModel(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    ref = logits(cfg, plain, batch)
    rows = []
    for base_dtype in ("float32", "bfloat16", "int8"):
        lora = lora_lib.LoraConfig(rank=128, alpha=256, base_dtype=base_dtype)
        shapes = nnx.state(nnx.eval_shape(lambda: LlavaModel(cfg, rngs=nnx.Rngs(0), lora=lora)), nnx.Param)
        adapters = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), lora_lib.adapter_params(nnx.to_pure_dict(shapes)))
        got = logits(cfg, _deep_merge(lora_lib.base_params_for(plain, lora), adapters), batch, lora)
        err = np.abs(got - ref)
        rows.append(dict(base=base_dtype, max_err_over_std=float(err.max() / ref.std()),
                         mean_err_over_std=float(err.mean() / ref.std()),
                         argmax_changed=float((got.argmax(-1) != ref.argmax(-1)).mean())))
    C.print_table(rows, ["base", "max_err_over_std", "mean_err_over_std", "argmax_changed"],
                  "LoRA frozen-base dtype: logit error vs the float32 model")
    C.write_json("lora_base_error", dict(machine=C.machine_info(), rows=rows), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
