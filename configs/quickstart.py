"""The quickstart's stages as training configs (the model is llava_jax.quickstart.config's).

`llava-jax quickstart` runs them all; to rerun one stage by hand on an existing quickstart folder:
  llava-jax train --config configs/quickstart.py:stage2 --workdir W --config.data.json_path=...
ARG is lm | stage1 | stage2 (default stage2); data paths point into ./quickstart_out.
"""
from llava_jax.quickstart.config import stage_config


def get_config(arg="stage2"):
    return stage_config(arg or "stage2", root="quickstart_out")
