"""`--config.profile_steps=a,b` writes a jax.profiler trace of those train steps into WORKDIR/profile."""
import subprocess
import sys

import pytest

from llava_jax.testing.processes import REPO, subprocess_env
from llava_jax.train.profile import parse_profile_steps
from llava_jax.validate import ConfigError

TINY = str(REPO / "configs" / "tiny.py")


def _train(workdir, *extra):
    return subprocess.run([sys.executable, "-m", "llava_jax.cli", "train", "--config", f"{TINY}:stage2",
                           "--workdir", str(workdir), "--noprogress", "--config.total_steps=4",
                           "--config.checkpoint_every=1000", *extra],
                          env=subprocess_env(1), cwd=REPO, capture_output=True, text=True, timeout=300)


def test_profile_steps_write_a_trace(tmp_path):
    proc = _train(tmp_path / "w", "--config.profile_steps=2,3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    traces = list((tmp_path / "w" / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 1000


def test_profile_steps_parse_and_refuse_bad_values():
    assert parse_profile_steps("") is None
    assert parse_profile_steps("5") == (5, 5)
    assert parse_profile_steps("3,7") == (3, 7)
    for bad in ("7,3", "0,2", "a,b", "1,2,3"):
        with pytest.raises(ConfigError, match="profile_steps"):
            parse_profile_steps(bad)


def test_bad_profile_steps_is_one_line_before_training(tmp_path):
    proc = _train(tmp_path / "w", "--config.profile_steps=9,x")
    assert proc.returncode == 2
    assert "profile_steps" in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
