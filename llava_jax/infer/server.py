"""`llava-jax serve`: an OpenAI-compatible HTTP server with a chat page (Starlette on uvicorn).

  llava-jax serve --ckpt DIR [--host 127.0.0.1] [--port 8000] [--max-batch 8] [--prefill-ahead 8]
                  [--max-queue 64] [--request-timeout 600]

Endpoints: POST /v1/chat/completions (text and image_url parts with data: URIs; stream: true gives
server-sent events in OpenAI's chunk format ending with [DONE]; temperature, top_p, max_tokens,
stop, seed), GET /v1/models, GET /health, GET /metrics (Prometheus), and the chat page at /.

Requests go to the slot engine (`llava_jax.infer.engine`): --max-batch decode slots that requests
enter (after their prefill, which may run --prefill-ahead requests ahead of a free slot) and leave
(EOS, stop, max_tokens, a client that hung up, the timeout) between decode steps. Limits: a bounded
queue (beyond it 429 with Retry-After; 503 while shutting down), a per-request timeout (504), body
and image sizes (413), a slow body (408), max_tokens within the context and the engine's cache
(400). Bad input gets a 4xx with {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import dataclasses
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from typing import Optional

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as StarletteRequest
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llava_jax.infer.engine import Engine, EngineClosed, QueueFull, Request
from llava_jax.infer.metrics import ServerMetrics

WEB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")


# ----- errors --------------------------------------------------------------------------------

class ApiError(Exception):
    """An error reported to the client as HTTP `status` with an OpenAI-style JSON body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

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
    max_queue: int = 64  # requests waiting for a decode slot; beyond: 429 with Retry-After
    retry_after_s: int = 1
    request_timeout_s: Optional[float] = 600.0  # accepted -> last token; then 504
    body_timeout_s: float = 30.0  # the whole request body must arrive within this (else 408)
    keep_alive_s: int = 5


# ----- requests ------------------------------------------------------------------------------

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


# ----- the service: validation and response building, independent of HTTP ----------------------

# OpenAI chat-completion parameters: those not listed in `start_completion` are accepted and ignored
# (clients send them with their defaults); any other field is a mistake and gets a 400 naming it.
KNOWN_FIELDS = frozenset((
    "model messages temperature top_p max_tokens max_completion_tokens stop seed stream stream_options n "
    "user frequency_penalty presence_penalty logit_bias logprobs top_logprobs response_format tools "
    "tool_choice parallel_tool_calls functions function_call metadata store service_tier modalities "
    "reasoning_effort prediction audio web_search_options").split())

@dataclasses.dataclass
class Completion:
    """A validated chat completion: the engine request and what the response needs."""
    request: Request
    stream: bool
    include_usage: bool
    prompt_tokens: int
    stop: list


