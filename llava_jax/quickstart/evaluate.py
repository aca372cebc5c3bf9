"""Held-out evaluation of a checkpoint: short-answer accuracy by question type, the same questions
asked about another scene's image (does the model read the image?), and descriptions.

Questions are asked as they are, in their canonical wording ("What color is the circle?"), with no
short-answer instruction appended: the stage-2 data teaches one-word answers to them. Answers come
from the same path as `llava-jax chat` (llava_jax.eval.answering: the checkpoint's template and
image preprocessing, batched greedy generation, stopping at the template's end token).
"""
from __future__ import annotations

import collections
import os

from llava_jax.data import synthetic as S
from llava_jax.datagen.prompts import DETAIL_INSTRUCTIONS
from llava_jax.eval.answering import answer_all

DESCRIBE = DETAIL_INSTRUCTIONS[0]
# Every answer of this world is at most two words ("bottom right" + <|im_end|> is 3 SmolLM2 tokens).
MAX_ANSWER_TOKENS = 5
BATCH_SIZE = 64  # rows decoded side by side (the slot engine's max_batch)


def chance_by_type() -> dict:
    return {t: S.chance_accuracy(t) for t in S.QUESTION_OPTIONS}


def question_accuracy(chat, scenes, image_folder: str, *, shown=None, batch_size: int = BATCH_SIZE,
                      progress: bool = True) -> dict:
    """Every canonical question of every scene -> accuracy overall and by type, and the answers.

    shown[i]: the scene whose image goes with scene i's questions (default: its own)."""
    shown = list(scenes) if shown is None else list(shown)
    items = [(scene, q, image) for scene, image in zip(scenes, shown, strict=True)
             for q in S.questions(scene, canonical=True)]
    replies = answer_all(chat, [q.question for _, q, _ in items],
                         [os.path.join(image_folder, image.file_name) for _, _, image in items],
                         batch_size=batch_size, max_new_tokens=MAX_ANSWER_TOKENS, progress=progress, desc="questions")
    correct, total = collections.Counter(), collections.Counter()
    answers = []
    for (scene, q, _), reply in zip(items, replies):
        ok = S.grade(q.type, reply, q.answer)
        correct[q.type] += ok
        total[q.type] += 1
        answers.append({"scene": scene.id, "type": q.type, "question": q.question, "answer": q.answer,
                        "reply": reply, "correct": ok})
    by_type = {t: correct[t] / total[t] for t in S.QUESTION_OPTIONS if total[t]}
    return {"accuracy": sum(correct.values()) / max(1, sum(total.values())), "accuracy_by_type": by_type,
            "num_questions": dict(total), "answers": answers}


def description_scores(chat, scenes, image_folder: str, *, batch_size: int = BATCH_SIZE,
                       progress: bool = True) -> dict:
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


def other_scenes(scenes) -> list:
    """Each scene paired with the next one's image (the last with the first): the ablation's images."""
    return list(scenes[1:]) + list(scenes[:1])


def evaluate(chat, scenes, image_folder: str, *, num_describe: int = 0, num_other_image: int = 0,
             progress: bool = True) -> dict:
    """Accuracy of `chat` (a loaded ChatModel, `load_chat_model(ckpt)`) on `scenes`; with
    num_other_image, also result["other_image"]: the questions of the first num_other_image scenes
    asked about another scene's image."""
    result = question_accuracy(chat, scenes, image_folder, progress=progress)
    if num_other_image:
        some = list(scenes[:num_other_image])
        result["other_image"] = question_accuracy(chat, some, image_folder, shown=other_scenes(some),
                                                  progress=progress)
    if num_describe:
        result["descriptions"] = description_scores(chat, scenes[:num_describe], image_folder, progress=progress)
    return result
