"""CC3M filter: the noun-phrase frequency rules on a corpus whose kept set is known."""
from __future__ import annotations

import importlib.util
import json
import random

import pytest

from llava_jax.datagen import cli as datagen_cli
from llava_jax.datagen.cc3m_filter import extract_all, filter_cc3m, load_pairs, select_captions
from llava_jax.datagen.prompts import BRIEF_INSTRUCTIONS


def bar_phrases(caption: str) -> list[str]:
    """A trivial extractor: the caption is its noun phrases separated by '|'."""
    return caption.split("|") if caption else []


def corpus():
    captions = []
    cat = [captions.append(c) or len(captions) - 1 for c in ["cat", "Cat |sofa", "unicorn|cat", "dog|cat"]]
    dog_only = [captions.append(c) or len(captions) - 1 for c in ["dog"] * 6 + ["dog|unicorn"] * 3]
    rare = [captions.append(c) or len(captions) - 1 for c in ["unicorn", "sofa|  SOFA", ""]]
    return captions, cat, dog_only, rare


def test_rules_on_a_constructed_corpus():
    captions, cat, dog_only, rare = corpus()
    sets = extract_all(captions, bar_phrases)
    assert sets[1] == {"cat", "sofa"} and sets[rare[1]] == {"sofa"}  # normalized, counted once per caption
    # counts: cat 4, dog 10, unicorn 5 (captions 2, the three dog|unicorn, and rare[0]), sofa 2
    dog_captions = [i for i, s in enumerate(sets) if "dog" in s]
    unicorn_captions = [i for i, s in enumerate(sets) if "unicorn" in s]
    assert (len(dog_captions), len(unicorn_captions)) == (10, 5)

    kept = set(select_captions(sets, min_count=3, max_per_phrase=5, seed=0))
    # dog is the only frequent phrase: a seeded sample of 5 of its captions (documented procedure)
    dog_sample = set(random.Random(0).sample(dog_captions, 5))
    assert kept == set(cat) | set(unicorn_captions) | dog_sample
    assert rare[1] not in kept and rare[2] not in kept  # only a rare phrase; no phrase at all
    assert len(kept & set(dog_only[:6])) == len(dog_sample & set(dog_only[:6]))  # dog-only: sample decides

    kept = set(select_captions(sets, min_count=6, max_per_phrase=5, seed=0))  # unicorn, cat, sofa now rare
    assert kept == dog_sample

    kept = set(select_captions(sets, min_count=5, max_per_phrase=100, seed=0))  # dog not frequent: all kept
    assert kept == set(dog_captions) | set(unicorn_captions)


def test_sampling_is_seeded_and_capped():
    sets = [{"dog", f"x{i}"} for i in range(50)]
    a = select_captions(sets, min_count=3, max_per_phrase=10, seed=1)
    assert a == select_captions(sets, min_count=3, max_per_phrase=10, seed=1) and len(a) == 10
    assert any(select_captions(sets, min_count=3, max_per_phrase=10, seed=s) != a for s in (2, 3))


def test_cli_writes_stage1_json(tmp_path, monkeypatch):
    captions, cat, dog_only, rare = corpus()
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"image": f"img/{i}.jpg", "caption": c + " "}) + "\n"
                             for i, c in enumerate(captions)))
    (tmp_path / "my_np.py").write_text("def extract(c):\n    return c.strip().split('|') if c.strip() else []\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "stage1.json"
    argv = ["filter-cc3m", "--pairs", str(pairs), "--out", str(out), "--extractor", "my_np:extract",
            "--min-count", "6", "--max-per-phrase", "5", "--seed", "3"]
    assert datagen_cli.main(argv) == 0
    records = json.loads(out.read_text())
    assert len(records) == 5
    for r in records:
        human, gpt = r["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert human["value"][len("<image>\n"):] in BRIEF_INSTRUCTIONS
        assert gpt == {"from": "gpt", "value": captions[int(r["image"][4:-4])]}
    assert records == filter_cc3m(load_pairs(pairs), bar_phrases_stripped, min_count=6, max_per_phrase=5, seed=3)


def bar_phrases_stripped(caption):
    return bar_phrases(caption.strip())


def test_tsv_pairs_and_missing_spacy(tmp_path, capsys):
    tsv = tmp_path / "train.tsv"
    tsv.write_text('a "quoted" dog\thttp://x/1.jpg\nno image column\n')
    with pytest.raises(ValueError, match=r"line 2: expected caption<TAB>image"):
        load_pairs(tsv)
    tsv.write_text('a "quoted" dog\thttp://x/1.jpg\n')
    assert load_pairs(tsv) == [{"caption": 'a "quoted" dog', "image": "http://x/1.jpg"}]
    if importlib.util.find_spec("spacy") is not None:
        pytest.skip("spaCy is installed here")
    rc = datagen_cli.main(["filter-cc3m", "--pairs", str(tsv), "--out", str(tmp_path / "o.json")])
    assert rc == 2 and "python -m spacy download en_core_web_sm" in capsys.readouterr().err
