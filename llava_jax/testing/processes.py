"""Fresh interpreters for the checks that must set XLA_FLAGS before jax is imported: N host CPU
devices (multi-device) or several jax.distributed processes on localhost (multi-process)."""
from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import textwrap

# The source checkout these helpers run from (tests and benchmarks use it as the working folder and
# to find configs/, convert/ and launch/); the package is installed from it in editable mode.
REPO = pathlib.Path(__file__).resolve().parents[2]


def subprocess_env(num_devices: int = 1, **extra) -> dict:
    """os.environ for a child on CPU with `num_devices` host devices; `extra` adds variables."""
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_python(code: str, *, num_devices: int = 1, timeout: float = 300, cwd=None, **env) -> str:
    """Run `code` in a fresh interpreter with `num_devices` CPU devices; return stdout (raise on failure)."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or REPO, env=subprocess_env(num_devices, **env))
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed (rc={proc.returncode})\nstdout:\n{proc.stdout[-4000:]}\n"
                             f"stderr:\n{proc.stderr[-8000:]}")
    return proc.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
