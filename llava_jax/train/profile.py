"""`--config.profile_steps=a,b`: a jax.profiler trace of train steps a..b (inclusive, numbered as
the log numbers them) written to WORKDIR/profile, which TensorBoard's profile plugin reads
(`tensorboard --logdir WORKDIR/profile`). Pick steps after the first (it carries the compile)."""
from __future__ import annotations

import os
from typing import Optional

import jax

from llava_jax.validate import ConfigError


def parse_profile_steps(text) -> Optional[tuple]:
    """'' -> None; 'a,b' (or 'a' for one step) -> (a, b) with 1 <= a <= b."""
    text = str(text or "").strip()
    if not text:
        return None
    try:
        parts = [int(x) for x in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not 1 <= parts[0] <= parts[1]:
        raise ConfigError(f"profile_steps takes FIRST,LAST step numbers with 1 <= FIRST <= LAST "
                          f"(e.g. --config.profile_steps=5,7), got {text!r}")
    return parts[0], parts[1]


class StepProfiler:
    """Call `before(step)` with the number of the step about to run and `after(step, outputs)` with
    the number of the step just run; `close()` stops a trace still open (a run that ended early)."""

    def __init__(self, spec, workdir: str):
        self.steps = parse_profile_steps(spec)
        self.directory = os.path.join(workdir, "profile")
        self.active = False

    def before(self, step: int) -> None:
        if self.steps and not self.active and self.steps[0] <= step <= self.steps[1]:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after(self, step: int, outputs) -> None:
        if self.active and step >= self.steps[1]:
            jax.block_until_ready(outputs)  # the trace must hold the step's device work
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
