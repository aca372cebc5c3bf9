"""Batched answers from a checkpoint: one user question (with or without an image) per row.

Prompt building, image preprocessing (LLaVA-1.5's or LLaVA-1.6's AnyRes tiles, with each image's
own placeholder count) and generation are the inference package's (ChatModel, left_pad, Generator,
the slot engine); this only groups rows into batches and decodes each row up
to its first stop id (`chat.eos_ids`: the EOS ids and the template's end-of-turn token, e.g. <|im_end|> for chatml).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from tqdm import tqdm

from llava_jax.validate import BadInput


def load_chat_model(ckpt: str, template: Optional[str] = None, image_aspect: Optional[str] = None,
                    adapter: Optional[str] = None):
    from llava_jax.infer.prompting import ChatModel

    return ChatModel.load(ckpt, template=template, image_aspect=image_aspect, adapter=adapter)


def answer_batch(chat, questions: Sequence[str], images: Sequence, *, max_new_tokens: int = 128,
                 temperature: float = 0.0) -> list[str]:
    """questions[i] is asked about images[i] (None: text only); greedy by default."""
    from llava_jax.infer.prompting import check_context, left_pad

    rows, pixels, sizes = [], [], []
    for text, image in zip(questions, images, strict=True):
        try:
            prompt = chat.prompts.encode([("user", text, image is not None)], [] if image is None else [image])
            check_context(chat.config, prompt.input_ids)
        except ValueError as e:
            raise BadInput(f"question {len(rows)}: {e}") from None
        rows.append(prompt.input_ids)
        if prompt.pixel_values is not None:
            pixels.append(prompt.pixel_values)
            if prompt.image_sizes is not None:
                sizes.append(prompt.image_sizes)
    input_ids, mask = left_pad(rows, chat.pad_id)
    tokens = chat.generator.generate(input_ids, np.concatenate(pixels) if pixels else None, mask,
                                     image_sizes=np.concatenate(sizes) if sizes else None,
                                     max_new_tokens=max_new_tokens, temperature=temperature,
                                     eos_token_id=chat.eos_ids, pad_token_id=chat.pad_id)
    answers = []
    for row in np.asarray(tokens).tolist():
        ends = [i for i, t in enumerate(row) if t in chat.eos_ids]
        answers.append(chat.tokenizer.decode(row[: ends[0]] if ends else row, skip_special_tokens=True).strip())
    return answers


def answer_all(chat, questions: Sequence[str], images: Sequence, *, batch_size: int = 8, progress: bool = True,
               desc: str = "answering", max_new_tokens: int = 128, temperature: float = 0.0) -> list[str]:
    """Answers to every question, `batch_size` decoded side by side in the slot engine
    (`llava_jax.infer.engine`): a row whose answer ends early takes the next question at once instead
    of waiting for the longest answer of its batch. Greedy answers equal `answer_batch`'s. Questions
    are encoded (and their images preprocessed) just before they are needed, not all up front."""
    from llava_jax.infer.engine import Engine, Request

    # Room for max_new_tokens after any prompt the model's positions cover (as answer_batch allows).
    context = chat.config.text.max_position_embeddings + max_new_tokens
    engine = Engine(chat.generator, max_batch=batch_size, max_queue=2 * batch_size, max_context=context,
                    eos_ids=chat.eos_ids, pad_id=chat.pad_id)
    items = list(zip(questions, images, strict=True))
    requests, pending = [], []
    with tqdm(total=len(items), disable=not progress, desc=desc) as bar:
        while len(requests) < len(items) or pending:
            while len(requests) < len(items) and engine.queue_length < batch_size:
                text, image = items[len(requests)]
                try:  # e.g. an image AnyRes cannot use, a prompt longer than the context: say which item
                    ids, pixels, sizes = chat.prompts.encode([("user", text, image is not None)],
                                                             [] if image is None else [image])
                    requests.append(engine.submit(Request(ids, pixels, max_tokens=max_new_tokens,
                                                          temperature=temperature, image_sizes=sizes)))
                except ValueError as e:
                    raise BadInput(f"{desc}: question {len(requests)}: {e}") from None
                pending.append(requests[-1])
            engine.step()
            for r in [r for r in pending if r.finished]:
                pending.remove(r)
                r.pixels = None  # the answer is all that is kept
                bar.update(1)
    for r in requests:
        if r.error:
            raise RuntimeError(f"answering failed: {r.error}")
    return [chat.tokenizer.decode(r.tokens, skip_special_tokens=True).strip() for r in requests]
