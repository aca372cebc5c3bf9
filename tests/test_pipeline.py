"""The Grain pipeline: batch format, packing, resume, host sharding, modality grouping, bad data."""
from __future__ import annotations

import io
import json
import logging
import re

import numpy as np
import pytest
from PIL import Image

from llava_jax.data import conversation as conv
from llava_jax.data import pipeline
from llava_jax.data.sources import JsonSource, SyntheticSource
from llava_jax.testing.tokenizer import IMAGE_TOKEN_ID, llama_tokenizer

IMAGE_SIZE, NUM_IMAGE_TOKENS = 28, 4


@pytest.fixture(scope="module")
def tok():
    return llama_tokenizer()


def specs(batch_size=4, max_length=128, packing=False, max_images=1, strict=False, template="vicuna_v1"):
    sample = pipeline.SampleSpec(template=template, image_aspect="pad", image_size=IMAGE_SIZE,
                                 image_token_id=IMAGE_TOKEN_ID, num_image_tokens=NUM_IMAGE_TOKENS,
                                 max_length=max_length, max_images_per_row=max_images)
    batch = pipeline.BatchSpec(batch_size=batch_size, max_length=max_length, image_size=IMAGE_SIZE,
                               max_images_per_row=max_images, packing=packing, strict=strict)
    return sample, batch


def iterator(source, tok, **kw):
    spec_kw = {k: kw.pop(k) for k in ("batch_size", "max_length", "packing", "max_images", "strict", "template")
               if k in kw}
    return pipeline.build_iterator(source, tok, *specs(**spec_kw), **kw)


def short_source(size=24, seed=0):
    return SyntheticSource(size=size, seed=seed, image_size=IMAGE_SIZE)


def test_padded_batch_format(tok):
    it = iterator(short_source(), tok, batch_size=4, max_length=128)
    batch = next(it)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "input_ids": ((4, 128), np.int32), "labels": ((4, 128), np.int32), "segment_ids": ((4, 128), np.int32),
        "positions": ((4, 128), np.int32), "pixel_values": ((4, 1, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)}
    source = short_source()
    for r, ids in enumerate(it.last_batch_ids):
        assert len(ids) == 1
        record = source[int(ids[0].split("-")[1])]
        expected = conv.encode(record["conversations"], tok, "vicuna_v1", IMAGE_TOKEN_ID, NUM_IMAGE_TOKENS)
        n = len(expected["input_ids"])
        assert batch["input_ids"][r, :n].tolist() == expected["input_ids"].tolist()
        assert batch["labels"][r, :n].tolist() == expected["labels"].tolist()
        assert (batch["labels"][r, n:] == -100).all() and (batch["input_ids"][r, n:] == 0).all()
        assert batch["segment_ids"][r].tolist() == [1] * n + [0] * (128 - n)
        assert batch["positions"][r, :n].tolist() == list(range(n))
        has_image = record["image"] is not None
        assert (np.abs(batch["pixel_values"][r, 0]).sum() > 0) == has_image
        assert (batch["input_ids"][r] == IMAGE_TOKEN_ID).sum() == NUM_IMAGE_TOKENS * has_image


def test_packed_rows(tok):
    it = iterator(short_source(), tok, batch_size=2, max_length=256, packing=True, max_images=3, shuffle=False)
    batch = next(it)
    for r, ids in enumerate(it.last_batch_ids):
        assert len(ids) >= 2  # samples are ~60-90 tokens: several share a row
        seg = batch["segment_ids"][r]
        assert sorted(set(seg.tolist()) - {0}) == list(range(1, len(ids) + 1))
        slot = 0
        for k, record_id in enumerate(ids, 1):
            where = np.flatnonzero(seg == k)
            assert batch["positions"][r, where].tolist() == list(range(len(where)))
            assert batch["labels"][r, where[0]] == -100
            record = short_source()[int(record_id.split("-")[1])]
            if record["image"] is not None:  # images fill the row's slots in sample order
                expected = pipeline.image_lib.preprocess(record["image"], IMAGE_SIZE, "pad")
                np.testing.assert_array_equal(batch["pixel_values"][r, slot], expected)
                slot += 1
        assert (batch["pixel_values"][r, slot:] == 0).all()
        assert (batch["input_ids"][r] == IMAGE_TOKEN_ID).sum() == NUM_IMAGE_TOKENS * slot


@pytest.mark.parametrize("packing", [False, True])
def test_resume_mid_epoch_gives_the_same_batches(tok, packing):
    kw = dict(batch_size=3, max_length=200, packing=packing, max_images=2, seed=5)
    source = short_source(size=10)  # several epochs in 12 batches: each reshuffled
    reference = iterator(source, tok, **kw)
    batches = [next(reference) for _ in range(12)]
    for cut in (1, 5):
        it = iterator(source, tok, **kw)
        for _ in range(cut):
            next(it)
        state = json.loads(json.dumps(it.get_state()))  # the state is plain JSON data
        resumed = iterator(source, tok, **kw)
        resumed.set_state(state)
        for expected in batches[cut:]:
            got = next(resumed)
            for key in expected:
                np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{key} after cut {cut}")
    # Epochs are reshuffled: the first two epochs' orders differ.
    order = pipeline.EpochOrder(pipeline.grain.MapDataset.source(source), seed=5)
    assert sorted(order.order(0)) == sorted(order.order(1)) and list(order.order(0)) != list(order.order(1))


