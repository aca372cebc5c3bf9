"""A small OpenAI-compatible chat server on 127.0.0.1 that injects faults, for tests.

`FaultServer(responder, faults)`: request n (1-based) gets the fault `faults(n)` (or faults[n-1] for a
list; past its end: "ok"). Faults: "ok", "429", "500", "timeout" (answer only after `timeout_sleep`
seconds, longer than the client's timeout), "401" (bad key), "drop" (close the connection without a reply),
"malformed" (HTTP 200 with a body that is not JSON), "garbage" (a valid completion whose text no
parser accepts). Each ok reply reports usage prompt_tokens=10, completion_tokens=5.

Also here, for the end-to-end tests of datagen and eval: our own OpenAI-compatible server
(llava_jax.infer.server, what `llava-jax serve` runs) serving a tiny random checkpoint on 127.0.0.1
in a thread (`shared_tiny_server()` -> (base_url, model id); tests/conftest.py's fixtures `tiny_ckpt`
and `tiny_server` give the checkpoint and the server).
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from llava_jax.testing.checkpoints import shared_tiny_checkpoint

PROMPT_TOKENS, COMPLETION_TOKENS = 10, 5
GARBAGE = "I am sorry, I cannot help with that."


class FaultServer:
    def __init__(self, responder, faults=(), *, delay: float = 0.0, timeout_sleep: float = 1.0):
        self.responder, self.faults = responder, faults
        self.delay, self.timeout_sleep = delay, timeout_sleep
        self.log = []  # (n, fault, messages) per request
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()

    def fault_for(self, n: int) -> str:
        if callable(self.faults):
            return self.faults(n)
        return self.faults[n - 1] if n <= len(self.faults) else "ok"

    def counts(self) -> dict:
        out = {}
        for _, fault, _ in self.log:
            out[fault] = out.get(fault, 0) + 1
        return out

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, code: int, body: bytes, content_type="application/json"):
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                if self.path != "/v1/chat/completions":
                    return self._send(404, b'{"error": "not found"}')
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with server._lock:
                    n = len(server.log) + 1
                    fault = server.fault_for(n)
                    server.log.append((n, fault, request["messages"]))
                if server.delay:
                    time.sleep(server.delay)
                try:
                    if fault == "429":
                        return self._send(429, b'{"error": {"message": "rate limited"}}')
                    if fault == "401":
                        return self._send(401, b'{"error": {"message": "invalid api key"}}')
                    if fault == "500":
                        return self._send(500, b'{"error": {"message": "internal error"}}')
                    if fault == "drop":
                        self.close_connection = True
                        return self.connection.close()
                    if fault == "malformed":
                        return self._send(200, b'{"choices": [ this is not json')
                    if fault == "timeout":
                        time.sleep(server.timeout_sleep)
                    text = GARBAGE if fault == "garbage" else server.responder(request["messages"])
                    body = {"id": f"chatcmpl-{n}", "object": "chat.completion", "model": request.get("model"),
                            "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": text}}],
                            "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS,
                                      "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS}}
                    self._send(200, json.dumps(body).encode())
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

        return Handler


# --- our own server on a tiny checkpoint ----------------------------------------------------------

# The datagen prompts (about 1,600 tokens with their few-shot examples) need 2048 positions.
TINY_SERVER_POSITIONS = 2048


@contextlib.contextmanager
def serve_checkpoint(ckpt: str, model_id: str = "tiny"):
    """Our server (llava_jax.infer.server.make_server, as `llava-jax serve`) on 127.0.0.1:<free port>."""
    from llava_jax.infer.prompting import ChatModel
    from llava_jax.infer.server import make_server

    server = make_server(ChatModel.load(ckpt), "127.0.0.1", 0, model_id)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", model_id
    finally:
        server.shutdown()
        server.server_close()  # also stops the engine


@functools.lru_cache(maxsize=None)
def shared_tiny_server() -> tuple:
    """(base_url, model id) of our server on the shared tiny checkpoint, one per process (stopped at exit)."""
    served = serve_checkpoint(shared_tiny_checkpoint(TINY_SERVER_POSITIONS))
    atexit.register(served.__exit__, None, None, None)
    return served.__enter__()
