"""Inference speed: llava_jax.infer.generate vs transformers' generate, same model and weights.

Model: benchmarks/_common.bench_config (the training benchmark's), random weights built by
transformers and loaded into ours (llava_jax/testing/hf_reference.py), fp32, torch with 2 threads.
Prompt: <s> + 256 image tokens + 31 text tokens = 288 tokens, 64 new tokens, greedy, EOS disabled.

Both sides are timed the same way: T1 = wall time of a generate call with max_new_tokens=1 (time to
first token: image encoding + prefill + first token), T64 = with max_new_tokens=64; decode rate per
row = 63 / (T64 - T1), aggregate = rows x that. Calls are interleaved (torch, ours) over rounds and
the medians reported. Roofline at batch 1: a decode step must read every LLM weight once, so its
floor is (weight bytes, in the row's weight dtype) / (memory read bandwidth measured in the same run).

Rows: transformers; llava-jax (fp32, one Generator); with --one-line, llava_jax.infer.generate(model, ...)
called afresh each time; llava-jax with bf16 / int8 language-model kernels
(`Generator(weights_dtype=...)`, llava_jax/models/layout.py) and their prompt-logit error vs fp32;
llava-jax with bf16 compute (config.dtype, fp32 parameters).

  .venv/bin/python benchmarks/generate_speed.py [--rounds 3] [--batches 1,8] [--weights bfloat16,int8]
      [--no-bf16] [--one-line] [--json PATH]
"""
from __future__ import annotations

import argparse
import sys

import _common as C  # noqa: E402  (sets JAX_PLATFORMS before jax is imported)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

NEW_TOKENS = 64


