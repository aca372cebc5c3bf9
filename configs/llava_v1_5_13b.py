"""LLaVA-1.5: CLIP ViT-L/14 at 336 px, mlp2x_gelu projector, Vicuna-13B v1.5.

Usage: llava-jax train --config configs/llava_v1_5_13b.py:stage1 --workdir W   (stage 1: projector only)
       llava-jax train --config configs/llava_v1_5_13b.py:stage2 --workdir W   (stage 2: projector + LLM; default)
"""
import pathlib
import sys

_here = str(pathlib.Path(__file__).resolve().parent)
if _here not in sys.path:  # loaded by path: reach configs/_common.py through this folder
    sys.path.insert(0, _here)

import _common  # noqa: E402


def get_config(arg="stage2"):
    return _common.llava_config("v1.5", "13b", arg)
