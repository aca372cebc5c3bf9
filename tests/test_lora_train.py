"""LoRA training end to end on the synthetic data (configs/tiny.py): adapters-only checkpoints, an
exact resume, a frozen int8 base, merge / export / --adapter loading, and refused configs."""
import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from llava_jax import checkpoint, peft_io, validate
from llava_jax.models import lora as lora_lib
from llava_jax.models.config import config_from_any
from llava_jax.models.llava import LlavaModel
from llava_jax.testing.batches import make_batch
from llava_jax.testing.processes import REPO
from llava_jax.train import loop

TINY = str(REPO / "configs" / "tiny.py")


def _make_base(folder):
    """A 'pretrained' model folder (random tiny weights + the synthetic tokenizer), made without
    building the model (numpy draws into the parameter shapes) to keep the set-up fast."""
    from llava_jax.config_files import load_config

    config = load_config(f"{TINY}:stage2")
    cfg = config_from_any(config.model)
    rng = np.random.default_rng(7)
    params = jax.tree.map(lambda t: (rng.normal(size=t.shape) * 0.05).astype(np.float32),
                          checkpoint.params_target(cfg, host=True))
    checkpoint.save_model(str(folder), params, cfg, tokenizer=loop.synthetic_tokenizer(config))
    return cfg, params


def _lora_args(workdir, base, *extra):
    return ["--config", f"{TINY}:stage2", "--workdir", str(workdir), "--noprogress", f"--config.init.base={base}",
            "--config.lora.rank=4", "--config.lora.alpha=8", "--config.lora.dropout=0.1",
            "--config.optim.projector_lr=2e-4", "--config.total_steps=6", "--config.checkpoint_every=3",
            "--config.keep_checkpoints=3", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    cfg, base_params = _make_base(root / "base")
    run = root / "run"
    assert loop.main(_lora_args(run, root / "base")) == 0
    return root, cfg, base_params, run


def _orbax_to_hf():
    import importlib.util

    spec = importlib.util.spec_from_file_location("orbax_to_hf", REPO / "convert" / "orbax_to_hf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stored(run, step):
    return checkpoint.restore_params(str(run / "checkpoints" / str(step) / "params"))


def test_checkpoints_hold_adapters_and_projector_only(trained):
    root, cfg, base_params, run = trained
    stored = checkpoint.stored_shapes(str(run / "checkpoints" / "6" / "params"))
    assert all(k.startswith("projector.") or k.split(".")[-1] in ("lora_a", "lora_b") for k in stored), sorted(stored)
    assert len([k for k in stored if k.endswith("lora_a")]) == 7
    params = _stored(run, 6)
    # Trained: B left zero and the projector left its base values.
    assert np.abs(params["language_model"]["layers"]["mlp"]["down_proj"]["lora_b"]).max() > 0
    assert not np.array_equal(params["projector"]["linear_1"]["kernel"], base_params["projector"]["linear_1"]["kernel"])
    run_file = json.loads((run / peft_io.RUN_FILE).read_text())
    assert run_file["lora"]["rank"] == 4 and run_file["base"] == str(root / "base")


def test_resume_continues_exactly(trained, tmp_path):
    root, _, _, run = trained
    cut = tmp_path / "cut"
    shutil.copytree(run, cut)
    shutil.rmtree(cut / "checkpoints" / "6")  # as if the run had stopped after step 3
    assert loop.main(_lora_args(cut, root / "base")) == 0
    for a, b in zip(jax.tree.leaves(_stored(run, 6)), jax.tree.leaves(_stored(cut, 6))):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_merge_and_adapter_loading_agree(trained, tmp_path):
    """`llava-jax merge` writes a plain folder whose logits equal the unmerged LoRA model's, and
    load_pretrained of the workdir, of base + --adapter and of the exported peft folder agree."""
    root, cfg, base_params, run = trained
    lora, adapter, _ = peft_io.read_run_adapter(str(run))
    unmerged = nnx.eval_shape(lambda: LlavaModel(cfg, rngs=nnx.Rngs(0), lora=lora))
    state = nnx.state(unmerged, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(np.asarray, loop.step_lib._deep_merge(base_params, adapter)))
    nnx.update(unmerged, state)

    merged_dir, peft_dir = tmp_path / "merged", tmp_path / "peft"
    assert peft_io.main(["--adapter", str(run), "--out", str(merged_dir)]) == 0
    assert checkpoint.tokenizer_files(str(merged_dir)) and (merged_dir / "inference.json").exists()
    assert _orbax_to_hf().main(["--ckpt", str(run), "--peft", "--out", str(peft_dir)]) == 0

    batch = make_batch(cfg, 2, 16, seed=1, packed_rows=0)
    args = (batch["input_ids"], batch["pixel_values"][:, 0], batch["segment_ids"])
    ref = np.asarray(unmerged(*args))
    real = batch["segment_ids"] != 0
    for how in ("merged", "workdir", "adapter", "peft"):
        if how == "merged":
            model, _ = checkpoint.load_pretrained(str(merged_dir))
        elif how == "workdir":
            model, _ = checkpoint.load_pretrained(str(run))
        elif how == "adapter":
            model, _ = checkpoint.load_pretrained(str(root / "base"), adapter=str(run))
        else:
            model, _ = checkpoint.load_pretrained(str(root / "base"), adapter=str(peft_dir))
        got = np.asarray(model(*args))
        np.testing.assert_allclose(got[real], ref[real], atol=1e-5, rtol=0, err_msg=how)


@pytest.mark.slow
def test_int8_base_trains_with_int8_kernels(trained, tmp_path):
    root, cfg, base_params, _ = trained
    run = tmp_path / "int8"
    assert loop.main(_lora_args(run, root / "base", "--config.lora.base_dtype=int8", "--config.total_steps=1",
                                "--config.lora.targets=q,v")) == 0
    stored = checkpoint.stored_shapes(str(run / "checkpoints" / "1" / "params"))
    assert len([k for k in stored if k.endswith("lora_a")]) == 2
    # The frozen base as the run holds it: int8 kernels whose dequantized values are the base's to 1/254 of a column's max.
    lora = lora_lib.LoraConfig(rank=4, alpha=8, targets=("q", "v"), base_dtype="int8")
    quant = lora_lib.base_params_for(base_params, lora)["language_model"]["layers"]["self_attn"]["q_proj"]
    assert quant["kernel"].dtype == np.int8
    w = base_params["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    err = np.abs(np.asarray(lora_lib.base_kernel(quant["kernel"], quant["kernel_scale"])) - w)
    assert (err <= np.abs(w).max(axis=-2, keepdims=True) / 254 + 1e-7).all()


@pytest.mark.parametrize("flag, says", [
    ("--config.lora.targets=q,qkv", "'qkv'"),
    ("--config.lora.rank=100", "larger than the q_proj layer"),
    ("--config.stage=1", "stage 2"),
    ("--config.lora.base_dtype=int4", "base_dtype"),
])
def test_bad_lora_configs_are_refused_before_compiling(trained, tmp_path, flag, says):
    root = trained[0]
    with pytest.raises(validate.UserError, match=says):
        loop.main(["--config", f"{TINY}:stage2", "--workdir", str(tmp_path / "w"), "--noprogress",
                   f"--config.init.base={root / 'base'}", "--config.lora.rank=4", flag])
    assert not (tmp_path / "w" / "checkpoints").exists()