def make_prompt(cfg, rows: int, text_tokens: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    t = cfg.num_image_tokens
    ids = rng.integers(3, cfg.image_token_id, size=(rows, 1 + t + text_tokens)).astype(np.int32)
    ids[:, 0] = cfg.text.bos_token_id
    ids[:, 1:1 + t] = cfg.image_token_id
    size = cfg.vision.image_size
    pixels = rng.normal(size=(rows, size, size, 3)).astype(np.float32)
    return ids, pixels


class Ours:
    def __init__(self, model, weights_dtype="float32"):
        from flax import nnx
        from llava_jax.infer.generate import Generator

        self.gen = Generator(model, weights_dtype=weights_dtype)
        self.model = nnx.merge(self.gen.graphdef, self.gen.state)  # what the generator runs

    def __call__(self, ids, pixels, new_tokens):
        return self.gen.generate(ids, pixels, max_new_tokens=new_tokens, eos_token_id=[])


class OneLine:
    """The one-line API, called afresh each time: `llava_jax.infer.generate(model, ...)` (it reuses
    the compiled Generator of the same model between calls)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, ids, pixels, new_tokens):
        from llava_jax.infer.generate import generate

        return generate(self.model, ids, pixels, max_new_tokens=new_tokens, eos_token_id=[])


class Torch:
    def __init__(self, model):
        self.model = model

    def __call__(self, ids, pixels, new_tokens):
        from llava_jax.testing.hf_reference import nhwc_to_nchw

        with torch.no_grad():
            out = self.model.generate(input_ids=torch.from_numpy(ids.astype(np.int64)),
                                      attention_mask=torch.ones(ids.shape, dtype=torch.int64),
                                      pixel_values=nhwc_to_nchw(pixels), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return out[:, ids.shape[1]:].numpy()


def decode_weight_bytes(ours: "Ours") -> int:
    from llava_jax.models.layout import weight_bytes

    return weight_bytes(ours.model)


def llm_weight_bytes(model) -> tuple:
    """(bytes of LLM weights a decode step reads, bytes of the embedding table it does not):
    every decoder layer, the final norm and the vocabulary projection; the token embedding is a
    one-row lookup."""
    from flax import nnx

    state = nnx.to_pure_dict(nnx.state(model.language_model))
    leaves = jax.tree_util.tree_leaves_with_path(state)
    embed = sum(x.nbytes for p, x in leaves if "embed_tokens" in jax.tree_util.keystr(p))
    total = sum(x.nbytes for _, x in leaves)
    tied = model.config.text.tie_word_embeddings
    return (total - (0 if tied else embed)), embed


def max_logit_error(model_a, model_b, ids, pixels) -> float:
    from llava_jax.testing.hf_reference import jitted

    a = np.asarray(jitted(model_a)(ids, pixels), np.float32)
    b = np.asarray(jitted(model_b)(ids, pixels), np.float32)
    return float(np.max(np.abs(a - b))), float(np.max(np.abs(a)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--text-tokens", type=int, default=31, help="text tokens after <s> and the image")
    ap.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    ap.add_argument("--no-bf16", action="store_true", help="skip the bfloat16-compute row")
    ap.add_argument("--weights", default="bfloat16,int8",
                    help="light language-model weight dtypes to add as rows ('' for none)")
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--small", action="store_true", help="smoke test: a tiny model")
    ap.add_argument("--one-line", action="store_true",
                    help="also time repeated llava_jax.infer.generate(model, ...) calls")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from llava_jax.testing.hf_reference import hf_llava, ours_from_hf

    torch.set_num_threads(2)
    info = C.machine_info()
    print(f"machine: {info}")
    cfg = C.model_config(args.small, remat_policy="none")
    new = args.new_tokens
    hf = hf_llava(cfg, std=0.02)
    hf.set_attn_implementation(args.attn)
    ours_model = ours_from_hf(hf, cfg)
    impls = {"transformers": Torch(hf), "llava-jax": Ours(ours_model)}
    if args.one_line:
        impls["llava-jax infer.generate"] = OneLine(ours_model)
    light = [w for w in args.weights.split(",") if w]
    for w in light:
        impls[f"llava-jax {w} weights"] = Ours(ours_model, weights_dtype=w)
    if not args.no_bf16:
        bf16_model = ours_from_hf(hf, cfg.replace(dtype="bfloat16"))
        impls["llava-jax bf16 compute"] = Ours(bf16_model)

    bandwidth = C.memory_bandwidth()
    copy_bw = C.numpy_copy_bandwidth()
    weight_bytes, embed_bytes = llm_weight_bytes(ours_model)
    print(f"read bandwidth (jax sum) {bandwidth / 1e9:.2f} GB/s, numpy copy {copy_bw / 1e9:.2f} GB/s; "
          f"LLM weights read per decode step {weight_bytes / 2 ** 20:.1f} MiB")

    rows, agreement = [], {}
    for rows_per_call in [int(b) for b in args.batches.split(",")]:
        ids, pixels = make_prompt(cfg, rows_per_call, args.text_tokens)
        outputs = {}
        for name, fn in impls.items():  # compile / warm up both lengths
            fn(ids, pixels, 1)
            outputs[name] = fn(ids, pixels, new)
        ref = outputs["transformers"]
        for name, out in outputs.items():
            agreement[f"{name} b{rows_per_call}"] = float(np.mean(out == ref))
        t1 = {n: [] for n in impls}
        tn = {n: [] for n in impls}
        for r in range(args.rounds):
            for name, fn in impls.items():
                t1[name] += C.time_calls(lambda: fn(ids, pixels, 1), 1)
                tn[name] += C.time_calls(lambda: fn(ids, pixels, new), 1)
            print(f"batch {rows_per_call} round {r + 1}/{args.rounds}: " +
                  ", ".join(f"{n} T1 {C.median(t1[n]):.3f}s T{new} {C.median(tn[n]):.3f}s" for n in impls) +
                  f"  load {C.load_average()[0]:.2f}")
        for name in impls:
            ttft, total = C.median(t1[name]), C.median(tn[name])
            per_row = (new - 1) / max(total - ttft, 1e-9)
            rows.append(dict(impl=name, batch=rows_per_call, ttft_s=ttft, total_s=total,
                             decode_tok_s_per_row=per_row, decode_tok_s_aggregate=per_row * rows_per_call,
                             ms_per_step=1e3 * (total - ttft) / (new - 1),
                             greedy_match=agreement[f"{name} b{rows_per_call}"]))
    for r in rows:
        ref = next(x for x in rows if x["impl"] == "transformers" and x["batch"] == r["batch"])
        r["decode_vs_torch"] = r["decode_tok_s_aggregate"] / ref["decode_tok_s_aggregate"]
        r["ttft_vs_torch"] = ref["ttft_s"] / r["ttft_s"]
        if r["batch"] == 1:
            impl = impls[r["impl"]]
            r["roofline_ms"] = 1e3 * (decode_weight_bytes(impl) if isinstance(impl, Ours) else weight_bytes) / bandwidth
    C.print_table(rows, ["impl", "batch", "ttft_s", "ttft_vs_torch", "ms_per_step", "decode_tok_s_per_row",
                         "decode_tok_s_aggregate", "decode_vs_torch", "roofline_ms", "greedy_match"],
                  f"generate: {1 + cfg.num_image_tokens + args.text_tokens}-token prompt, {new} new tokens, greedy")

    error = None
    ids, pixels = make_prompt(cfg, 1, args.text_tokens)
    if not args.no_bf16:
        err, scale = max_logit_error(ours_model, bf16_model, ids, pixels)
        error = dict(max_abs_logit_error=err, max_abs_logit=scale)
        print(f"bf16 compute vs fp32: max |logit error| {err:.4g} (max |logit| {scale:.4g})")
    weight_errors = {}
    for w in light:
        err, scale = max_logit_error(ours_model, impls[f"llava-jax {w} weights"].model, ids, pixels)
        weight_errors[w] = dict(max_abs_logit_error=err, max_abs_logit=scale,
                                weight_bytes_per_step=decode_weight_bytes(impls[f"llava-jax {w} weights"]))
        print(f"{w} weights vs fp32, prompt logits: max |logit error| {err:.4g} (max |logit| {scale:.4g}); "
              f"LLM weights read per decode step {weight_errors[w]['weight_bytes_per_step'] / 2 ** 20:.1f} MiB")

    C.write_json("generate_speed", dict(
        machine=info, prompt_tokens=1 + cfg.num_image_tokens + args.text_tokens, new_tokens=new,
        read_bandwidth_bytes_per_s=bandwidth, numpy_copy_bandwidth_bytes_per_s=copy_bw,
        llm_weight_bytes_per_step=weight_bytes, embedding_bytes=embed_bytes, rows=rows, bf16=error,
        light_weights=weight_errors,
        model=cfg.to_dict()), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
