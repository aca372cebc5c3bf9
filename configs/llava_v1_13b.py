"""LLaVA v1 (paper): CLIP ViT-L/14 at 224 px, linear projector, Vicuna-13B v1.1.

Usage: llava-jax train --config configs/llava_v1_13b.py:stage1 --workdir W   (stage 1: projector only)
       llava-jax train --config configs/llava_v1_13b.py:stage2 --workdir W   (stage 2: projector + LLM; default)
"""
import pathlib
import sys

_here = str(pathlib.Path(__file__).resolve().parent)
if _here not in sys.path:  # loaded by path: reach configs/_common.py through this folder
    sys.path.insert(0, _here)

import _common  # noqa: E402


def get_config(arg="stage2"):
    return _common.llava_config("v1", "13b", arg)
