"""`llava-jax info --config configs/X.py[:ARG]`: parameter counts per component, nothing allocated.

Prints one line per component and the total, integers without separators:
    vision_tower: N
    projector: N
    language_model: N
    total: N
The vision tower count includes its last layer and post_layernorm, which LLaVA never uses but the
parameter tree (like the reference's checkpoints) holds.
"""
from __future__ import annotations

import argparse
import math
import sys

import jax

COMPONENTS = ("vision_tower", "projector", "language_model")


def parameter_counts(model_config) -> dict:
    """{'vision_tower': n, 'projector': n, 'language_model': n, 'total': n} from shapes alone."""
    from llava_jax.checkpoint import abstract_model
    from llava_jax.models.config import config_from_any
    from flax import nnx

    state = nnx.to_pure_dict(nnx.state(abstract_model(config_from_any(model_config)), nnx.Param))
    unknown = set(state) - set(COMPONENTS)
    if unknown:
        raise RuntimeError(f"parameters outside the known components: {sorted(unknown)}")
    counts = {name: sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(state.get(name, {})))
              for name in COMPONENTS}
    counts["total"] = sum(counts.values())
    return counts


def format_counts(counts: dict) -> str:
    return "\n".join(f"{name}: {counts[name]}" for name in (*COMPONENTS, "total"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="llava-jax info", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="configs/X.py or configs/X.py:ARG")
    args = parser.parse_args(argv)
    from llava_jax.config_files import load_config
    from llava_jax.validate import ConfigError

    config = load_config(args.config)  # a missing file or a bad argument: a UserError (one line, exit 2)
    try:
        counts = parameter_counts(config.model)
    except (ValueError, TypeError, KeyError) as e:  # e.g. an unknown projector type in the config file
        raise ConfigError(f"--config {args.config}: {e}") from e
    print(format_counts(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
