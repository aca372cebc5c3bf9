"""A small LLaMA-style tokenizer trained on the quickstart's own text (nothing is downloaded).

Sentencepiece BPE with byte fallback and LLaMA's special ids (unk 0, bos 1, eos 2, pad = unk as in
the reference's v1 recipe), loaded as a transformers LlamaTokenizer (fast) with `<image>` added as
the first id after the base vocabulary: the llava-hf convention the model config follows.
"""
from __future__ import annotations

import io
import os
import tempfile

IMAGE_TOKEN = "<image>"


def train_tokenizer(texts, vocab_size: int, folder: str):
    """Train on `texts` (an iterable of strings), save into `folder`; returns the tokenizer.

    The total vocabulary (with `<image>`) is `vocab_size`; `<image>` gets id vocab_size - 1.
    """
    import sentencepiece as spm
    from tokenizers import AddedToken
    from transformers import LlamaTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)), model_writer=model, vocab_size=vocab_size - 1, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece="<unk>", bos_piece="<s>",
        eos_piece="</s>", character_coverage=1.0, split_digits=True, add_dummy_prefix=False,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, normalization_rule_name="identity",
        num_threads=1, minloglevel=2)
    with tempfile.TemporaryDirectory(prefix="llava_jax_quickstart_spm_") as tmp:
        with open(os.path.join(tmp, "tokenizer.model"), "wb") as f:
            f.write(model.getvalue())
        tok = LlamaTokenizer.from_pretrained(tmp, legacy=False, add_bos_token=True, add_eos_token=False,
                                             add_prefix_space=True, pad_token="<unk>", padding_side="right")
    tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    tok.init_kwargs.update(legacy=False, add_prefix_space=True, pad_token="<unk>", padding_side="right")
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_id != vocab_size - 1 or len(tok) != vocab_size:
        raise RuntimeError(f"tokenizer has {len(tok)} ids with <image> at {image_id}; expected {vocab_size} "
                           f"ids with <image> at {vocab_size - 1} (is the corpus too small for the vocabulary?)")
    tok.save_pretrained(folder)
    return tok
