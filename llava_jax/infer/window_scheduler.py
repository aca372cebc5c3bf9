"""The server's scheduler before the slot engine: batch the requests that arrive within a short
window, then run that batch to its end with one `Generator.generate`.

Kept as `llava-jax serve --scheduler window` and for benchmarks/serve_load.py, which compares it
with `llava_jax.infer.engine.Engine` in the same run. It takes the engine's `Request` objects and
emits the same events, so the server runs on either; a request that arrives one step after a batch
started waits for that batch's longest answer, and a cancelled request decodes to its batch's end.
"""
from __future__ import annotations

import collections
import queue
import threading
import time

import numpy as np

from llava_jax.infer.engine import EngineClosed, QueueFull, Request
from llava_jax.infer.prompting import left_pad


class WindowScheduler:
    def __init__(self, generator, *, max_batch: int = 8, window_s: float = 0.02, max_queue: int = 64,
                 max_context=None, eos_ids=None, pad_id=None, tokenizer=None):
        self.generator = generator
        self.max_batch, self.window_s, self.max_queue = int(max_batch), float(window_s), int(max_queue)
        text = generator.config.text
        self.max_context = int(max_context or text.max_position_embeddings)
        self.eos_ids = list(eos_ids) if eos_ids is not None else list(np.atleast_1d(text.eos_token_id))
        self.pad_id = int(generator.config.pad_token_id if pad_id is None else pad_id)
        self.tokenizer = tokenizer
        self.queue: queue.Queue = queue.Queue()
        self.stats = collections.Counter()
        self._running = 0
        self._closed = False
        self._thread = None

    def capacity(self, prompt_length: int) -> int:
        return max(0, self.max_context - int(prompt_length))

    @property
    def queue_length(self) -> int:
        return self.queue.qsize()

    @property
    def busy_slots(self) -> int:
        return self._running

    def submit(self, request: Request) -> Request:
        if self._closed:
            raise EngineClosed("the scheduler is shut down")
        if self.queue.qsize() >= self.max_queue:
            raise QueueFull(f"{self.queue.qsize()} requests are waiting (the bound is {self.max_queue})")
        request.input_ids = np.asarray(request.input_ids, np.int32).reshape(-1)
        request.submitted_at = time.monotonic()
        self.stats["requests"] += 1
        self.queue.put(request)
        return request

    def start(self) -> "WindowScheduler":
        self._thread = threading.Thread(target=self._run, name="llava-jax-window", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 30.0):
        self._closed = True
        self.queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def _collect(self) -> list:
        first = self.queue.get()
        if first is None:
            return []
        jobs, deadline = [first], time.monotonic() + self.window_s
        while len(jobs) < self.max_batch:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                job = self.queue.get(timeout=remaining)
            except queue.Empty:
                break
            if job is None:
                self._closed = True
                break
            jobs.append(job)
        return jobs

    def _run(self):
        while not self._closed:
            jobs = self._collect()
            if not jobs:
                continue
            self._running = len(jobs)
            try:
                self._run_batch(jobs)
            except Exception as e:  # a failure fails this batch's requests, not the server
                for job in jobs:
                    job.error = f"generation failed: {type(e).__name__}: {e}"
                    if job.on_event is not None:
                        job.on_event("error", job.error)
                    job._done.set()
            finally:
                self._running = 0

    def _run_batch(self, jobs: list):
        self.stats["prefills"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(jobs))
        ids, mask = left_pad([job.input_ids for job in jobs], self.pad_id)
        with_images = [job for job in jobs if job.pixels is not None]
        pixels = np.concatenate([job.pixels for job in with_images]) if with_images else None
        sizes = None
        if with_images and self.generator.config.anyres:  # LLaVA-1.6: each image's (height, width)
            sizes = np.concatenate([np.reshape(job.image_sizes, (-1, 2)) for job in with_images])

        def on_step(tokens, active):
            now = time.monotonic()
            for b in np.flatnonzero(active):
                token, job = int(tokens[b]), jobs[b]
                if job.first_token_at is None:
                    job.first_token_at = now
                if token in self.eos_ids:
                    continue
                job.tokens.append(token)
                if job.on_event is not None:
                    job.on_event("token", token)

        _, reasons = self.generator.generate(
            ids, pixels, mask, image_sizes=sizes, max_new_tokens=np.array([job.max_tokens for job in jobs]),
            temperature=np.array([job.temperature for job in jobs]), top_k=np.array([job.top_k for job in jobs]),
            top_p=np.array([job.top_p for job in jobs]), seed=np.array([job.seed for job in jobs]),
            eos_token_id=self.eos_ids, pad_token_id=self.pad_id, stop_per_row=[job.stop for job in jobs],
            tokenizer=self.tokenizer, stream_callback=on_step, return_finish_reasons=True)
        for job, reason in zip(jobs, reasons):
            job.finish_reason = reason
            self.stats[f"finished_{reason}"] += 1
            if job.on_event is not None:
                job.on_event("done", reason)
            job._done.set()

