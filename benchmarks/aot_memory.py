"""TPU memory fit of the real train step, compiled ahead of time on this machine (`llava-jax aot`).

For each (model, stage, topology) case: sequence 2048, global batch 128, the config's remat policy
and mesh (fsdp over all chips). It finds the largest accumulation microbatch (global rows per
microbatch) that fits in HBM:
  1. try the whole batch at once (microbatch 128 = no accumulation); if it fits, that is the answer;
  2. else try the smallest microbatch (one row per chip); if it does not fit, nothing does;
  3. else double from there while it fits.
Each compile is a separate `llava-jax aot` process (one at a time; the last stdout line is its JSON).
Results are merged into the JSON file after every compile, so an interrupted run keeps what finished
and a rerun skips compiles already recorded (--redo to repeat them).

  .venv/bin/python benchmarks/aot_memory.py [--cases 7b-2-v5e:4x4,...] [--timeout 1800] [--json PATH]
      [--attention xla|splash] [--remat POLICY]
--attention xla (the default) is the dense attention the first table was measured with; splash (the
Pallas kernel, what `auto` picks on TPU) writes benchmarks/results/aot_memory_splash.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import _common as C  # noqa: E402

GLOBAL_BATCH = 128
SEQ = 2048
CONFIGS = {"7b": "configs/llava_v1_5_7b.py", "13b": "configs/llava_v1_5_13b.py"}
# (size, stage, topology), in the order they are compiled: stage 2 (the demanding one) first.
CASES = [("7b", 2, "v5e:4x4"), ("7b", 2, "v5p:2x2x2"), ("13b", 2, "v5e:4x8"), ("13b", 2, "v5p:2x2x4"),
         ("7b", 1, "v5e:4x4"), ("7b", 1, "v5p:2x2x2"), ("13b", 1, "v5e:4x8"), ("13b", 1, "v5p:2x2x4")]


def chips(topology: str) -> int:
    n = 1
    for d in topology.split(":")[1].split("x"):
        n *= int(d)
    return n


def case_name(size, stage, topology) -> str:
    return f"{size}-{stage}-{topology}"


ATTENTION = ["xla"]  # set by --attention
REMAT = [""]  # set by --remat ("" = the config's)


def run_aot(size: str, stage: int, topology: str, microbatch: int, timeout: float) -> dict:
    cmd = [str(C.REPO / ".venv" / "bin" / "llava-jax"), "aot", "--config", f"{CONFIGS[size]}:stage{stage}",
           "--topology", topology, "--global-batch", str(GLOBAL_BATCH), "--max-length", str(SEQ),
           "--microbatch", str(0 if microbatch >= GLOBAL_BATCH else microbatch),
           "--attention", ATTENTION[0], "--no-cost"] + (["--remat", REMAT[0]] if REMAT[0] else [])
    # Compile-only TPU devices come from libtpu's topology API; the host backend can stay CPU.
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=C.REPO, env=env)
    except subprocess.TimeoutExpired:
        return dict(command=" ".join(cmd), error=f"timed out after {timeout:.0f}s", compile_s=time.time() - t0)
    out = dict(command=" ".join(cmd), compile_s=round(time.time() - t0, 1), loadavg=C.load_average()[0])
    lines = proc.stdout.strip().splitlines()
    try:
        out.update(json.loads(lines[-1]))
    except (IndexError, json.JSONDecodeError):
        out["error"] = f"rc={proc.returncode}: " + (proc.stderr.strip().splitlines() or ["no output"])[-1][:500]
    return out


def search(size, stage, topology, timeout, record) -> None:
    """The fit search of the module docstring; `record(microbatch, result)` stores each compile."""
    def fits(mb):
        r = record(mb, None) or record(mb, run_aot(size, stage, topology, mb, timeout))
        print(f"  {case_name(size, stage, topology)} microbatch {mb}: fits={r.get('fits')} "
              f"peak={r.get('per_device_peak_bytes')} compile {r.get('compile_s')}s {r.get('error', '')}",
              flush=True)
        return bool(r.get("fits"))

    if fits(GLOBAL_BATCH):
        return
    mb = chips(topology)
    while mb < GLOBAL_BATCH and fits(mb):
        mb *= 2


def summarize(results: dict) -> list:
    rows = []
    for size, stage, topology in CASES:
        runs = results.get(case_name(size, stage, topology), {})
        if not runs:
            continue
        good = [int(mb) for mb, r in runs.items() if r.get("fits")]
        best = max(good) if good else None
        shown = runs[str(best)] if best else runs[min(runs, key=int)]
        rows.append(dict(model=f"llava-v1.5-{size}", stage=stage, topology=topology, mesh=shown.get("mesh"),
                         remat=shown.get("remat"), largest_fitting_microbatch=best,
                         accumulation_steps=(GLOBAL_BATCH // best) if best else None,
                         peak_gib=(shown.get("per_device_peak_bytes") or 0) / 2 ** 30,
                         hbm_gib=(shown.get("hbm_bytes") or 0) / 2 ** 30, fits=shown.get("fits"),
                         tried=",".join(f"{mb}:{'y' if r.get('fits') else ('n' if r.get('fits') is False else '?')}"
                                        for mb, r in sorted(runs.items(), key=lambda kv: int(kv[0])))))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="", help="comma-separated size-stage-topology names (default: all)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per compile")
    ap.add_argument("--redo", action="store_true", help="recompile cases already in the JSON")
    ap.add_argument("--json", default=None)
    ap.add_argument("--attention", choices=["xla", "splash"], default="xla")
    ap.add_argument("--remat", default="", help="remat policy for every case (default: the config's)")
    args = ap.parse_args(argv)
    ATTENTION[0], REMAT[0] = args.attention, args.remat

    suffix = ("" if args.attention == "xla" else f"_{args.attention}") + (f"_{args.remat}" if args.remat else "")
    path = args.json or str(C.RESULTS / f"aot_memory{suffix}.json")
    previous = json.loads(open(path).read()) if os.path.exists(path) and not args.redo else {}
    results = previous.get("results", {})
    info = previous.get("machine") or C.machine_info()
    wanted = set(filter(None, args.cases.split(",")))

    def save():
        C.write_json("aot_memory", dict(machine=info, global_batch=GLOBAL_BATCH, seq=SEQ, results=results,
                                        summary=summarize(results)), path)

    for size, stage, topology in CASES:
        name = case_name(size, stage, topology)
        if wanted and name not in wanted:
            continue
        print(f"{name}:", flush=True)
        runs = results.setdefault(name, {})

        def record(mb, result, runs=runs):
            if result is None:
                done = runs.get(str(mb))  # an answered compile (fits true or false) is reused
                return done if done is not None and done.get("fits") is not None else None
            runs[str(mb)] = result
            save()
            return result

        search(size, stage, topology, args.timeout, record)

    rows = summarize(results)
    C.print_table(rows, ["model", "stage", "topology", "mesh", "remat", "largest_fitting_microbatch",
                         "accumulation_steps", "peak_gib", "hbm_gib", "fits", "tried"],
                  f"train step memory per chip, global batch {GLOBAL_BATCH} x {SEQ} tokens")
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
