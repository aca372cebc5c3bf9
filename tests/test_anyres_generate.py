"""LLaVA-1.6 (AnyRes) inference: the Generator, the slot engine, chat, serve, eval and the Colab notebook on a
tiny random v1.6 checkpoint folder, against transformers' LlavaNextForConditionalGeneration.generate.

One folder serves every test: a random `LlavaNextForConditionalGeneration` (the test tokenizer's vocabulary,
`<image>` = its id 640, the v1.6 grids scaled to a 28 px tile of 4 x 4 features) converted to our weights and
saved with the tokenizer. Images of different aspect ratios get different tile grids and placeholder counts
(wide 40 x 100: 1 x 3 grid, 60 tokens; tall 100 x 40: 3 x 1, 66; square 64 x 64: 2 x 2, 88; (height x width))."""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from llava_jax.data import anyres
from llava_jax.infer import chat
from llava_jax.infer.engine import Engine, Request
from llava_jax.infer.generate import TRACE_COUNTS
from llava_jax.infer.prompting import ChatModel, check_context, left_pad
from llava_jax.testing import hf_reference as R
from llava_jax.testing.checkpoints import tiny_chat_config
from test_engine import run_staggered
from test_llava_next import PINPOINTS, VISION

torch.set_num_threads(1)

NEW_TOKENS = 12
WIDE, TALL, SQUARE = (40, 100), (100, 40), (64, 64)  # (height, width)
QUESTION = "What is shown in the image?"


def v16_config():
    return tiny_chat_config().replace(image_grid_pinpoints=PINPOINTS, vision=VISION)


def photo(size_hw, name="astronaut") -> Image.Image:
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize(size_hw[::-1])


@pytest.fixture(scope="module")
def hf():
    return R.hf_llava_next(v16_config(), seed=11)


@pytest.fixture(scope="module")
def ckpt(hf, tmp_path_factory):
    from llava_jax.checkpoint import save_model
    from llava_jax.testing.tokenizer import llama_tokenizer

    folder = str(tmp_path_factory.mktemp("llava-v1.6-tiny"))
    config = v16_config()
    save_model(folder, R.ours_from_hf(hf, config), config, tokenizer=llama_tokenizer())
    return folder


@pytest.fixture(scope="module")
def chat_model(ckpt):
    return ChatModel.load(ckpt)


def hf_generate(hf, ids, mask, pixels, sizes, eos=None):
    """transformers' greedy tokens for left-padded rows; pixels (N, P, H, W, 3), sizes (N, 2)."""
    from transformers import GenerationConfig

    gc = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos, pad_token_id=0)
    kw = {}
    if pixels is not None:
        kw = dict(pixel_values=R.to_torch(pixels.transpose(0, 1, 4, 2, 3)), image_sizes=R.to_torch(sizes, torch.long))
    with torch.no_grad():
        out = hf.generate(input_ids=R.to_torch(ids, torch.long), attention_mask=R.to_torch(mask, torch.long),
                          generation_config=gc, **kw)
    return out[:, ids.shape[1]:].numpy()


def conversations():
    """Three conversations: a tall image; a wide image, an answer, then a square image; text only."""
    return [([("user", QUESTION, True)], [photo(TALL)]),
            ([("user", "Describe it.", True), ("assistant", "A person.", False),
              ("user", "And this one, in more detail please?", True)], [photo(WIDE, "coffee"), photo(SQUARE)]),
            ([("user", "Say something about the colour red.", False)], [])]


def batch(chat_model, convs):
    prompts = [chat_model.encode(turns, images) for turns, images in convs]
    ids, mask = left_pad([p.input_ids for p in prompts], chat_model.pad_id)
    pixels = np.concatenate([p.pixel_values for p in prompts if p.pixel_values is not None])
    sizes = np.concatenate([p.image_sizes for p in prompts if p.image_sizes is not None])
    return prompts, ids, mask, pixels, sizes


@pytest.fixture(scope="module")
def reference(hf, chat_model):
    """The batch of `conversations` and transformers' greedy tokens for it (EOS ignored)."""
    prompts, ids, mask, pixels, sizes = batch(chat_model, conversations())
    return prompts, ids, mask, pixels, sizes, hf_generate(hf, ids, mask, pixels, sizes)


