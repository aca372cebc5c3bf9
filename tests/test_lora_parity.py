"""LoRA parity with the PyTorch ecosystem: our LoRA LLaVA against peft's LoraModel on transformers'
LlavaForConditionalGeneration with the same base and adapter weights (tiny random model, fp32):
forward logits, one step's adapter and projector gradients, and the peft folder round trip."""
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx

from llava_jax import peft_io
from llava_jax.data.conversation import IGNORE_INDEX
from llava_jax.hf.keys import state_from_hf
from llava_jax.hf.weights import write_hf_llava
from llava_jax.models import lora as lora_lib
from llava_jax.models.llava import LlavaModel
from llava_jax.recipes.tiny import tiny_llava_config
from llava_jax.testing import hf_reference as R
from llava_jax.testing.batches import make_batch
from llava_jax.train import optim
from llava_jax.train import step as S

# fp32 on both sides; logits are O(10) with std-0.1 random weights, so the bound is relative.
LOGIT_TOL = 1e-5
GRAD_TOL = 1e-5
RANK, ALPHA = 4, 8.0


def _deep_merge(a, b):
    return S._deep_merge(a, b)


def _peft_pair(targets=lora_lib.ALL_TARGETS, seed=0):
    cfg = tiny_llava_config()
    hf = R.hf_llava(cfg, seed=seed)
    base = state_from_hf(R.canonical_state_dict(hf), cfg)
    lora = lora_lib.LoraConfig(rank=RANK, alpha=ALPHA, targets=targets)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                 target_modules=peft_io.target_regex(lora),
                                                 modules_to_save=["multi_modal_projector"]))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # B starts at zero: give it values so the adapters change the output
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    pm.eval()
    tensors = {k: v.detach().numpy().copy() for k, v in peft.get_peft_model_state_dict(pm).items()}
    read_lora, adapter = peft_io._params_from_tensors(tensors, {k: "peft" for k in tensors}, {"r": RANK,
                                                      "lora_alpha": ALPHA}, cfg)
    assert read_lora.targets == lora.targets
    model = nnx.eval_shape(lambda: LlavaModel(cfg, rngs=nnx.Rngs(0), lora=lora))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, _deep_merge(base, adapter)))
    nnx.update(model, state)
    return cfg, lora, pm, model, base, adapter


def _torch_inputs(batch):
    mask = torch.from_numpy((batch["segment_ids"] != 0).astype(np.int64))
    pixels = R.nhwc_to_nchw(batch["pixel_values"][:, 0])
    return torch.from_numpy(batch["input_ids"].astype(np.int64)), pixels, mask


def _assert_close(got, ref, tol, what):
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(np.asarray(got) - np.asarray(ref)).max())
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol} x {scale:.3g}"


@pytest.fixture(scope="module")
def pair():
    return _peft_pair()