class Service:
    """Validates requests, feeds the scheduler (the slot engine, or `--scheduler window`)."""

    def __init__(self, chat_model, model_id: str, limits: Limits = Limits(), max_batch: int = 8,
                 batch_window_s: float = 0.02, scheduler: str = "engine", chunk_size: int = 1,
                 prefill_ahead: Optional[int] = None, precompile: bool = False):
        self.chat_model, self.model_id, self.limits = chat_model, model_id, limits
        self.context = limits.max_context or chat_model.config.text.max_position_embeddings
        kw = dict(max_batch=max_batch, max_queue=limits.max_queue, max_context=self.context,
                  eos_ids=chat_model.eos_ids, pad_id=chat_model.pad_id, tokenizer=chat_model.tokenizer)
        if scheduler == "engine":
            engine = Engine(chat_model.generator, chunk_size=chunk_size, prefill_ahead=prefill_ahead, **kw)
            if precompile:
                started = time.monotonic()
                shapes = engine.precompile()
                print(f"compiled {shapes} decode shapes in {time.monotonic() - started:.1f} s", file=sys.stderr,
                      flush=True)
            self.scheduler = engine.start()
        elif scheduler == "window":
            from llava_jax.infer.window_scheduler import WindowScheduler

            self.scheduler = WindowScheduler(chat_model.generator, window_s=batch_window_s, **kw).start()
        else:
            raise ValueError(f"unknown scheduler {scheduler!r}; expected 'engine' or 'window'")
        self.metrics = ServerMetrics(self.scheduler)
        self.created = int(time.time())

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_id, "object": "model", "created": self.created,
                                            "owned_by": "llava-jax"}]}

    def health(self) -> dict:
        stats = self.scheduler.stats
        return {"status": "ok", "model": self.model_id, "requests": stats["requests"],
                "batches": stats["prefills"], "largest_batch": stats["largest_batch"],
                "queue_length": self.scheduler.queue_length, "busy_slots": self.scheduler.busy_slots}

    def start_completion(self, body) -> Completion:
        """Validate a request -> Completion (not yet submitted)."""
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        unknown = sorted(set(body) - KNOWN_FIELDS)
        if unknown:
            raise ApiError(400, f"unrecognized request argument(s): {', '.join(map(repr, unknown))}",
                           param=unknown[0], code="unknown_parameter")
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
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise ApiError(400, "'stream_options' must be an object", param="stream_options")

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
            # AnyRes (LLaVA-1.6) images: tiles, and a placeholder count that depends on each image's size
            input_ids, pixels, sizes = builder.encode(turns, images)
        except ValueError as e:  # the conversation module's BadSample errors, an image AnyRes cannot use
            raise ApiError(400, f"messages: {e}", param="messages") from None
        prompt_tokens = len(input_ids)
        room = min(self.context - prompt_tokens, self.scheduler.capacity(prompt_tokens))
        if max_tokens is None:
            max_tokens = min(self.limits.default_max_tokens, room)
        if room < 1 or max_tokens > room:
            counts = ([builder.image_tokens(s) for s in sizes] if sizes is not None
                      else [cm.config.num_image_tokens] * len(images))
            raise ApiError(400, f"this model's context is {self.context} tokens; the messages take "
                                f"{prompt_tokens} tokens (the images take {counts}) and "
                                f"{max_key} asks for {max_tokens} more (at most {max(room, 0)} fit)",
                           param="messages", code="context_length_exceeded")
        request = Request(input_ids, pixels, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                          seed=seed, stop=stop, timeout_s=self.limits.request_timeout_s, image_sizes=sizes)
        return Completion(request, stream, bool(options.get("include_usage")), prompt_tokens, stop)

    def submit(self, completion: Completion, forward) -> None:
        """Queue the request; its events go to `forward(kind, value)` (from the engine thread)."""
        request = completion.request
        request.on_event = self.metrics.watch(request, forward)
        try:
            self.scheduler.submit(request)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}; retry later", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": str(self.limits.retry_after_s)}) from None
        except EngineClosed as e:
            raise ApiError(503, f"the server is shutting down ({e})", type="server_error", code="unavailable",
                           headers={"Retry-After": str(self.limits.retry_after_s)}) from None
        except ValueError as e:  # the engine's own checks (images, capacity)
            raise ApiError(400, str(e), param="messages") from None
        self.metrics.prompt_tokens.inc(completion.prompt_tokens)

    def completion_id(self) -> str:
        return "chatcmpl-" + uuid.uuid4().hex[:24]

    def close(self):
        self.scheduler.close()


# ----- HTTP (Starlette on uvicorn) ---------------------------------------------------------------

def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _read_json(request: StarletteRequest, limits: Limits):
    """The body as JSON, within the size limit and the body timeout (a slow client gets 408)."""
    limit = limits.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and not declared.isdigit():
        raise ApiError(400, f"bad Content-Length {declared!r}")

    async def read() -> bytes:
        chunks, size = [], 0
        too_large = declared is not None and int(declared) > limit
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                too_large = True
            if too_large:
                # Drain (bounded) so the client reads the answer instead of a reset connection.
                if size > 4 * limit:
                    break
                continue
            chunks.append(chunk)
        if too_large:
            raise ApiError(413, f"request body of {declared or size} bytes exceeds the {limit} bytes this server "
                                f"accepts", code="body_too_large", headers={"Connection": "close"})
        return b"".join(chunks)

    try:
        raw = await asyncio.wait_for(read(), limits.body_timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {limits.body_timeout_s:g} s",
                       code="body_timeout", headers={"Connection": "close"}) from None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None


class _Events:
    """The engine's events for one request, delivered on the event loop."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def forward(self, kind, value):  # engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))

    async def __aiter__(self):
        while True:
            kind, value = await self.queue.get()
            yield kind, value
            if kind in ("done", "error"):
                return


async def _cancel_on_disconnect(request: StarletteRequest, engine_request: Request):
    """Wait for the client to hang up, then cancel: its slot is freed before the next decode step."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            engine_request.cancel()
            return


