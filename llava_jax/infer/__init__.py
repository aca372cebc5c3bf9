"""Inference: `llava_jax.infer.generate(model, input_ids, ...)` and the reusable `Generator`."""
from llava_jax.infer.generate import Generator, generate  # noqa: F401  (the public entry point)
