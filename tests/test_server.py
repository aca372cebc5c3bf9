"""`llava-jax serve` over real HTTP on loopback, driven by the `openai` client."""
import base64
import concurrent.futures
import http.client
import io
import json
import socket
import threading
import time

import numpy as np
import openai
import pytest
from PIL import Image

from llava_jax.infer.prompting import ChatModel
from llava_jax.infer.server import Limits, make_server
from llava_jax.testing.checkpoints import expected_answer, shared_tiny_checkpoint

MODEL = "tiny-llava"
QUESTION = "What is shown in the image?"


def data_uri(image: Image.Image, fmt="PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def photo(name="astronaut", size=(64, 48)):
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize(size)


def user(text, image=None):
    content = [{"type": "text", "text": text}]
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": data_uri(image)}})
    return {"role": "user", "content": content}


@pytest.fixture(scope="module")
def chat_model():
    return ChatModel.load(shared_tiny_checkpoint())


def _serve(chat_model, limits, **kw):
    srv = make_server(chat_model, "127.0.0.1", 0, MODEL, limits, **kw)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    host, port = srv.server_address[:2]
    return {"ckpt": shared_tiny_checkpoint(), "host": host, "port": port, "srv": srv,
            "client": openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="unused", timeout=120,
                                    max_retries=0)}


@pytest.fixture(scope="module")
def server(chat_model):
    limits = Limits(max_body_bytes=1_000_000, max_image_bytes=200_000, default_max_tokens=16)
    served = _serve(chat_model, limits, max_batch=8)
    yield served
    served["srv"].shutdown()
    served["srv"].server_close()


def get_json(server, path):
    conn = http.client.HTTPConnection(server["host"], server["port"], timeout=30)
    conn.request("GET", path)
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def ask(client, messages, **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 12)
    return client.chat.completions.create(model=MODEL, messages=messages, **kw)


def test_models_health_plain_and_streamed(server):
    client = server["client"]
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert get_json(server, "/health")[0] == 200
    image = photo()
    done = ask(client, [user(QUESTION, image)])
    expected = expected_answer(server["ckpt"], QUESTION, image, max_new_tokens=12)
    assert done.choices[0].message.content == expected and expected
    assert done.choices[0].finish_reason in ("stop", "length")
    assert done.usage.completion_tokens <= 12 and done.usage.prompt_tokens > 40
    chunks = list(ask(client, [user(QUESTION, image)], stream=True))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 1 and "".join(deltas) == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == done.choices[0].finish_reason
    # A multi-turn conversation with a system message is accepted and answered.
    follow_up = ask(client, [{"role": "system", "content": "Answer briefly."}, user(QUESTION, image),
                             {"role": "assistant", "content": expected}, user("Describe the colour.")])
    assert follow_up.choices[0].message.content


def test_stop_string_cuts_the_answer(server):
    client = server["client"]
    image = photo("coffee")
    full = ask(client, [user(QUESTION, image)], max_tokens=16).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 2]
    cut = ask(client, [user(QUESTION, image)], max_tokens=16, stop=[stop])
    assert cut.choices[0].message.content == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       ask(client, [user(QUESTION, image)], max_tokens=16, stop=stop, stream=True) if c.choices)
    assert streamed == full[:full.index(stop)]


def test_concurrent_requests_are_batched_and_equal_single_answers(server):
    client = server["client"]
    names = ["astronaut", "coffee", "chelsea", "rocket"]
    requests = [[user(f"{QUESTION} {'Please answer in detail.' * (i % 3)}", photo(names[i % 4]))]
                if i % 4 != 3 else [user("How many objects are there?" + " one" * i)] for i in range(8)]
    singles = [ask(client, m).choices[0].message.content for m in requests]
    before = get_json(server, "/health")[1]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda m: ask(client, m).choices[0].message.content, requests))
    after = get_json(server, "/health")[1]
    assert together == singles
    assert after["requests"] - before["requests"] == 8
    assert after["largest_batch"] > 1  # rows decoded side by side in the engine's slots


