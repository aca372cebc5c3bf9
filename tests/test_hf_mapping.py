"""The declarative llava-hf <-> ours parameter table: names, shapes, layouts, exact round trips."""
import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from llava_jax import sharding
from llava_jax.hf.keys import entries, hf_from_state, hf_keys, load_into_model, state_from_hf
from llava_jax.models.llava import LlavaModel
from llava_jax.recipes.tiny import tiny_llava_config
from llava_jax.testing import hf_reference as R


def _tied():
    cfg = tiny_llava_config()
    return cfg.replace(text=dataclasses.replace(cfg.text, tie_word_embeddings=True))


CONFIGS = {
    "default": tiny_llava_config(),
    "tied": _tied(),
    "linear": tiny_llava_config(projector_type="linear"),
    "mlp3x": tiny_llava_config(projector_type="mlp3x_gelu", vision_feature_layer=(0, -2)),
    # two 32-wide feature layers make 64 = the text width, which 'identity' requires
    "identity": tiny_llava_config(projector_type="identity", vision_feature_layer=(-1, -2)),
}


@pytest.fixture(scope="module", params=["default", "tied"])
def saved(request, tmp_path_factory):
    """A random llava-hf model and the tensors of the file save_pretrained writes for it."""
    cfg = CONFIGS[request.param]
    hf = R.hf_llava(cfg, seed=7)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return cfg, hf, load_file(str(folder / "model.safetensors"))


def test_table_names_are_the_save_format(saved):
    cfg, hf, on_disk = saved
    assert set(hf_keys(cfg)) == set(on_disk)
    assert set(R.canonical_state_dict(hf)) == set(on_disk)
    for e in entries(cfg):
        for k in e.hf_keys:
            assert on_disk[k].shape == e.hf_shape, k


def test_round_trip_is_bitwise_identical(saved):
    cfg, _, on_disk = saved
    ours = state_from_hf(on_disk, cfg, strict=True)
    back = dict(hf_from_state(ours, cfg))
    assert set(back) == set(on_disk)
    for k, v in on_disk.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        assert np.array_equal(back[k], v), k


def test_layouts_transposed_and_stacked(saved):
    cfg, _, on_disk = saved
    ours = state_from_hf(on_disk, cfg)
    q1 = on_disk["language_model.model.layers.1.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(ours["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"][1], q1.T)
    conv = on_disk["vision_tower.embeddings.patch_embedding.weight"]  # (out, in, kh, kw)
    kernel = ours["vision_tower"]["embeddings"]["patch_embedding"]["kernel"]  # (kh, kw, in, out)
    assert kernel[3, 5, 2, 7] == conv[7, 2, 3, 5]
    assert ("lm_head" in ours["language_model"]) != cfg.text.tie_word_embeddings


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_state_tree_matches_the_model(name):
    cfg = CONFIGS[name]
    model = nnx.eval_shape(lambda: LlavaModel(cfg, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    expected = {jax.tree_util.keystr(p): v.shape for p, v in
                jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(params))[0]}
    table = {jax.tree_util.keystr(tuple(jax.tree_util.DictKey(k) for k in e.path)): e.shape
             for e in entries(cfg)}
    assert table == expected
    # every parameter carries one logical axis name per dimension, all known to the sharding rules
    for path, var in jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda v: isinstance(v, nnx.Variable))[0]:
        names = var.get_metadata()["out_sharding"]
        assert len(names) == len(var.shape), (path, names)
        sharding.logical_to_spec(names)
        if "layers" in jax.tree_util.keystr(path):
            assert names[0] == "layers", path


def test_loaded_model_holds_the_tensors(saved):
    cfg, _, on_disk = saved
    model = load_into_model(nnx.eval_shape(lambda: LlavaModel(cfg, rngs=nnx.Rngs(0))), on_disk)
    back = dict(hf_from_state(nnx.state(model), cfg))
    for k, v in on_disk.items():
        assert np.array_equal(back[k], v), k


def test_errors_name_the_key(saved):
    cfg, _, on_disk = saved
    missing = dict(on_disk)
    del missing["language_model.model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match=r"layers\.1\.mlp\.up_proj\.weight"):
        state_from_hf(missing, cfg)
    bad = dict(on_disk)
    bad["multi_modal_projector.linear_2.bias"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"multi_modal_projector\.linear_2\.bias: expected shape \(64,\), found \(3,\)"):
        state_from_hf(bad, cfg)
    extra = dict(on_disk, **{"language_model.model.rotary_emb.inv_freq": np.zeros(8, np.float32)})
    state_from_hf(extra, cfg)  # tolerated by default
    with pytest.raises(KeyError, match="rotary_emb.inv_freq"):
        state_from_hf(extra, cfg, strict=True)


def test_components_select_subtrees(saved):
    cfg, _, on_disk = saved
    vision_only = {k: v for k, v in on_disk.items() if k.startswith("vision_tower.")}
    tree = state_from_hf(vision_only, cfg, components=("vision_tower",))
    assert set(tree) == {"vision_tower"}
    assert {k for k, _ in hf_from_state(tree, cfg, components=("vision_tower",))} == set(vision_only)
