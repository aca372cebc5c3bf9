"""A small LLaMA-style tokenizer trained in-process for tests and benchmarks (nothing can be downloaded).

`llama_tokenizer(legacy=...)` returns a transformers `LlamaTokenizer` built from a sentencepiece BPE
model with byte fallback (unk=0 '<unk>', bos=1 '<s>', eos=2 '</s>', pad = unk as in the reference's
v1 recipe) plus `<image>` as an added special token whose id is the next one after the base vocab
(the llava-hf convention). The sentencepiece model is trained once per process; each call builds a
fresh tokenizer object from it (cheap), so a test that mutates its tokenizer cannot affect another.

`save_llama_tokenizer(folder, legacy=...)` writes the tokenizer files into a folder (e.g. a
checkpoint folder) so `AutoTokenizer.from_pretrained(folder)` gives back the same tokenization.
"""
from __future__ import annotations

import functools
import io
import os
import random
import tempfile

BASE_VOCAB_SIZE = 640
IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = BASE_VOCAB_SIZE  # the first id after the base vocabulary

# Words of the conversation templates (llava_jax.data.conversation) and of the synthetic data, so
# that they get real pieces; everything else (rare unicode, emoji) exercises byte fallback.
_TEMPLATE_TEXT = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions.",
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions.",
]
_WORDS = (
    "what is shown in the image describe picture photo colour color red green blue yellow black white "
    "circle square triangle shape left right top bottom center large small how many there are is a an "
    "of on with this that it its yes no answer question please briefly detail object objects scene the "
    "one two three four five six seven eight nine ten count background foreground near far above below"
).split()
_UNICODE = ["café", "naïve", "über", "日本語", "中文", "привет", "ñandú", "Ελληνικά", "°C", "—", "€"]


def _corpus(rng: random.Random, spaced_roles: bool) -> list[str]:
    lines = []
    for _ in range(40):
        lines.extend(_TEMPLATE_TEXT)
    for _ in range(2500):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(2, 14))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words) + 1), rng.choice(_UNICODE))
        if rng.random() < 0.4:
            words.insert(rng.randrange(len(words) + 1), str(rng.randint(0, 10 ** rng.randint(1, 6))))
        text = " ".join(words)
        text = text[0].upper() + text[1:] + rng.choice([".", "?", "!", ",", ":", ";"])
        # The roles appear the way the templates render them; as in LLaMA's vocabulary, "USER" and
        # "ASSISTANT" are learnt mostly without a leading space (they follow "</s>" in rounds > 1).
        kind = rng.random()
        if kind < 0.3:
            text = f"USER: {text} ASSISTANT: {text}"
            if spaced_roles:  # a vocabulary with a "▁USER" piece, unlike LLaMA's
                text = f"{text} {text}"
        elif kind < 0.45:
            text = f"###Human: {text}###Assistant: {text}###"
        elif kind < 0.55:
            text = f"({rng.choice('ABCD')}) {text} {text}"
        lines.append(text)
    return lines


@functools.lru_cache(maxsize=None)
def _sentencepiece_model_dir(spaced_roles: bool = False) -> str:
    """Train the sentencepiece model once per process; returns a folder holding tokenizer.model."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(random.Random(0), spaced_roles)), model_writer=model,
        vocab_size=BASE_VOCAB_SIZE, model_type="bpe", byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        character_coverage=0.9995, split_digits=True, add_dummy_prefix=False,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", num_threads=1, minloglevel=2)
    folder = tempfile.mkdtemp(prefix="llava_jax_test_tokenizer_")
    with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    return folder


def llama_tokenizer(legacy: bool = False, spaced_roles: bool = False):
    """A fresh transformers LlamaTokenizer (fast) with `<image>` at id BASE_VOCAB_SIZE.

    The default vocabulary is LLaMA-like: "USER" is a piece but "▁USER" is not. `spaced_roles=True`
    trains one where "▁USER" is a piece too, a vocabulary on which the reference's legacy=False token
    counting goes wrong after the first round."""
    from tokenizers import AddedToken
    from transformers import LlamaTokenizer

    tok = LlamaTokenizer.from_pretrained(
        _sentencepiece_model_dir(spaced_roles), legacy=legacy, add_bos_token=True, add_eos_token=False,
        add_prefix_space=True, pad_token="<unk>", padding_side="right")
    tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    # Persisted by save_pretrained so that a reload tokenizes the same way.
    tok.init_kwargs.update(legacy=legacy, add_prefix_space=True, pad_token="<unk>", padding_side="right")
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) == IMAGE_TOKEN_ID, tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    return tok


def save_llama_tokenizer(folder: str, legacy: bool = False):
    """Write the test tokenizer's files into `folder`; returns the tokenizer."""
    tok = llama_tokenizer(legacy=legacy)
    tok.save_pretrained(folder)
    return tok
