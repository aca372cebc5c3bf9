"""VQAv2-style accuracy with the standard answer normalization, and POPE metrics.

Normalization follows the official VQA evaluation: punctuation handling, number words -> digits,
articles dropped, apostrophe-less contractions restored, then
    acc(answer) = mean over the 10 leave-one-out subsets of 9 human answers of min(#matches / 3, 1).
"""
from __future__ import annotations

import itertools
import json
import re
from collections import defaultdict
from pathlib import Path

_CANONICAL_CONTRACTIONS = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't
he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've
mustn't must've needn't not've o'clock oughtn't shan't she'd've should've shouldn't shouldn't've
somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's
something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've
they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's
where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've
wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()

# Forms whose apostrophe-less spelling is an ordinary word stay as they are ("its", "well", "shed",
# "were", ...); they are simply not in the list above. Contractions of "I" are absent too: the text
# is lowercased before lookup, and the official table keys them with a capital I, so they never fire.


def _contraction_table() -> dict[str, str]:
    table = {}
    for canonical in _CANONICAL_CONTRACTIONS:
        positions = [i for i, ch in enumerate(canonical) if ch == "'"]
        for r in range(1, len(positions) + 1):
            for dropped in itertools.combinations(positions, r):
                variant = "".join(ch for i, ch in enumerate(canonical) if i not in dropped)
                table.setdefault(variant, canonical)
    return table


CONTRACTIONS = _contraction_table()
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!"]
# A period not followed by a digit ("5." -> "5", "3.5" stays). The official code passes re.UNICODE
# (= 32) where `count` goes, so at most 32 periods are removed; we keep that for identical scores.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        # glued punctuation ("yes,no") becomes a space; spaced or digit-grouping punctuation vanishes
        if (p + " " in text or " " + p in text) or _COMMA_BETWEEN_DIGITS.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=32)


def process_digits_articles(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """A model's answer, normalized as the official evaluation does."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digits_articles(process_punctuation(text))


def vqa_accuracy(prediction: str, human_answers: list[str]) -> float:
    """Official per-question accuracy in [0, 1] (human answers are the 10 raw annotations)."""
    pred = normalize_answer(prediction)
    answers = list(human_answers)
    if len(set(answers)) > 1:  # the official code touches ground truth only when annotators disagree
        answers = [process_punctuation(a) for a in answers]
    scores = []
    for i in range(len(answers)):
        others = answers[:i] + answers[i + 1:]
        scores.append(min(1.0, sum(a == pred for a in others) / 3))
    return sum(scores) / len(scores)


def _read_records(path) -> list[dict]:
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    return data["annotations"] if isinstance(data, dict) and "annotations" in data else data


def _prediction_text(record: dict, where: str) -> str:
    for key in ("text", "answer"):
        if key in record:
            return record[key]
    raise KeyError(f"{where}: prediction has neither 'text' nor 'answer': {record!r:.200}")


def evaluate_vqa(preds_path, annotations_path) -> dict:
    """Overall and per-answer-type accuracy (percent, 2 decimals) over the annotated questions predicted."""
    annotations = {}
    for i, a in enumerate(_read_records(annotations_path)):
        if "question_id" not in a or "answers" not in a:
            raise KeyError(f"{annotations_path} record {i}: expected 'question_id' and 'answers'")
        answers = [x["answer"] if isinstance(x, dict) else x for x in a["answers"]]
        annotations[a["question_id"]] = (answers, a.get("answer_type", "all"))
    per_type, scores, missing = defaultdict(list), [], 0
    for i, p in enumerate(_read_records(preds_path)):
        qid = p.get("question_id")
        if qid not in annotations:
            missing += 1
            continue
        answers, answer_type = annotations[qid]
        acc = vqa_accuracy(_prediction_text(p, f"{preds_path} line {i + 1}"), answers)
        scores.append(acc)
        per_type[answer_type].append(acc)
    if not scores:
        raise ValueError(f"no prediction in {preds_path} matches a question_id of {annotations_path}")
    result = {"accuracy": round(100 * sum(scores) / len(scores), 2), "num_questions": len(scores),
              "unmatched_predictions": missing,
              "per_answer_type": {t: round(100 * sum(v) / len(v), 2) for t, v in sorted(per_type.items())}}
    return result


def pope_yes_no(text: str) -> str:
    """The reference's reading of a POPE reply: first sentence, commas dropped; 'no' if it says no."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(predictions: list[str], labels: list[str]) -> dict:
    if len(predictions) != len(labels) or not labels:
        raise ValueError(f"POPE needs one prediction per label; got {len(predictions)} and {len(labels)}")
    pred = [pope_yes_no(p) == "yes" for p in predictions]
    gold = [str(label).strip().lower() != "no" for label in labels]
    tp = sum(p and g for p, g in zip(pred, gold))
    tn = sum(not p and not g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    fn = sum(not p and g for p, g in zip(pred, gold))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / len(gold), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(pred) / len(pred), "tp": tp, "tn": tn, "fp": fp, "fn": fn}


def evaluate_pope(preds_path, labels_path) -> dict:
    """Predictions and POPE label records joined by question_id."""
    labels = {}
    for i, r in enumerate(_read_records(labels_path)):
        if "question_id" not in r or "label" not in r:
            raise KeyError(f"{labels_path} record {i}: expected 'question_id' and 'label'")
        labels[r["question_id"]] = r["label"]
    preds, gold = [], []
    for i, p in enumerate(_read_records(preds_path)):
        if p.get("question_id") not in labels:
            raise KeyError(f"{preds_path} line {i + 1}: question_id {p.get('question_id')!r} not in {labels_path}")
        preds.append(_prediction_text(p, f"{preds_path} line {i + 1}"))
        gold.append(labels[p["question_id"]])
    return pope_metrics(preds, gold)
