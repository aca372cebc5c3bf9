"""A tiny model folder for the inference tests: random LLaVA weights + the trained test tokenizer."""
from __future__ import annotations

import os

from conftest import tiny_llava_config
from llava_jax.models.config import TextConfig
from tokenizers_for_tests import BASE_VOCAB_SIZE, IMAGE_TOKEN_ID


def tiny_chat_config():
    # The vocabulary covers the tokenizer (base pieces + <image>); max positions bound the prompt.
    text = TextConfig(vocab_size=BASE_VOCAB_SIZE + 8, hidden_size=64, intermediate_size=96, num_layers=2,
                      num_heads=4, num_kv_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6)
    return tiny_llava_config(text=text, image_token_id=IMAGE_TOKEN_ID, pad_token_id=0)


def make_tiny_checkpoint(folder: str, seed: int = 0) -> str:
    """Write a model folder (config.json, tokenizer files, params/) and return its path."""
    from flax import nnx

    from llava_jax.checkpoint import save_model
    from llava_jax.models.llava import LlavaModel
    from tokenizers_for_tests import llama_tokenizer

    config = tiny_chat_config()
    model = LlavaModel(config, rngs=nnx.Rngs(seed))
    os.makedirs(folder, exist_ok=True)
    save_model(folder, model, config, tokenizer=llama_tokenizer())
    return folder


_SHARED = {}
_LOADED = {}


def shared_tiny_checkpoint() -> str:
    """One tiny model folder per test process (building it trains a tokenizer and saves with Orbax)."""
    if "path" not in _SHARED:
        import tempfile

        _SHARED["path"] = make_tiny_checkpoint(tempfile.mkdtemp(prefix="llava_jax_infer_ckpt_"))
    return _SHARED["path"]


def expected_answer(ckpt: str, question: str, image=None, max_new_tokens: int = 16) -> str:
    """The greedy answer computed straight from the data modules and generate(), independently of
    llava_jax.infer.prompting: vicuna_v1 prompt, 'pad' preprocessing, cut at EOS."""
    import numpy as np

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
