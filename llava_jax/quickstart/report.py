"""DIR/report.json, DIR/report.md and DIR/report.png (loss curves and per-type accuracy, drawn with PIL)."""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

from PIL import Image, ImageDraw

from llava_jax.data import synthetic as S

PASS_ACCURACY = 0.80     # overall, on the question types with chance <= LOW_CHANCE
PASS_TYPE_ACCURACY = 0.60  # and on each of those types
PASS_MINUTES = 10.0        # the whole run (on the 2-core machine the recipe is tuned for)
LOW_CHANCE = 0.25


# ----- the example answer ------------------------------------------------------------------------

def example(chat, world, root: str, answers=()) -> dict:
    """Ask the trained model (`chat`, a loaded ChatModel) about one held-out image, through the chat
    path (the evaluation's batch size, so its compiled shapes are reused); the image is copied
    next to the report. The question is fixed in advance (the colour of the last object of the first
    held-out scene with two or more objects, in the evaluation's wording), never chosen by whether
    it is answered right; `answers` (the evaluation's) says what the evaluation replied to it."""
    from llava_jax.eval.answering import answer_all
    from llava_jax.quickstart.evaluate import BATCH_SIZE

    scene = next((s for s in world.eval_scenes if len(s.objects) >= 2), world.eval_scenes[0])
    obj = scene.objects[-1]
    question = next(q.question for q in S.questions(scene, canonical=True)
                    if q.type == "color" and q.answer == obj.color)
    image = os.path.join(root, "example.png")
    shutil.copyfile(os.path.join(world.eval_images, scene.file_name), image)
    reply = answer_all(chat, [question], [image], batch_size=BATCH_SIZE, max_new_tokens=16, progress=False)[0]
    evaluated = next((a for a in answers if a["scene"] == scene.id and a["question"] == question), None)
    return {"image": image, "scene": scene.id, "question": question, "answer": obj.color, "reply": reply,
            "correct": S.grade("color", reply, obj.color),
            "evaluation_reply": evaluated["reply"] if evaluated else None}


# ----- drawing -----------------------------------------------------------------------------------

