"""The CC3M filter for stage-1 data: keep a concept-balanced subset of image-caption pairs.

Rules (the reference's, made precise). Let phrases(c) be the set of normalized noun phrases of
caption c (lowercased, whitespace collapsed; a phrase counts once per caption) and count(p) the
number of captions whose set contains p.
  1. p is *rare* if count(p) < min_count (3); a caption whose phrases are all rare (or that has no
     noun phrase at all) is dropped.
  2. p is *frequent* if count(p) > max_per_phrase (100); it selects a seeded random subset of
     max_per_phrase of its captions. Any other non-rare p selects all of its captions.
  3. A caption is kept iff at least one of its non-rare phrases selects it. So a caption with several
     phrases survives if any of them vouches for it: being left out of one frequent phrase's
     sample does not drop a caption that a mid-frequency phrase keeps.
Sampling is deterministic: frequent phrases are visited in sorted order with one random.Random(seed),
each sampling from its captions in input order.

The noun-phrase extractor is pluggable: any callable caption -> list of phrases; if it also has a
`batch(captions)` method, that is used (spaCy's nlp.pipe is much faster than one call per caption).
"""
from __future__ import annotations

import csv
import json
import random
from collections import defaultdict
from pathlib import Path

from .prompts import BRIEF_INSTRUCTIONS

SPACY_HELP = ("noun-phrase extraction needs a spaCy pipeline: pip install spacy && "
              "python -m spacy download {model}  (or pass --extractor MODULE:FUNCTION, a function "
              "caption -> list of noun phrases)")


def normalize_phrase(phrase: str) -> str:
    return " ".join(phrase.lower().split())


class SpacyNounPhrases:
    """spaCy noun chunks (the reference's extractor)."""

    def __init__(self, model: str = "en_core_web_sm", batch_size: int = 512):
        try:
            import spacy
        except ImportError:
            raise RuntimeError("spaCy is not installed. " + SPACY_HELP.format(model=model)) from None
        try:
            self.nlp = spacy.load(model, disable=["ner", "lemmatizer"])
        except OSError:
            raise RuntimeError(f"spaCy pipeline {model!r} is not installed. " + SPACY_HELP.format(model=model)) from None
        self.batch_size = batch_size

    def __call__(self, caption: str) -> list[str]:
        return [chunk.text for chunk in self.nlp(caption).noun_chunks]

    def batch(self, captions):
        for doc in self.nlp.pipe(captions, batch_size=self.batch_size):
            yield [chunk.text for chunk in doc.noun_chunks]


def extract_all(captions: list[str], extract) -> list[set[str]]:
    raw = extract.batch(captions) if hasattr(extract, "batch") else map(extract, captions)
    return [{normalize_phrase(p) for p in phrases if normalize_phrase(p)} for phrases in raw]


def select_captions(phrase_sets: list[set[str]], *, min_count: int = 3, max_per_phrase: int = 100,
                    seed: int = 0) -> list[int]:
    """Indices (ascending) of the captions the rules above keep."""
    captions_of = defaultdict(list)
    for i, phrases in enumerate(phrase_sets):
        for p in phrases:
            captions_of[p].append(i)
    rng = random.Random(seed)
    kept = set()
    for p in sorted(captions_of):
        members = captions_of[p]
        if len(members) < min_count:
            continue
        kept.update(rng.sample(members, max_per_phrase) if len(members) > max_per_phrase else members)
    return sorted(kept)


def load_pairs(path) -> list[dict]:
    """Image-caption pairs from .json (a list of {"image", "caption"[, "id"]}), .jsonl (one such
    object per line) or .tsv (the CC3M release layout: caption<TAB>image path or URL)."""
    path = Path(path)
    if path.suffix == ".tsv":
        pairs = []
        with open(path, newline="") as f:
            for n, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
                if len(row) < 2:
                    raise ValueError(f"{path} line {n}: expected caption<TAB>image, found {len(row)} column(s)")
                pairs.append({"caption": row[0], "image": row[1]})
        return pairs
    if path.suffix == ".jsonl":
        with open(path) as f:
            pairs = [json.loads(line) for line in f if line.strip()]
    elif path.suffix == ".json":
        with open(path) as f:
            pairs = json.load(f)
    else:
        raise ValueError(f"{path}: unsupported pairs format {path.suffix!r}; expected .json, .jsonl or .tsv")
    for n, pair in enumerate(pairs):
        if not isinstance(pair, dict) or "caption" not in pair or "image" not in pair:
            raise ValueError(f"{path} record {n}: expected an object with 'image' and 'caption', found {pair!r:.200}")
    return pairs


def brief_instruction(index: int, seed: int = 0) -> str:
    return random.Random(f"{seed}:brief:{index}").choice(BRIEF_INSTRUCTIONS)


def to_stage1_records(pairs: list[dict], indices, seed: int = 0) -> list[dict]:
    """Single-turn LLaVA records: human = "<image>\\n" + a brief-description instruction, gpt = caption."""
    return [{"id": str(pairs[i].get("id", f"cc3m_{i:09d}")), "image": pairs[i]["image"],
             "conversations": [{"from": "human", "value": "<image>\n" + brief_instruction(i, seed)},
                               {"from": "gpt", "value": pairs[i]["caption"].strip()}]}
            for i in indices]


def filter_cc3m(pairs: list[dict], extract, *, min_count: int = 3, max_per_phrase: int = 100,
                seed: int = 0) -> list[dict]:
    phrase_sets = extract_all([p["caption"] for p in pairs], extract)
    kept = select_captions(phrase_sets, min_count=min_count, max_per_phrase=max_per_phrase, seed=seed)
    return to_stage1_records(pairs, kept, seed)
