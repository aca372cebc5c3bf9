"""CPU training throughput: our jitted stage-2 train step vs transformers' PyTorch LLaVA, same model.

Model: benchmarks/_common.bench_config (CLIP 4 x 256 at 224 px / patch 14 = 256 image tokens,
LLaMA 8 x 512, 8 heads, MLP 1376, vocab 32000), fp32. Batch 4 x 512 tokens per step, every row
<s> + 256 image tokens + 255 text tokens (no padding), labels ignore the image part.
Both sides freeze the vision tower and run AdamW (clip 1.0, no weight decay) on the rest:
  torch: requires_grad False on the vision tower, loss.backward(), clip_grad_norm_, AdamW.step()
  ours:  llava_jax.train.step.jit_train_step, stage 2 (projector + LLM trainable).
Steps are timed interleaved (rounds of torch steps then our steps) so a change in machine load hits
both sides alike; the table gives medians. Each step's process CPU time (all threads) is recorded
beside its wall time: on a machine shared with other jobs, wall times swing with their load while
CPU-seconds per step stay close to the work done, so `vs_torch_cpu` is the ratio to read there.
MFU = the step's FLOPs (llava_jax.train.flops) / time / the fp32 matmul rate of a jitted 2048x2048
matmul loop measured in the same run.

  .venv/bin/python benchmarks/train_throughput.py [--rounds 3 --steps 3] [--variants nothing_saveable,none]
      [--torch-dtypes float32,bfloat16] [--profile] [--batch 4 --seq 512] [--json PATH]

A variant is `remat[:dtype[:attention]]`, e.g. `nothing_saveable:float32:xla` (dense attention)
beside `nothing_saveable:float32:auto` (on CPU: the blocked causal attention that skips fully masked
blocks, llava_jax.models.layers.blocked_causal_attention) times both in the same run.
bf16 against bf16: `--variants nothing_saveable:bfloat16 --torch-dtypes float32,bfloat16` adds a
transformers side under torch.autocast(bfloat16) and compares each of our variants with the torch side
of its dtype; the run also probes bf16 matmul rates (bf16 x bf16 -> f32 and -> bf16, jax and torch).
"""
from __future__ import annotations

import argparse
import sys
import time

import _common as C  # noqa: E402  (sets JAX_PLATFORMS before jax is imported)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from llava_jax.data.conversation import IGNORE_INDEX  # noqa: E402


def make_batch(cfg, batch: int, seq: int, seed: int = 0) -> dict:
    """Full rows: <s>, one image's placeholders, then random text; the pipeline's batch format."""
    rng = np.random.default_rng(seed)
    t = cfg.num_image_tokens
    if seq <= t + 2:
        raise ValueError(f"--seq {seq} must exceed the {t} image tokens + 2")
    ids = rng.integers(3, cfg.image_token_id, size=(batch, seq)).astype(np.int32)
    ids[:, 0] = cfg.text.bos_token_id
    ids[:, 1:1 + t] = cfg.image_token_id
    labels = ids.copy()
    labels[:, :1 + t] = IGNORE_INDEX
    size = cfg.vision.image_size
    return dict(input_ids=ids, labels=labels, segment_ids=np.ones_like(ids),
                positions=np.broadcast_to(np.arange(seq, dtype=np.int32), ids.shape).copy(),
                pixel_values=rng.normal(size=(batch, 1, size, size, 3)).astype(np.float32))


# ----- ours ---------------------------------------------------------------------------------------

