"""ScienceQA: prompt format, the reference's answer parsing and scoring, an end-to-end run."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from llava_jax.eval import cli as eval_cli
from llava_jax.eval.scienceqa import (SINGLE_PRED_PROMPT, parse_prediction, question_text, score,
                                      to_llava_records)


PROBLEMS = {
    "10": {"question": "Which animal is  shown?", "choices": ["cat", "dog"], "answer": 1, "hint": "",
           "image": "image.png", "subject": "natural science", "split": "test"},
    "11": {"question": "Which word is a noun?", "choices": ["run", "table", "quickly"], "answer": 1,
           "hint": "Pick one.", "image": None, "subject": "language science", "split": "test"},
    "12": {"question": "Which is a state?", "choices": ["Ohio", "Paris", "Nile", "Alps"], "answer": 0,
           "hint": "Look at the map.", "image": "image.png", "subject": "social science", "split": "test"},
    "13": {"question": "Which is hot?", "choices": ["ice", "fire"], "answer": 1, "hint": "", "image": None,
           "subject": "natural science", "split": "test"},
    "20": {"question": "Unused", "choices": ["a", "b"], "answer": 0, "hint": "", "image": None,
           "subject": "natural science", "split": "train"},
}


def write_release(root):
    root.mkdir(parents=True, exist_ok=True)
    (root / "problems.json").write_text(json.dumps(PROBLEMS))
    (root / "pid_splits.json").write_text(json.dumps({"test": ["10", "11", "12", "13"], "train": ["20"]}))
    rng = np.random.default_rng(0)
    for pid in ("10", "12"):
        (root / "test" / pid).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(root / "test" / pid / "image.png")
    return root


@pytest.mark.parametrize("reply, letter", [
    ("B", "B"), ("A", "A"), ("F", "FAILED"), ("b", "FAILED"), ("B. dog", "B"), ("B.dog", "FAILED"),
    ("The answer is C.", "C"), ("I think. The answer is A, clearly", "A"),
    ("The answer is A. The answer is B.", "FAILED"), ("", "FAILED"), ("dog", "FAILED"), (" B", "FAILED"),
    ("The answer is (B).", "FAILED"),
])
def test_parse_prediction(reply, letter):
    assert parse_prediction(reply) == letter


def test_prompt_format_and_llava_records():
    assert question_text(PROBLEMS["10"]) == "Context: N/A\nQuestion: Which animal is shown?\nOptions: (A) cat (B) dog"
    assert question_text(PROBLEMS["11"], "QCM") == ("Which word is a noun?\nContext: Pick one.\n"
                                                   "Options: (A) run (B) table (C) quickly")
    records = to_llava_records(PROBLEMS, ["10", "11"])
    assert records[0]["image"] == "10/image.png" and records[0]["conversations"][0]["value"].endswith("\n<image>")
    assert "image" not in records[1] and records[1]["conversations"][1]["value"] == "B"


def test_score_counts_failed_and_out_of_range_as_wrong():
    preds = {"10": "B", "11": "The answer is B.", "12": "E"}  # 12: E is not an option of a 4-choice problem
    r = score(PROBLEMS, ["10", "11", "12", "13"], preds)  # 13: missing -> FAILED
    assert (r["total"], r["correct"], r["accuracy"]) == (4, 2, 50.0)
    assert (r["img_total"], r["img_accuracy"]) == (2, 50.0)
    assert r["per_subject"] == {"language science": 100.0, "natural science": 50.0, "social science": 0.0}


def test_end_to_end_with_a_tiny_checkpoint(tmp_path, capsys, tiny_ckpt):  # noqa: F811
    data = write_release(tmp_path / "sqa")
    ckpt = tiny_ckpt
    out = tmp_path / "preds.jsonl"
    rc = eval_cli.main(["scienceqa", "--ckpt", ckpt, "--data", str(data), "--out", str(out), "--batch-size", "4",
                        "--max-new-tokens", "4", "--single-pred-prompt", "--no-progress",
                        "--llava-json", str(tmp_path / "llava_test.json")])
    assert rc == 0
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["question_id"] for p in preds] == ["10", "11", "12", "13"]
    assert preds[0]["prompt"] == ("<image>\nContext: N/A\nQuestion: Which animal is shown?\n"
                                  "Options: (A) cat (B) dog\n" + SINGLE_PRED_PROMPT)
    assert [p["has_image"] for p in preds] == [True, False, True, False]
    assert all(isinstance(p["text"], str) for p in preds)
    expected = score(PROBLEMS, ["10", "11", "12", "13"], {p["question_id"]: p["text"] for p in preds})
    report = capsys.readouterr().out
    assert f"Accuracy: {expected['accuracy']:.2f}%, IMG-Accuracy: {expected['img_accuracy']:.2f}%" in report
    assert len(json.loads((tmp_path / "llava_test.json").read_text())) == 4

    # scoring a predictions file alone
    preds_file = tmp_path / "given.jsonl"
    preds_file.write_text("".join(json.dumps({"question_id": q, "text": t}) + "\n"
                                  for q, t in [("10", "B"), ("11", "A. run"), ("12", "A"), ("13", "The answer is B.")]))
    assert eval_cli.main(["scienceqa", "--data", str(data), "--preds", str(preds_file)]) == 0
    assert "Accuracy: 75.00%, IMG-Accuracy: 100.00%" in capsys.readouterr().out
