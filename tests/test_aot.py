"""`llava-jax aot` compiles the real train step for a TPU topology on this CPU machine (libtpu's
compile-only devices), and the launch scripts' dry runs print the gcloud commands."""
import json
import subprocess
import sys

import pytest

from llava_jax.testing.processes import REPO, subprocess_env

TINY = str(REPO / "configs" / "tiny.py")
libtpu = pytest.importorskip("libtpu", reason="libtpu is needed for compile-only TPU topologies")


def _aot(*args):
    proc = subprocess.run([sys.executable, "-m", "llava_jax.cli", "aot", "--config", f"{TINY}:stage2",
                           "--topology", "v5e:2x4", *args], env=subprocess_env(1), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout, json.loads(proc.stdout.strip().splitlines()[-1])


def test_aot_tiny_fits_on_v5e_2x4():
    # XLA's attention: the Pallas kernel (auto's choice on TPU) is opaque to XLA's cost analysis
    out, result = _aot("--global-batch", "16", "--mesh", "2,4,1", "--microbatch", "8", "--attention", "xla")
    assert result["topology"] == "v5e:2x4" and result["mesh"] == [2, 4, 1]
    assert result["fits"] is True
    assert 0 < result["per_device_peak_bytes"] < result["hbm_bytes"] == 16 * 1024 ** 3
    assert "temp_size_in_bytes" in out  # the memory breakdown is printed before the JSON line
    # cost model: one chip's share of the step, XLA-counted at the real depth, near the analytic
    # model FLOPs (XLA also counts softmax, norms, the full attention square and the optimizer;
    # the analytic count has the vocabulary projection at every position, XLA only at targets)
    analytic = result["model_flops_per_step"] / result["num_devices"]
    assert 0.7 * analytic < result["xla_flops_per_device"] < 2.0 * analytic
    assert result["hbm_bytes_accessed_per_device"] > 0
    assert result["peak_flops_per_device"] == 197e12 and result["hbm_bandwidth"] == 819e9
    expected = max(result["xla_flops_per_device"] / 197e12, result["hbm_bytes_accessed_per_device"] / 819e9)
    assert result["roofline_step_s"] == pytest.approx(expected)


def test_aot_reports_out_of_memory_as_fits_false():
    # XLA's dense attention scores alone need ~100 GiB per chip at this batch and length
    _, result = _aot("--global-batch", "1024", "--max-length", "4096", "--no-cost", "--attention", "xla")
    assert result["fits"] is False
    assert result["per_device_peak_bytes"] > result["hbm_bytes"]
    assert result["mesh"] == [1, 8, 1]


def test_launch_dry_runs_print_the_commands():
    def dry(*args):
        proc = subprocess.run([sys.executable, str(REPO / "launch" / "tpu.py"), args[0], "--dry-run", *args[1:]],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    common = ["--name", "llava-pod", "--zone", "us-central2-b", "--project", "my-proj"]
    create = dry("create", *common, "--accelerator-type", "v4-32")
    assert "gcloud compute tpus tpu-vm create llava-pod" in create and "--accelerator-type=v4-32" in create
    install = dry("install", *common)
    assert "--worker=all" in install and "pip install" in install
    train = dry("train", *common, "--config", "configs/llava_v1_5_7b.py:stage1", "--workdir", "gs://b/run",
                "--", "--config.total_steps=10")
    assert "--worker=all" in train and "llava_jax.cli train" in train and "--distributed" in train
    assert "--config.total_steps=10" in train and "gs://b/run" in train
    logs = dry("logs", *common)
    assert "train.log" in logs
    delete = dry("delete", *common)
    assert "tpu-vm delete llava-pod" in delete
