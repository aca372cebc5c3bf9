"""`llava-jax train` end to end on the built-in synthetic data (configs/tiny.py)."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from llava_jax import checkpoint, validate
from llava_jax.testing.processes import REPO, subprocess_env
from llava_jax.train import loop
from llava_jax.train.metrics import read_metrics

TINY = str(REPO / "configs" / "tiny.py")


def _train_cmd(workdir, *extra):
    return [sys.executable, "-m", "llava_jax.cli", "train", "--config", f"{TINY}:stage2", "--workdir", str(workdir),
            "--noprogress", "--config.total_steps=40", "--config.log_every=1", "--config.checkpoint_every=1000",
            *extra]


def _losses(workdir):
    by_step = {}
    for r in read_metrics(str(workdir), "loss"):
        by_step[r["step"]] = r["loss"]  # a re-logged step keeps its latest value
    return by_step


def test_sigterm_then_rerun_logs_the_same_losses_as_an_uninterrupted_run(tmp_path):
    env = subprocess_env(1)
    full, cut = tmp_path / "full", tmp_path / "cut"
    # Both runs at once: the machine's cores are shared anyway and the wall time halves.
    uninterrupted = subprocess.Popen(_train_cmd(full), env=env, cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
    interrupted = subprocess.Popen(_train_cmd(cut), env=env, cwd=REPO, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    metrics = cut / "metrics.jsonl"
    while time.time() < deadline and interrupted.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    interrupted.send_signal(signal.SIGTERM)
    out_cut = interrupted.communicate(timeout=240)[0]
    out_full = uninterrupted.communicate(timeout=240)[0]
    assert interrupted.returncode == 0, out_cut[-3000:]
    assert uninterrupted.returncode == 0, out_full[-3000:]
    stopped_at = checkpoint.latest_step(str(cut))
    assert stopped_at is not None and 3 <= stopped_at < 40, (stopped_at, out_cut[-2000:])
    assert "SIGTERM" in out_cut

    resumed = subprocess.run(_train_cmd(cut), env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from" in resumed.stderr + resumed.stdout

    a, b = _losses(full), _losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, 41))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6 * abs(a[step]), (step, a[step], b[step])
    record = read_metrics(str(full), "loss")[-1]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
        assert key in record
    assert record["tokens_per_s"] > 0
    # the workdir is a loadable model folder: config.json + tokenizer + checkpoints/<step>/params
    assert (full / "config.json").exists() and checkpoint.tokenizer_files(str(full))
    assert os.listdir(full / "tensorboard")
    model, cfg = checkpoint.load_pretrained(str(full))
    assert cfg.text.vocab_size == 128
    # chat/serve prompt it with the template and image aspect it was trained with (tiny stage 2)
    from llava_jax.infer.prompting import chat_settings
    settings = chat_settings(str(full))
    assert (settings.template, settings.image_aspect) == ("vicuna_v1", "pad")


def test_stage2_starts_from_stage1_projector_and_base_weights(tmp_path):
    s1 = tmp_path / "s1"
    assert loop.main(["--config", f"{TINY}:stage1", "--workdir", str(s1), "--noprogress",
                      "--config.total_steps=2", "--config.optim.warmup_ratio=0"]) == 0
    stage1 = checkpoint.restore_params(checkpoint.params_location(str(s1)))
    from llava_jax.infer.prompting import chat_settings
    recorded = chat_settings(str(s1))  # chat/serve prompt a checkpoint the way it was trained
    assert (recorded.template, recorded.image_aspect) == ("plain", "square")
    # a "converted base" model folder: a differently seeded model without a projector item
    base_cfg = checkpoint.read_config(str(s1))
    from flax import nnx

    from llava_jax.models.llava import LlavaModel

    base_params = nnx.state(LlavaModel(base_cfg, rngs=nnx.Rngs(7)), nnx.Param).to_pure_dict()
    base_params.pop("projector")
    base = tmp_path / "base"
    checkpoint.save_model(str(base), base_params, base_cfg, tokenizer_dir=str(s1))

    s2 = tmp_path / "s2"
    # lr 0: the step changes nothing, so the saved state is exactly what was loaded
    assert loop.main(["--config", f"{TINY}:stage2", "--workdir", str(s2), "--noprogress",
                      "--config.total_steps=1", "--config.optim.lr=0", f"--config.init.base={base}",
                      f"--config.init.stage1={s1}"]) == 0
    got = checkpoint.restore_params(checkpoint.params_location(str(s2)))
    same = lambda x, y: all(jax.tree.leaves(jax.tree.map(np.array_equal, x, y)))  # noqa: E731
    assert same(got["projector"], stage1["projector"])
    assert same(got["language_model"], base_params["language_model"])
    assert same(got["vision_tower"], base_params["vision_tower"])
    assert not same(got["language_model"], stage1["language_model"])
    assert json.loads((s2 / "config.json").read_text())["text"]["vocab_size"] == 128


@pytest.mark.parametrize("template", ["chatml", "chatml_direct"])
def test_synthetic_tokenizer_serves_the_chatml_templates(template):
    """<|im_start|> and <|im_end|> are special tokens of the built-in tokenizer; every answer of a
    batch ends with <|im_end|> as a target, and <|im_start|> never is one."""
    from llava_jax.config_files import load_config
    from llava_jax.data import conversation as conv
    from llava_jax.data.pipeline import make_train_iterator
    from llava_jax.models.config import config_from_any

    config = load_config(f"{TINY}:stage2")
    config.data.template = template
    tok = loop.synthetic_tokenizer(config)
    end, start = conv.check_tokenizer(template, tok), tok.convert_tokens_to_ids(conv.IM_START)
    assert tok.convert_ids_to_tokens([start, end]) == ["<|im_start|>", "<|im_end|>"] and start in tok.all_special_ids
    assert tok.convert_tokens_to_ids("<image>") == 127 and len(tok) == 128
    batch = next(make_train_iterator(config, tok, config_from_any(config.model), process_index=0, process_count=1))
    ids, labels = batch["input_ids"], batch["labels"]
    assert (labels == end).sum(axis=1).min() >= 1 and not (labels == start).any()
    assert not (labels == tok.unk_token_id).all(axis=1).any()


def test_synthetic_tokenizer_refuses_the_tokenizer_template():
    from llava_jax.config_files import load_config

    config = load_config(f"{TINY}:stage2")
    config.data.template = "tokenizer"
    with pytest.raises(validate.ConfigError, match="the synthetic source's built-in tokenizer has none; "
                                                   "set --config.data.template=chatml"):
        loop.synthetic_tokenizer(config)