def _raw_post(server, body: bytes, path="/v1/chat/completions"):
    conn = http.client.HTTPConnection(server["host"], server["port"], timeout=60)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def test_bad_inputs_get_4xx_json_errors_and_the_server_keeps_serving(server):
    client = server["client"]
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8))
    bad_url = lambda url: [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                         {"type": "image_url", "image_url": {"url": url}}]}]
    cases = [
        (dict(messages=bad_url("data:image/png;base64,@@not base64@@")), 400, "invalid base64"),
        (dict(messages=bad_url("data:image/png;base64," + base64.b64encode(b"hello, not a picture").decode())),
         400, "not an image"),
        (dict(messages=bad_url(data_uri(noise))), 413, "image is larger than the 200000 bytes"),
        (dict(messages=bad_url("https://example.com/cat.jpg")), 400, "remote image URLs are not fetched"),
        (dict(messages=[user(QUESTION)], max_tokens=100000), 400, "context is 512 tokens"),
        (dict(messages=[user(QUESTION)], model="gpt-4o"), 404, "'gpt-4o' does not exist"),
        (dict(messages=[{"role": "assistant", "content": "hi"}]), 400, "expected a 'user' message"),
        (dict(messages=[user(QUESTION)], temperature=5), 400, "'temperature' must be in"),
    ]
    for kwargs, status, message in cases:
        kwargs = {"model": MODEL, "max_tokens": 4, **kwargs}
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(**kwargs)
        assert info.value.status_code == status, (message, info.value.response.text)
        error = info.value.response.json()["error"]
        assert message in error["message"] and error["type"], error
        assert get_json(server, "/health") [0] == 200
    status, body = _raw_post(server, b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = _raw_post(server, json.dumps({"model": MODEL, "messages": [user("x" * 1_200_000)]}).encode())
    assert status == 413 and "exceeds the 1000000 bytes" in body["error"]["message"]
    status, body = _raw_post(server, b"{}", path="/v1/nothing")
    assert status == 404
    assert ask(client, [user(QUESTION)], max_tokens=3).choices[0].message.content is not None


def _metric(server, name: str) -> float:
    """One sample's value from GET /metrics (name with its labels, as Prometheus writes it)."""
    conn = http.client.HTTPConnection(server["host"], server["port"], timeout=30)
    conn.request("GET", "/metrics")
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/plain")
    for line in response.read().decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no sample {name} in /metrics")


def test_metrics_count_requests_tokens_and_latencies(server):
    before = _metric(server, 'llava_requests_total{status="200"}')
    tokens_before = _metric(server, "llava_completion_tokens_total")
    done = ask(server["client"], [user(QUESTION)], max_tokens=6)
    with pytest.raises(openai.APIStatusError):
        server["client"].chat.completions.create(model="nope", messages=[user(QUESTION)])
    assert _metric(server, 'llava_requests_total{status="200"}') == before + 1
    assert _metric(server, 'llava_requests_total{status="404"}') >= 1
    assert _metric(server, "llava_completion_tokens_total") >= tokens_before + done.usage.completion_tokens
    assert _metric(server, "llava_prompt_tokens_total") >= done.usage.prompt_tokens
    assert _metric(server, "llava_time_to_first_token_seconds_count") >= 1
    assert _metric(server, "llava_inter_token_latency_seconds_count") >= 1
    assert _metric(server, "llava_busy_slots") == 0 and _metric(server, "llava_queue_length") == 0
    assert _metric(server, "llava_prefilled_waiting") == 0
    assert _metric(server, 'llava_engine_seconds{phase="prefill"}') > 0
    assert _metric(server, 'llava_engine_seconds{phase="decode"}') > 0
    assert _metric(server, "llava_decode_slots") == 8


def _wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_full_queue_gets_429_a_disconnect_frees_the_slot_and_timeouts_504(chat_model):
    limits = Limits(max_queue=1, request_timeout_s=60.0, body_timeout_s=1.0)
    tight = _serve(chat_model, limits, max_batch=1)
    try:
        engine, client = tight["srv"].service.scheduler, tight["client"]
        # A long streamed answer takes the only slot; read its first chunk, then hold the stream.
        conn = http.client.HTTPConnection(tight["host"], tight["port"], timeout=60)
        body = {"model": MODEL, "messages": [user(QUESTION)], "max_tokens": 400, "temperature": 0, "stream": True}
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        stream = conn.getresponse()
        assert stream.status == 200 and stream.read(6) == b"data: "
        waiting = concurrent.futures.ThreadPoolExecutor(1).submit(ask, client, [user("Hello?")], max_tokens=3)
        assert _wait_for(lambda: engine.queue_length == 1)
        with pytest.raises(openai.APIStatusError) as info:
            ask(client, [user("And me?")], max_tokens=3)
        assert info.value.status_code == 429 and info.value.response.headers["Retry-After"] == "1"
        assert "busy" in info.value.response.json()["error"]["message"]
        # The streaming client hangs up: its slot goes to the waiting request.
        cancelled = engine.stats["finished_cancelled"]
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        assert waiting.result(timeout=60).choices[0].finish_reason in ("stop", "length")
        assert engine.stats["finished_cancelled"] == cancelled + 1
        # A request that runs past the timeout gets 504; the engine lets its slot go.
        tight["srv"].service.limits.request_timeout_s = 0.05
        with pytest.raises(openai.APIStatusError) as info:
            ask(client, [user(QUESTION)], max_tokens=400)
        assert info.value.status_code == 504 and "did not finish within" in info.value.response.text
        tight["srv"].service.limits.request_timeout_s = 60.0
        assert _wait_for(lambda: engine.busy_slots == 0)
        # A body that does not arrive in time: 408, and the server keeps serving.
        slow = socket.create_connection((tight["host"], tight["port"]), timeout=30)
        slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"model\"")
        assert slow.recv(4096).startswith(b"HTTP/1.1 408")
        slow.close()
        assert ask(client, [user("Hi")], max_tokens=2).choices[0].message.content is not None
    finally:
        tight["srv"].shutdown()
        tight["srv"].server_close()
