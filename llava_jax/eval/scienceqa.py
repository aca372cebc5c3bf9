"""ScienceQA in the LLaVA format: conversion, batched greedy answers, the reference's scoring.

Prompt (the reference's converter, `llava_test_CQM-A.json`, used by the LLaVA-1.5 evaluation):
    "Context: {hint or N/A}\\nQuestion: {question}\\nOptions: (A) x (B) y"
double spaces collapsed once, stripped. QCM order ("Question: ..." first, used with LLaVA v1's
QCM-LEA data) is available as --prompt-format QCM; as in the reference's converter, the "Question: "
label is then removed. Image problems put "<image>\\n" first; --single-pred-prompt appends
"\\nAnswer with the option's letter from the given choices directly."
"""
from __future__ import annotations

import json
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

OPTIONS = ["A", "B", "C", "D", "E"]
SINGLE_PRED_PROMPT = "Answer with the option's letter from the given choices directly."
# As in the reference: the '.' is unescaped, so it matches any character after the letter.
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def choice_text(choices) -> str:
    return " ".join(f"({OPTIONS[i]}) {c}" for i, c in enumerate(choices))


def question_text(problem: dict, prompt_format: str = "CQM") -> str:
    context = (problem.get("hint") or "").strip() or "N/A"
    question, options = problem["question"], choice_text(problem["choices"])
    if prompt_format == "CQM":
        text = f"Context: {context}\nQuestion: {question}\nOptions: {options}\n"
    elif prompt_format == "QCM":
        text = f"Question: {question}\nContext: {context}\nOptions: {options}\n"
    else:
        raise ValueError(f"unknown ScienceQA prompt format {prompt_format!r}; expected CQM or QCM")
    text = text.replace("  ", " ").strip()
    if text.startswith("Question: "):
        text = text.replace("Question: ", "")
    return text


def load_release(data_dir) -> tuple[dict, dict]:
    data_dir = Path(data_dir)
    files = {}
    for name in ("problems.json", "pid_splits.json"):
        path = data_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"ScienceQA: {path} not found (expected the release's {name} in --data)")
        with open(path) as f:
            files[name] = json.load(f)
    return files["problems.json"], files["pid_splits.json"]


def image_path(data_dir, split: str, pid: str, problem: dict):
    """<data>/<split>/<pid>/<image> (or <data>/images/<split>/...); None for text-only problems."""
    if not problem.get("image"):
        return None
    for candidate in (Path(data_dir) / split / pid / problem["image"],
                      Path(data_dir) / "images" / split / pid / problem["image"]):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"ScienceQA problem {pid}: image {problem['image']!r} not found under "
                            f"{Path(data_dir) / split / pid} or {Path(data_dir) / 'images' / split / pid}")


def to_llava_records(problems: dict, pids, prompt_format: str = "CQM") -> list[dict]:
    """The reference's LLaVA-format test file (question + "\\n<image>"; gpt = answer letter)."""
    out = []
    for pid in pids:
        p = problems[pid]
        text = question_text(p, prompt_format)
        record = {"id": pid, "conversations": [{"from": "human", "value": text},
                                                {"from": "gpt", "value": OPTIONS[p["answer"]]}]}
        if p.get("image"):
            record["image"] = os.path.join(pid, p["image"])
            record["conversations"][0]["value"] = text + "\n<image>"
        out.append(record)
    return out


def parse_prediction(text: str) -> str:
    """A letter, or "FAILED": exactly a letter; else "X. ..." ; else a single "The answer is X."."""
    if text in OPTIONS:
        return text
    if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else "FAILED"


def score(problems: dict, pids, predictions: dict) -> dict:
    """predictions: pid -> reply text (a missing pid counts as FAILED, i.e. wrong)."""
    total = correct = img_total = img_correct = 0
    subjects = defaultdict(lambda: [0, 0])
    for pid in pids:
        p = problems[pid]
        letter = parse_prediction(predictions.get(pid, "FAILED"))
        index = OPTIONS.index(letter) if letter in OPTIONS[: len(p["choices"])] else -1
        ok = index == p["answer"]
        total += 1
        correct += ok
        if p.get("image"):
            img_total += 1
            img_correct += ok
        subjects[p.get("subject", "unknown")][0] += ok
        subjects[p.get("subject", "unknown")][1] += 1
    return {"total": total, "correct": correct,
            "accuracy": 100 * correct / total if total else 0.0,
            "img_total": img_total, "img_accuracy": 100 * img_correct / img_total if img_total else 0.0,
            "per_subject": {s: 100 * c / n for s, (c, n) in sorted(subjects.items())}}


