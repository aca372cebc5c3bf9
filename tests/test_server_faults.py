"""Fault and soak test of `llava-jax serve`: bad requests of every kind interleaved with good ones,
concurrently, for a few hundred requests. Every good answer equals its answer alone, every bad one
gets its 4xx, /health stays up, and neither requests nor memory pile up."""
import base64
import concurrent.futures
import gc
import http.client
import json
import random
import socket
import threading

import psutil
import pytest

from llava_jax.infer.engine import Request
from llava_jax.infer.prompting import ChatModel
from llava_jax.infer.server import Limits, make_server
from llava_jax.testing.checkpoints import expected_answer, shared_tiny_checkpoint
from test_server import QUESTION, photo, user

MODEL = "tiny-llava"


@pytest.fixture(scope="module")
def served():
    ckpt = shared_tiny_checkpoint()
    limits = Limits(max_body_bytes=100_000, max_image_bytes=50_000, body_timeout_s=0.3, default_max_tokens=8)
    srv = make_server(ChatModel.load(ckpt), "127.0.0.1", 0, MODEL, limits, max_batch=4)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield ckpt, srv
    srv.shutdown()
    srv.server_close()


def post(port, body: bytes, path="/v1/chat/completions"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def chat(messages, **kw) -> bytes:
    return json.dumps({"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": 8, **kw}).encode()


def slow_body(port):
    """Headers and part of a body, then nothing: the server gives up after its body timeout."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 200\r\n\r\n{\"model\": ")
        status = int(s.recv(4096).split()[1])
    return status, None


def hang_up_mid_stream(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/chat/completions", body=chat([user(QUESTION)], max_tokens=200, stream=True),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    first = response.read(6)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    return (response.status if first == b"data: " else -1), None


def bad_requests(port):
    """(name, call -> (status, body), expected status)"""
    bad_image = lambda url: chat([{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": url}}]}])
    not_image = "data:image/png;base64," + base64.b64encode(b"not a picture").decode()
    return [
        ("malformed json", lambda: post(port, b'{"model": "tiny-llava", "messages": [}'), 400),
        ("oversized body", lambda: post(port, chat([user("x" * 120_000)])), 413),
        ("bad base64", lambda: post(port, bad_image("data:image/png;base64,@@@")), 400),
        ("not an image", lambda: post(port, bad_image(not_image)), 400),
        ("unknown field", lambda: post(port, chat([user(QUESTION)], temprature=0.5)), 400),
        ("unknown model", lambda: post(port, chat([user(QUESTION)], model="gpt-4o")), 404),
        ("bad temperature", lambda: post(port, chat([user(QUESTION)], temperature=9)), 400),
        ("too many tokens", lambda: post(port, chat([user(QUESTION)], max_tokens=10 ** 6)), 400),
        ("unknown route", lambda: post(port, b"{}", path="/v1/completion"), 404),
        ("slow body", lambda: slow_body(port), 408),
        ("hang up mid-stream", lambda: hang_up_mid_stream(port), 200),
    ]


def test_bad_requests_interleaved_with_good_ones(served):
    ckpt, srv = served
    port = srv.server_address[1]
    images = {name: photo(name) for name in ("astronaut", "coffee", "chelsea")}
    goods = [(QUESTION, images[name]) for name in images] + [("How many objects are there?", None),
                                                             ("Describe the colour.", images["coffee"])]
    expected = [expected_answer(ckpt, q, im, max_new_tokens=8) for q, im in goods]

    def good(i):
        question, image = goods[i]
        status, body = post(port, chat([user(question, image)]))
        return status, body["choices"][0]["message"]["content"] if status == 200 else body

    bads = bad_requests(port)
    process = psutil.Process()
    rng = random.Random(0)

    def one_round():
        jobs = [("good", i, lambda i=i: good(i), 200) for i in range(len(goods)) for _ in range(4)]
        jobs += [("bad", name, call, status) for _ in range(10) for name, call, status in bads]
        rng.shuffle(jobs)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda job: job[2](), jobs))
        for (kind, what, _, want), (status, body) in zip(jobs, results):
            assert status == want, (kind, what, status, body)
            if kind == "good":
                assert body == expected[what], (goods[what][0], body)
            elif body is not None:
                assert body["error"]["message"], body
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        return len(jobs)

    count = one_round()  # warm-up: compiles every shape the mix needs
    gc.collect()
    rss_before = process.memory_info().rss
    for _ in range(2):
        count += one_round()
    gc.collect()
    growth = process.memory_info().rss - rss_before
    assert count >= 300
    engine = srv.service.scheduler
    assert engine.busy_slots == 0 and engine.queue_length == 0
    assert engine.stats["finished_cancelled"] >= 30  # every hung-up stream was cut short
    # nothing kept per request: no engine request object outlives its response
    assert sum(isinstance(o, Request) for o in gc.get_objects()) <= 2
    assert growth < 40 * 2 ** 20, f"RSS grew by {growth / 2 ** 20:.1f} MiB over {count} requests"
