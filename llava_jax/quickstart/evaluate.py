"""Held-out evaluation of a checkpoint: short-answer accuracy by question type, and descriptions.

Answers come from the same path as `llava-jax chat` (llava_jax.eval.answering: the checkpoint's
template and image preprocessing, batched greedy generation).
"""
from __future__ import annotations

import collections
import os

from llava_jax.data import synthetic as S
from llava_jax.datagen.prompts import DETAIL_INSTRUCTIONS
from llava_jax.eval.answering import answer_all, load_chat_model
from llava_jax.quickstart.instructions import short_question

DESCRIBE = DETAIL_INSTRUCTIONS[0]


def chance_by_type() -> dict:
    return {t: S.chance_accuracy(t) for t in S.QUESTION_OPTIONS}


def question_accuracy(chat, scenes, image_folder: str, *, batch_size: int = 64, progress: bool = True) -> dict:
    """Every canonical question of every scene -> accuracy overall and by type, and the answers."""
    items = [(scene, q) for scene in scenes for q in S.questions(scene, canonical=True)]
    replies = answer_all(chat, [short_question(q.question) for _, q in items],
                         [os.path.join(image_folder, s.file_name) for s, _ in items],
                         batch_size=batch_size, max_new_tokens=6, progress=progress, desc="questions")
    correct, total = collections.Counter(), collections.Counter()
    answers = []
    for (scene, q), reply in zip(items, replies):
        ok = S.grade(q.type, reply, q.answer)
        correct[q.type] += ok
        total[q.type] += 1
        answers.append({"scene": scene.id, "type": q.type, "question": q.question, "answer": q.answer,
                        "reply": reply, "correct": ok})
    by_type = {t: correct[t] / total[t] for t in S.QUESTION_OPTIONS if total[t]}
    return {"accuracy": sum(correct.values()) / max(1, sum(total.values())), "accuracy_by_type": by_type,
            "num_questions": dict(total), "answers": answers}


def description_scores(chat, scenes, image_folder: str, *, batch_size: int = 64, progress: bool = True) -> dict:
    """Object precision / recall of generated descriptions ('<colour> <shape>' mentions vs the truth)."""
    replies = answer_all(chat, [DESCRIBE] * len(scenes), [os.path.join(image_folder, s.file_name) for s in scenes],
                         batch_size=batch_size, max_new_tokens=80, progress=progress, desc="descriptions")
    named = truth = hits = 0
    examples = []
    for scene, reply in zip(scenes, replies):
        said, real = S.mentioned_objects(reply), {(o.color, o.shape) for o in scene.objects}
        named, truth, hits = named + len(said), truth + len(real), hits + len(said & real)
        examples.append({"scene": scene.id, "description": reply})
    precision = hits / named if named else 0.0
    recall = hits / truth if truth else 0.0
    return {"object_precision": precision, "object_recall": recall, "examples": examples}


def evaluate(ckpt: str, scenes, image_folder: str, *, num_describe: int = 32, progress: bool = True) -> dict:
    chat = load_chat_model(ckpt)
    result = question_accuracy(chat, scenes, image_folder, progress=progress)
    if num_describe:
        result["descriptions"] = description_scores(chat, scenes[:num_describe], image_folder, progress=progress)
    return result