def format_report(r: dict) -> str:
    lines = [f"Total: {r['total']}, Correct: {r['correct']}, Accuracy: {r['accuracy']:.2f}%, "
             f"IMG-Accuracy: {r['img_accuracy']:.2f}% (over {r['img_total']})"]
    lines += [f"  {subject}: {acc:.2f}%" for subject, acc in r["per_subject"].items()]
    return "\n".join(lines)


def model_prompt(problem: dict, prompt_format: str, single_pred_prompt: bool) -> str:
    """The text the model is asked (the image marker is added by the prompt builder)."""
    text = question_text(problem, prompt_format)
    return text + "\n" + SINGLE_PRED_PROMPT if single_pred_prompt else text


# --- CLI -----------------------------------------------------------------------------------------

def add_parser(sub):
    p = sub.add_parser("scienceqa", help="ScienceQA accuracy of a checkpoint (or of a predictions file)")
    p.add_argument("--ckpt", help="model folder or workdir; without it, --preds is scored as is")
    p.add_argument("--adapter", help="LoRA adapter merged into --ckpt (a LoRA training workdir or a peft folder)")
    p.add_argument("--data", required=True, help="ScienceQA release: problems.json, pid_splits.json, <split>/<pid>/image.png")
    p.add_argument("--split", default="test")
    p.add_argument("--out", default="scienceqa_preds.jsonl", help="predictions JSONL to write (with --ckpt)")
    p.add_argument("--preds", help="score this predictions JSONL ({question_id, text}) instead of running a model")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--single-pred-prompt", action="store_true", help="append the 'answer with the letter' line (v1.5)")
    p.add_argument("--prompt-format", default="CQM", choices=["CQM", "QCM"])
    p.add_argument("--template", default=None, help="conversation template (default: the checkpoint's)")
    p.add_argument("--limit", type=int, default=None, help="only the first N problems of the split")
    p.add_argument("--llava-json", default=None, help="also write the split in the LLaVA format to this file")
    p.add_argument("--no-progress", action="store_true")


def run_cli(args) -> int:
    problems, splits = load_release(args.data)
    if args.split not in splits:
        raise KeyError(f"{args.data}/pid_splits.json has no split {args.split!r}; found {sorted(splits)}")
    pids = [pid for pid in splits[args.split]][: args.limit]
    missing = [pid for pid in pids if pid not in problems]
    if missing:
        raise KeyError(f"{args.data}/problems.json lacks problems {missing[:5]} of split {args.split!r}")
    if args.llava_json:
        with open(args.llava_json, "w") as f:
            json.dump(to_llava_records(problems, pids, args.prompt_format), f, indent=1)
    if args.preds:
        with open(args.preds) as f:
            predictions = {str(r["question_id"]): r["text"] for r in map(json.loads, filter(str.strip, f))}
    elif args.ckpt:
        predictions = predict(args, problems, pids)
    else:
        print("eval scienceqa: give --ckpt (answer with a model) or --preds (score a file)", file=sys.stderr)
        return 2
    print(format_report(score(problems, pids, predictions)))
    return 0


def predict(args, problems: dict, pids) -> dict:
    from .answering import answer_all, load_chat_model

    chat = load_chat_model(args.ckpt, template=args.template, adapter=args.adapter)
    prompts = [model_prompt(problems[pid], args.prompt_format, args.single_pred_prompt) for pid in pids]
    images = [image_path(args.data, args.split, pid, problems[pid]) for pid in pids]
    replies = answer_all(chat, prompts, images, batch_size=args.batch_size, progress=not args.no_progress,
                         desc="scienceqa", max_new_tokens=args.max_new_tokens)
    with open(args.out, "w") as f:
        for pid, prompt, image, reply in zip(pids, prompts, images, replies):
            p = problems[pid]
            pred = parse_prediction(reply)
            f.write(json.dumps({"question_id": pid, "prompt": ("<image>\n" if image else "") + prompt,
                                "text": reply, "pred": pred, "answer": OPTIONS[p["answer"]],
                                "correct": pred in OPTIONS and OPTIONS.index(pred) == p["answer"],
                                "has_image": image is not None}) + "\n")
    return dict(zip(pids, replies))
