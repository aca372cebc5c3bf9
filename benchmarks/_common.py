"""Shared pieces of the benchmarks: the benchmark model, machine facts, roofline probes, reporting.
The helpers the tests use too (the tiny model, the test tokenizer, the transformers reference) come
from the package: llava_jax.recipes.tiny and llava_jax.testing.

Every benchmark compares figures measured in one process run (ours vs PyTorch, ours vs this
machine's own matmul peak and memory bandwidth measured moments before), because the machine is
shared and absolute timings drift with its load.
"""
from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def bench_config(**overrides):
    """The model of the CPU benchmarks: CLIP 4 layers / 256 wide at 224 px patch 14 (256 patches),
    LLaMA 8 layers / 512 wide / 8 heads / MLP 1376, vocabulary 32000, fp32.

    The image placeholder is the last vocabulary id so that transformers' embedding lookup of the
    placeholder stays in range (llava-hf grows the vocabulary instead; the cost is the same)."""
    from llava_jax.models.config import LlavaConfig, TextConfig, VisionConfig

    vision = VisionConfig(image_size=224, patch_size=14, hidden_size=256, intermediate_size=1024,
                          num_layers=4, num_heads=4)
    text = TextConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8,
                      num_kv_heads=8, max_position_embeddings=2048)
    base = dict(vision=vision, text=text, projector_type="mlp2x_gelu", vision_feature_layer=-2,
                vision_feature_select_strategy="default", image_token_id=31999, pad_token_id=0,
                dtype="float32", remat_policy="nothing_saveable")
    base.update(overrides)
    return LlavaConfig(**base)


def model_config(small: bool = False, **overrides):
    """bench_config, or with `small` (the benchmarks' --small smoke test) the tests' tiny model
    (llava_jax.recipes.tiny); `overrides` replace fields of either."""
    if small:
        from llava_jax.recipes.tiny import tiny_llava_config

        return tiny_llava_config(**overrides)
    return bench_config(**overrides)


# ----- machine ----------------------------------------------------------------------------------

def load_average() -> tuple:
    return os.getloadavg()


def machine_info() -> dict:
    lscpu = ""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except Exception:  # lscpu missing: the rest still identifies the machine
        pass
    model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "?")
    info = dict(cpu=model, nproc=os.cpu_count(), platform=platform.platform(), python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                loadavg_start=[round(x, 2) for x in load_average()])
    try:
        import jax
        import torch

        info.update(jax=jax.__version__, torch=torch.__version__)
        import transformers

        info["transformers"] = transformers.__version__
    except Exception:
        pass
    return info


# ----- timing -------------------------------------------------------------------------------------

def time_calls(fn: Callable[[], object], repeats: int) -> list:
    """Wall seconds of `repeats` calls of fn (fn must block until its result is ready)."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def jax_matmul_peak(n: int = 2048, inner: int = 8, repeats: int = 5, dtype: str = "float32",
                    accumulate: str | None = None) -> float:
    """FLOP/s of a jitted loop of n x n matmuls on the default jax device (the best of repeats: the
    machine's attainable matmul rate with the threads XLA uses). dtype: the operands'; accumulate:
    the product's preferred_element_type (None: the operands' dtype), e.g. bf16 x bf16 -> float32."""
    import jax
    import jax.numpy as jnp

    a = (jax.random.normal(jax.random.key(0), (n, n), jnp.float32) / n ** 0.5).astype(dtype)
    b = (jax.random.normal(jax.random.key(1), (n, n), jnp.float32) / n ** 0.5).astype(dtype)

    @jax.jit
    def loop(x):
        return jax.lax.fori_loop(0, inner, lambda _, y: jnp.dot(y, b, preferred_element_type=accumulate)
                                 .astype(dtype), x)

    loop(a).block_until_ready()
    best = min(time_calls(lambda: loop(a).block_until_ready(), repeats))
    return 2.0 * n ** 3 * inner / best


def torch_matmul_peak(n: int = 2048, inner: int = 8, repeats: int = 5, dtype: str = "float32") -> float:
    import torch

    a, b = torch.randn(n, n, dtype=getattr(torch, dtype)), torch.randn(n, n, dtype=getattr(torch, dtype))
    with torch.no_grad():
        a @ b

        def run():
            y = a
            for _ in range(inner):
                y = y @ b
            return y

        best = min(time_calls(run, repeats))
    return 2.0 * n ** 3 * inner / best


def memory_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Bytes/s of a jitted full read of a `mib` MiB float32 array (a sum: reads only, like a decode
    step reading the weights), the best of repeats."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((mib * 1024 * 1024 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    best = min(time_calls(lambda: total(x).block_until_ready(), repeats))
    return x.nbytes / best


def numpy_copy_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Bytes/s moved (read + write) by a numpy array copy, the best of repeats."""
    import numpy as np

    src = np.ones(mib * 1024 * 1024 // 4, np.float32)
    dst = np.empty_like(src)
    best = min(time_calls(lambda: np.copyto(dst, src), repeats))
    return 2 * src.nbytes / best


# ----- reporting ----------------------------------------------------------------------------------

def print_table(rows: Sequence[dict], columns: Sequence[str], title: str = ""):
    if title:
        print(f"\n## {title}")
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |")


def write_json(name: str, payload: dict, path: str | None = None) -> pathlib.Path:
    target = pathlib.Path(path) if path else RESULTS / f"{name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(payload)
    payload.setdefault("command", " ".join([".venv/bin/python"] + sys.argv))
    payload["loadavg_end"] = [round(x, 2) for x in load_average()]
    target.write_text(json.dumps(payload, indent=2, default=str))
    print(f"\nwrote {target}")
    return target
