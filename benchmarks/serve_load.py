"""Serving under load: `llava-jax serve` with the slot engine vs the window scheduler, same model,
same run, same request stream.

Model: the CPU bench model (benchmarks/_common.bench_config: CLIP 4x256 at 224 px, LLaMA 8x512,
vocabulary 32000, fp32), random weights, saved with the test tokenizer (llava_jax/testing/tokenizer.py);
the vocabulary-projection columns of ids that do not decode to text (specials, EOS, byte pieces, ids
past the tokenizer) are zeroed so every answer token streams as text and no answer ends early.
Each scheduler runs in its own `llava-jax serve` subprocess on 127.0.0.1 (--max-batch 8), one after
the other; the load generator is this process.

Load: N closed-loop clients (1, 4, 16, 32), each waiting an exponential think time (Poisson
arrivals, mean --think-s) before each request; prompts of 8-120 words, half with a 224 px image
(+256 image tokens), max_tokens drawn from {8, 16, 32, 64}; greedy; streamed (stream=true,
include_usage). A run stops sending after --seconds and waits for what is in flight (bounded by the
server's request timeout). Reported per (scheduler, N): completed requests, errors, throughput
(completion tokens / wall time), TTFT p50/p99 (send -> first content chunk) and inter-token latency
p50/p99 (between content chunks); for the slot engine also the share of its busy time spent in
prefill calls and how much of the run it was busy (from /metrics, llava_engine_seconds). Before the
measured runs each server gets an unmeasured warm-up (bursts of every batch size and image count,
then --warmup-s of load) that compiles its shapes into a persistent compilation cache (--jax-cache),
so the measured runs time steady-state serving; the engine servers also start with --precompile.

  .venv/bin/python benchmarks/serve_load.py [--clients 1,4,16,32] [--seconds 30] [--json PATH]
      [--serve-args "--weights-dtype bfloat16"]
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time

import _common as C  # noqa: E402  (sets JAX_PLATFORMS before jax is imported)

import numpy as np  # noqa: E402

HOST = "127.0.0.1"  # loopback only
MAX_TOKENS = (8, 16, 32, 64)
WORDS = "what is shown in the image describe the colour shape and count of objects near far left right".split()


def make_checkpoint(folder: str) -> str:
    from flax import nnx

    from llava_jax.checkpoint import save_model
    from llava_jax.models.llava import LlavaModel
    from llava_jax.testing.tokenizer import llama_tokenizer

    config = C.bench_config()
    model = LlavaModel(config, rngs=nnx.Rngs(0))
    tok = llama_tokenizer()
    allowed = np.zeros(config.text.vocab_size, bool)
    for i in range(min(len(tok), config.text.vocab_size)):
        piece = tok.convert_ids_to_tokens(i)
        allowed[i] = (i not in tok.all_special_ids and isinstance(piece, str) and not piece.startswith("<")
                      and tok.decode([i]).strip() != "")
    head = model.language_model.lm_head
    head.kernel[...] = head.kernel[...] * allowed[None, :]
    save_model(folder, model, config, tokenizer=tok)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# --schedulers names -> serve flags
SCHEDULERS = {"window": ["--scheduler", "window"], "engine": ["--scheduler", "engine", "--precompile"],
              "engine-no-ahead": ["--scheduler", "engine", "--prefill-ahead", "0", "--precompile"]}


class ServerProcess:
    def __init__(self, ckpt: str, scheduler: str, max_batch: int, jax_cache: str, extra_args=()):
        self.port = free_port()
        cmd = [sys.executable, "-m", "llava_jax.cli", "serve", "--ckpt", ckpt, "--host", HOST, "--port",
               str(self.port), "--max-batch", str(max_batch), "--max-queue", "256",
               "--model-name", "bench", "--request-timeout", "300"] + SCHEDULERS[scheduler] + list(extra_args)
        # A persistent compilation cache: a rerun (and the second server, for the shared prefill)
        # loads compiled shapes instead of compiling them during the measured runs.
        env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=jax_cache,
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
        self.proc = subprocess.Popen(cmd, cwd=C.REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     env=env)
        line = self.proc.stdout.readline()
        if "serving" not in line:
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line}")

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def image_uri() -> str:
    import base64
    import io

    import skimage.data
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).resize((224, 224)).save(buf, "JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def make_body(rng: random.Random, image: str, with_image=None) -> dict:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 50)))
    content = [{"type": "text", "text": text}]
    if rng.random() < 0.5 if with_image is None else with_image:
        content.append({"type": "image_url", "image_url": {"url": image}})
    return {"model": "bench", "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": rng.choice(MAX_TOKENS), "stream": True, "stream_options": {"include_usage": True}}


def one_request(port: int, body: dict) -> dict:
    """Send one streamed request -> {ttft, gaps, tokens, error}."""
    start = time.monotonic()
    conn = http.client.HTTPConnection(HOST, port, timeout=600)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            return {"error": f"HTTP {response.status}: {response.read()[:200]!r}"}
        ttft, last, gaps, tokens, error = None, None, [], 0, None
        while True:
            line = response.readline()
            if not line:
                break
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                error = event["error"]["message"]
            elif event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif event["choices"] and event["choices"][0]["delta"].get("content"):
                now = time.monotonic()
                if ttft is None:
                    ttft = now - start
                else:
                    gaps.append(now - last)
                last = now
        return {"ttft": ttft, "gaps": gaps, "tokens": tokens, "error": error}
    except (OSError, http.client.HTTPException) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        conn.close()


def run_load(port: int, clients: int, seconds: float, think_s: float, seed: int, image: str) -> dict:
    results, lock = [], threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(i: int):
        rng = random.Random(seed * 1000 + i)
        while True:
            time.sleep(rng.expovariate(1.0 / think_s))
            if time.monotonic() >= stop_at:
                return
            out = one_request(port, make_body(rng, image))
            with lock:
                results.append(out)

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    ok = [r for r in results if not r.get("error") and r.get("ttft") is not None]
    ttfts = [r["ttft"] for r in ok]
    gaps = [g for r in ok for g in r["gaps"]]
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else float("nan")
    return {"clients": clients, "requests": len(ok), "errors": len(results) - len(ok),
            "error_examples": [r.get("error") for r in results if r.get("error")][:3],
            "tokens": sum(r["tokens"] for r in ok), "wall_s": wall,
            "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "ttft_p50_ms": 1e3 * pct(ttfts, 50), "ttft_p99_ms": 1e3 * pct(ttfts, 99),
            "itl_p50_ms": 1e3 * pct(gaps, 50), "itl_p99_ms": 1e3 * pct(gaps, 99)}


def engine_seconds(port: int) -> dict:
    """The server's llava_engine_seconds{phase} samples (0 for the window scheduler)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    out = {}
    for phase in ("prefill", "decode"):
        sample = f'llava_engine_seconds{{phase="{phase}"}} '
        out[phase] = next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(sample)), 0.0)
    return out


