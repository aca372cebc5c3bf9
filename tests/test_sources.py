"""Sources: LLaVA JSON/JSONL, mixtures, synthetic data, and the TFDS ArrayRecord round trip."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from llava_jax.data import pipeline, sources
from llava_jax.data.cli import main as data_main
from llava_jax.testing.tokenizer import IMAGE_TOKEN_ID, llama_tokenizer


def _write_dataset(tmp_path, n=7):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    entries = []
    for i in range(n):
        rng = np.random.default_rng(i)
        entry = {"id": f"rec{i}", "conversations": [
            {"from": "human", "value": f"Question {i} über 日本?" + ("\n<image>" if i % 3 else "")},
            {"from": "gpt", "value": f"Answer {i}."}]}
        if i % 3:
            name = f"sub/img{i}.{'png' if i % 2 else 'jpg'}"
            Image.fromarray(rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)).save(folder / name)
            entry["image"] = name
        entries.append(entry)
    entries[-1]["image"] = "sub/missing.png"  # kept by prepare, skipped in training
    entries[-1]["conversations"][0]["value"] += "\n<image>"
    path = tmp_path / "data.json"
    path.write_text(json.dumps(entries, ensure_ascii=False))
    return path, folder, entries


def test_json_and_jsonl(tmp_path):
    path, folder, entries = _write_dataset(tmp_path)
    src = sources.JsonSource(str(path), str(folder))
    assert len(src) == len(entries)
    assert src[1]["image"] == str(folder / "sub/img1.png") and src[0]["image"] is None
    assert src[1]["conversations"] == entries[1]["conversations"]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(e) for e in entries[:3]) + "\n{broken\n")
    src2 = sources.JsonSource(str(jsonl), str(folder))
    assert [src2[i]["id"] for i in range(3)] == ["rec0", "rec1", "rec2"]
    assert src2[3]["id"] == "data.jsonl:4" and "bad JSON" in src2[3]["error"]
    bad = tmp_path / "bad.json"
    bad.write_text("[{]")
    with pytest.raises(ValueError, match="bad.json"):
        sources.JsonSource(str(bad))


def test_record_helpers_live_in_records_and_stay_importable_where_they_were():
    """sources (reading) and tfds_builder (writing) share llava_jax.data.records, not each other."""
    import ast
    import inspect

    from llava_jax.data import records, tfds_builder

    assert (sources.read_llava_json, sources.raw_to_record) == (records.read_llava_json, records.raw_to_record)
    assert (tfds_builder.example_to_record, tfds_builder.find_dataset_dir) == (records.example_to_record,
                                                                               records.find_dataset_dir)
    assert (tfds_builder.DATASET_NAME, tfds_builder.VERSION) == (records.DATASET_NAME, records.VERSION)
    for module, other in ((sources, "llava_jax.data.tfds_builder"), (tfds_builder, "llava_jax.data.sources")):
        imported = {n.module for n in ast.walk(ast.parse(inspect.getsource(module))) if isinstance(n, ast.ImportFrom)}
        assert other not in imported, module.__name__


def test_mixture_weights(tmp_path):
    a = [{"id": f"a{i}", "conversations": []} for i in range(10)]
    b = [{"id": f"b{i}", "conversations": []} for i in range(4)]
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    mix = sources.json_mixture(f"{tmp_path / 'a.json'},{tmp_path / 'b.json'}", weights="0.5,2")
    ids = [mix[i]["id"] for i in range(len(mix))]
    assert len(ids) == 5 + 8
    assert sorted(i for i in ids if i.startswith("b")) == sorted([f"b{i}" for i in range(4)] * 2)
    assert len({i for i in ids if i.startswith("a")}) == 5


def test_synthetic_is_deterministic_and_valid():
    tok = llama_tokenizer()
    a, b = sources.SyntheticSource(32, seed=1), sources.SyntheticSource(32, seed=1)
    for i in range(32):
        ra, rb = a[i], b[i]
        assert ra["conversations"] == rb["conversations"]
        assert (ra["image"] is None) == (rb["image"] is None)
        if ra["image"] is not None:
            np.testing.assert_array_equal(ra["image"], rb["image"])
    assert any(a[i]["image"] is None for i in range(32)) and any(a[i]["image"] is not None for i in range(32))
    sample_spec = pipeline.SampleSpec(image_size=28, image_token_id=IMAGE_TOKEN_ID, num_image_tokens=4)
    builder = pipeline.SampleBuilder(tok, sample_spec)
    assert all("skip" not in builder(a[i]) for i in range(32))
    plain = sources.SyntheticSource(16, captions_only=True)
    plain_builder = pipeline.SampleBuilder(tok, pipeline.SampleSpec(template="plain", image_size=28,
                                                                     image_token_id=IMAGE_TOKEN_ID, num_image_tokens=4))
    assert all("skip" not in plain_builder(plain[i]) for i in range(16))


def test_arrayrecord_round_trip_and_two_workers(tmp_path, capsys):
    path, folder, entries = _write_dataset(tmp_path)
    out = tmp_path / "out"
    assert data_main(["prepare", "--json", str(path), "--images", str(folder), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {len(entries)} records" in printed and "rec6" in printed  # the missing image is reported
    src = sources.ArrayRecordSource(str(out))
    assert len(src) == len(entries)
    by_id = {src[i]["id"]: src[i] for i in range(len(src))}
    for entry in entries:
        got = by_id[entry["id"]]
        assert got["conversations"] == entry["conversations"]
        if entry["id"] == "rec6":
            assert got.get("image_missing")
        elif "image" in entry:
            assert got["image"] == (folder / entry["image"]).read_bytes()
        else:
            assert got["image"] is None

    tok = llama_tokenizer()
    sample_spec = pipeline.SampleSpec(image_size=28, image_token_id=IMAGE_TOKEN_ID, num_image_tokens=4,
                                      max_length=128)
    batch_spec = pipeline.BatchSpec(batch_size=2, max_length=128, image_size=28)

    def run(workers):
        it = pipeline.build_iterator(src, tok, sample_spec, batch_spec, seed=3, num_epochs=1, num_workers=workers)
        batches = list(it)
        return batches, it.skips

    serial, serial_skips = run(0)
    parallel, parallel_skips = run(2)
    assert len(serial) == len(parallel) == 3  # 6 usable records
    for a, b in zip(serial, parallel):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert dict(parallel_skips.counts) == {"missing_image": 1} and parallel_skips.ids["missing_image"] == ["rec6"]