def test_prompts_expand_each_image_to_its_own_token_count(chat_model, reference):
    prompts, ids, mask, pixels, sizes, _ = reference
    config = chat_model.config
    assert sizes.tolist() == [list(TALL), list(WIDE), list(SQUARE)]
    counts = [anyres.num_image_tokens(s, PINPOINTS, VISION.image_size, VISION.patch_size) for s in sizes]
    assert counts == [66, 60, 88]
    assert [int((p.input_ids == config.image_token_id).sum()) for p in prompts] == [66, 60 + 88, 0]
    assert pixels.shape == (3, anyres.max_tiles(PINPOINTS, VISION.image_size), VISION.image_size, VISION.image_size, 3)
    assert len({len(p.input_ids) for p in prompts}) == 3 and (mask == 0).any()  # left padding


def test_greedy_tokens_equal_transformers_generate(chat_model, reference):
    """Images of three aspect ratios (one row holding two), a text-only row, left padding: the same greedy
    tokens as LlavaNextForConditionalGeneration.generate; a new mix of image sizes compiles nothing new."""
    _, ids, mask, pixels, sizes, expected = reference
    gen = chat_model.generator
    got = gen.generate(ids, pixels, mask, image_sizes=sizes, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    np.testing.assert_array_equal(got, expected)

    # Other image sizes and prompt lengths inside the same buckets: layouts are data, nothing recompiles.
    before = dict(TRACE_COUNTS)
    swapped = [([("user", QUESTION + " Be brief.", True)], [photo(SQUARE, "chelsea")]),
               ([("user", "Describe it.", True), ("assistant", "A cat.", False), ("user", "And this?", True)],
                [photo(TALL, "rocket"), photo(WIDE)]),
               ([("user", "Say something about the colour blue, please.", False)], [])]
    _, ids2, mask2, pixels2, sizes2 = batch(chat_model, swapped)
    gen.generate(ids2, pixels2, mask2, image_sizes=sizes2, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    assert dict(TRACE_COUNTS) == before

    # Fewer tile slots than the model's largest grid needs are padded (the same tokens, the same program).
    small = [([("user", QUESTION, True)], [photo(TALL)])]
    _, ids3, mask3, pixels3, sizes3 = batch(chat_model, small)
    one = gen.generate(ids3, pixels3[:, :4], mask3, image_sizes=sizes3, max_new_tokens=4, eos_token_id=[])
    np.testing.assert_array_equal(one, gen.generate(ids3, pixels3, mask3, image_sizes=sizes3, max_new_tokens=4,
                                                    eos_token_id=[]))


def test_slot_engine_with_staggered_arrivals_equals_transformers(chat_model, reference):
    """The same conversations as separate requests (one with two images) entering 2 decode slots at
    different steps: each gets transformers' tokens."""
    prompts, *_, expected = reference
    engine = Engine(chat_model.generator, max_batch=2, eos_ids=[])
    requests = [Request(p.input_ids, p.pixel_values, max_tokens=NEW_TOKENS, image_sizes=p.image_sizes)
                for p in prompts]
    run_staggered(engine, requests, arrivals=[0, 3, 5])
    for r, want in zip(requests, expected):
        assert r.error is None and r.tokens == want.tolist()
    assert engine.stats["prefills"] >= 2

    # The older window scheduler (`serve --scheduler window`) batches them into one generate call.
    from llava_jax.infer.window_scheduler import WindowScheduler

    window = WindowScheduler(chat_model.generator, max_batch=3, window_s=5.0, eos_ids=[]).start()
    try:
        again = [window.submit(Request(p.input_ids, p.pixel_values, max_tokens=NEW_TOKENS, image_sizes=p.image_sizes))
                 for p in prompts]
        assert all(r.wait(120) for r in again)
    finally:
        window.close()
    assert [r.tokens for r in again] == expected.tolist() and window.stats["prefills"] == 1


def _expected_answer(hf, chat_model, turns, images, max_new_tokens=NEW_TOKENS) -> str:
    """transformers' greedy answer to one conversation, cut at EOS, decoded."""
    prompt = chat_model.encode(turns, images)
    ids = prompt.input_ids[None]
    out = hf_generate(hf, ids, np.ones_like(ids), prompt.pixel_values, prompt.image_sizes,
                      eos=chat_model.eos_ids)[0, :max_new_tokens].tolist()
    ends = [i for i, t in enumerate(out) if t in chat_model.eos_ids]
    return chat_model.tokenizer.decode(out[:ends[0]] if ends else out, skip_special_tokens=True)


def test_chat_cli_answers_like_transformers(hf, ckpt, chat_model, tmp_path, capsys):
    path = str(tmp_path / "wide.png")
    photo(WIDE, "coffee").save(path)
    rc = chat.main(["--ckpt", ckpt, "--image", path, "--prompt", QUESTION, "--max-new-tokens", str(NEW_TOKENS)])
    assert rc == 0
    expected = _expected_answer(hf, chat_model, [("user", QUESTION, True)], [Image.open(path)])
    assert expected.strip() and capsys.readouterr().out == expected + "\n"

    thin = str(tmp_path / "thin.png")
    Image.new("RGB", (300, 2), "white").save(thin)  # 2 px high: no row of features survives the unpadding
    rc = chat.main(["--ckpt", ckpt, "--image", thin, "--prompt", QUESTION])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "too thin for AnyRes" in err, err


def test_eval_answering_equals_transformers(hf, chat_model):
    """`answer_all` (slot engine, 2 slots) and `answer_batch` (one Generator batch) on questions about
    images of different sizes: transformers' answers."""
    from llava_jax.eval.answering import answer_all, answer_batch

    questions = ["What is shown?", "How many?", "Describe the colour in detail.", "Where is it?"]
    images = [photo(TALL, "chelsea"), None, photo(WIDE), photo(SQUARE, "rocket")]
    expected = [_expected_answer(hf, chat_model, [("user", q, im is not None)], [] if im is None else [im]).strip()
                for q, im in zip(questions, images)]
    assert any(expected)
    kw = dict(max_new_tokens=NEW_TOKENS)
    assert answer_all(chat_model, questions, images, batch_size=2, progress=False, **kw) == expected
    assert answer_batch(chat_model, questions, images, **kw) == expected


def data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user_message(text, image) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text},
                                        {"type": "image_url", "image_url": {"url": data_uri(image)}}]}