def warm_up(port: int, max_batch: int, image: str):
    """Unmeasured: bursts of 1, 2, 4 ... max_batch simultaneous requests with 0, 1, half, all of them
    with an image, so the batch / image-count shapes are compiled before the measured runs."""
    rng = random.Random(7)
    rows = 1
    while rows <= max_batch:
        for images in sorted({0, 1, rows // 2, rows}):
            bodies = [make_body(rng, image, with_image=i < images) for i in range(rows)]
            threads = [threading.Thread(target=one_request, args=(port, b)) for b in bodies]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        rows *= 2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="1,4,16,32")
    p.add_argument("--seconds", type=float, default=30.0, help="per (scheduler, clients) run: sending window")
    p.add_argument("--think-s", type=float, default=1.0, help="mean think time between a client's requests")
    p.add_argument("--warmup-s", type=float, default=40.0)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--schedulers", default="window,engine",
                   help=f"comma-separated, of {sorted(SCHEDULERS)} (engine-no-ahead: --prefill-ahead 0)")
    p.add_argument("--serve-args", default="",
                   help="more `llava-jax serve` flags for every server, e.g. '--weights-dtype bfloat16'")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--jax-cache", default=os.path.join(tempfile.gettempdir(), "llava_jax_serve_load_jax_cache"),
                   help="persistent compilation cache of the servers")
    args = p.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    image = image_uri()
    ckpt = make_checkpoint(tempfile.mkdtemp(prefix="serve_load_ckpt_"))
    rows = []
    for scheduler in args.schedulers.split(","):
        server = ServerProcess(ckpt, scheduler, args.max_batch, args.jax_cache, shlex.split(args.serve_args))
        try:
            warm_up(server.port, args.max_batch, image)
            run_load(server.port, 16, args.warmup_s, 0.2, seed=99, image=image)
            for n in clients:
                before = engine_seconds(server.port)
                row = {"scheduler": scheduler, **run_load(server.port, n, args.seconds, args.think_s, seed=n,
                                                          image=image)}
                after = engine_seconds(server.port)
                spent = {k: after[k] - before[k] for k in after}
                if sum(spent.values()) > 0:  # the engine's split of its busy time, and how busy it was
                    row["prefill_share"] = spent["prefill"] / sum(spent.values())
                    row["engine_busy"] = sum(spent.values()) / row["wall_s"]
                print(json.dumps(row), flush=True)
                rows.append(row)
        finally:
            server.close()
    C.print_table(rows, ["scheduler", "clients", "requests", "errors", "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms",
                         "itl_p50_ms", "itl_p99_ms", "prefill_share", "engine_busy"], title="serve_load")
    payload = {"machine": C.machine_info(), "args": vars(args), "rows": rows}
    C.write_json("serve_load", payload, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
