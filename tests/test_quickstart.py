"""The quickstart: its data path, the default recipe reading the image (counting) and answering through
chat, and the accuracy target of issue #6 (slow, expected to fail until it is met)."""
import json
import os
import subprocess
import sys

import pytest

from llava_jax.data import synthetic as S
from llava_jax.datagen import instruct, prompts
from llava_jax.datagen.context import load_coco_contexts
from llava_jax.quickstart import instructions


def _generated(tmp_path, scenes):
    instances, captions = S.write_world(str(tmp_path / "world"), scenes)
    contexts = load_coco_contexts(instances, captions)
    out = tmp_path / "instruct.json"
    summary = instruct.generate(contexts, prompts.KINDS, instructions.world_backend, out, concurrency=1,
                                progress=False)
    assert summary.unparsable == 0 and summary.request_failures == 0
    return json.load(open(out))


def test_world_backend_records_agree_with_the_scenes(tmp_path):
    scenes = S.make_scenes(seed=1, count=12)
    records = _generated(tmp_path, scenes)
    assert len(records) == 3 * len(scenes)
    by_file = {s.file_name: s for s in scenes}
    kinds = set()
    for record in records:
        scene = by_file[record["image"]]
        kind = record["id"].rsplit("_", 1)[1]
        kinds.add(kind)
        turns = record["conversations"]
        assert turns[0]["value"].startswith("<image>\n")
        answers = " ".join(t["value"] for t in turns[1::2])
        # Every object the replies name exists in the scene, with the colour the scene gives it.
        assert S.mentioned_objects(answers) <= {(o.color, o.shape) for o in scene.objects}, record
        for q, a in zip(turns[0::2], turns[1::2]):
            q = q["value"].replace("<image>\n", "")
            if q.startswith("What color is the ") and "background" not in q:
                shape = q[len("What color is the "):-1]
                assert a["value"] == f"The {shape} is {scene.object_by(shape=shape).color}."
            if q.startswith("Where is the "):
                (color, shape), = S.mentioned_objects(q)
                assert scene.object_by(color=color, shape=shape).position in a["value"]
            if q == "What color is the background?":
                assert scene.background in a["value"]
        if kind == "detail":
            assert S.mentioned_objects(answers) == {(o.color, o.shape) for o in scene.objects}
            for obj in scene.objects:
                assert f"In the {obj.position} there is {S._a(obj.size + ' ' + obj.name)}." in answers
    assert kinds == set(prompts.KINDS)


def test_vqa_and_text_records_hold_the_annotated_answers():
    scene = S.make_scene(2, 7)
    truth = {(q.question, q.answer) for q in S.questions(scene)}
    turns = instructions.vqa_record(scene)["conversations"]
    for q, a in zip(turns[0::2], turns[1::2]):
        question = q["value"].replace("<image>\n", "").replace("\n" + S.SHORT_ANSWER_SUFFIX, "")
        assert (question, a["value"]) in truth
    read, write = instructions.text_records(scene)
    passage = read["conversations"][0]["value"]
    assert S.mentioned_objects(passage) == {(o.color, o.shape) for o in scene.objects}
    assert write["conversations"][1]["value"] in S.captions(scene)


@pytest.mark.slow
@pytest.mark.xfail(reason="issue #6: within the quickstart's step budget the model learns counting but not yet "
                          "the colour/shape/position questions, which need question-to-image binding", strict=False)
def test_fast_quickstart_learns_and_chat_answers(tmp_path):
    from llava_jax.quickstart import main

    out = tmp_path / "qs"
    assert main(["--fast", "--quiet", "--no-ablation", "--out", str(out)]) == 0
    report = json.load(open(out / "report.json"))
    assert report["accuracy"] >= report["chance_accuracy"] + 0.3, report["accuracy_by_type"]
    assert (out / "report.md").exists() and (out / "report.png").exists()

    # The checkpoint answers through the chat command, about a held-out image.
    scene = next(s for s in S.make_scenes(0, 40, "eval") if len(s.objects) >= 2)
    obj = scene.objects[0]
    image = out / "world" / "eval" / scene.file_name
    cmd = [sys.executable, "-m", "llava_jax.cli", "chat", "--ckpt", str(out / "stage2"), "--image", str(image),
           "--prompt", f"What color is the {obj.shape}?\n{S.SHORT_ANSWER_SUFFIX}", "--max-new-tokens", "8"]
    reply = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert reply.returncode == 0, reply.stderr[-2000:]
    assert S.grade("color", reply.stdout, obj.color), reply.stdout