def test_server_takes_image_url_of_any_aspect_ratio(hf, chat_model):
    import http.client

    from llava_jax.infer.server import Limits, Service, make_server

    srv = make_server(chat_model, "127.0.0.1", 0, "tiny-v1.6", Limits(default_max_tokens=NEW_TOKENS),
                      max_batch=2)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    host, port = srv.server_address[:2]

    def post(image, text=QUESTION):
        body = {"model": "tiny-v1.6", "temperature": 0, "max_tokens": NEW_TOKENS,
                "messages": [user_message(text, image)]}
        conn = http.client.HTTPConnection(host, port, timeout=120)
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())

    deadline = time.monotonic() + 60
    while True:  # uvicorn listens once its thread has started
        try:
            conn = http.client.HTTPConnection(host, port, timeout=5)
            conn.request("GET", "/health")
            assert conn.getresponse().status == 200
            break
        except ConnectionRefusedError:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
    try:
        image = photo(TALL, "rocket")
        status, body = post(image)
        assert status == 200, body
        expected = _expected_answer(hf, chat_model, [("user", QUESTION, True)], [image])
        assert body["choices"][0]["message"]["content"] == expected
        assert body["usage"]["prompt_tokens"] == len(chat_model.encode([("user", QUESTION, True)], [image]).input_ids)

        status, body = post(Image.new("RGB", (300, 2), "white"))  # too thin for AnyRes: 400, named
        assert status == 400 and "too thin for AnyRes" in body["error"]["message"], body
    finally:
        srv.shutdown()
        srv.server_close()

    # A context the images do not fit in: 400 naming each image's token count (validation only, no HTTP).
    service = Service(chat_model, "tiny-v1.6", Limits(max_context=100), max_batch=1)
    try:
        from llava_jax.infer.server import ApiError

        with pytest.raises(ApiError, match=r"the images take \[88\]") as info:
            service.start_completion({"model": "tiny-v1.6", "max_tokens": 8,
                                      "messages": [user_message(QUESTION, photo(SQUARE))]})
        assert info.value.code == "context_length_exceeded"
    finally:
        service.close()


