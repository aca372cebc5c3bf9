"""The quickstart's training data, all as LLaVA JSON records.

- Instruction data (conversation, detailed description, complex reasoning) goes through the real
  instruction generator (llava_jax.datagen.instruct.generate): COCO-style contexts -> the prompts an
  LLM would see -> a backend -> parsed records. `world_backend` stands in for the LLM: it reads only
  the context text (captions + category boxes), as the LLM would, and writes its reply from that.
- Stage-1 caption pairs go through the CC3M path (llava_jax.datagen.cc3m_filter.to_stage1_records).
- Short-answer VQA (the LLaVA-1.5 mix's "single word or phrase" data) and the text-only records the
  language model is pretrained on come straight from the scene annotations.
"""
from __future__ import annotations

import hashlib
import re

from llava_jax.data import synthetic as S
from llava_jax.datagen.context import parse_context
from llava_jax.datagen.prompts import kind_of_messages

# Normalised box extent separating the two sizes (small objects span <= 0.25, large >= 0.33).
_LARGE_EXTENT = 0.29


class _Obj:
    """An object as the context describes it: category '<colour> <shape>' and a normalised box."""

    def __init__(self, box):
        self.color, self.shape = box.category.split(" ", 1)
        self.name = box.category
        cx, cy = (box.x1 + box.x2) / 2, (box.y1 + box.y2) / 2
        self.position = S.POSITIONS[2 * int(cy >= 0.5) + int(cx >= 0.5)]
        self.size = "large" if max(box.x2 - box.x1, box.y2 - box.y1) > _LARGE_EXTENT else "small"


def _background(captions) -> str:
    words = set(re.findall(r"[a-z]+", " ".join(captions).lower()))
    found = [bg for bg in S.BACKGROUNDS if bg in words]
    return found[0] if len(found) == 1 else "plain"


def _choice(key: str, options):
    """A deterministic pick: the same context always gets the same reply."""
    return options[int(hashlib.sha256(key.encode()).hexdigest(), 16) % len(options)]


def _listing(objs, with_size: bool = False) -> str:
    return S._join([S._a(f"{o.size} {o.name}" if with_size else o.name) for o in objs])


def _conversation(objs, background: str, key: str) -> list:
    n = len(objs)
    pairs = [("How many shapes are in the image?",
              f"There {'is' if n == 1 else 'are'} {S._count_phrase(n)} in the image: {_listing(objs)}.")]
    for o in objs:
        pairs.append((f"What color is the {o.shape}?", f"The {o.shape} is {o.color}."))
        pairs.append((f"Where is the {o.name}?", f"The {o.name} is in the {o.position} of the image."))
    target = _choice(key + "shape", objs)
    pairs.append((f"What shape is the {target.color} object?", f"The {target.color} object is {S._a(target.shape)}."))
    pairs.append(("What color is the background?", f"The background is {background}."))
    # A different subset and order per image, as an LLM would vary its questions.
    order = sorted(range(len(pairs)), key=lambda i: hashlib.sha256(f"{key}:{i}".encode()).hexdigest())
    return [pairs[i] for i in sorted(order[:4])]


def _detail(objs, background: str) -> str:
    n = len(objs)
    lines = [f"The image shows {S._count_phrase(n)} on {S._a(background)} background."]
    for o in objs:
        lines.append(f"In the {o.position} there is {S._a(f'{o.size} {o.name}')}.")
    empty = [p for p in S.POSITIONS if p not in {o.position for o in objs}]
    if empty:
        lines.append(f"The {S._join(empty)} {'is' if len(empty) == 1 else 'are'} empty.")
    return " ".join(lines)


def _complex(objs, background: str, key: str) -> tuple:
    kind = _choice(key + "complex", ("remove", "largest", "corner") if len(objs) > 1 else ("remove", "corner"))
    if kind == "remove":
        gone = _choice(key + "gone", objs)
        rest = [o for o in objs if o is not gone]
        answer = (f"The image has {S._count_phrase(len(objs))}. Without the {gone.name}, "
                  + (f"{S._count_phrase(len(rest))} would remain: {_listing(rest)}." if rest
                     else f"nothing would remain but the {background} background."))
        return f"If the {gone.name} were taken away, what would be left in the picture?", answer
    if kind == "largest":
        large = [o for o in objs if o.size == "large"]
        if not large:
            return ("Is any of the shapes large?",
                    f"No. All {S._count_phrase(len(objs))} are small: {_listing(objs, with_size=True)}.")
        return ("Which shapes take up the most space in the image?",
                f"The large ones: {_listing(large)}. " + (f"The others are small: {_listing([o for o in objs if o.size == 'small'])}."
                                                          if len(large) < len(objs) else "All of them are large."))
    corner = _choice(key + "corner", S.POSITIONS)
    there = [o for o in objs if o.position == corner]
    answer = (f"In the {corner} corner there is {S._a(there[0].name)}." if there
              else f"Nothing: the {corner} corner is empty {background} background.")
    return f"What would I find if I looked at the {corner} corner of the picture?", answer


def world_backend(messages: list) -> str:
    """The offline stand-in for the LLM: a reply in the generator's format, from the context text only."""
    kind = kind_of_messages(messages)
    context = messages[-1]["content"]
    captions, boxes = parse_context(context)
    objs = [_Obj(b) for b in boxes]
    background = _background(captions)
    key = hashlib.sha256(context.encode()).hexdigest()
    if not objs:
        return captions[0] if kind == "detail" else f"Question: What does the image show?\nAnswer: {captions[0]}"
    if kind == "detail":
        return _detail(objs, background)
    if kind == "complex":
        q, a = _complex(objs, background, key)
        return f"Question: {q}\nAnswer: {a}"
    return "\n\n".join(f"Question: {q}\nAnswer: {a}" for q, a in _conversation(objs, background, key))


# ----- records straight from the annotations ------------------------------------------------------

def vqa_record(scene: S.Scene) -> dict:
    """A multi-turn record of short-answer questions about one image (LLaVA-1.5's VQA format, asked
    without its "Answer the question using a single word or phrase." suffix: in this world every
    question has a one- or two-word answer, and the suffix would add 11 tokens to every turn).

    One question per object (its type drawn) plus the count question, in a drawn order. Asking two
    questions about the same object would leak answers through the text ("Where is the red
    triangle?" answers "What color is the triangle?"), and a fixed type order would let the turn
    index stand in for the question: with either shortcut the model learns to ignore the image.
    """
    questions = S.questions(scene)
    rng = S._rng(scene.seed, scene.split, scene.index, 3)
    count = [q for q in questions if q.type == "count"]
    # questions() asks colour, shape and position about each object in turn, after the count.
    per_object = [questions[1 + 3 * i: 4 + 3 * i] for i in range(len(scene.objects))]
    picked = count + [qs[int(rng.integers(len(qs)))] for qs in per_object]
    turns = []
    for i, j in enumerate(rng.permutation(len(picked))):
        q = picked[j]
        turns.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + q.question})
        turns.append({"from": "gpt", "value": q.answer})
    return {"id": f"{scene.id}_vqa", "image": scene.file_name, "conversations": turns}
