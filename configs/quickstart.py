"""The quickstart's stage 2 as a training config (the model is llava_jax.quickstart.config's).

`llava-jax quickstart` runs the whole recipe; to rerun stage 2 by hand on an existing quickstart folder:
  llava-jax train --config configs/quickstart.py --workdir W
It starts from ./quickstart_out/stage1 (the aligned model) and reads ./quickstart_out/data/vqa.json.
"""
from llava_jax.quickstart.config import stage_config


def get_config(arg="stage2"):
    return stage_config(arg or "stage2", root="quickstart_out")
