"""LLaVA-Bench: judge prompt, score parsing, the reference's summary arithmetic, end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from llava_jax.eval import cli as eval_cli
from llava_jax.eval.llava_bench import context_text, judge_messages, parse_scores, summarize
from llava_jax.testing.fault_server import FaultServer


@pytest.mark.parametrize("review, scores", [
    ("8 6", (8.0, 6.0)), ("8 6\nAssistant 1 is better.", (8.0, 6.0)), ("8,6\n", (8.0, 6.0)),
    ("7.5 9", (7.5, 9.0)), ("8, 6", (-1.0, -1.0)),  # comma -> space gives a double space: 3 parts
    ("Scores: 8 6", (-1.0, -1.0)), ("8", (-1.0, -1.0)), ("", (-1.0, -1.0)), ("eight six", (-1.0, -1.0)),
    ("\n8 6", (-1.0, -1.0)), ("8/10 6/10", (-1.0, -1.0)), ("8  6", (-1.0, -1.0)),
])
def test_parse_scores(review, scores):
    assert parse_scores(review) == scores


def test_summary_arithmetic_matches_the_reference():
    reviews = [{"category": "conv", "scores": (8, 6)}, {"category": "conv", "scores": (6, 6)},
               {"category": "detail", "scores": (9, 3)}, {"category": "complex", "scores": (-1, -1)}]
    s = summarize(reviews)
    assert s["conv"] == {"relative": round(6 / 7 * 100, 1), "reference": 70.0, "model": 60.0, "count": 2,
                         "unparsable": 0}
    assert s["detail"]["relative"] == round(3 / 9 * 100, 1) == 33.3
    assert s["complex"]["relative"] == 100.0 and s["complex"]["unparsable"] == 1  # -1/-1, as the reference
    # overall: means over all four, each rounded to 3 decimals before dividing
    ref, model = round((8 + 6 + 9 - 1) / 4, 3), round((6 + 6 + 3 - 1) / 4, 3)
    assert s["all"]["relative"] == round(model / ref * 100, 1) and s["all"]["reference"] == round(ref * 10, 1)


def test_judge_prompt_has_context_boxes_and_both_answers():
    coco = {"image": "x.jpg", "captions": ["A dog.", "A brown dog."],
            "instances": [{"category": "dog", "bbox": [0.1, 0.2, 0.5, 0.9]}]}
    assert context_text(coco) == "A dog.\nA brown dog.\n\ndog: [0.1, 0.2, 0.5, 0.9]"
    assert context_text({"image": "y.jpg", "caption": "A street."}) == "A street."
    msgs = judge_messages("What is it?", "A dog.", "REF ANSWER", "MODEL ANSWER", "detail")
    user = msgs[1]["content"]
    assert user.index("REF ANSWER") < user.index("MODEL ANSWER") and "A dog." in user and "What is it?" in user
    assert "first line" in user


def write_bench(root):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    (root / "images").mkdir()
    for name in ("001.jpg", "002.jpg"):
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(root / "images" / name)
    questions = [{"question_id": 0, "image": "001.jpg", "text": "What is shown?", "category": "conv"},
                 {"question_id": 1, "image": "001.jpg", "text": "Describe the picture in detail.", "category": "detail"},
                 {"question_id": 2, "image": "002.jpg", "text": "Why is it there?", "category": "complex"}]
    lines = lambda rs: "".join(json.dumps(r) + "\n" for r in rs)  # noqa: E731
    (root / "questions.jsonl").write_text(lines(questions))
    (root / "context.jsonl").write_text(lines([{"id": 1, "image": "001.jpg", "caption": "Red squares."},
                                               {"id": 2, "image": "002.jpg", "captions": ["A blue circle."],
                                                "instances": [{"category": "circle", "bbox": [0.1, 0.1, 0.4, 0.4]}]}]))
    (root / "answers_ref.jsonl").write_text(lines([{"question_id": i, "text": f"reference answer {i}"} for i in range(3)]))
    return root


def bench_args(root, base_url, out_dir):
    return ["llava-bench", "--questions", str(root / "questions.jsonl"), "--context", str(root / "context.jsonl"),
            "--answers-ref", str(root / "answers_ref.jsonl"), "--images", str(root / "images"),
            "--judge-base-url", base_url, "--judge-model", "judge", "--out-dir", str(out_dir), "--no-progress"]


def test_end_to_end_model_answers_fixed_judge_scores(tmp_path, capsys, tiny_ckpt):  # noqa: F811
    root = write_bench(tmp_path / "bench")
    replies = {"What is shown?": "8 6\nfine", "Describe the picture in detail.": "10,5\nok",
               "Why is it there?": "The first answer is better."}

    def judge(messages):
        user = messages[-1]["content"]
        question = user.split("[Question]\n", 1)[1].split("\n", 1)[0]
        assert "reference answer" in user and "[Assistant 2]" in user
        return replies[question]

    with FaultServer(judge, ["500"]) as srv:  # the judge client retries a server error too
        rc = eval_cli.main(bench_args(root, srv.base_url, tmp_path / "out") +
                           ["--ckpt", tiny_ckpt, "--batch-size", "4", "--max-new-tokens", "4"])
        assert rc == 0 and len(srv.log) == 4
        complex_prompt = next(m for _, _, m in srv.log if "Why is it there?" in m[-1]["content"])[-1]["content"]
        assert "circle: [0.1, 0.1, 0.4, 0.4]" in complex_prompt  # COCO-style boxes reach the judge
    answers = [json.loads(x) for x in (tmp_path / "out" / "llava_bench_answers.jsonl").read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [0, 1, 2] and all(isinstance(a["text"], str) for a in answers)
    reviews = [json.loads(x) for x in (tmp_path / "out" / "llava_bench_reviews.jsonl").read_text().splitlines()]
    assert [r["scores"] for r in reviews] == [[8.0, 6.0], [10.0, 5.0], [-1.0, -1.0]]
    out = capsys.readouterr().out
    ref, model = round(17 / 3, 3), round(10 / 3, 3)
    assert "conv           75.0      80.0   60.0" in out and "detail         50.0     100.0   50.0" in out
    assert f"all        {round(model / ref * 100, 1):>8} {round(ref * 10, 1):>9} {round(model * 10, 1):>6}" in out


def test_end_to_end_with_our_server_as_the_judge(tmp_path, capsys, tiny_server):  # noqa: F811
    root = write_bench(tmp_path / "bench")
    base_url, model_id = tiny_server
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"question_id": i, "text": f"model answer {i}"}) + "\n" for i in range(3)))
    args = bench_args(root, base_url, tmp_path / "out")
    args[args.index("--judge-model") + 1] = model_id
    rc = eval_cli.main(args + ["--model-answers", str(answers), "--judge-max-tokens", "6",
                               "--judge-temperature", "0"])
    assert rc == 0
    reviews = [json.loads(x) for x in (tmp_path / "out" / "llava_bench_reviews.jsonl").read_text().splitlines()]
    assert len(reviews) == 3
    for r in reviews:  # a random tiny model cannot produce a score line
        assert tuple(r["scores"]) == parse_scores(r["review"])
    captured = capsys.readouterr()
    s = summarize(reviews)
    assert s["all"]["count"] == 3 and f"{s['all']['unparsable']:>10}" in captured.out.splitlines()[-1]
    if s["all"]["unparsable"]:
        assert "counted as (-1, -1)" in captured.err
