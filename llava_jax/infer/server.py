"""`llava-jax serve`: an OpenAI-compatible HTTP server with a chat page, standard library only.

  llava-jax serve --ckpt DIR [--host 127.0.0.1] [--port 8000]

Endpoints: POST /v1/chat/completions (text and image_url parts with data: URIs; stream: true gives
server-sent events in OpenAI's chunk format ending with [DONE]; temperature, top_p, max_tokens,
stop, seed), GET /v1/models, GET /health, and the chat page at /.

Requests arriving close together are decoded together: one scheduler thread owns the model; it
takes the first waiting request, collects more for a short window (up to --max-batch), left-pads
them into one batch and runs a single generate() whose per-step callback streams every row to its
own client. Bad input gets a 4xx with {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import dataclasses
import http.server
import json
import os
import queue
import signal
import sys
import threading
import time
import uuid
from typing import Optional

import numpy as np

WEB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")


# ----- errors --------------------------------------------------------------------------------

class ApiError(Exception):
    """An error reported to the client as HTTP `status` with an OpenAI-style JSON body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class Limits:
    max_body_bytes: int = 32 * 1024 * 1024
    max_image_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 64 * 1024 * 1024
    max_images_per_request: int = 4
    default_max_tokens: int = 512
    max_context: Optional[int] = None  # default: the model's max_position_embeddings


# ----- requests ------------------------------------------------------------------------------

@dataclasses.dataclass
class Job:
    """One chat completion on its way through the scheduler. `events` receives ('delta', text),
    then ('done', finish_reason, completion_tokens) or ('error', ApiError)."""

    input_ids: np.ndarray
    pixels: Optional[np.ndarray]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: list
    events: queue.Queue = dataclasses.field(default_factory=queue.Queue)


def _decode_image(url: str, where: str, limits: Limits):
    """A data: URI -> PIL image, or ApiError saying what is wrong with it."""
    from llava_jax.data.image import load_image

    if url.startswith(("http://", "https://")):
        raise ApiError(400, f"{where}: remote image URLs are not fetched by this server; send the image "
                            f"inline as a data: URI (data:image/png;base64,...)", param=where,
                       code="remote_image_url")
    if not url.startswith("data:"):
        raise ApiError(400, f"{where}: expected a data: URI (data:image/png;base64,...), got "
                            f"{url[:40]!r}", param=where, code="invalid_image_url")
    header, sep, payload = url[5:].partition(",")
    if not sep or not header.endswith(";base64"):
        raise ApiError(400, f"{where}: the data: URI must be base64-encoded (data:<mime>;base64,<data>)",
                       param=where, code="invalid_image_url")
    if len(payload) * 3 // 4 > limits.max_image_bytes:
        raise ApiError(413, f"{where}: image is larger than the {limits.max_image_bytes} bytes this server "
                            f"accepts", param=where, code="image_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"{where}: invalid base64 image data ({e})", param=where,
                       code="invalid_base64") from None
    try:
        image = load_image(data)
    except ValueError as e:
        raise ApiError(400, f"{where}: the data is not an image this server can decode ({e})",
                       param=where, code="invalid_image") from None
    if image.width * image.height > limits.max_image_pixels:
        raise ApiError(413, f"{where}: image of {image.width}x{image.height} pixels exceeds the "
                            f"{limits.max_image_pixels} pixels this server accepts", param=where,
                       code="image_too_large")
    return image


def _number(body: dict, key: str, default, low, high, kind=float):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise ApiError(400, f"'{key}' must be {'an integer' if kind is int else 'a number'}, got {value!r}",
                       param=key)
    if not low <= value <= high:
        raise ApiError(400, f"'{key}' must be in [{low}, {high}], got {value}", param=key)
    return kind(value)