def test_quickstart_reads_the_image_and_chat_answers(tmp_path):
    """The default-size recipe without the ablation (~4.5 min on 2 cores): the part of the task it
    learns today, counting, must stay well above chance (it can only come from the image), and the
    stage-2 checkpoint must answer through `llava-jax chat`. The 0.80 target over all question types
    is the slow test above (issue #6)."""
    from llava_jax.quickstart import main

    out = tmp_path / "qs"
    assert main(["--quiet", "--no-ablation", "--out", str(out)]) == 0
    report = json.load(open(out / "report.json"))
    assert set(report) >= {"accuracy", "accuracy_by_type", "accuracy_without_stage1", "chance_accuracy", "minutes"}
    assert report["accuracy_by_type"]["count"] >= 0.6, report["accuracy_by_type"]  # chance 0.25
    assert report["accuracy"] >= report["chance_accuracy"] + 0.05, report["accuracy_by_type"]
    assert (out / "report.md").exists() and (out / "report.png").exists() and (out / "example.png").exists()

    # A held-out image whose count the evaluation got right: chat (one row, its own prompt
    # building and generation call) must give that answer too.
    answers = json.load(open(out / "answers.json"))["with_stage1"]
    right = next(a for a in answers if a["type"] == "count" and a["correct"] and a["answer"] != "1")
    image = out / "world" / "eval" / f"{right['scene']}.png"
    cmd = [sys.executable, "-m", "llava_jax.cli", "chat", "--ckpt", str(out / "stage2"), "--image", str(image),
           "--prompt", f"{right['question']}\n{S.SHORT_ANSWER_SUFFIX}", "--max-new-tokens", "6"]
    reply = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert reply.returncode == 0, reply.stderr[-2000:]
    assert S.grade("count", reply.stdout, right["answer"]), (reply.stdout, right)


def test_contrastive_pretraining_pulls_images_towards_their_captions():
    """A few steps of the CLIP-style stage on 64 scenes (in-batch captions + shape-swapped hard
    negatives): the loss falls well below where it started; an unknown pooling is refused."""
    import numpy as np
    from flax import nnx

    from llava_jax.quickstart import contrastive
    from llava_jax.quickstart.config import model_config

    vision = model_config().vision
    scenes = S.make_scenes(seed=3, count=64, image_size=vision.image_size)
    images = np.stack([np.asarray(S.render(s), np.float32) / 127.5 - 1.0 for s in scenes])
    captions = [S.captions(s) for s in scenes]
    negatives = [S.captions(S.with_other_shapes(s)) for s in scenes]
    words = sorted({w for c in captions + negatives for text in c for w in text.split()})
    vocab = {w: i + 2 for i, w in enumerate(words)}

    def tokenize(text):
        return [vocab[w] for w in text.split()] + [1]

    cfg = contrastive.ContrastiveConfig(steps=40, batch_size=32, warmup_steps=4, lr=3e-3)
    tower, history = contrastive.train(vision, images, captions, negatives, tokenize, len(vocab) + 2, cfg)
    assert np.mean([h["loss"] for h in history[-5:]]) < 0.7 * np.mean([h["loss"] for h in history[:3]]), history
    assert isinstance(tower, nnx.Module)
    with pytest.raises(ValueError, match="pooling"):
        contrastive.ContrastiveModel(vision, 8, contrastive.ContrastiveConfig(pool="max"), 8, rngs=nnx.Rngs(0))


def test_a_new_run_replaces_only_the_previous_runs_outputs(tmp_path):
    # The training stages resume from their workdirs, so a stale stage2 checkpoint would otherwise be
    # reported as this run's model.
    from llava_jax.quickstart.run import clear_previous_run

    (tmp_path / "stage2" / "checkpoints" / "250").mkdir(parents=True)
    (tmp_path / "lm").mkdir()
    (tmp_path / "report.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "mine").mkdir()
    assert sorted(clear_previous_run(str(tmp_path))) == ["lm", "report.json", "stage2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "notes.txt"]
    assert clear_previous_run(str(tmp_path)) == []
