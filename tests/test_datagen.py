"""Instruction-data generation: context, parsing, HTTP client faults, generation core, resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llava_jax.datagen import cli as datagen_cli
from llava_jax.datagen.client import ChatClient, RateLimiter, RequestError
from llava_jax.datagen.context import load_coco_contexts, normalize_box, parse_context
from llava_jax.testing.fault_server import COMPLETION_TOKENS, GARBAGE, PROMPT_TOKENS, FaultServer
from llava_jax.datagen.instruct import (ParseError, detail_instruction, generate, offline_backend, parse_reply,
                                        progress_path)
from llava_jax.datagen.prompts import DETAIL_INSTRUCTIONS, KINDS, build_messages, kind_of_messages

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = ["person", "dog", "cat", "car", "bus"]


def write_coco(tmp_path: Path, n_images: int):
    """A COCO-shaped pair of files: n images, 2 captions and 1-3 boxes each (deterministic)."""
    images = [{"id": 100 + i, "file_name": f"{100 + i:012d}.jpg", "width": 640, "height": 480}
              for i in range(n_images)]
    annotations, captions = [], []
    for i, im in enumerate(images):
        for j in range(1 + i % 3):
            annotations.append({"id": len(annotations) + 1, "image_id": im["id"], "category_id": 1 + (i + j) % 5,
                                "bbox": [10.0 * (i + j), 20.0 * j, 100.0, 200.0], "iscrowd": 0})
        captions += [{"id": 2 * i + 1, "image_id": im["id"], "caption": f"Scene {i} with a {CATEGORIES[i % 5]}."},
                     {"id": 2 * i + 2, "image_id": im["id"], "caption": f"Another view of scene {i}. "}]
    ann_path, cap_path = tmp_path / "instances.json", tmp_path / "captions.json"
    ann_path.write_text(json.dumps({"images": images, "annotations": annotations,
                                    "categories": [{"id": k + 1, "name": c} for k, c in enumerate(CATEGORIES)]}))
    cap_path.write_text(json.dumps({"images": images, "annotations": captions}))
    return ann_path, cap_path


# --- context and prompts -------------------------------------------------------------------------

def test_box_normalization_and_context_text(tmp_path):
    box = normalize_box([64, 48, 320, 500], 640, 480, "dog")  # runs past the bottom edge: clipped
    assert (box.x1, box.y1, box.x2, box.y2) == (0.1, 0.1, 0.6, 1.0)
    assert box.text() == "dog: [0.100, 0.100, 0.600, 1.000]"
    assert normalize_box([1, 1, 1, 1], 3, 3, "x").x2 == 0.667  # 3 decimals

    ann, cap = write_coco(tmp_path, 4)
    contexts = load_coco_contexts(ann, cap, max_images=3)
    assert [c.image_id for c in contexts] == [100, 101, 102]
    assert [len(c.boxes) for c in contexts] == [1, 2, 3] and len(contexts[0].captions) == 2
    text = contexts[1].text()
    assert "Scene 1 with a dog." in text and "dog: [0.016, 0.000, 0.172, 0.417]" in text
    captions, boxes = parse_context(text)
    assert captions == [c.strip() for c in contexts[1].captions] and tuple(boxes) == contexts[1].boxes


def test_coco_errors_name_the_record(tmp_path):
    ann, cap = write_coco(tmp_path, 2)
    data = json.loads(ann.read_text())
    data["annotations"][0]["category_id"] = 99
    ann.write_text(json.dumps(data))
    with pytest.raises(KeyError, match=r"annotations\[0\].*category_id 99"):
        load_coco_contexts(ann, cap)


def test_messages_have_few_shot_examples_and_known_kind():
    assert len(DETAIL_INSTRUCTIONS) == 16 and len(set(DETAIL_INSTRUCTIONS)) == 16
    for kind in KINDS:
        msgs = build_messages(kind, "Captions:\n- a cat")
        assert [m["role"] for m in msgs][:2] == ["system", "user"] and msgs[2]["role"] == "assistant"
        assert msgs[-1] == {"role": "user", "content": "Captions:\n- a cat"}
        assert kind_of_messages(msgs) == kind
        parse_reply(kind, msgs[2]["content"])  # our own few-shot replies satisfy our parser
    assert detail_instruction(5) == detail_instruction(5) in DETAIL_INSTRUCTIONS


# --- reply parsing ---------------------------------------------------------------------------------

def test_parse_conversation_variants():
    reply = ("Sure, here it is.\n**Question:** How many dogs?\n**Answer:** Two.\n===\n"
             "question: Where are they?\nANSWER: On the grass,\nnext to a bench.\n")
    assert parse_reply("conversation", reply) == [("How many dogs?", "Two."),
                                                  ("Where are they?", "On the grass,\nnext to a bench.")]
    for bad in ["No labels at all.", "Question: a?\nQuestion: b?\nAnswer: c", "Answer: x\nQuestion: y?",
                "Question: a?\nAnswer:\nQuestion: b?\nAnswer: c", "Question: only a question?", GARBAGE]:
        with pytest.raises(ParseError):
            parse_reply("conversation", bad)


def test_parse_complex_and_detail():
    assert parse_reply("complex", "Question: Why?\nAnswer: Because\nof rain.") == ("Why?", "Because\nof rain.")
    with pytest.raises(ParseError):
        parse_reply("complex", "Answer: no question")
    assert parse_reply("detail", "Description: A red car.\n\nIt is parked.") == "A red car.\n\nIt is parked."
    with pytest.raises(ParseError):
        parse_reply("detail", "   \n")


# --- client ----------------------------------------------------------------------------------------

def test_rate_limiter_spaces_requests():
    now, waits = [0.0], []

    def sleep(s):
        waits.append(round(s, 6))
        now[0] += s

    limiter = RateLimiter(120, clock=lambda: now[0], sleep=sleep)  # one slot every 0.5 s
    for _ in range(4):
        limiter.acquire()
    assert waits == [0.5, 0.5, 0.5] and now[0] == 1.5
    now[0] += 10  # idle time is not banked as a burst beyond one request
    limiter.acquire()
    limiter.acquire()
    assert waits[-1] == 0.5


def test_client_retries_each_fault_then_succeeds():
    faults = ["429", "500", "timeout", "malformed", "drop"]
    with FaultServer(lambda m: "hello", faults, timeout_sleep=2.5) as srv:  # only the injected timeout times out
        sleeps = []
        client = ChatClient(srv.base_url, "m", "KEY", timeout=1.0, max_retries=6, backoff=0.01, sleep=sleeps.append)
        reply = client([{"role": "user", "content": "hi"}])
        assert (reply.text, reply.prompt_tokens, reply.completion_tokens) == ("hello", PROMPT_TOKENS, COMPLETION_TOKENS)
        assert client.retries == 5 and client.requests == 6 and len(srv.log) == 6
        for i, s in enumerate(sleeps):  # exponential backoff, jittered within [0.5, 1] of the nominal delay
            assert 0.01 * 2 ** i * 0.5 <= s <= 0.01 * 2 ** i

        client = ChatClient(srv.base_url, "m", timeout=0.3, max_retries=2, backoff=0.0, sleep=lambda s: None)
        srv.faults = lambda n: "500"
        with pytest.raises(RequestError, match="giving up after 3 attempts") as e:
            client([{"role": "user", "content": "hi"}])
        assert not e.value.fatal
    with FaultServer(lambda m: "x", ["401"]) as srv:  # 4xx other than 429 is fatal: no retry
        client = ChatClient(srv.base_url, "m", backoff=0.0)
        with pytest.raises(RequestError, match="HTTP 401.*invalid api key") as e:
            client([{"role": "user", "content": "hi"}])
        assert e.value.fatal and client.retries == 0


# --- the generation core ---------------------------------------------------------------------------

def test_generate_with_faults_unparsable_skips_and_resume(tmp_path):
    ann, cap = write_coco(tmp_path, 6)
    contexts = load_coco_contexts(ann, cap)

    def responder(messages):  # image 103's conversation never parses: it must be retried, then skipped
        if "Scene 3 " in messages[-1]["content"] and kind_of_messages(messages) == "conversation":
            return GARBAGE
        return offline_backend(messages)

    faults = lambda n: {2: "429", 5: "500", 7: "timeout", 9: "malformed", 11: "garbage", 13: "drop"}.get(n, "ok")
    out = tmp_path / "out" / "instruct.json"
    # Only the injected timeout may time out: on a loaded machine a tighter client timeout also drops
    # ordinary replies (the injected garbage one included) and the counts below drift.
    with FaultServer(responder, faults, timeout_sleep=3.0) as srv:
        client = ChatClient(srv.base_url, "m", timeout=1.5, backoff=0.01)
        summary = generate(contexts, KINDS, client, out, concurrency=4, parse_attempts=3, progress=False,
                           image_prefix="coco/")
        ok_completions = sum(1 for _, f, _ in srv.log if f in ("ok", "garbage"))
        garbage_request = srv.log[10][2]
    # image 103's conversation: 3 attempts (2 retries); the injected garbage reply costs one more
    # retry unless it landed on that always-failing pair, or on a kind whose parser accepts it (a
    # detail reply is free text). Which request it lands on depends on thread timing.
    garbage_kind = kind_of_messages(garbage_request)
    try:
        parse_reply(garbage_kind, GARBAGE)
        garbage_parses = True
    except ParseError:
        garbage_parses = False
    on_failing_pair = "Scene 3 " in garbage_request[-1]["content"] and garbage_kind == "conversation"
    extra = 0 if on_failing_pair or garbage_parses else 1
    assert summary.total == 18 and summary.generated == 17 and summary.unparsable == 1
    assert summary.request_failures == 0 and summary.parse_retries == 2 + extra
    assert summary.prompt_tokens == PROMPT_TOKENS * ok_completions
    assert summary.completion_tokens == COMPLETION_TOKENS * ok_completions
    assert client.retries == 5  # 429, 500, timeout, malformed, drop
    records = json.loads(out.read_text())
    assert summary.records_written == len(records) == 17
    assert len({r["id"] for r in records}) == 17
    conv = next(r for r in records if r["id"] == "000000000101_conversation")
    assert conv["image"] == "coco/000000000101.jpg"
    assert [t["from"] for t in conv["conversations"]] == ["human", "gpt"] * (len(conv["conversations"]) // 2)
    assert conv["conversations"][0]["value"].startswith("<image>\nWhat is shown")
    assert not any("<image>" in t["value"] for t in conv["conversations"][1:])
    # (a detail pair that drew the injected garbage kept it as its description; check another one)
    scene = 4 if garbage_kind == "detail" and "Scene 2 " in garbage_request[-1]["content"] else 2
    detail = next(r for r in records if r["id"] == f"00000000010{scene}_detail")
    assert detail["conversations"][0]["value"] == "<image>\n" + detail_instruction(100 + scene)
    assert f"Scene {scene} with a " in detail["conversations"][1]["value"]

    # rerun: only the skipped pair is asked again (it still fails); finished pairs are not redone
    with FaultServer(responder) as srv:
        summary2 = generate(contexts, KINDS, ChatClient(srv.base_url, "m", backoff=0.01), out, progress=False)
        assert len(srv.log) == 3  # three parse attempts for image 103's conversation
    assert (summary2.already_done, summary2.generated, summary2.unparsable) == (17, 0, 1)
    assert json.loads(out.read_text()) == records


def test_offline_backend_builds_data_without_a_server(tmp_path):
    ann, cap = write_coco(tmp_path, 3)
    out = tmp_path / "synthetic.json"
    summary = generate(load_coco_contexts(ann, cap), ["detail", "complex"], offline_backend, out, progress=False)
    assert summary.generated == 6 and summary.prompt_tokens == 0
    complex_ = [r for r in json.loads(out.read_text()) if r["id"].endswith("_complex")]
    assert complex_[0]["conversations"][0]["value"] == "<image>\nWhere is the person and what does the scene show?"


def test_torn_progress_line_is_repaired(tmp_path):
    ann, cap = write_coco(tmp_path, 2)
    contexts, out = load_coco_contexts(ann, cap), tmp_path / "x.json"
    generate(contexts[:1], ["detail"], offline_backend, out, progress=False)
    with open(progress_path(out), "a") as f:
        f.write('{"image_id": 101, "kind": "det')  # killed mid-write
    summary = generate(contexts, ["detail"], offline_backend, out, progress=False)
    assert (summary.already_done, summary.generated, summary.records_written) == (1, 1, 2)
    assert all(json.loads(line) for line in progress_path(out).read_text().splitlines())


# --- the CLI: killed mid-run, then resumed ---------------------------------------------------------

def test_cli_resumes_after_kill_without_redoing_or_duplicating(tmp_path):
    ann, cap = write_coco(tmp_path, 10)
    out = tmp_path / "instruct.json"
    jsonl = progress_path(out)
    with FaultServer(offline_backend, lambda n: "500" if n % 7 == 0 else "ok", delay=0.05) as srv:
        args = ["instruct", "--annotations", str(ann), "--captions", str(cap), "--out", str(out),
                "--base-url", srv.base_url, "--model", "test-model", "--concurrency", "2",
                "--backoff", "0.01", "--timeout", "5", "--no-progress"]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OPENAI_API_KEY": "sk-test", "JAX_PLATFORMS": "cpu"}
        proc = subprocess.Popen([sys.executable, "-c", "import sys; from llava_jax.datagen.cli import main; "
                                 "sys.exit(main(sys.argv[1:]))", *args], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if jsonl.exists() and len(jsonl.read_text().splitlines()) >= 6:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"finished before it could be killed: {proc.communicate()}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        before = [json.loads(line) for line in jsonl.read_text().splitlines() if line.endswith("}")]
        assert 6 <= len(before) < 30 and not out.exists()
        seen = len(srv.log)

        assert datagen_cli.main(args) == 0  # finish in-process
        second_run_requests = len(srv.log) - seen
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    keys = [(ln["image_id"], ln["kind"]) for ln in lines if ln["status"] == "ok"]
    assert len(keys) == len(set(keys)) == 30  # nothing redone, nothing missing
    assert lines[:len(before)] == before
    assert second_run_requests <= (30 - len(before)) * 2  # at most one 500 retry per remaining pair
    records = json.loads(out.read_text())
    assert len(records) == 30 and len({r["id"] for r in records}) == 30


# --- against our own server with a tiny checkpoint -------------------------------------------------

def test_datagen_against_our_server_and_output_loads_in_the_pipeline(tmp_path, tiny_server, tiny_ckpt):  # noqa: F811
    from llava_jax.checkpoint import load_tokenizer, read_config
    from llava_jax.data.conversation import encode
    from llava_jax.data.sources import JsonSource

    base_url, model_id = tiny_server
    ann, cap = write_coco(tmp_path, 1)
    out = tmp_path / "served.json"
    args = ["instruct", "--annotations", str(ann), "--captions", str(cap), "--out", str(out),
            "--base-url", base_url, "--model", model_id, "--concurrency", "1", "--max-tokens", "8",
            "--temperature", "0", "--parse-attempts", "2", "--image-prefix", "coco/", "--no-progress"]
    assert datagen_cli.main(args) == 0
    lines = [json.loads(line) for line in progress_path(out).read_text().splitlines()]
    assert len(lines) == 3 and all(ln["status"] in ("ok", "unparsable") for ln in lines)
    # the server's usage reaches the token accounting: every attempt reported its prompt tokens
    assert all(ln["prompt_tokens"] > 1000 * ln["attempts"] and ln["completion_tokens"] >= 1 for ln in lines)
    records = json.loads(out.read_text())
    assert len(records) == sum(ln["status"] == "ok" for ln in lines)

    # a hand-made record in the same file shape, plus whatever the random model produced, must load
    # and tokenize through the training data code
    records.append({"id": "x_conversation", "image": "coco/x.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A dog."},
        {"from": "human", "value": "Where?"}, {"from": "gpt", "value": "On the left."}]})
    out.write_text(json.dumps(records))
    source = JsonSource(str(out), image_folder=str(tmp_path / "images"))
    assert len(source) == len(records)
    config, tokenizer = read_config(tiny_ckpt), load_tokenizer(tiny_ckpt)
    for i in range(len(source)):
        record = source[i]
        assert record["image"] == str(tmp_path / "images" / records[i]["image"])
        if any(t["value"].strip() for t in record["conversations"][1::2]):
            encode(record["conversations"], tokenizer, "vicuna_v1", image_token_id=config.image_token_id,
                   num_image_tokens=config.num_image_tokens)