def test_forward_matches_peft(pair):
    cfg, lora, pm, model, _, _ = pair
    batch = make_batch(cfg, 2, 16, seed=3, packed_rows=0)
    ids, pixels, mask = _torch_inputs(batch)
    with torch.no_grad():
        ref = pm(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits.numpy()
    got = np.asarray(R.jitted(model)(batch["input_ids"], batch["pixel_values"][:, 0],
                                     batch["segment_ids"]))
    real = batch["segment_ids"] != 0
    _assert_close(got[real], ref[real], LOGIT_TOL, "LoRA logits vs peft")
    # The adapters matter: without them the logits move by far more than the tolerance.
    with pm.disable_adapter(), torch.no_grad():
        plain = pm(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits.numpy()
    assert np.abs(plain[real] - ref[real]).max() > 100 * LOGIT_TOL * max(1.0, np.abs(ref).max())


def test_adapter_gradients_match_torch(pair):
    cfg, lora, pm, model, _, _ = pair
    batch = make_batch(cfg, 2, 16, seed=4, packed_rows=0)
    ids, pixels, mask = _torch_inputs(batch)
    pm.zero_grad()
    logits = pm(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
    labels = torch.from_numpy(batch["labels"].astype(np.int64))
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=IGNORE_INDEX)
    loss.backward()
    torch_grads = {n: p.grad.numpy() for n, p in pm.named_parameters() if p.requires_grad}

    graphdef, state = nnx.split(model)
    trainable, frozen = optim.split_trainable(state, 2, lora)
    params = nnx.to_pure_dict(trainable)
    assert set(params) == {"projector", "language_model"}
    spec = S.StepSpec(graphdef, tx=None, schedule=None)
    jb = dict(batch, pixel_values=batch["pixel_values"][:, 0])
    ours_loss, grads, _ = jax.jit(lambda p, f, b: S.loss_and_grads(spec, p, f, b))(params, frozen, jb)
    np.testing.assert_allclose(float(ours_loss), loss.item(), rtol=1e-5)

    layers = grads["language_model"]["layers"]
    compared = 0
    for target in lora.targets:
        parent, attr = lora_lib.TARGETS[target]
        for i in range(cfg.text.num_layers):
            stem = f"base_model.model.model.language_model.layers.{i}.{parent}.{attr}"
            _assert_close(np.asarray(layers[parent][attr]["lora_a"][i]).T, torch_grads[f"{stem}.lora_A.default.weight"],
                          GRAD_TOL, f"{stem} lora_A grad")
            _assert_close(np.asarray(layers[parent][attr]["lora_b"][i]).T, torch_grads[f"{stem}.lora_B.default.weight"],
                          GRAD_TOL, f"{stem} lora_B grad")
            compared += 2
    for name in ("linear_1", "linear_2"):
        stem = f"base_model.model.model.multi_modal_projector.modules_to_save.default.{name}"
        _assert_close(np.asarray(grads["projector"][name]["kernel"]).T, torch_grads[f"{stem}.weight"], GRAD_TOL,
                      f"projector {name} grad")
        _assert_close(grads["projector"][name]["bias"], torch_grads[f"{stem}.bias"], GRAD_TOL, f"projector {name} bias")
    # Every trainable torch tensor was compared: nothing else trains on either side.
    assert compared + 4 == len(torch_grads)
    assert len(jax.tree.leaves(params)) == 2 * len(lora.targets) + 4  # stacked over layers on our side


def test_peft_folder_round_trip_and_hf_load(pair, tmp_path):
    """Our export loads into peft on the exported HF model and gives our logits; reading it back
    gives the same adapters."""
    import transformers


    cfg, lora, pm, model, base, adapter = pair
    full = _deep_merge(base, adapter)
    hf_dir, peft_dir = tmp_path / "hf", tmp_path / "adapter"
    write_hf_llava(base, cfg, str(hf_dir), progress=False)
    peft_io.write_peft(str(peft_dir), full, cfg, lora)
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(str(hf_dir), attn_implementation="eager")
    loaded = peft.PeftModel.from_pretrained(hf, str(peft_dir)).eval()
    batch = make_batch(cfg, 2, 16, seed=5, packed_rows=0)
    ids, pixels, mask = _torch_inputs(batch)
    with torch.no_grad():
        ref = loaded(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits.numpy()
    got = np.asarray(R.jitted(model)(batch["input_ids"], batch["pixel_values"][:, 0], batch["segment_ids"]))
    real = batch["segment_ids"] != 0
    _assert_close(got[real], ref[real], LOGIT_TOL, "peft-loaded export vs ours")

    back_lora, back = peft_io.read_peft(str(peft_dir), cfg)
    assert (back_lora.rank, back_lora.alpha, back_lora.targets) == (lora.rank, lora.alpha, lora.targets)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(adapter)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_merge_equals_unmerged(pair):
    cfg, lora, _, model, base, adapter = pair
    merged = peft_io.merge_into(base, adapter, lora)
    plain = nnx.eval_shape(lambda: LlavaModel(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(plain, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, merged))
    nnx.update(plain, state)
    batch = make_batch(cfg, 2, 16, seed=6, packed_rows=0)
    args = (batch["input_ids"], batch["pixel_values"][:, 0], batch["segment_ids"])
    got, ref = np.asarray(R.jitted(plain)(*args)), np.asarray(R.jitted(model)(*args))
    real = batch["segment_ids"] != 0
    _assert_close(got[real], ref[real], LOGIT_TOL, "merged vs unmerged logits")
    # The in-JAX merge (lora.merged_params) agrees with the numpy one.
    full = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for x, y in zip(jax.tree.leaves(lora_lib.merged_params(full, lora)), jax.tree.leaves(merged)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
