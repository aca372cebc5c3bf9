"""`llava-jax quickstart [--out DIR] [--seed N] [--fast]`: the LLaVA recipe end to end on a synthetic world.

  world     scenes, COCO annotations, instruction data through the datagen core, tokenizer
  clip      CLIP-style contrastive pretraining of the vision tower (then frozen)
  lm        language-model pretraining on the world's text (the "Vicuna" of this world)
  stage1    projector only, caption pairs, plain template            (llava-jax train's loop)
  stage2    projector + LLM, instructions + short-answer VQA, vicuna_v1 (llava-jax train's loop)
  eval      held-out scenes: accuracy per question type, descriptions
  ablation  stage 2 again without stage 1, and its evaluation
DIR/stage2 is a normal training workdir: `llava-jax chat --ckpt DIR/stage2` and `llava-jax serve` load it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time

import numpy as np

STAGE_NAMES = ("world", "clip", "lm", "stage1", "stage2", "eval", "ablation")
# Everything a run writes under DIR. A new run removes these first: the training stages resume from
# a workdir's checkpoint, so a previous run's lm/stage1/stage2 would otherwise be picked up as
# finished (or fail to restore when the model changed) on top of a newly trained vision tower.
OUTPUTS = ("world", "data", "tokenizer", "clip", "lm", "stage1", "stage2", "ablation_no_stage1",
           "report.json", "report.md", "report.png", "answers.json", "example.png")


@dataclasses.dataclass(frozen=True)
class Sizes:
    num_train: int
    num_eval: int
    num_instruct: int
    clip_steps: int
    num_describe: int


FULL = Sizes(num_train=2000, num_eval=100, num_instruct=1000, clip_steps=150, num_describe=32)
FAST = Sizes(num_train=800, num_eval=40, num_instruct=400, clip_steps=60, num_describe=8)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="llava-jax quickstart", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="quickstart_out",
                   help="output folder (default: quickstart_out); a previous run's outputs there are replaced")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fast", action="store_true", help="a shorter run (fewer scenes and steps), for tests")
    p.add_argument("--no-ablation", action="store_true", help="skip the run without stage 1")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


class Timer:
    """Wall time per stage, and the one-line summaries printed as stages finish."""

    def __init__(self):
        self.start = time.perf_counter()
        self.seconds = {}

    def done(self, name: str, began: float, summary: str) -> None:
        self.seconds[name] = time.perf_counter() - began
        print(f"[{name}] {summary} ({self.seconds[name]:.0f}s)", flush=True)

    @property
    def minutes(self) -> float:
        return (time.perf_counter() - self.start) / 60


def _preprocessed(world, scenes, size: int) -> np.ndarray:
    from llava_jax.data import image as image_lib

    return np.stack([image_lib.preprocess(os.path.join(world.train_images, s.file_name), size, "square")
                     for s in scenes])


def pretrain_vision(world, sizes: Sizes, seed: int, progress: bool):
    """Contrastive image/caption training; returns the vision tower and its metrics."""
    from tqdm import tqdm

    from llava_jax.data import synthetic as S
    from llava_jax.quickstart import contrastive
    from llava_jax.quickstart.config import model_config

    cfg = model_config()
    images = _preprocessed(world, world.train_scenes, cfg.vision.image_size)
    captions = [S.captions(s) for s in world.train_scenes]
    negatives = [S.captions(S.with_other_shapes(s)) for s in world.train_scenes]
    tok = world.tokenizer

    def tokenize(text):
        return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    ccfg = contrastive.ContrastiveConfig(steps=sizes.clip_steps, seed=seed)
    bar = tqdm(total=ccfg.steps, desc="clip", disable=not progress, dynamic_ncols=True)

    def report(m):
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['accuracy']:.2f}", refresh=False)

    tower, history = contrastive.train(cfg.vision, images, captions, negatives, tokenize, len(tok), ccfg, progress=report)
    bar.close()
    return tower, history


def save_clip_base(root: str, tower, tokenizer, seed: int) -> str:
    """A model folder: the pretrained vision tower, the rest randomly initialised (the 'base')."""
    from flax import nnx

    from llava_jax import checkpoint
    from llava_jax.models.llava import LlavaModel
    from llava_jax.quickstart.config import model_config

    cfg = model_config()
    model = LlavaModel(cfg, rngs=nnx.Rngs(seed))
    nnx.update(model.vision_tower, nnx.state(tower, nnx.Param))
    path = os.path.join(root, "clip")
    checkpoint.save_model(path, model, cfg, tokenizer=tokenizer)
    return path


def train_stage(name: str, root: str, workdir: str, *, fast: bool, seed: int, progress: bool, base: str,
                stage1: str = "") -> dict:
    """One stage through `llava-jax train`'s loop -> its metrics records."""
    from llava_jax.quickstart.config import stage_config
    from llava_jax.train import loop
    from llava_jax.train.metrics import read_metrics

    config = stage_config(name, root, fast=fast, seed=seed)
    config.init.base = base
    config.init.stage1 = stage1
    config.log_every = 5
    result = loop.train(config, workdir, progress=progress)
    if result["status"] != "finished":
        raise RuntimeError(f"stage {name} in {workdir} ended with status {result['status']}")
    return {"metrics": read_metrics(workdir, "loss"), "steps": result["step"]}