def _end_error(reason: str, limits: Limits) -> Optional[ApiError]:
    if reason == "timeout":
        return ApiError(504, f"the request did not finish within {limits.request_timeout_s:g} s "
                             f"(--request-timeout)", type="server_error", code="timeout")
    if reason == "cancelled":
        return ApiError(499, "the request was cancelled", code="cancelled")
    return None


def build_app(service: Service) -> Starlette:
    from llava_jax.infer.prompting import TextStream

    limits = service.limits

    async def index(request):
        return FileResponse(os.path.join(WEB_DIR, "index.html"), media_type="text/html; charset=utf-8")

    async def health(request):
        return JSONResponse(service.health())

    async def models(request):
        return JSONResponse(service.models())

    async def metrics(request):
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    async def not_found(request):
        return _error_response(ApiError(404, f"no route {request.method} {request.url.path}", code="not_found"))

    async def chat_completions(request):
        try:
            body = await _read_json(request, limits)
            completion = await run_in_threadpool(service.start_completion, body)  # images, tokenizer: CPU work
            events = _Events()
            service.submit(completion, events.forward)
        except ApiError as e:
            service.metrics.requests.labels(str(e.status)).inc()
            return _error_response(e)
        if completion.stream:
            service.metrics.requests.labels("200").inc()
            return StreamingResponse(_stream(completion, events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watcher = asyncio.ensure_future(_cancel_on_disconnect(request, completion.request))
        try:
            response = await _complete(completion, events)
        finally:
            watcher.cancel()
        service.metrics.requests.labels(str(response.status_code)).inc()
        return response

    async def _complete(completion: Completion, events: _Events) -> Response:
        text, count, reason = TextStream(service.chat_model.tokenizer, completion.stop), 0, None
        async for kind, value in events:
            if kind == "token":
                count += 1
                text.push(value)
            elif kind == "error":
                return _error_response(ApiError(500, value, type="server_error"))
            else:
                reason = value
        error = _end_error(reason, limits)
        if error is not None:
            return _error_response(error)
        text.finish()
        return JSONResponse({
            "id": service.completion_id(), "object": "chat.completion", "created": int(time.time()),
            "model": service.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text.text()},
                         "finish_reason": "length" if reason == "length" else "stop", "logprobs": None}],
            "usage": {"prompt_tokens": completion.prompt_tokens, "completion_tokens": count,
                      "total_tokens": completion.prompt_tokens + count}})

    async def _stream(completion: Completion, events: _Events):
        base = {"id": service.completion_id(), "object": "chat.completion.chunk", "created": int(time.time()),
                "model": service.model_id}

        def sse(obj) -> bytes:
            return b"data: " + json.dumps(obj).encode() + b"\n\n"

        def chunk(delta, reason=None):
            return sse({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]})

        text, count = TextStream(service.chat_model.tokenizer, completion.stop), 0
        try:  # Starlette cancels this generator when the client disconnects: `finally` frees the slot
            yield chunk({"role": "assistant", "content": ""})
            async for kind, value in events:
                if kind == "token":
                    count += 1
                    delta = text.push(value)
                    if delta:
                        yield chunk({"content": delta})
                elif kind == "error":
                    yield sse(ApiError(500, value, type="server_error").body())
                else:
                    error = _end_error(value, limits)
                    if error is not None:
                        yield sse(error.body())
                        break
                    rest = text.finish()
                    if rest:
                        yield chunk({"content": rest})
                    yield chunk({}, "length" if value == "length" else "stop")
                    if completion.include_usage:
                        yield sse({**base, "choices": [], "usage": {
                            "prompt_tokens": completion.prompt_tokens, "completion_tokens": count,
                            "total_tokens": completion.prompt_tokens + count}})
            yield b"data: [DONE]\n\n"
        finally:
            completion.request.cancel()  # no-op once finished

    routes = [Route("/", index), Route("/index.html", index), Route("/health", health),
              Route("/v1/models", models), Route("/metrics", metrics),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/{path:path}", not_found, methods=["GET", "POST", "PUT", "DELETE", "PATCH"])]
    return Starlette(routes=routes)


class Server:
    """uvicorn serving the app on a socket bound at construction (port 0 = any free port), with the
    interface of the standard library's servers: serve_forever(), shutdown(), server_close()."""

    def __init__(self, service: Service, host: str, port: int, verbose: bool = False):
        self.service = service
        self.app = build_app(service)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.server_address = self.socket.getsockname()
        self.verbose = verbose
        self._uvicorn = None
        self._stop_requested = False
        self._stopped = threading.Event()

    def serve_forever(self, poll_interval: Optional[float] = None):
        config = uvicorn.Config(self.app, log_config=None, log_level="info" if self.verbose else "warning",
                                access_log=self.verbose, timeout_graceful_shutdown=5,
                                timeout_keep_alive=self.service.limits.keep_alive_s)
        self._uvicorn = uvicorn.Server(config)
        self._uvicorn.should_exit = self._stop_requested   # a stop asked for before uvicorn existed
        self._stopped.clear()
        try:
            self._uvicorn.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def request_stop(self) -> None:
        """Ask serve_forever to return (graceful: running requests finish); safe from a signal
        handler and at any time, also before serve_forever starts."""
        self._stop_requested = True
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True

    def shutdown(self, timeout: float = 30.0):
        if self._uvicorn is not None:
            self.request_stop()
            self._stopped.wait(timeout)

    def server_close(self):
        self.service.close()
        self.socket.close()


def make_server(chat_model, host: str = "127.0.0.1", port: int = 8000, model_id: str = "llava-jax",
                limits: Limits = Limits(), max_batch: int = 8, batch_window_s: float = 0.02,
                scheduler: str = "engine", chunk_size: int = 1, prefill_ahead: Optional[int] = None,
                precompile: bool = False) -> Server:
    """An HTTP server bound to (host, port) (port 0 = any free port); call serve_forever().
    `batch_window_s` only matters to scheduler='window' (the scheduler before the slot engine)."""
    service = Service(chat_model, model_id, limits, max_batch=max_batch, batch_window_s=batch_window_s,
                      scheduler=scheduler, chunk_size=chunk_size, prefill_ahead=prefill_ahead,
                      precompile=precompile)
    return Server(service, host, port)


def parse_args(argv):
    from llava_jax.infer.prompting import add_model_arguments

    p = argparse.ArgumentParser(prog="llava-jax serve", description="OpenAI-compatible server with a chat page.")
    p.add_argument("--ckpt", required=True, help="model folder or training workdir")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", help="the id clients send as 'model' (default: the checkpoint folder's name)")
    p.add_argument("--max-batch", type=int, default=8, help="decode slots: requests decoded together")
    p.add_argument("--prefill-ahead", type=int, default=None,
                   help="requests prefilled (first token streamed) while they wait for a decode slot "
                        "(default: --max-batch; 0: prefill only into free slots)")
    p.add_argument("--precompile", action="store_true",
                   help="compile the decode step for every cache length before serving "
                        "(no request waits for one of those compiles)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a slot beyond which the server answers 429 with Retry-After")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds from accepting a request to its last token; then 504 (or an error event)")
    p.add_argument("--scheduler", choices=("engine", "window"), default="engine",
                   help="engine: decode slots that requests enter and leave between steps; window: the older "
                        "batch-per-window scheduler (for comparison)")
    p.add_argument("--batch-window-ms", type=float, default=20.0,
                   help="--scheduler window only: how long the first waiting request waits for others")
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
                    default_max_tokens=args.max_tokens, max_queue=args.max_queue,
                    request_timeout_s=args.request_timeout)
    server = make_server(chat_model, args.host, args.port, model_id, limits, max_batch=args.max_batch,
                         batch_window_s=args.batch_window_ms / 1000, scheduler=args.scheduler,
                         prefill_ahead=args.prefill_ahead, precompile=args.precompile)
    server.verbose = args.verbose
    host, port = server.server_address[:2]
    # SIGTERM (docker stop, systemd, kill) stops like Ctrl-C. While uvicorn runs it catches the
    # signal itself (graceful shutdown) and raises it again afterwards for this handler; before that
    # (a client that stops the server as soon as it reads the "serving" line) this handler asks the
    # server to stop. It sets a flag rather than raising: an exception raised from a signal handler
    # can land inside a garbage-collection callback, where Python prints and drops it. It also
    # replaces the native failure handler that would print "*** SIGTERM received ..." with a trace.
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: server.request_stop()) if in_main else None
    try:
        print(f"serving {model_id!r} on http://{host}:{port}/  (OpenAI API at http://{host}:{port}/v1, "
              f"metrics at /metrics)", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous or signal.SIG_DFL)
        server.server_close()
    print("llava-jax serve: stopped", file=sys.stderr, flush=True)
    return 0



if __name__ == "__main__":
    sys.exit(main())