def parse_messages(messages, limits: Limits):
    """OpenAI messages -> (system text or None, turns [(role, text, has_image)], PIL images)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    system, turns, images = None, [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, f"{where} must be an object with role 'system', 'user' or 'assistant'",
                           param=where)
        role, content = message["role"], message.get("content")
        texts, message_images = [], []
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for j, part in enumerate(content):
                part_where = f"{where}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif kind == "image_url":
                    image_url = part.get("image_url")
                    url = image_url.get("url") if isinstance(image_url, dict) else image_url
                    if not isinstance(url, str):
                        raise ApiError(400, f"{part_where}.image_url.url must be a string", param=part_where)
                    if role != "user":
                        raise ApiError(400, f"{part_where}: only user messages can hold images", param=part_where)
                    message_images.append(_decode_image(url, part_where, limits))
                else:
                    raise ApiError(400, f"{part_where} must be {{'type': 'text', 'text': ...}} or "
                                        f"{{'type': 'image_url', 'image_url': {{'url': ...}}}}", param=part_where)
        else:
            raise ApiError(400, f"{where}.content must be a string or a list of parts", param=where)
        text = "\n".join(texts)
        if role == "system":
            if turns or system is not None:
                raise ApiError(400, f"{where}: a system message may only come first", param=where)
            system = text
            continue
        if len(message_images) > 1:
            raise ApiError(400, f"{where}: at most one image per message (LLaVA places one image at the "
                                f"start of a user turn)", param=where)
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise ApiError(400, f"{where}: expected a {expected!r} message (after an optional system "
                                f"message, user and assistant messages alternate)", param=where)
        turns.append((role, text, bool(message_images)))
        images += message_images
    if not turns or turns[-1][0] != "user":
        raise ApiError(400, "the last message must be from the user", param="messages")
    if len(images) > limits.max_images_per_request:
        raise ApiError(400, f"{len(images)} images in one request; this server accepts at most "
                            f"{limits.max_images_per_request}", param="messages")
    return system, turns, images


# ----- the batching scheduler ------------------------------------------------------------------

class BatchScheduler:
    """Owns the model: runs waiting jobs together, one generate() per batch."""

    def __init__(self, chat_model, max_batch: int = 8, window_s: float = 0.02):
        self.chat_model = chat_model
        self.max_batch, self.window_s = max_batch, window_s
        self.queue: queue.Queue = queue.Queue()
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0}
        self._thread = threading.Thread(target=self._run, name="llava-jax-batcher", daemon=True)
        self._stop = threading.Event()
        self._thread.start()

    def submit(self, job: Job) -> Job:
        self.queue.put(job)
        return job

    def close(self):
        self._stop.set()
        self.queue.put(None)
        self._thread.join(timeout=10)

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
                self._stop.set()
                break
            jobs.append(job)
        return jobs

    def _run(self):
        while not self._stop.is_set():
            jobs = self._collect()
            if not jobs:
                continue
            try:
                self._run_batch(jobs)
            except Exception as e:  # a failure fails this batch's requests, not the server
                error = ApiError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")
                for job in jobs:
                    job.events.put(("error", error))

    def _run_batch(self, jobs: list):
        from llava_jax.infer.prompting import TextStream, left_pad

        cm = self.chat_model
        self.stats["batches"] += 1
        self.stats["requests"] += len(jobs)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(jobs))
        ids, mask = left_pad([job.input_ids for job in jobs], cm.pad_id)
        # Images in row order = the order their placeholders appear in the batch (row-major).
        pixels = [job.pixels for job in jobs if job.pixels is not None]
        pixels = np.concatenate(pixels) if pixels else None
        streams = [TextStream(cm.tokenizer, job.stop) for job in jobs]
        counts = [0] * len(jobs)

        def on_step(tokens, active):
            for b in np.flatnonzero(active):
                token = int(tokens[b])
                if token in cm.eos_ids:
                    continue
                counts[b] += 1
                delta = streams[b].push(token)
                if delta:
                    jobs[b].events.put(("delta", delta))

        _, reasons = cm.generator.generate(
            ids, pixels, mask, max_new_tokens=np.array([job.max_tokens for job in jobs]),
            temperature=np.array([job.temperature for job in jobs]), top_p=np.array([job.top_p for job in jobs]),
            seed=np.array([job.seed for job in jobs]), eos_token_id=cm.eos_ids, pad_token_id=cm.pad_id,
            stop_per_row=[job.stop for job in jobs], tokenizer=cm.tokenizer, stream_callback=on_step,
            return_finish_reasons=True)
        for job, stream, count, reason in zip(jobs, streams, counts, reasons):
            rest = stream.finish()
            if rest:
                job.events.put(("delta", rest))
            job.events.put(("done", "length" if reason == "length" else "stop", count))


# ----- the service: validation and response building, independent of HTTP ----------------------

class Service:
    def __init__(self, chat_model, model_id: str, limits: Limits = Limits(), max_batch: int = 8,
                 batch_window_s: float = 0.02):
        self.chat_model, self.model_id, self.limits = chat_model, model_id, limits
        self.context = limits.max_context or chat_model.config.text.max_position_embeddings
        self.scheduler = BatchScheduler(chat_model, max_batch=max_batch, window_s=batch_window_s)
        self.created = int(time.time())

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_id, "object": "model", "created": self.created,
                                            "owned_by": "llava-jax"}]}

    def health(self) -> dict:
        return {"status": "ok", "model": self.model_id, **self.scheduler.stats}

    def start_completion(self, body) -> tuple:
        """Validate a request and queue it -> (job, stream?, prompt token count)."""
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model != self.model_id:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {self.model_id!r}",
                           param="model", code="model_not_found")
        if body.get("n", 1) != 1:
            raise ApiError(400, "only n=1 is supported", param="n")
        temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        top_p = max(_number(body, "top_p", 1.0, 0.0, 1.0), 1e-6)  # 0 = only the most likely token
        seed = _number(body, "seed", 0, 0, 2 ** 32 - 1, int)
        max_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _number(body, max_key, None, 1, 1 << 30, int)
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else (stop or [])
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
            raise ApiError(400, "'stop' must be a string or a list of at most 4 strings", param="stop")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "'stream' must be true or false", param="stream")

        system, turns, images = parse_messages(body.get("messages"), self.limits)
        cm = self.chat_model
        try:
            if system is not None:
                from llava_jax.data.conversation import get_template
                from llava_jax.infer.prompting import PromptBuilder

                template = dataclasses.replace(get_template(cm.settings.template), system=system)
                builder = PromptBuilder(cm.tokenizer, cm.config, dataclasses.replace(cm.settings, template=template))
            else:
                builder = cm.prompts
            input_ids = builder.input_ids(turns)
        except ValueError as e:  # the conversation module's BadSample errors
            raise ApiError(400, f"messages: {e}", param="messages") from None
        pixels = np.stack([builder.pixels(im) for im in images]) if images else None
        prompt_tokens = len(input_ids)
        room = self.context - prompt_tokens
        if max_tokens is None:
            max_tokens = min(self.limits.default_max_tokens, room)
        if room < 1 or max_tokens > room:
            raise ApiError(400, f"this model's context is {self.context} tokens; the messages take "
                                f"{prompt_tokens} tokens (each image counts {cm.config.num_image_tokens}) and "
                                f"{max_key} asks for {max_tokens} more", param="messages",
                           code="context_length_exceeded")
        job = Job(input_ids, pixels, max_tokens, temperature, top_p, seed, stop)
        return self.scheduler.submit(job), stream, prompt_tokens

    def completion_id(self) -> str:
        return "chatcmpl-" + uuid.uuid4().hex[:24]


# ----- HTTP ----------------------------------------------------------------------------------

def _wait(job: Job, timeout: float):
    try:
        return job.events.get(timeout=timeout)
    except queue.Empty:
        raise ApiError(504, f"no progress from the model in {timeout:.0f} s", type="server_error") from None


class Handler(http.server.BaseHTTPRequestHandler):
    service: Service  # set on the subclass made by make_server
    server_version = "llava-jax"
    step_timeout_s = 600.0

    def log_message(self, fmt, *args):  # quiet unless asked
        if getattr(self.server, "verbose", False):
            super().log_message(fmt, *args)

    # -- helpers
    def _send_json(self, status: int, obj: dict):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, error: ApiError):
        self._send_json(error.status, error.body())

    def _read_body(self):
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "a Content-Length header is required")
        try:
            length = int(length)
        except ValueError:
            raise ApiError(400, f"bad Content-Length {length!r}") from None
        limit = self.service.limits.max_body_bytes
        if length > limit:
            # Drain (bounded) so the client sees the answer instead of a reset connection.
            remaining = min(length, 4 * limit)
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                remaining -= len(chunk)
            self.close_connection = True
            raise ApiError(413, f"request body of {length} bytes exceeds the {limit} bytes this server accepts",
                           code="body_too_large")
        raw = self.rfile.read(length)
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None

    # -- routes
    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._send_json(200, self.service.health())
        elif path == "/v1/models":
            self._send_json(200, self.service.models())
        elif path in ("/", "/index.html"):
            with open(os.path.join(WEB_DIR, "index.html"), "rb") as f:
                data = f.read()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        else:
            self._send_error(ApiError(404, f"no route GET {path}", code="not_found"))

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        try:
            if path != "/v1/chat/completions":
                raise ApiError(404, f"no route POST {path}", code="not_found")
            body = self._read_body()
            job, stream, prompt_tokens = self.service.start_completion(body)
        except ApiError as e:
            self._send_error(e)
            return
        try:
            if stream:
                self._stream(job, prompt_tokens, body)
            else:
                self._complete(job, prompt_tokens)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client left; its row finishes with the batch

    def _complete(self, job: Job, prompt_tokens: int):
        text = []
        while True:
            event = _wait(job, self.step_timeout_s)
            if event[0] == "delta":
                text.append(event[1])
            elif event[0] == "error":
                self._send_error(event[1])
                return
            else:
                _, reason, count = event
                break
        self._send_json(200, {
            "id": self.service.completion_id(), "object": "chat.completion", "created": int(time.time()),
            "model": self.service.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                         "finish_reason": reason, "logprobs": None}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": count,
                      "total_tokens": prompt_tokens + count}})

    def _stream(self, job: Job, prompt_tokens: int, body: dict):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        base = {"id": self.service.completion_id(), "object": "chat.completion.chunk",
                "created": int(time.time()), "model": self.service.model_id}
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def send(obj):
            self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
            self.wfile.flush()

        def chunk(delta, reason=None):
            choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
            return {**base, "choices": [choice]}

        send(chunk({"role": "assistant", "content": ""}))
        while True:
            event = _wait(job, self.step_timeout_s)
            if event[0] == "delta":
                send(chunk({"content": event[1]}))
            elif event[0] == "error":
                send(event[1].body())
                break
            else:
                _, reason, count = event
                send(chunk({}, reason))
                if include_usage:
                    send({**base, "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": count,
                                                           "total_tokens": prompt_tokens + count}})
                break
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    verbose = False


def make_server(chat_model, host: str = "127.0.0.1", port: int = 8000, model_id: str = "llava-jax",
                limits: Limits = Limits(), max_batch: int = 8, batch_window_s: float = 0.02) -> Server:
    """An HTTP server bound to (host, port) (port 0 = any free port); call serve_forever()."""
    service = Service(chat_model, model_id, limits, max_batch=max_batch, batch_window_s=batch_window_s)
    handler = type("BoundHandler", (Handler,), {"service": service})
    server = Server((host, port), handler)
    server.service = service
    return server


def parse_args(argv):
    from llava_jax.infer.prompting import add_model_arguments

    p = argparse.ArgumentParser(prog="llava-jax serve", description="OpenAI-compatible server with a chat page.")
    p.add_argument("--ckpt", required=True, help="model folder or training workdir")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", help="the id clients send as 'model' (default: the checkpoint folder's name)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    p.add_argument("--batch-window-ms", type=float, default=20.0,
                   help="how long the first waiting request waits for others to join its batch")
    p.add_argument("--max-tokens", type=int, default=512, help="default max_tokens")
    p.add_argument("--max-body-mb", type=float, default=32.0)
    p.add_argument("--max-image-mb", type=float, default=16.0)
    add_model_arguments(p)
    p.add_argument("--verbose", action="store_true", help="log every request")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from llava_jax.infer.prompting import load_from_args

    chat_model = load_from_args(args)
    model_id = args.model_name or os.path.basename(os.path.normpath(args.ckpt))
    limits = Limits(max_body_bytes=int(args.max_body_mb * 2 ** 20), max_image_bytes=int(args.max_image_mb * 2 ** 20),
                    default_max_tokens=args.max_tokens)
    server = make_server(chat_model, args.host, args.port, model_id, limits, max_batch=args.max_batch,
                         batch_window_s=args.batch_window_ms / 1000)
    server.verbose = args.verbose
    host, port = server.server_address[:2]
    # SIGTERM (docker stop, systemd, kill) stops like Ctrl-C: a Python handler also replaces the native
    # failure handler that would print "*** SIGTERM received ..." with a stack trace. Installed before
    # the "serving" line, so a client that stops the server as soon as it reads that line is handled.
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if in_main else None
    try:
        print(f"serving {model_id!r} on http://{host}:{port}/  (OpenAI API at http://{host}:{port}/v1)", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        print("llava-jax serve: stopped", file=sys.stderr, flush=True)
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous or signal.SIG_DFL)
        server.service.scheduler.close()
        server.server_close()
    return 0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