_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _panel(draw, box, title, series, y_label="loss"):
    """Line plot of {name: [(x, y)]} inside box = (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    draw.text((x0 + 4, y0), title, fill="black")
    px0, py0, px1, py1 = x0 + 40, y0 + 16, x1 - 8, y1 - 20
    draw.rectangle([px0, py0, px1, py1], outline="black")
    points = [p for pts in series.values() for p in pts]
    if not points:
        return
    xmax = max(x for x, _ in points) or 1
    ymin, ymax = min(y for _, y in points), max(y for _, y in points)
    ymin = min(0.0, ymin)
    span = (ymax - ymin) or 1.0
    for k in range(5):
        v = ymin + span * k / 4
        yy = py1 - (py1 - py0) * k / 4
        draw.line([px0 - 3, yy, px0, yy], fill="black")
        draw.text((x0, yy - 6), f"{v:.2f}", fill="black")
    draw.text((px1 - 60, py1 + 4), f"step (max {xmax})", fill="black")
    for i, (name, pts) in enumerate(series.items()):
        color = _COLORS[i % len(_COLORS)]
        xy = [(px0 + (px1 - px0) * x / xmax, py1 - (py1 - py0) * (y - ymin) / span) for x, y in pts]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        if len(series) > 1:
            draw.text((px1 - 150, py0 + 4 + 12 * i), name, fill=color)


def _bars(draw, box, title, groups, labels):
    """Grouped bars: groups = {category: [value per label]}, values in [0, 1]."""
    x0, y0, x1, y1 = box
    draw.text((x0 + 4, y0), title, fill="black")
    px0, py0, px1, py1 = x0 + 40, y0 + 16, x1 - 8, y1 - 20
    draw.rectangle([px0, py0, px1, py1], outline="black")
    for k in range(5):
        yy = py1 - (py1 - py0) * k / 4
        draw.line([px0 - 3, yy, px0, yy], fill="black")
        draw.text((x0 + 8, yy - 6), f"{k / 4:.2f}", fill="black")
    n = max(1, len(groups))
    width = (px1 - px0) / n
    for g, (category, values) in enumerate(groups.items()):
        bar = width * 0.8 / max(1, len(values))
        for i, v in enumerate(values):
            if v is None:
                continue
            left = px0 + g * width + width * 0.1 + i * bar
            draw.rectangle([left, py1 - (py1 - py0) * v, left + bar - 2, py1], fill=_COLORS[i % len(_COLORS)])
        draw.text((px0 + g * width + width * 0.3, py1 + 4), category, fill="black")
    for i, label in enumerate(labels):
        draw.text((px0 + 6, py0 + 4 + 12 * i), label, fill=_COLORS[i % len(_COLORS)])


def plot(path: str, curves: dict, accuracy_groups: dict, labels: list) -> str:
    names = list(curves)
    panels = len(names) + 1
    cols = 3
    rows = (panels + cols - 1) // cols
    w, h = 330, 230
    image = Image.new("RGB", (cols * w, rows * h), "white")
    draw = ImageDraw.Draw(image)
    order = [n for n in names if not n.startswith("stage2")] + ["stage2"]
    for i, name in enumerate(order):
        series = {n: [(r["step"], r["loss"]) for r in curves[n] if r.get("loss") is not None]
                  for n in names if n == name or (name == "stage2" and n.startswith("stage2"))}
        box = ((i % cols) * w, (i // cols) * h, (i % cols + 1) * w, (i // cols + 1) * h)
        _panel(draw, box, f"{name} training loss", series)
    i = len(order)
    _bars(draw, ((i % cols) * w, (i // cols) * h, (i % cols + 1) * w, (i // cols + 1) * h),
          "held-out accuracy by question type", accuracy_groups, labels)
    image.save(path)
    return path


# ----- report files ------------------------------------------------------------------------------

def write(root: str, *, result: dict, ablation, chance: dict, curves: dict, minutes: float, stage_seconds: dict,
          example: dict, fast: bool, datagen: str, stage1: Optional[dict] = None) -> dict:
    by_type = result["accuracy_by_type"]
    counts = result["num_questions"]
    total = sum(counts.values())
    low = [t for t in by_type if chance[t] <= LOW_CHANCE]
    low_total = sum(counts[t] for t in low)
    low_accuracy = sum(by_type[t] * counts[t] for t in low) / max(1, low_total)
    summary = {
        "accuracy": result["accuracy"],
        "accuracy_by_type": by_type,
        # The ablation: the same questions asked about another held-out scene's image.
        "accuracy_other_image": ablation["accuracy"] if ablation else None,
        "accuracy_other_image_by_type": ablation["accuracy_by_type"] if ablation else None,
        # Expected accuracy of uniform guessing among each type's options, weighted like the questions.
        "chance_accuracy": sum(chance[t] * counts[t] for t in counts) / max(1, total),
        "chance_by_type": {t: chance[t] for t in by_type},
        "low_chance_types": low,
        "accuracy_low_chance_types": low_accuracy,
        "passed": (low_accuracy >= PASS_ACCURACY and min((by_type[t] for t in low), default=0.0) >= PASS_TYPE_ACCURACY
                   and minutes <= PASS_MINUTES),
        "num_questions": counts,
        "descriptions": {k: v for k, v in result.get("descriptions", {}).items() if k != "examples"},
        "example": example,
        # Stage 1's held-out read-out: how often a quadrant's colour / shape token is nearest the right word.
        "stage1": {k: v for k, v in (stage1 or {}).items() if k != "history"},
        "minutes": minutes,
        "stage_seconds": stage_seconds,
        "fast": fast,
    }
    with open(os.path.join(root, "report.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(root, "answers.json"), "w") as f:
        json.dump({"answers": result["answers"], "other_image": ablation["answers"] if ablation else None,
                   "descriptions": result.get("descriptions", {}).get("examples")}, f, indent=1)

    labels = ["own image"] + (["another scene's image"] if ablation else []) + ["chance"]
    groups = {t: [by_type[t]] + ([ablation["accuracy_by_type"].get(t)] if ablation else []) + [chance[t]]
              for t in by_type}
    plot(os.path.join(root, "report.png"), curves, groups, labels)

    lines = [
        "# llava-jax quickstart report", "",
        f"{'Fast' if fast else 'Full'} run, {minutes:.1f} minutes. Held-out scenes, greedy answers, "
        f"{total} short-answer questions.", "",
        "![loss curves and accuracy](report.png)", "",
        "| question type | accuracy | with another scene's image | chance | questions |",
        "|---|---|---|---|---|",
    ]
    for t in by_type:
        ab = f"{ablation['accuracy_by_type'][t]:.3f}" if ablation else "-"
        lines.append(f"| {t} | {by_type[t]:.3f} | {ab} | {chance[t]:.3f} | {counts[t]} |")
    ab_all = f"{ablation['accuracy']:.3f}" if ablation else "-"
    lines.append(f"| **all** | **{result['accuracy']:.3f}** | {ab_all} | {summary['chance_accuracy']:.3f} | {total} |")
    if stage1:
        read = stage1["nearest_word"]
        lines += ["", f"Stage 1 (vision tower + projector aligned to word embeddings): on held-out images the colour "
                      f"token of a quadrant holding an object is nearest the right colour word {read['color']:.2f} "
                      f"of the time, its shape token nearest the right shape word {read['shape']:.2f}."]
    d = summary["descriptions"]
    if d:
        lines += ["", f"Detailed descriptions ({DESCRIBE_NOTE}): object precision {d['object_precision']:.3f}, "
                      f"object recall {d['object_recall']:.3f}."]
    lines += ["", f"Pass bar: accuracy >= {PASS_ACCURACY} on the types with chance <= {LOW_CHANCE} "
                  f"({', '.join(low)}) and >= {PASS_TYPE_ACCURACY} on each, within {PASS_MINUTES:.0f} minutes: "
                  f"{low_accuracy:.3f}, lowest type {min((by_type[t] for t in low), default=0.0):.3f}, "
                  f"{minutes:.1f} min -> {'passed' if summary['passed'] else 'NOT passed'}.",
              "", "## Example (held-out image)", "", "![held-out example](example.png)", "",
              f"Q: {example['question']}  ", f"A: {example['reply']}  ", f"(expected: {example['answer']}; "
              f"{'right' if example['correct'] else 'wrong'}; picked before the answer was known)", "",
              "## Time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in stage_seconds.items()]
    lines += ["", "## Instruction data generation", "", "```", datagen, "```", ""]
    with open(os.path.join(root, "report.md"), "w") as f:
        f.write("\n".join(lines))
    return summary


DESCRIBE_NOTE = "'<colour> <shape>' mentions against the annotations"