class OursRunner:
    """The real train step (stage 2) of llava_jax on one CPU device."""

    def __init__(self, cfg, batch: dict, *, loss_chunk: int = 0):
        from llava_jax import sharding
        from llava_jax.train import step as S
        from llava_jax.train.defaults import base_config
        from llava_jax.train.setup import train_setup

        self.cfg = cfg
        c = base_config(cfg)  # stage 2, seed 0, no accumulation
        c.optim.lr, c.optim.warmup_ratio, c.optim.weight_decay, c.optim.grad_clip = 1e-5, 0.0, 0.0, 1.0
        c.loss_chunk_size = loss_chunk
        self.mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
        setup = train_setup(c, cfg, self.mesh, 1000)
        self.layout, self.spec = setup.layout, setup.spec
        self.state = setup.init_state()
        bsh = sharding.tree_batch_shardings(self.mesh, batch)
        self.batch = {k: jax.device_put(v, bsh[k]) for k, v in batch.items()}
        self.S = S
        with jax.set_mesh(self.mesh):
            self._step = setup.jit_train_step(bsh)

    def step(self):
        with jax.set_mesh(self.mesh):
            self.state, metrics = self._step(self.state, self.batch)
            return float(metrics["loss"])  # blocks until the step is done

    def parts(self) -> dict:
        """Jitted pieces of the step, each a thunk that blocks: vision forward, loss forward,
        loss + gradients (no optimizer)."""
        from flax import nnx

        from llava_jax.train.target_loss import token_nll

        S, spec = self.S, self.spec
        graphdef = self.layout.graphdef

        @jax.jit
        def vision(params, frozen, pixels):
            model = nnx.merge(graphdef, params, frozen)
            return model.image_features(pixels.reshape(-1, *pixels.shape[2:]))

        @jax.jit
        def forward(params, frozen, batch):
            return S.summed_nll(nnx.merge(graphdef, params, frozen), batch, loss_chunk=spec.loss_chunk)[0]

        @jax.jit
        def grads(params, frozen, batch):
            return S.loss_and_grads(spec, params, frozen, batch)[1]

        @jax.jit
        def head_grads(params, frozen, hidden, targets):
            # vocabulary projection + cross-entropy alone, gradients w.r.t. its input and weights
            def loss(p, h):
                return token_nll(nnx.merge(graphdef, p, frozen).logits_from_hidden(h), targets).sum()
            return jax.grad(loss, argnums=(0, 1))(params, hidden)

        p, f, b = self.state["params"], self.state["frozen"], self.batch
        hidden, targets = _head_inputs(self.batch["input_ids"].shape, self.cfg.text.hidden_size,
                                       self.cfg.text.vocab_size)

        def run(fn, *args):
            with jax.set_mesh(self.mesh):
                jax.block_until_ready(fn(*args))

        return {"vision fwd": lambda: run(vision, p, f, b["pixel_values"]),
                "loss fwd": lambda: run(forward, p, f, b),
                "loss fwd+bwd": lambda: run(grads, p, f, b),
                "vocab projection + CE fwd+bwd": lambda: run(head_grads, p, f, hidden, targets)}


def _head_inputs(shape, hidden_size: int, vocab_size: int):
    """Random final hidden states (B, S-1, D) and targets for timing the loss head alone."""
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(shape[0], shape[1] - 1, hidden_size)).astype(np.float32)
    targets = rng.integers(0, vocab_size, size=(shape[0], shape[1] - 1)).astype(np.int32)
    return hidden, targets


# ----- PyTorch ------------------------------------------------------------------------------------

class TorchRunner:
    """transformers' LlavaForConditionalGeneration with the vision tower frozen, AdamW on the rest."""

    LR = 1e-5

    def __init__(self, cfg, batch: dict, attn: str = "sdpa", dtype: str = "float32"):
        from llava_jax.testing.hf_reference import hf_llava, nhwc_to_nchw

        # "bfloat16": the forward pass (and so its backward) under torch.autocast, as a torch user
        # trains in bf16 on CPU; the parameters and AdamW stay float32, like ours.
        self.dtype = dtype

        model = hf_llava(cfg, std=0.02)
        model.set_attn_implementation(attn)
        for p in model.model.vision_tower.parameters():
            p.requires_grad_(False)
        self.model = self.wrap(model)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=self.LR, weight_decay=0.0)
        self.ids = torch.from_numpy(batch["input_ids"].astype(np.int64))
        self.labels = torch.from_numpy(batch["labels"].astype(np.int64))
        self.pixels = nhwc_to_nchw(batch["pixel_values"][:, 0])

    def wrap(self, model):
        """The module that trains (a subclass puts adapters around `model` here)."""
        return model

    def autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.dtype == "bfloat16")

    def step(self):
        with self.autocast():
            out = self.model(input_ids=self.ids, pixel_values=self.pixels, labels=self.labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return out.loss.item()

    def parts(self) -> dict:
        m = self.model

        def vision():
            with torch.no_grad(), self.autocast():
                m.model.get_image_features(pixel_values=self.pixels)

        def forward():
            with torch.no_grad(), self.autocast():
                m(input_ids=self.ids, pixel_values=self.pixels, labels=self.labels)

        def fwd_bwd():
            with self.autocast():
                loss = m(input_ids=self.ids, pixel_values=self.pixels, labels=self.labels).loss
            loss.backward()
            m.zero_grad(set_to_none=True)

        text = m.config.get_text_config()
        hidden, targets = _head_inputs(tuple(self.ids.shape), text.hidden_size, text.vocab_size)
        hidden = torch.from_numpy(hidden).requires_grad_(True)
        targets = torch.from_numpy(targets.astype(np.int64))

        def head():
            with self.autocast():
                logits = m.lm_head(hidden)
            torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                              reduction="sum").backward()
            hidden.grad = None
            m.zero_grad(set_to_none=True)

        return {"vision fwd": vision, "loss fwd": forward, "loss fwd+bwd": fwd_bwd,
                "vocab projection + CE fwd+bwd": head}


