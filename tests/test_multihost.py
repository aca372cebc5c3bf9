"""Two CPU processes (4 devices each) train as one JAX job, save, and resume from the checkpoint;
the checkpoint then restores onto a different mesh (one device) in this process."""
import subprocess
import sys

import jax
import numpy as np

from llava_jax import checkpoint, sharding
from llava_jax.models.config import config_from_any
from llava_jax.testing.processes import REPO, free_port, subprocess_env
from llava_jax.train import step as step_lib
from llava_jax.train.checkpointer import TrainCheckpointer
from llava_jax.train.metrics import read_metrics
from llava_jax.train.setup import train_setup

TINY = str(REPO / "configs" / "tiny.py")


def _run_two_processes(workdir, total_steps):
    port = free_port()
    procs = []
    for pid in range(2):
        cmd = [sys.executable, "-m", "llava_jax.cli", "train", "--config", f"{TINY}:stage2", "--workdir", str(workdir),
               "--noprogress", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
               f"--process_id={pid}", f"--config.total_steps={total_steps}", "--config.checkpoint_every=2",
               "--config.global_batch_size=8", "--config.mesh.fsdp=4", "--config.mesh.data=2"]
        procs.append(subprocess.Popen(cmd, env=subprocess_env(4), cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=400)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


def test_two_processes_train_save_resume_and_restore_elsewhere(tmp_path):
    workdir = tmp_path / "run"
    _run_two_processes(workdir, 2)
    outs = _run_two_processes(workdir, 4)
    assert "resumed from" in outs[0] and "at step 2" in outs[0]
    steps = [r["step"] for r in read_metrics(str(workdir), "loss")]
    assert steps == [1, 2, 3, 4]
    step_dir = workdir / "checkpoints" / "4"
    # each process saved the position of its own data shard
    assert sorted(p.name for p in (step_dir / "data").glob("process_*.json")) == [
        "process_0-of-2.json", "process_1-of-2.json"]

    # restore the 8-device (2 x 4 mesh) checkpoint onto this process's single device
    from llava_jax.config_files import load_config

    config = load_config(f"{TINY}:stage2")
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    layout = train_setup(config, config_from_any(config.model), mesh, 4).layout
    ckpt = TrainCheckpointer(str(workdir), keep=2)
    params, opt_state, data_state, meta = ckpt.restore(4, step_lib.merged_params(layout.abstract),
                                                       layout.abstract["opt_state"])
    ckpt.close()
    assert meta["step"] == 4 and data_state is None  # positions of 2 hosts do not map onto 1
    # the same arrays through the other reader (PyTree restore used for init.base / init.stage1)
    stored = checkpoint.restore_params_subset(str(workdir), step_lib.merged_params(layout.abstract))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(stored)):
        assert a.sharding.mesh.shape == mesh.shape or len(a.sharding.device_set) == 1
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    mu = [x for x in jax.tree.leaves(opt_state) if getattr(x, "ndim", 0) > 0]
    assert mu and all(np.isfinite(np.asarray(x)).all() for x in mu)
