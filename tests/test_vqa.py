"""VQAv2 normalization and accuracy (the official rules), and POPE metrics."""
from __future__ import annotations

import json

import pytest

from llava_jax.eval import cli as eval_cli
from llava_jax.eval.vqa import evaluate_pope, evaluate_vqa, normalize_answer, pope_metrics, vqa_accuracy


@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"), ("none", "0"), ("The cat", "cat"), ("an apple", "apple"), ("dont", "don't"),
    ("isnt it", "isn't it"), ("yes.", "yes"), ("3.5", "3.5"), ("1,000", "1000"), ("red,white", "red white"),
    ("hot-dog", "hot dog"), ("hot - dog", "hot dog"), ("a.m.", "am"), ("  Yes\n", "yes"),
    ("its", "its"), ("well", "well"), ("couldntve", "couldn't've"), ("(left)", "left"),
    ("10:30", "10:30"), ("ten", "10"),
])
def test_normalization_examples(raw, expected):
    assert normalize_answer(raw) == expected


def test_accuracy_is_averaged_over_leave_one_out_subsets():
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0
    assert vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)  # 0.9
    assert vqa_accuracy("2", ["2"] + ["3"] * 9) == pytest.approx(9 * (1 / 3) / 10)  # 0.3
    assert vqa_accuracy("3", ["2"] * 2 + ["3"] * 8) == 1.0
    assert vqa_accuracy("dog", ["cat"] * 10) == 0.0
    # ground truth is punctuation-processed only when annotators disagree (official behaviour)
    assert vqa_accuracy("red;blue", ["red;blue"] * 10) == 0.0
    assert vqa_accuracy("red;blue", ["red;blue"] * 9 + ["no"]) == 1.0
    assert vqa_accuracy("yes", ["yes!"] * 9 + ["no"]) == 0.0  # "yes!" -> "yes " (not stripped), as officially


def test_evaluate_files_and_cli(tmp_path, capsys):
    ann = {"annotations": [
        {"question_id": 1, "answer_type": "number", "answers": [{"answer": "2", "answer_id": i} for i in range(10)]},
        {"question_id": 2, "answer_type": "yes/no", "answers": [{"answer": a} for a in ["yes"] * 4 + ["no"] * 6]},
        {"question_id": 3, "answer_type": "other", "answers": [{"answer": "red"}] * 10},
    ]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    preds = [{"question_id": 1, "text": "Two."}, {"question_id": 2, "text": "Yes"}, {"question_id": 3, "text": "blue"},
             {"question_id": 99, "text": "x"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    result = evaluate_vqa(tmp_path / "p.jsonl", tmp_path / "ann.json")
    assert result["per_answer_type"] == {"number": 100.0, "other": 0.0, "yes/no": 100.0}
    assert result["accuracy"] == round(100 * (1 + 1 + 0) / 3, 2) and result["unmatched_predictions"] == 1
    assert eval_cli.main(["vqa", "--preds", str(tmp_path / "p.jsonl"), "--annotations", str(tmp_path / "ann.json")]) == 0
    assert "66.67" in capsys.readouterr().out


def test_pope_metrics_and_cli(tmp_path, capsys):
    texts = ["Yes, there is.", "No, there is not.", "There is no dog. Yes.", "yes", "I think not"]
    labels = ["yes", "no", "yes", "no", "no"]
    m = pope_metrics(texts, labels)
    assert (m["tp"], m["tn"], m["fp"], m["fn"]) == (1, 2, 1, 1)
    assert m["accuracy"] == 0.6 and m["precision"] == 0.5 and m["recall"] == 0.5 and m["f1"] == 0.5
    assert m["yes_ratio"] == 0.4
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"question_id": i, "text": t}) + "\n"
                                              for i, t in reversed(list(enumerate(texts)))))
    (tmp_path / "labels.jsonl").write_text("".join(json.dumps({"question_id": i, "label": lab}) + "\n"
                                                   for i, lab in enumerate(labels)))
    assert evaluate_pope(tmp_path / "p.jsonl", tmp_path / "labels.jsonl") == m  # joined by question id
    assert eval_cli.main(["vqa", "--pope", "--preds", str(tmp_path / "p.jsonl"),
                          "--annotations", str(tmp_path / "labels.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "F1" in out and "yes-ratio" in out
