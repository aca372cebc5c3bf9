"""`llava-jax plan`: rows, steps, hours and chip-hours of a stage from the analytic step FLOPs at an
MFU band, and the cost model's depth scaling of XLA's cost analysis (llava_jax/cost_model.py)."""
import json
import math
import subprocess
import sys

import pytest

from llava_jax import cost_model, plan
from llava_jax.config_files import load_config
from llava_jax.models.config import config_from_any
from llava_jax.testing.processes import REPO, subprocess_env
from llava_jax.train import flops

TINY = str(REPO / "configs" / "tiny.py")


def test_rows_follow_packing_tokens_and_image_slots():
    work = plan.Workload(samples=1000, avg_tokens=600, image_fraction=1.0)
    kw = dict(max_length=2048, packing_efficiency=0.9)
    assert plan.rows_needed(work, packing=False, max_images_per_row=1, **kw) == 1000
    # by tokens 1000 * 600 / (2048 * 0.9) = 325.5 rows, with room for 4 images per row ...
    assert plan.rows_needed(work, packing=True, max_images_per_row=4, **kw) == 326
    # ... but 3 or 2 image slots per row hold only 3 or 2 of the (all image) samples
    assert plan.rows_needed(work, packing=True, max_images_per_row=3, **kw) == 334
    assert plan.rows_needed(work, packing=True, max_images_per_row=2, **kw) == 500


def test_plan_hours_and_chip_hours():
    config = load_config(f"{TINY}:stage2")
    with config.unlocked():
        config.data.packing = True
        config.data.max_images_per_row = 2
    work = plan.Workload(samples=10_000, avg_tokens=40, image_fraction=0.5, epochs=2)
    p = plan.make_plan(config, work, chips=8, peak_flops=197e12, mfu_band=(0.4, 0.5), packing_efficiency=0.8)
    rows = math.ceil(10_000 * 40 / (64 * 0.8))  # 7813 by tokens; images need only 2500
    assert p.rows == rows and p.steps == math.ceil(rows * 2 / 4)
    step = flops.step_flops(config_from_any(config.model), 2, 4, 64, 2).total
    assert p.model_flops_per_step == pytest.approx(step)
    assert p.seconds_per_step[0.4] == pytest.approx(step / (8 * 197e12 * 0.4))
    assert p.hours(0.5) == pytest.approx(p.steps * step / (8 * 197e12 * 0.5) / 3600)
    assert p.chip_hours(0.5) == pytest.approx(8 * p.hours(0.5))


class _Compiled:
    def __init__(self, flops_, bytes_):
        self.cost = {"flops": flops_, "bytes accessed": bytes_}

    def cost_analysis(self):
        return self.cost


def test_cost_model_scales_shallow_compiles_to_the_real_depth():
    """F = F(1,1) + (L_text - 1) dT + (L_vision_used - 1) dV, from compiles of shallow variants that
    keep the shapes but drop microbatching and loss chunks."""
    config = load_config(f"{TINY}:stage2")  # 2 decoder layers; CLIP 3 layers, features at -2: 2 used
    with config.unlocked():
        config.model.text.num_layers = 5
        config.microbatch_size = 2
    seen = []

    def fake_compile(c, devices):
        cfg = config_from_any(c.model)
        seen.append((cfg.text.num_layers, flops.vision_layers_used(cfg), int(c.microbatch_size),
                     int(c.global_batch_size)))
        return None, _Compiled(100.0 + 10.0 * cfg.text.num_layers + 3.0 * flops.vision_layers_used(cfg),
                               1000.0 + 7.0 * cfg.text.num_layers)

    cost = cost_model.step_cost(config, devices=None, compile_fn=fake_compile)
    assert sorted(seen) == [(1, 1, 0, 4), (1, 2, 0, 4), (2, 1, 0, 4)]
    assert cost.flops == pytest.approx(100 + 10 * 5 + 3 * 2)
    assert cost.hbm_bytes == pytest.approx(1000 + 7 * 5)
    chip = cost_model.Chip.of("TPU v5 lite")
    assert (chip.peak_flops, chip.hbm_bandwidth) == (197e12, 819e9)
    assert cost.roofline_seconds(chip) == pytest.approx(max(156 / 197e12, 1035 / 819e9))


libtpu_missing = pytest.mark.skipif(
    __import__("importlib").util.find_spec("libtpu") is None, reason="libtpu is needed for TPU topologies")


def _plan(*args):
    return subprocess.run([sys.executable, "-m", "llava_jax.cli", "plan", "--config", f"{TINY}:stage2",
                           "--topology", "v5e:2x4", *args], env=subprocess_env(1), cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@libtpu_missing
def test_plan_cli_prints_the_table_and_json():
    proc = _plan("--samples", "1000", "--avg-tokens", "50", "--global-batch", "16", "--packing", "on",
                 "--no-compile", "--mfu", "0.4,0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["chips"] == 8 and result["device_kind"].startswith("TPU v5")
    assert result["rows"] == math.ceil(1000 * 50 / (64 * plan.DEFAULT_PACKING_EFFICIENCY))
    assert result["steps"] == math.ceil(result["rows"] / 16)
    hours = result["mfu"]["0.4"]["hours"]
    assert hours == pytest.approx(result["steps"] * result["model_flops_per_step"] / (8 * 197e12 * 0.4) / 3600)
    assert "chip-hours" in proc.stdout


@libtpu_missing
def test_plan_cli_bad_mfu_is_one_line():
    proc = _plan("--samples", "1000", "--avg-tokens", "50", "--mfu", "45")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--mfu" in proc.stderr