# ----- main ---------------------------------------------------------------------------------------

def _timed_step(wall: list, cpu: list, fn) -> None:
    """Append one call's wall seconds and this process's CPU seconds (all threads); fn blocks."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    wall.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (torch steps, then ours)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per side per round")
    ap.add_argument("--variants", default="nothing_saveable,dots_saveable,none",
                    help="our remat policies to time, comma-separated; 'X:bfloat16' also sets the dtype, "
                         "'X:float32:xla' also the attention_impl (auto | xla | xla_blocked)")
    ap.add_argument("--attn", default="sdpa", help="transformers attention implementation (sdpa | eager)")
    ap.add_argument("--torch-dtypes", default="float32",
                    help="transformers sides, comma-separated: float32 and/or bfloat16 (torch.autocast); each "
                         "of our variants is compared with the torch side of its own dtype when there is one")
    ap.add_argument("--profile", action="store_true", help="also time the step's parts on both sides")
    ap.add_argument("--small", action="store_true", help="smoke test: a tiny model")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from llava_jax.models.layers import resolve_attention_impl
    from llava_jax.train.flops import step_flops

    torch.set_num_threads(2)
    info = C.machine_info()
    print(f"machine: {info}")
    base = C.model_config(args.small, remat_policy="nothing_saveable")
    batch = make_batch(base, args.batch, args.seq)
    tokens = args.batch * args.seq

    peak = C.jax_matmul_peak()
    torch_peak = C.torch_matmul_peak()
    print(f"fp32 matmul peak: jax {peak / 1e9:.1f} GFLOP/s, torch(2 threads) {torch_peak / 1e9:.1f} GFLOP/s")
    torch_dtypes = args.torch_dtypes.split(",")
    bf16_peaks = None
    if "bfloat16" in torch_dtypes or "bfloat16" in args.variants:
        # AMX CPUs run bf16 x bf16 -> f32 several times faster than fp32; a bf16 result does not gain
        bf16_peaks = dict(jax_bf16_f32=C.jax_matmul_peak(dtype="bfloat16", accumulate="float32"),
                          jax_bf16_bf16=C.jax_matmul_peak(dtype="bfloat16"),
                          torch_bf16=C.torch_matmul_peak(dtype="bfloat16"))
        print("bf16 matmul peaks (GFLOP/s): " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in bf16_peaks.items()))

    torch_runners = {("torch" if d == "float32" else f"torch {d}"): TorchRunner(base, batch, args.attn, d)
                     for d in torch_dtypes}
    variants = {}
    for v in args.variants.split(","):
        policy, dtype, attention = (v.split(":") + ["", ""])[:3]
        cfg = base.replace(remat_policy=policy, dtype=dtype or base.dtype,
                           attention_impl=attention or base.attention_impl)
        runner = OursRunner(cfg, batch)
        runner.step()  # compile + first step
        variants[v] = (cfg, runner)
    for runner in torch_runners.values():
        runner.step()  # warm-up (allocator, thread pool)

    times = {k: [] for k in torch_runners} | {v: [] for v in variants}
    cpu_times = {k: [] for k in torch_runners} | {v: [] for v in variants}
    losses = {}
    peaks = [peak]
    for r in range(args.rounds):
        peaks.append(C.jax_matmul_peak(repeats=3))  # the peak too drifts with the machine's load
        for k, runner in torch_runners.items():
            for _ in range(args.steps):
                _timed_step(times[k], cpu_times[k], lambda: losses.__setitem__(k, runner.step()))
        for v, (_, runner) in variants.items():
            for _ in range(args.steps):
                _timed_step(times[v], cpu_times[v], lambda: losses.__setitem__(v, runner.step()))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {C.median(t):.3f}s ({C.median(cpu_times[k]):.2f} "
                                                          f"CPU-s)" for k, t in times.items())
              + f"  load {C.load_average()[0]:.2f}")

    flops = step_flops(base, 2, args.batch, args.seq, 1).total
    peak = C.median(peaks)
    rows = []
    for k, runner in torch_runners.items():
        t_torch, c_torch = C.median(times[k]), C.median(cpu_times[k])
        rows.append(dict(impl=f"transformers {info.get('transformers', '')} ({args.attn})", remat="-",
                         dtype=runner.dtype, attention=args.attn, cpu_s=c_torch, vs_torch_cpu=1.0,
                         step_s=t_torch, tokens_per_s=tokens / t_torch, vs_torch=1.0,
                         mfu=flops / t_torch / peak, last_loss=losses[k]))
    for v, (cfg, _) in variants.items():
        # against the torch side of the same dtype (else the first one)
        k = next((k for k, r in torch_runners.items() if r.dtype == cfg.dtype), next(iter(torch_runners)))
        t_torch, c_torch = C.median(times[k]), C.median(cpu_times[k])
        t, c = C.median(times[v]), C.median(cpu_times[v])
        attention = resolve_attention_impl(cfg.attention_impl, seq_len=args.seq, causal=True)
        rows.append(dict(impl="llava-jax train step", remat=cfg.remat_policy, dtype=cfg.dtype, attention=attention,
                         step_s=t, cpu_s=c, vs_torch_cpu=c_torch / c,
                         tokens_per_s=tokens / t, vs_torch=t_torch / t, mfu=flops / t / peak,
                         last_loss=losses[v]))
    C.print_table(rows, ["impl", "remat", "dtype", "attention", "step_s", "tokens_per_s", "vs_torch", "mfu",
                         "cpu_s", "vs_torch_cpu", "last_loss"],
                  f"train step, batch {args.batch} x {args.seq} tokens, stage 2 (vision frozen)")
    print(f"step FLOPs {flops / 1e9:.1f} GFLOP; peak (jax fp32 matmul, median of {len(peaks)} probes) "
          f"{peak / 1e9:.1f} GFLOP/s; probes {[round(p / 1e9, 1) for p in peaks]}")

    profile = None
    if args.profile:
        profile = []
        first = next(iter(variants.values()))[1]
        first_torch = next(iter(torch_runners))
        sides = {first_torch: torch_runners[first_torch].parts(), f"ours ({next(iter(variants))})": first.parts()}
        for name, parts in sides.items():
            for part, fn in parts.items():
                fn()  # compile / warm up
                profile.append(dict(side=name, part=part, seconds=C.median(C.time_calls(fn, 2))))
        for name in sides:
            full = C.median(times[first_torch] if name == first_torch else times[next(iter(variants))])
            profile.append(dict(side=name, part="full step (from above)", seconds=full))
        C.print_table(profile, ["side", "part", "seconds"], "where the time goes")

    C.write_json("train_throughput", dict(
        machine=info, batch=args.batch, seq=args.seq, tokens_per_step=tokens, step_flops=flops,
        jax_matmul_peak_flops=peak, jax_matmul_peaks_per_round=peaks, torch_matmul_peak_flops=torch_peak,
        bf16_matmul_peak_flops=bf16_peaks,
        rows=rows, profile=profile,
        samples_per_s={" ".join([r["impl"], r["remat"], r["dtype"], r["attention"]]): args.batch / r["step_s"]
                       for r in rows},
        raw_times=times, raw_cpu_times=cpu_times, model=base.to_dict()), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