def test_host_shards_are_disjoint_and_cover(tok):
    source = short_source(size=23)
    seen = []
    for host in range(3):
        it = iterator(source, tok, batch_size=2, num_epochs=1, process_index=host, process_count=3, seed=1)
        ids = []
        for _ in it:
            ids += [i for row in it.last_batch_ids for i in row]
        seen.append(set(ids))
        assert len(ids) == len(set(ids))
    assert all(not (seen[a] & seen[b]) for a in range(3) for b in range(a + 1, 3))
    assert set.union(*seen) == {f"synthetic-{i}" for i in range(23)}


def test_modality_length_grouping():
    rng = np.random.default_rng(0)
    lengths = np.where(rng.random(103) < 0.3, -1, 1) * rng.integers(1, 200, size=103)
    order = pipeline.modality_length_order(lengths, 8, np.random.default_rng(1))
    assert sorted(order.tolist()) == list(range(103))
    megabatches = [order[i:i + 8] for i in range(0, 103, 8)]
    mixed = [mb for mb in megabatches if len(set(np.sign(lengths[mb]))) > 1]
    assert len(mixed) <= 1  # only the leftover megabatch mixes modalities
    for mb in megabatches:
        if len(set(np.sign(lengths[mb]))) == 1:
            assert list(np.abs(lengths[mb])) == sorted(np.abs(lengths[mb]), reverse=True)


# ----- bad data -----------------------------------------------------------------------------------

def _png(tmp_path, name):
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(tmp_path / name)


