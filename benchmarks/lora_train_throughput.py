"""CPU LoRA stage-2 step: ours vs peft's LoraModel on transformers' LLaVA, the same model and batch.

Model: benchmarks/_common.bench_config (CLIP 4 x 256 at 224 px, LLaMA 8 x 512, vocab 32000), fp32
base on both sides. Batch 4 x 512 tokens (<s> + 256 image tokens + text, labels on the text).
LoRA rank --rank (default 128, the reference's), alpha 2 x rank, dropout 0.05 on q/k/v/o/gate/up/down of
the LLM; the projector trains fully; AdamW (clip 1.0) over adapters + projector only.
  torch: peft.get_peft_model(..., modules_to_save=["multi_modal_projector"]), train mode, backward,
         clip_grad_norm_, AdamW.step()
  ours:  llava_jax.train.step.jit_train_step with a LoraConfig (frozen base, adapters in the state).
Steps are timed interleaved (torch steps, then ours, per round); the table gives medians.

  .venv/bin/python benchmarks/lora_train_throughput.py [--rounds 3 --steps 3] [--rank 128] [--json PATH]
"""
from __future__ import annotations

import argparse
import sys

import _common as C  # noqa: E402  (sets JAX_PLATFORMS before jax is imported)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from train_throughput import TorchRunner, make_batch  # noqa: E402


class OursLora:
    def __init__(self, cfg, batch, lora):
        from llava_jax import sharding
        from llava_jax.train.defaults import base_config
        from llava_jax.train.setup import train_setup

        c = base_config(cfg)  # stage 2, seed 0 (the adapter dropout's), no accumulation
        c.optim.lr, c.optim.warmup_ratio, c.optim.weight_decay, c.optim.grad_clip = 1e-4, 0.0, 0.0, 1.0
        self.mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
        setup = train_setup(c, cfg, self.mesh, 1000, lora=lora)
        self.state = setup.init_state()
        self.trainable = sum(int(x.size) for x in jax.tree.leaves(self.state["params"]))
        bsh = sharding.tree_batch_shardings(self.mesh, batch)
        self.batch = {k: jax.device_put(v, bsh[k]) for k, v in batch.items()}
        with jax.set_mesh(self.mesh):
            self._step = setup.jit_train_step(bsh)

    def step(self):
        with jax.set_mesh(self.mesh):
            self.state, metrics = self._step(self.state, self.batch)
            return float(metrics["loss"])


class PeftLora(TorchRunner):
    """train_throughput's torch runner with peft's LoraModel around transformers' LLaVA: adapters on the
    LLM's projections, the projector trained fully (modules_to_save), everything else frozen."""

    LR = 1e-4

    def __init__(self, cfg, batch, lora):
        self.lora = lora
        super().__init__(cfg, batch, attn="sdpa")
        self.trainable = sum(p.numel() for p in self.params)

    def wrap(self, model):
        import peft

        from llava_jax.peft_io import target_regex

        lora = self.lora
        return peft.get_peft_model(model, peft.LoraConfig(
            r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=target_regex(lora),
            modules_to_save=["multi_modal_projector"]))


def main(argv=None) -> int:
    from llava_jax.models.lora import LoraConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    cfg = C.bench_config()
    batch = make_batch(cfg, args.batch, args.seq)
    lora = LoraConfig(rank=args.rank, alpha=2.0 * args.rank, dropout=0.05)
    info = C.machine_info()
    torch.set_num_threads(max(1, int(info.get("nproc", 1))))
    ours, theirs = OursLora(cfg, batch, lora), PeftLora(cfg, batch, lora)
    assert ours.trainable == theirs.trainable, (ours.trainable, theirs.trainable)
    ours.step(), theirs.step()  # compile / warm up
    times = {"ours": [], "peft": []}
    for _ in range(args.rounds):
        times["peft"] += C.time_calls(theirs.step, args.steps)
        times["ours"] += C.time_calls(ours.step, args.steps)
    tokens = args.batch * args.seq
    rows = [dict(impl=name, step_s=round(C.median(ts), 3), tokens_per_s=round(tokens / C.median(ts), 1),
                 trainable_params=(ours if name == "ours" else theirs).trainable) for name, ts in times.items()]
    speedup = C.median(times["peft"]) / C.median(times["ours"])
    C.print_table(rows, ["impl", "step_s", "tokens_per_s", "trainable_params"],
                  f"LoRA r={args.rank} stage-2 step, batch {args.batch} x {args.seq}: ours / peft = {speedup:.2f}x")
    C.write_json("lora_train_throughput", dict(machine=info, rank=args.rank, batch=args.batch, seq=args.seq,
                                               rows=rows, speedup=speedup, times=times), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
