"""Batched answers from a checkpoint: one user question (with or without an image) per row.

Prompt building, image preprocessing and generation are the inference package's (ChatModel,
left_pad, Generator); this only groups rows into batches and decodes each row up to its first stop
id (`chat.eos_ids`: the EOS ids and the template's end-of-turn token, e.g. <|im_end|> for chatml).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from tqdm import tqdm


def load_chat_model(ckpt: str, template: Optional[str] = None, image_aspect: Optional[str] = None):
    from llava_jax.infer.prompting import ChatModel

    return ChatModel.load(ckpt, template=template, image_aspect=image_aspect)


def answer_batch(chat, questions: Sequence[str], images: Sequence, *, max_new_tokens: int = 128,
                 temperature: float = 0.0) -> list[str]:
    """questions[i] is asked about images[i] (None: text only); greedy by default."""
    from llava_jax.infer.prompting import left_pad

    rows, pixels = [], []
    for text, image in zip(questions, images, strict=True):
        rows.append(chat.prompts.input_ids([("user", text, image is not None)]))
        if image is not None:
            pixels.append(chat.prompts.pixels(image))
    input_ids, mask = left_pad(rows, chat.pad_id)
    tokens = chat.generator.generate(input_ids, np.stack(pixels) if pixels else None, mask,
                                     max_new_tokens=max_new_tokens, temperature=temperature,
                                     eos_token_id=chat.eos_ids, pad_token_id=chat.pad_id)
    answers = []
    for row in np.asarray(tokens).tolist():
        ends = [i for i, t in enumerate(row) if t in chat.eos_ids]
        answers.append(chat.tokenizer.decode(row[: ends[0]] if ends else row, skip_special_tokens=True).strip())
    return answers


def answer_all(chat, questions: Sequence[str], images: Sequence, *, batch_size: int = 8, progress: bool = True,
               desc: str = "answering", **kwargs) -> list[str]:
    out = []
    with tqdm(total=len(questions), disable=not progress, desc=desc) as bar:
        for start in range(0, len(questions), batch_size):
            stop = start + batch_size
            out += answer_batch(chat, questions[start:stop], images[start:stop], **kwargs)
            bar.update(len(questions[start:stop]))
    return out