def clear_previous_run(root: str) -> list:
    """Remove what an earlier quickstart wrote under `root` (only the names in OUTPUTS) -> removed names."""
    import shutil

    removed = []
    for name in OUTPUTS:
        path = os.path.join(root, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
        else:
            continue
        removed.append(name)
    return removed


def _loss_line(records) -> str:
    losses = [r["loss"] for r in records]
    return f"loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "no loss logged"


def main(argv=None) -> int:
    args = parse_args([] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("absl").setLevel(logging.ERROR)
    from llava_jax.quickstart import report
    from llava_jax.quickstart.config import IMAGE_SIZE, VOCAB_SIZE
    from llava_jax.quickstart.evaluate import chance_by_type, evaluate
    from llava_jax.quickstart.world import build_world

    sizes = FAST if args.fast else FULL
    root = os.path.abspath(args.out)
    os.makedirs(root, exist_ok=True)
    removed = clear_previous_run(root)
    if removed:
        print(f"[start] removed the previous run's outputs in {root}: {', '.join(removed)}", flush=True)
    progress = not args.quiet
    timer = Timer()
    curves = {}

    t = time.perf_counter()
    world = build_world(root, args.seed, sizes.num_train, sizes.num_eval, IMAGE_SIZE, sizes.num_instruct,
                        VOCAB_SIZE, progress=progress)
    counts = {k: len(json.load(open(v))) for k, v in world.data.items()}
    timer.done("world", t, f"{len(world.train_scenes)} training scenes, {len(world.eval_scenes)} held out; "
               f"records: " + ", ".join(f"{k} {n}" for k, n in counts.items()))

    t = time.perf_counter()
    tower, clip_history = pretrain_vision(world, sizes, args.seed, progress)
    base = save_clip_base(root, tower, world.tokenizer, args.seed)
    curves["clip"] = [{"step": h["step"], "loss": h["loss"]} for h in clip_history]
    timer.done("clip", t, f"contrastive {_loss_line(clip_history)}, in-batch retrieval accuracy "
               f"{np.mean([h['accuracy'] for h in clip_history[-10:]]):.2f} (batch 128 + hard negatives)")

    kw = dict(fast=args.fast, seed=args.seed, progress=progress)
    lm_dir, s1_dir, s2_dir = (os.path.join(root, n) for n in ("lm", "stage1", "stage2"))
    for name, workdir, init, stage1 in (("lm", lm_dir, base, ""), ("stage1", s1_dir, lm_dir, ""),
                                        ("stage2", s2_dir, lm_dir, s1_dir)):
        t = time.perf_counter()
        out = train_stage(name, root, workdir, base=init, stage1=stage1, **kw)
        curves[name] = out["metrics"]
        timer.done(name, t, f"{out['steps']} steps, {_loss_line(out['metrics'])}")

    t = time.perf_counter()
    result = evaluate(s2_dir, world.eval_scenes, world.eval_images, num_describe=sizes.num_describe,
                      progress=progress)
    timer.done("eval", t, f"held-out accuracy {result['accuracy']:.3f} "
               + " ".join(f"{k} {v:.2f}" for k, v in result["accuracy_by_type"].items()))

    ablation = None
    if not args.no_ablation:
        t = time.perf_counter()
        ab_dir = os.path.join(root, "ablation_no_stage1")
        out = train_stage("stage2", root, ab_dir, base=lm_dir, stage1="", **kw)
        curves["stage2 without stage1"] = out["metrics"]
        ablation = evaluate(ab_dir, world.eval_scenes, world.eval_images, num_describe=0, progress=progress)
        timer.done("ablation", t, f"stage 2 without stage 1: {_loss_line(out['metrics'])}, held-out accuracy "
                   f"{ablation['accuracy']:.3f}")

    example = report.example(s2_dir, world, root)
    print(f"\nheld-out image: {example['image']}\nQ: {example['question']}\nA: {example['reply']} "
          f"(expected: {example['answer']})")
    summary = report.write(root, result=result, ablation=ablation, chance=chance_by_type(), curves=curves,
                           minutes=timer.minutes, stage_seconds=timer.seconds, example=example, fast=args.fast,
                           datagen=world.datagen_summary)
    print(f"\naccuracy {summary['accuracy']:.3f} (chance {summary['chance_accuracy']:.3f}); without stage 1 "
          f"{summary['accuracy_without_stage1']}; {summary['minutes']:.1f} min. Report: {root}/report.md")
    return 0
