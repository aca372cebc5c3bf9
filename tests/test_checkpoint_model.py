"""Model folders and training workdirs: save_model / load_pretrained / load_tokenizer / read_config."""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llava_jax
from llava_jax import checkpoint
from llava_jax.models.llava import LlavaModel
from llava_jax.recipes.tiny import tiny_llava_config
from llava_jax.testing.processes import run_python
from llava_jax.testing.tokenizer import llama_tokenizer

CFG = tiny_llava_config()


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, CFG.image_token_id, size=(2, 10)).astype(np.int32)
    ids[:, 1:1 + CFG.num_image_tokens] = CFG.image_token_id
    pixels = rng.normal(size=(2, CFG.vision.image_size, CFG.vision.image_size, 3)).astype(np.float32)
    return ids, pixels


@jax.jit
def _forward(graphdef, state, ids, pixels):
    return nnx.merge(graphdef, state)(ids, pixels)


def _logits(model, ids, pixels) -> np.ndarray:
    """Jitted forward: both models of a comparison share one compilation."""
    return np.asarray(_forward(*nnx.split(model), ids, pixels))


def _assert_same_params(model, params: dict):
    pa, pb = nnx.to_pure_dict(nnx.state(model, nnx.Param)), params
    assert jax.tree.structure(pa) == jax.tree.structure(pb)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A model folder with a tokenizer object saved into it; returns (folder, model, tokenizer)."""
    folder = str(tmp_path_factory.mktemp("model"))
    model = LlavaModel(CFG, rngs=nnx.Rngs(3))
    tokenizer = llama_tokenizer()
    checkpoint.save_model(folder, model, CFG, tokenizer=tokenizer)
    return folder, model, tokenizer


def test_save_model_then_load_pretrained_gives_same_logits(saved):
    folder, model, _ = saved
    assert {"config.json", "params", "tokenizer.json"} <= set(os.listdir(folder))
    loaded, config = llava_jax.load_pretrained(folder)
    assert config == CFG
    ids, pixels = _inputs()
    np.testing.assert_array_equal(_logits(loaded, ids, pixels), _logits(model, ids, pixels))
    leaves = jax.tree_util.tree_leaves(nnx.state(loaded, nnx.Param))
    assert all(isinstance(x, jax.Array) and x.dtype == jnp.float32 for x in leaves)


def test_load_tokenizer_and_read_config(saved):
    folder, _, tokenizer = saved
    text = "USER: <image>\nwhat is shown in the picture? ASSISTANT:"
    assert checkpoint.load_tokenizer(folder).encode(text) == tokenizer.encode(text)
    assert checkpoint.read_config(folder) == CFG


def test_dtype_overrides(saved):
    folder, model, _ = saved
    loaded, config = checkpoint.load_pretrained(folder, dtype="bfloat16", param_dtype="bfloat16")
    assert config.dtype == "bfloat16"
    assert {x.dtype for x in jax.tree_util.tree_leaves(nnx.state(loaded, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
    expected = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    _assert_same_params(loaded, expected)


def test_training_workdir_loads_latest_step(saved, tmp_path):
    """workdir: config.json + tokenizer at the root, checkpoints/<step>/params; the latest step wins,
    and a step folder loads on its own."""
    tokenizer = llama_tokenizer()
    checkpoint.write_model_files(str(tmp_path), CFG, tokenizer=tokenizer)
    base = nnx.to_pure_dict(nnx.state(saved[1], nnx.Param))
    models = {step: jax.tree.map(lambda x: np.asarray(x) + step, base) for step in (2, 10, 7)}
    for step, model in models.items():
        checkpoint.save_params(str(tmp_path / "checkpoints" / str(step) / "params"), model)
    os.makedirs(tmp_path / "checkpoints" / "12.orbax-checkpoint-tmp-1")  # unfinished save: ignored
    assert checkpoint.latest_step(str(tmp_path)) == 10
    loaded, _ = checkpoint.load_pretrained(str(tmp_path))
    _assert_same_params(loaded, models[10])
    loaded, config = checkpoint.load_pretrained(str(tmp_path / "checkpoints" / "7"))
    assert config == CFG
    _assert_same_params(loaded, models[7])
    assert checkpoint.load_tokenizer(str(tmp_path)).encode("a red circle") == tokenizer.encode("a red circle")


def test_config_and_params_mismatch_is_named(saved, tmp_path):
    folder, model, _ = saved
    other = tiny_llava_config(text=dataclasses.replace(CFG.text, intermediate_size=80))
    checkpoint.save_model(str(tmp_path), model, CFG)
    checkpoint.write_config(str(tmp_path), other)
    with pytest.raises(ValueError, match=r"shape mismatch for language_model\.layers\.mlp\.down_proj\.kernel: "
                                         r"expected \(2, 80, 64\), found \(2, 96, 64\)"):
        checkpoint.load_pretrained(str(tmp_path))


def test_missing_and_foreign_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a llava-jax model folder or training workdir"):
        checkpoint.load_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ValueError, match="transformers config .* convert the folder with convert/hf_to_orbax.py"):
        checkpoint.read_config(str(tmp_path))


def test_sharded_restore_on_a_mesh(saved):
    """With a mesh, parameters are read straight into their shards by the logical-axis rules."""
    folder, model, _ = saved
    ids, pixels = _inputs()
    expected = _logits(model, ids, pixels)
    work = os.path.dirname(folder)
    np.save(os.path.join(work, "pixels.npy"), pixels)
    out = run_python(f"""
        import jax, numpy as np
        from llava_jax import checkpoint, sharding
        mesh = sharding.make_mesh(data=1, fsdp=2, tensor=2)
        model, config = checkpoint.load_pretrained({folder!r}, mesh=mesh)
        emb = model.language_model.embed_tokens.embedding[...]
        print("spec", tuple(emb.sharding.spec), len(emb.addressable_shards), emb.addressable_shards[0].data.shape)
        ids = np.asarray({ids.tolist()!r}, np.int32)
        pixels = np.load({work!r} + "/pixels.npy")
        with jax.set_mesh(mesh):
            np.save({work!r} + "/logits.npy", np.asarray(model(ids, pixels)))
    """, num_devices=4)
    assert "spec ('tensor', 'fsdp') 4 (64, 32)" in out
    np.testing.assert_allclose(np.load(os.path.join(work, "logits.npy")), expected, atol=1e-5, rtol=1e-5)
