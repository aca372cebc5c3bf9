"""Render benchmarks/results/*.json as Markdown tables (pasted into BENCHMARKS.md, so that every
figure there is the one a run wrote, not a transcription).

  .venv/bin/python benchmarks/report.py [train_throughput train_throughput_blocked generate_speed data_pipeline
      aot_memory]
"""
from __future__ import annotations

import json
import sys

import _common as C


def _fmt(v, digits=3):
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    if isinstance(v, (list, tuple)):
        return "x".join(str(x) for x in v)
    return "" if v is None else str(v)


def table(rows, columns, headers=None) -> str:
    headers = headers or columns
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(out)


def header(d: dict) -> str:
    m = d["machine"]
    return (f"Run {m['date']}: `{d.get('command', '')}`; {m['cpu']}, nproc {m['nproc']}, jax {m.get('jax')}, "
            f"torch {m.get('torch')}, transformers {m.get('transformers')}; load average (1/5/15 min) at start "
            f"{m['loadavg_start']}, at end {d.get('loadavg_end')}.")


def train(d):
    print(header(d))
    print(f"\nStep FLOPs {d['step_flops'] / 1e9:.1f} GFLOP; fp32 matmul peak (jitted 2048^2 matmul loop, median of "
          f"per-round probes) {d['jax_matmul_peak_flops'] / 1e9:.1f} GFLOP/s "
          f"(torch 2 threads: {d['torch_matmul_peak_flops'] / 1e9:.1f} GFLOP/s).\n")
    if d.get("bf16_matmul_peak_flops"):
        print("bf16 matmul peaks (GFLOP/s): " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in
                                                           d["bf16_matmul_peak_flops"].items()) + "\n")
    columns = ["impl", "remat", "dtype", "step_s", "tokens_per_s", "vs_torch", "mfu"]
    headers = ["implementation", "remat", "dtype", "s/step (median)", "tokens/s", "vs PyTorch", "MFU"]
    if any("attention" in r for r in d["rows"]):  # runs since the blocked causal attention
        columns.insert(3, "attention")
        headers.insert(3, "attention")
    if any("cpu_s" in r for r in d["rows"]):  # process CPU-seconds per step (shared machines)
        columns += ["cpu_s", "vs_torch_cpu"]
        headers += ["CPU-s/step (median)", "vs PyTorch (CPU-s)"]
    print(table(d["rows"], columns, headers))
    if d.get("profile"):
        print()
        print(table(d["profile"], ["side", "part", "seconds"]))


def generate(d):
    print(header(d))
    print(f"\nRead bandwidth (jitted sum over 512 MiB) {d['read_bandwidth_bytes_per_s'] / 1e9:.2f} GB/s; numpy copy "
          f"{d['numpy_copy_bandwidth_bytes_per_s'] / 1e9:.2f} GB/s (read+write); LLM weights read per decode step "
          f"{d['llm_weight_bytes_per_step'] / 2 ** 20:.1f} MiB (fp32).\n")
    print(table(d["rows"], ["impl", "batch", "ttft_s", "ttft_vs_torch", "ms_per_step", "decode_tok_s_aggregate",
                            "decode_vs_torch", "roofline_ms", "greedy_match"],
                ["implementation", "batch", "TTFT s", "TTFT speed-up", "ms/decode step", "decode tokens/s (all rows)",
                 "decode vs PyTorch", "roofline ms/step", "greedy tokens = PyTorch's"]))
    if d.get("bf16"):
        b = d["bf16"]
        print(f"\nbf16 compute vs fp32, prompt logits: max |error| {b['max_abs_logit_error']:.3g} "
              f"(max |logit| {b['max_abs_logit']:.3g}).")
    for name, w in (d.get("light_weights") or {}).items():
        print(f"\n{name} language-model weights vs fp32, prompt logits: max |error| {w['max_abs_logit_error']:.3g} "
              f"(max |logit| {w['max_abs_logit']:.3g}); weights read per decode step "
              f"{w['weight_bytes_per_step'] / 2 ** 20:.1f} MiB.")


def data(d):
    print(header(d))
    print()
    print(table(d["throughput"], ["workers", "batch", "first_batch_s", "samples_per_s", "vs_fastest_train_step",
                                  "mean_real_tokens_per_row"],
                ["workers", "rows/batch", "first batch s", "samples/s", "vs fastest train step", "real tokens/row"]))
    if d.get("train_consumption_samples_per_s"):
        rates = ", ".join(f"{k.strip(' -')}: {v:.3g}" for k, v in d["train_consumption_samples_per_s"].items())
        print(f"\nTrain step consumption (samples/s, from train_throughput.json): {rates}")
    print()
    print(table(d["efficiency"], ["batching", "image_slots_per_row", "samples_per_row", "token_efficiency",
                                  "padding_waste", "image_slot_efficiency", "rows_per_1k_samples"],
                ["batching", "image slots/row", "samples/row", "token efficiency", "padding waste",
                 "image-slot efficiency", "rows per 1k samples"]))


def aot(d):
    m = d["machine"]
    print(f"Runs from {m['date']} on: {m['cpu']}, nproc {m['nproc']}, jax {m.get('jax')}.\n")
    print(table(d["summary"], ["model", "stage", "topology", "mesh", "remat", "largest_fitting_microbatch",
                               "accumulation_steps", "peak_gib", "hbm_gib", "fits", "tried"],
                ["model", "stage", "topology", "mesh (data x fsdp x tensor)", "remat", "largest microbatch that fits",
                 "accumulation steps", "peak GiB/chip at that microbatch", "HBM GiB", "fits", "tried (microbatch:fits)"]))
    print()
    rows = []
    for case, runs in d["results"].items():
        for mb, r in sorted(runs.items(), key=lambda kv: int(kv[0])):
            rows.append(dict(case=case, microbatch=mb, peak=(r.get("per_device_peak_bytes") or 0) / 2 ** 30,
                             fits=r.get("fits"), compile_s=r.get("compile_s"),
                             note=(r.get("error") or "")[:90]))
    print(table(rows, ["case", "microbatch", "peak", "fits", "compile_s", "note"],
                ["case", "microbatch", "peak GiB/chip", "fits", "compile s", "note"]))


RENDER = {"train_throughput": train, "train_throughput_blocked": train, "generate_speed": generate,
          "data_pipeline": data, "aot_memory": aot}


def main(argv=None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or list(RENDER)
    for name in names:
        path = C.RESULTS / f"{name}.json"
        if not path.exists():
            print(f"\n### {name}: no results ({path} missing)\n")
            continue
        print(f"\n### {name}\n")
        RENDER[name](json.loads(path.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
