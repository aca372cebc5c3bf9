"""LLaVA-Bench: answer the questions with a checkpoint, have a judge LLM score them against reference
answers, summarize like the reference (relative score = mean(model) / mean(reference) * 100).

The judge sees the image's captions (and, for the COCO variant, its object boxes), the question,
the reference answer as "Assistant 1" and ours as "Assistant 2", and must put the two 1-10 scores on
its first line. A first line that is not exactly two numbers gives (-1, -1), which - as in the
reference - still enters the means; the summary reports how many there were.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

CATEGORIES = ("conv", "detail", "complex")

JUDGE_SYSTEM = "You are a strict and fair reviewer who grades answers to questions about images."

_FOCUS = {
    "conv": "a short conversational answer: it should answer exactly what was asked, correctly",
    "detail": "a detailed description: it should be complete and accurate, covering the important "
              "content without inventing objects or details",
    "complex": "a reasoning answer: its reasoning should be sound, grounded in the scene, and reach a "
               "sensible conclusion",
}


def judge_rules(category: str) -> str:
    focus = _FOCUS.get(category, _FOCUS["conv"])
    return (
        "Two AI assistants answered the question above about an image that neither you nor they can "
        "see here; the context describes the image for you. The question calls for " + focus + ".\n"
        "Grade each answer for helpfulness, relevance, accuracy with respect to the context, and an "
        "appropriate level of detail, with an integer from 1 (useless) to 10 (excellent).\n"
        "Your first line must contain only the two grades, Assistant 1's then Assistant 2's, separated "
        "by a single space (for example: 7 5). From the second line on, explain your grades briefly. "
        "Judge the content, not the length, and do not let the order of the answers sway you."
    )


def context_text(record: dict) -> str:
    """Captions (a string or a list), plus object boxes when the record has 'instances' (COCO)."""
    captions = record.get("captions", record.get("caption", ""))
    text = "\n".join(captions) if isinstance(captions, list) else str(captions)
    instances = record.get("instances")
    if instances:
        text += "\n\n" + "\n".join(f"{inst['category']}: {inst['bbox']}" for inst in instances)
    return text


def judge_messages(question: str, context: str, reference_answer: str, model_answer: str, category: str):
    content = (f"[Image context]\n{context}\n\n[Question]\n{question}\n\n"
               f"[Assistant 1]\n{reference_answer}\n[End of Assistant 1]\n\n"
               f"[Assistant 2]\n{model_answer}\n[End of Assistant 2]\n\n"
               f"[Instructions]\n{judge_rules(category)}\n")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": content}]


def parse_scores(review: str) -> tuple[float, float]:
    """The reference's rule: the first line, commas as spaces, split on single spaces, exactly two
    numbers -> (reference, model); anything else -> (-1, -1)."""
    try:
        parts = review.split("\n")[0].replace(",", " ").split(" ")
        if len(parts) == 2:
            return float(parts[0]), float(parts[1])
    except ValueError:
        pass
    return -1.0, -1.0


def summarize(reviews: list[dict]) -> dict:
    """reviews: {"category", "scores": (reference, model)} -> per category and "all":
    {relative, reference, model, count, unparsable}; means rounded to 3 decimals first as the reference."""
    groups = defaultdict(list)
    for r in reviews:
        groups[r["category"]].append(tuple(r["scores"]))
        groups["all"].append(tuple(r["scores"]))
    out = {}
    for name, pairs in groups.items():
        ref = round(sum(p[0] for p in pairs) / len(pairs), 3)
        model = round(sum(p[1] for p in pairs) / len(pairs), 3)
        out[name] = {"relative": round(model / ref * 100, 1) if ref else float("nan"),
                     "reference": round(ref * 10, 1), "model": round(model * 10, 1), "count": len(pairs),
                     "unparsable": sum(p == (-1.0, -1.0) for p in pairs)}
    return out


def format_summary(summary: dict) -> str:
    lines = [f"{'category':<10} {'relative':>8} {'reference':>9} {'model':>6} {'n':>4} {'unparsable':>10}"]
    for name in [c for c in CATEGORIES if c in summary] + sorted(set(summary) - set(CATEGORIES) - {"all"}) + ["all"]:
        if name in summary:
            s = summary[name]
            lines.append(f"{name:<10} {s['relative']:>8} {s['reference']:>9} {s['model']:>6} {s['count']:>4} "
                         f"{s['unparsable']:>10}")
    return "\n".join(lines)


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _by_question_id(records, path) -> dict:
    out = {}
    for i, r in enumerate(records):
        if "question_id" not in r:
            raise KeyError(f"{path} line {i + 1}: no 'question_id'")
        out[r["question_id"]] = r
    return out


def judge_all(questions, contexts: dict, references: dict, answers: dict, client, concurrency: int = 4):
    """One review per question: {"question_id", "category", "review", "scores"}."""

    def one(q):
        context = contexts.get(q["image"])
        if context is None:
            raise KeyError(f"no context record for image {q['image']!r} (question {q['question_id']})")
        messages = judge_messages(q["text"], context_text(context), references[q["question_id"]]["text"],
                                  answers[q["question_id"]]["text"], q["category"])
        reply = client(messages)
        text = reply if isinstance(reply, str) else reply.text
        return {"question_id": q["question_id"], "category": q["category"], "review": text,
                "scores": list(parse_scores(text))}

    with cf.ThreadPoolExecutor(max(1, concurrency)) as pool:
        return list(pool.map(one, questions))


# --- CLI -----------------------------------------------------------------------------------------

def add_parser(sub):
    p = sub.add_parser("llava-bench", help="LLaVA-Bench: answer, judge with an LLM, relative scores")
    p.add_argument("--ckpt", help="model folder or workdir (or give --model-answers)")
    p.add_argument("--adapter", help="LoRA adapter merged into --ckpt (a LoRA training workdir or a peft folder)")
    p.add_argument("--model-answers", help="JSONL {question_id, text} to judge instead of running --ckpt")
    p.add_argument("--questions", required=True, help="questions.jsonl {question_id, image, text, category}")
    p.add_argument("--context", required=True, help="context JSONL {image, caption(s)[, instances]}")
    p.add_argument("--answers-ref", required=True, help="reference answers JSONL {question_id, text}")
    p.add_argument("--images", help="image folder (with --ckpt)")
    p.add_argument("--judge-base-url", required=True, help="OpenAI-compatible base URL including /v1")
    p.add_argument("--judge-model", required=True)
    p.add_argument("--api-key-env", default="OPENAI_API_KEY")
    p.add_argument("--judge-concurrency", type=int, default=4)
    p.add_argument("--judge-max-tokens", type=int, default=1024)
    p.add_argument("--judge-temperature", type=float, default=0.2)
    p.add_argument("--judge-timeout", type=float, default=120.0)
    p.add_argument("--out-dir", default=".", help="writes llava_bench_answers.jsonl and llava_bench_reviews.jsonl")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--template", default=None)
    p.add_argument("--no-progress", action="store_true")


def run_cli(args) -> int:
    from llava_jax.datagen.client import ChatClient

    questions = read_jsonl(args.questions)
    for i, q in enumerate(questions):
        missing = [k for k in ("question_id", "image", "text", "category") if k not in q]
        if missing:
            raise KeyError(f"{args.questions} line {i + 1}: missing {missing}")
    contexts = {c["image"]: c for c in read_jsonl(args.context)}
    references = _by_question_id(read_jsonl(args.answers_ref), args.answers_ref)
    absent = [q["question_id"] for q in questions if q["question_id"] not in references]
    if absent:
        raise KeyError(f"{args.answers_ref}: no reference answer for question(s) {absent[:5]}")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    if args.model_answers:
        answers = _by_question_id(read_jsonl(args.model_answers), args.model_answers)
    elif args.ckpt:
        if not args.images:
            print("eval llava-bench: --ckpt needs --images", file=sys.stderr)
            return 2
        answers = answer_questions(args, questions)
        with open(out_dir / "llava_bench_answers.jsonl", "w") as f:
            for q in questions:
                f.write(json.dumps(answers[q["question_id"]]) + "\n")
    else:
        print("eval llava-bench: give --ckpt (answer with a model) or --model-answers", file=sys.stderr)
        return 2

    client = ChatClient(args.judge_base_url, args.judge_model, os.environ.get(args.api_key_env),
                        timeout=args.judge_timeout, temperature=args.judge_temperature,
                        max_tokens=args.judge_max_tokens)
    reviews = judge_all(questions, contexts, references, answers, client, args.judge_concurrency)
    with open(out_dir / "llava_bench_reviews.jsonl", "w") as f:
        for r in reviews:
            f.write(json.dumps(r) + "\n")
    summary = summarize(reviews)
    print(format_summary(summary))
    if summary["all"]["unparsable"]:
        print(f"warning: {summary['all']['unparsable']} judge replies had no score line; counted as (-1, -1)",
              file=sys.stderr)
    return 0


def answer_questions(args, questions) -> dict:
    from .answering import answer_all, load_chat_model

    chat = load_chat_model(args.ckpt, template=args.template, adapter=args.adapter)
    images = [Path(args.images) / q["image"] for q in questions]
    for q, path in zip(questions, images):
        if not path.is_file():
            raise FileNotFoundError(f"question {q['question_id']}: image {path} not found")
    replies = answer_all(chat, [q["text"] for q in questions], images, batch_size=args.batch_size,
                         progress=not args.no_progress, desc="llava-bench", max_new_tokens=args.max_new_tokens)
    return {q["question_id"]: {"question_id": q["question_id"], "prompt": q["text"], "text": reply,
                               "category": q["category"]} for q, reply in zip(questions, replies)}