def test_bad_images_and_prompts_raise_clear_errors(chat_model, reference, monkeypatch):
    config = chat_model.config
    prompts, ids, mask, pixels, sizes, _ = reference
    gen = chat_model.generator
    # Too thin (no feature row survives) and too large: one-line errors naming the image's size.
    with pytest.raises(anyres.UnusableImage, match=r"300x2 \(w x h\) is too thin for AnyRes"):
        chat_model.encode([("user", QUESTION, True)], [Image.new("RGB", (300, 2))])
    monkeypatch.setattr(anyres, "MAX_IMAGE_PIXELS", 90 * 90)
    with pytest.raises(anyres.UnusableImage, match=r"image of 100x100 pixels is larger than the AnyRes limit"):
        chat_model.encode([("user", QUESTION, True)], [photo((100, 100))])
    monkeypatch.undo()
    # Sizes that do not match the placeholders, or no sizes at all.
    with pytest.raises(ValueError, match="need image_sizes"):
        gen.generate(ids, pixels, mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="placeholder count mismatch"):
        gen.generate(ids, pixels, mask, image_sizes=sizes[[0, 1, 1]], max_new_tokens=2)
    with pytest.raises(ValueError, match="row 0's image placeholders end inside an image's token run"):
        gen.generate(ids, pixels, mask, image_sizes=sizes[[1, 0, 2]], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"\(N, tiles, 28, 28, 3\)"):
        gen.generate(ids, pixels[:, 0], mask, image_sizes=sizes, max_new_tokens=2)
    # More image tokens than the engine's cache holds, or than the model's context: refused, never cut.
    engine = Engine(gen, max_batch=1, max_context=120)
    p = prompts[1]  # two images: 148 image tokens
    with pytest.raises(ValueError, match=r"prompt of \d+ tokens \(148 of them image tokens\) leaves room for 0"):
        engine.submit(Request(p.input_ids, p.pixel_values, max_tokens=4, image_sizes=p.image_sizes))
    small = config.replace(text=dataclasses.replace(config.text, max_position_embeddings=100))
    with pytest.raises(ValueError, match=r"takes \d+ tokens \(148 of them image tokens\) but the model's context is"):
        check_context(small, p.input_ids)


def test_colab_notebook_runs_on_a_llava_hf_v1_6_folder(hf, tmp_path):
    """The notebook's cells on a llava-hf LlavaNext folder (converted by convert/hf_to_orbax.py inside the
    notebook): the answer equals transformers' on the same prompt, and the generate() cell takes sizes."""
    from test_notebook import ROOT, run_notebook
    from llava_jax.testing.tokenizer import save_llama_tokenizer

    hf_dir = str(tmp_path / "llava-v1.6-hf")
    hf.save_pretrained(hf_dir)
    save_llama_tokenizer(hf_dir)
    image_path = str(tmp_path / "tall.jpg")
    photo(TALL, "rocket").save(image_path)
    overrides = dict(HF_DIR=hf_dir, REPO_DIR=ROOT, CKPT_DIR=str(tmp_path / "ckpt"), IMAGE_PATH=image_path,
                     DTYPE="float32", PARAM_DTYPE="float32", MAX_NEW_TOKENS=NEW_TOKENS)
    namespace, printed = run_notebook(overrides)
    loaded = namespace["chat_model"]
    assert loaded.config.anyres
    expected = _expected_answer(hf, loaded, [("user", "What is shown in this image?", True)],
                                [Image.open(image_path)])
    assert namespace["answer"] == expected and f"ASSISTANT: {expected}\n" in printed
    assert os.path.isfile(os.path.join(overrides["CKPT_DIR"], "config.json"))
    assert isinstance(namespace["tokens"], np.ndarray)


def test_conversation_counts_need_sizes(chat_model):
    """An AnyRes prompt without the images' sizes cannot know its placeholder counts: a clear error."""
    with pytest.raises(ValueError, match="1 turn\\(s\\) have an image but 0 image size"):
        chat_model.prompts.input_ids([("user", QUESTION, True)])
