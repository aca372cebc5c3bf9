"""Tiny model folders for the inference, eval and datagen tests: random LLaVA weights + the test
tokenizer (llava_jax.testing.tokenizer), and the greedy answer such a folder gives."""
from __future__ import annotations

import dataclasses
import os

from llava_jax.recipes.tiny import tiny_llava_config
from llava_jax.testing.tokenizer import BASE_VOCAB_SIZE, IMAGE_TOKEN_ID


def tiny_chat_config(max_positions: int = 512):
    """The tiny model with a vocabulary that covers the test tokenizer (base pieces + <image>);
    `max_positions` bounds the prompt."""
    base = tiny_llava_config()
    text = dataclasses.replace(base.text, vocab_size=BASE_VOCAB_SIZE + 8, max_position_embeddings=max_positions)
    return tiny_llava_config(text=text, image_token_id=IMAGE_TOKEN_ID, pad_token_id=0)


def make_tiny_checkpoint(folder: str, seed: int = 0, max_positions: int = 512) -> str:
    """Write a model folder (config.json, tokenizer files, params/) and return its path."""
    from flax import nnx

    from llava_jax.checkpoint import save_model
    from llava_jax.models.llava import LlavaModel
    from llava_jax.testing.tokenizer import llama_tokenizer

    config = tiny_chat_config(max_positions)
    model = LlavaModel(config, rngs=nnx.Rngs(seed))
    os.makedirs(folder, exist_ok=True)
    save_model(str(folder), model, config, tokenizer=llama_tokenizer())
    return str(folder)


_SHARED = {}
_LOADED = {}


def shared_tiny_checkpoint(max_positions: int = 512) -> str:
    """One tiny model folder per test process and context length (building it trains a tokenizer
    and saves with Orbax)."""
    if max_positions not in _SHARED:
        import tempfile

        _SHARED[max_positions] = make_tiny_checkpoint(tempfile.mkdtemp(prefix="llava_jax_tiny_ckpt_"),
                                                      max_positions=max_positions)
    return _SHARED[max_positions]


def expected_answer(ckpt: str, question: str, image=None, max_new_tokens: int = 16) -> str:
    """The greedy answer computed straight from the data modules and generate(), independently of
    llava_jax.infer.prompting: vicuna_v1 prompt, 'pad' preprocessing, cut at EOS."""
    from llava_jax import load_pretrained
    from llava_jax.checkpoint import load_tokenizer
    from llava_jax.data.conversation import encode_prompt, generation_prompt
    from llava_jax.data.image import preprocess
    from llava_jax.infer.generate import generate

    if ckpt not in _LOADED:
        _LOADED[ckpt] = load_pretrained(ckpt), load_tokenizer(ckpt)
    (model, config), tok = _LOADED[ckpt]
    text = ("<image>\n" + question) if image is not None else question
    prompt = generation_prompt([{"from": "human", "value": text}], "vicuna_v1")
    ids = encode_prompt(prompt, tok, config.image_token_id, config.num_image_tokens)
    pixels = None if image is None else preprocess(image, config.vision.image_size, "pad")[None]
    out = generate(model, ids[None], pixels, max_new_tokens=max_new_tokens,
                   eos_token_id=config.text.eos_token_id)[0].tolist()
    if config.text.eos_token_id in out:
        out = out[:out.index(config.text.eos_token_id)]
    return tok.decode(out, skip_special_tokens=True)
