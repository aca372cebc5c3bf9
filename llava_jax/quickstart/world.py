"""Build the quickstart's world on disk: images, COCO annotations, LLaVA JSON data, tokenizer.

Layout under DIR:
  world/train/, world/eval/   <scene>.png + instances.json + captions.json (COCO)
  data/vqa.json               short-answer questions, several per image (stage 2)
  data/instruct.json          conversation / detail / complex records (through the datagen core)
  data/stage1.json            caption pairs (through the CC3M record path)
  tokenizer/                  the CLIP-style text tower's tokenizer, trained on the world's text
instruct.json and stage1.json are LLaVA's other data kinds for this world; the default recipe trains
on vqa.json only (see llava_jax/quickstart/config.py), and both work with `llava-jax train` by hand.
"""
from __future__ import annotations

import dataclasses
import json
import os

from llava_jax.data import conversation, synthetic as S
from llava_jax.datagen import cc3m_filter, instruct, prompts
from llava_jax.datagen.context import load_coco_contexts
from llava_jax.quickstart import instructions
from llava_jax.quickstart.tokenizer import train_tokenizer


@dataclasses.dataclass
class World:
    root: str
    train_scenes: list
    eval_scenes: list
    train_images: str
    eval_images: str
    data: dict            # name -> LLaVA JSON path
    tokenizer: object
    tokenizer_dir: str
    datagen_summary: str


def _write_json(path: str, records: list) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
    return path


def _corpus(records_by_name: dict) -> list:
    """Every text the models will read or write, rendered in the templates they are trained with."""
    texts = []
    for name, records in records_by_name.items():
        for r in records:
            template = "plain" if name == "stage1" else "vicuna_v1"
            texts.append(conversation.render(r["conversations"], template).replace(conversation.IMAGE_PLACEHOLDER, ""))
    texts += list(prompts.DETAIL_INSTRUCTIONS) + list(prompts.BRIEF_INSTRUCTIONS)
    return texts


def build_world(root: str, seed: int, num_train: int, num_eval: int, image_size: int, num_instruct: int,
                vocab_size: int, progress: bool = True) -> World:
    train_scenes = S.make_scenes(seed, num_train, "train", image_size)
    eval_scenes = S.make_scenes(seed, num_eval, "eval", image_size)
    train_dir, eval_dir = os.path.join(root, "world", "train"), os.path.join(root, "world", "eval")
    instances, captions = S.write_world(train_dir, train_scenes)
    S.write_world(eval_dir, eval_scenes)

    data_dir = os.path.join(root, "data")
    contexts = load_coco_contexts(instances, captions, max_images=num_instruct)
    summary = instruct.generate(contexts, prompts.KINDS, instructions.world_backend,
                                os.path.join(data_dir, "instruct.json"), concurrency=1, seed=seed,
                                progress=progress)
    if summary.unparsable or summary.request_failures:
        raise RuntimeError(f"instruction generation lost records:\n{summary.format()}")
    with open(os.path.join(data_dir, "instruct.json")) as f:
        instruct_records = json.load(f)

    pairs = [{"id": f"{s.id}_cap{k}", "image": s.file_name, "caption": c}
             for s in train_scenes for k, c in enumerate(S.captions(s))]
    records = {
        "instruct": instruct_records,
        "stage1": cc3m_filter.to_stage1_records(pairs, range(len(pairs)), seed),
        "vqa": [instructions.vqa_record(s) for s in train_scenes],
    }
    paths = {"instruct": os.path.join(data_dir, "instruct.json")}
    for name in ("stage1", "vqa"):
        paths[name] = _write_json(os.path.join(data_dir, f"{name}.json"), records[name])

    tokenizer_dir = os.path.join(root, "tokenizer")
    tokenizer = train_tokenizer(_corpus(records), vocab_size, tokenizer_dir)
    return World(root, train_scenes, eval_scenes, train_dir, eval_dir, paths, tokenizer, tokenizer_dir,
                 summary.format())
