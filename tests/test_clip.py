"""CLIP vision tower parity with transformers' CLIPVisionModel (random tiny weights, fp32)."""
import dataclasses

import numpy as np
import pytest
import torch

from llava_jax.recipes.tiny import tiny_llava_config
from llava_jax.testing import hf_reference as R

TOL = 1e-4


@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def pair(request):
    cfg = tiny_llava_config()
    cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, hidden_act=request.param))
    hf = R.hf_clip(cfg, seed=1)
    return cfg, hf, R.ours_from_hf(hf, cfg)


@pytest.fixture(scope="module")
def pixels():
    return np.random.RandomState(0).randn(3, 28, 28, 3).astype(np.float32)


def test_every_hidden_state_matches_transformers(pair, pixels):
    cfg, hf, ours = pair
    with torch.no_grad():
        ref = hf(R.nhwc_to_nchw(pixels), output_hidden_states=True)
    out = R.jitted(ours, output_hidden_states=True)(pixels)
    assert len(out.hidden_states) == len(ref.hidden_states) == cfg.vision.num_layers + 1
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        np.testing.assert_allclose(np.asarray(a), b.numpy(), atol=TOL, rtol=0, err_msg=f"hidden_states[{i}]")
    np.testing.assert_allclose(np.asarray(out.last_hidden_state), ref.last_hidden_state.numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(out.pooler_output), ref.pooler_output.numpy(), atol=TOL, rtol=0)
    # Guard against a vacuous comparison: the layers really change the features.
    assert np.abs(ref.hidden_states[-1].numpy() - ref.hidden_states[0].numpy()).mean() > 0.1


def test_select_hidden_states_agrees_with_the_full_list(pair, pixels):
    cfg, _, ours = pair
    full = R.jitted(ours, output_hidden_states=True)(pixels).hidden_states
    picks = (-2, 0, 1, -1, -cfg.vision.num_layers - 1)
    selected = R.jitted(ours, "select_hidden_states", indices=picks)(pixels)
    for i, got in zip(picks, selected):
        np.testing.assert_allclose(np.asarray(got), np.asarray(full[i]), atol=1e-6, rtol=0, err_msg=f"layer {i}")


def test_feature_layer_out_of_range_names_the_layer(pair, pixels):
    cfg, _, ours = pair
    with pytest.raises(ValueError, match=r"vision feature layer 7 out of range"):
        ours.select_hidden_states(pixels, (7,))