def _bad_dataset(tmp_path):
    _png(tmp_path, "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    good = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A grey box."}]
    entries = [
        {"id": "good", "image": "ok.png", "conversations": good},
        {"id": "missing", "image": "nope.png", "conversations": good},
        {"id": "undecodable", "image": "broken.png", "conversations": good},
        {"id": "no_conversations", "image": "ok.png"},
        "not a dict",
        {"id": "out_of_order", "image": "ok.png", "conversations": good[::-1]},
        {"id": "placeholder_no_image", "conversations": good},
        {"id": "image_no_placeholder", "image": "ok.png",
         "conversations": [{"from": "human", "value": "What is it?"}, good[1]]},
        {"id": "empty_answer", "image": "ok.png", "conversations": [good[0], {"from": "gpt", "value": " "}]},
        {"id": "too_long", "image": "ok.png", "conversations": [  # the image comes late, in round 2
            {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there. " * 10},
            {"from": "human", "value": "What now? <image>"}, {"from": "gpt", "value": "Done."}]},
        {"id": "no_targets_left", "conversations": [
            {"from": "human", "value": "describe the scene " * 60}, {"from": "gpt", "value": "Fine."}]},
        {"id": "good_text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(entries))
    expected = {"missing_image": ["missing"], "undecodable_image": ["undecodable"],
                "malformed_record": ["no_conversations", "data.json#4"], "roles_out_of_order": ["out_of_order"],
                "placeholder_without_image": ["placeholder_no_image"],
                "image_without_placeholder": ["image_no_placeholder"], "empty_answer": ["empty_answer"],
                "too_long": ["too_long"], "empty_targets": ["no_targets_left"]}
    return JsonSource(str(path), str(tmp_path)), expected


def _max_length_cutting_the_image(source, tok):
    """A max_length that cuts through the image of record 'too_long' and fits the good records."""
    record = next(source[i] for i in range(len(source)) if source[i]["id"] == "too_long")
    ids = conv.encode(record["conversations"], tok, "vicuna_v1", IMAGE_TOKEN_ID, NUM_IMAGE_TOKENS)["input_ids"]
    max_length = int(np.argmax(ids == IMAGE_TOKEN_ID)) + 2
    assert max_length > 90
    return max_length


def test_bad_records_are_skipped_counted_and_logged(tok, tmp_path, caplog):
    source, expected = _bad_dataset(tmp_path)
    it = iterator(source, tok, batch_size=2, max_length=_max_length_cutting_the_image(source, tok), num_epochs=1,
                  shuffle=False)
    with caplog.at_level(logging.WARNING, logger="llava_jax.data.pipeline"):
        batches = list(it)
    used = [i for row in it.last_batch_ids for i in row]
    assert len(batches) == 1 and sorted(used) == ["good", "good_text"]
    assert dict(it.skips.counts) == {reason: len(ids) for reason, ids in expected.items()}
    assert {k: sorted(v) for k, v in it.skips.ids.items()} == {k: sorted(v) for k, v in expected.items()}
    for reason, ids in expected.items():
        for record_id in ids:
            assert any(record_id in r.getMessage() and reason in r.getMessage() for r in caplog.records), record_id
    summary = it.skips.summary()
    assert "2 samples used" in summary and "10 records skipped" in summary and "missing_image=1" in summary


@pytest.mark.parametrize("reason", ["missing_image", "roles_out_of_order", "too_long", "malformed_record"])
def test_strict_mode_raises_naming_the_record(tok, tmp_path, reason):
    source, expected = _bad_dataset(tmp_path)
    bad_id = expected[reason][0]
    index = next(i for i in range(len(source)) if source[i]["id"] == bad_id)
    only = type("One", (), {"__len__": lambda self: 2, "__getitem__": lambda self, i: source[[0, index][i]]})()
    it = iterator(only, tok, batch_size=2, max_length=_max_length_cutting_the_image(source, tok), num_epochs=1,
                  shuffle=False, strict=True)
    with pytest.raises(pipeline.DataError, match=f"record {bad_id}: {reason}"):
        next(it)



def test_a_repeating_stream_of_only_bad_records_stops_with_an_error(tok, tmp_path):
    source, expected = _bad_dataset(tmp_path)
    bad = [i for i in range(len(source))
           if isinstance(source[i], dict) and source[i].get("id") in ("missing", "empty_answer")]
    only_bad = type("Bad", (), {"__len__": lambda self: 2, "__getitem__": lambda self, i: source[bad[i]]})()
    it = iterator(only_bad, tok, batch_size=2, max_length=128, shuffle=False)  # epochs repeat forever
    with pytest.raises(pipeline.DataError, match="2 records in a row were skipped"):
        next(it)
    assert it.skips.counts["missing_image"] >= 1 and it.skips.counts["empty_answer"] >= 1

@pytest.mark.parametrize("template, why", [("chatml", "closes answers with '<|im_end|>'"),
                                           ("tokenizer", "needs a tokenizer with a chat_template")])
def test_a_template_the_tokenizer_cannot_serve_fails_at_set_up(tok, template, why):
    """Not one unexpected_error skip per record: the iterator is refused before it reads a record."""
    with pytest.raises(conv.TemplateMismatch, match=re.escape(why)):
        iterator(short_source(), tok, template=template)

# ----- global arrays ------------------------------------------------------------------------------

def test_to_global_on_a_mesh(tok):
    import jax

    from llava_jax import sharding

    mesh = sharding.make_mesh(1, -1, 1)
    batch = next(iterator(short_source(), tok, batch_size=2, max_length=96))
    out = pipeline.to_global(batch, mesh)
    for key, value in batch.items():
        assert isinstance(out[key], jax.Array) and out[key].shape == value.shape
        np.testing.assert_array_equal(np.asarray(out[key]), value)


# ----- packing through the real model -------------------------------------------------------------

def test_packed_loss_equals_unpacked_loss(tok):
    """Token-weighted loss of a packed batch == that of the same samples one per row (fp32)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from llava_jax.models.config import TextConfig
    from llava_jax.models.llava import LlavaModel
    from llava_jax.recipes.tiny import tiny_llava_config
    from llava_jax.train.step import summed_nll

    config = tiny_llava_config(
        text=TextConfig(vocab_size=IMAGE_TOKEN_ID + 8, hidden_size=64, intermediate_size=96, num_layers=2,
                        num_heads=4, num_kv_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6),
        image_token_id=IMAGE_TOKEN_ID)
    assert config.num_image_tokens == NUM_IMAGE_TOKENS
    model = LlavaModel(config, rngs=nnx.Rngs(0))
    source = short_source(size=6, seed=3)
    packed_it = iterator(source, tok, batch_size=2, max_length=400, packing=True, max_images=6,
                         num_epochs=1, shuffle=False)
    packed = next(packed_it)
    assert sum(len(r) for r in packed_it.last_batch_ids) == 6 and max(len(r) for r in packed_it.last_batch_ids) > 1
    single_it = iterator(source, tok, batch_size=6, max_length=160, num_epochs=1, shuffle=False)
    single = next(single_it)
    assert [i for r in single_it.last_batch_ids for i in r] == [i for r in packed_it.last_batch_ids for i in r]

    graphdef, state = nnx.split(model)
    summed = jax.jit(lambda st, b: summed_nll(nnx.merge(graphdef, st), b))

    def loss(batch):
        total, count = summed(state, {k: jnp.asarray(v) for k, v in batch.items()})
        return float(total), int(count)

    (packed_sum, packed_count), (single_sum, single_count) = loss(packed), loss(single)
    assert packed_count == single_count > 0
    np.testing.assert_allclose(packed_sum / packed_count, single_sum / single_count, rtol=1e-5, atol=1e-5)
    # The comparison is sensitive: letting packed samples see each other changes the loss.
    leaky = dict(packed, segment_ids=np.where(packed["segment_ids"] > 0, 1, 0).astype(np.int32))
    leaky_sum, leaky_count = loss(leaky)
    assert abs(leaky_sum / leaky_count - packed_sum / packed_count) > 1e-4
