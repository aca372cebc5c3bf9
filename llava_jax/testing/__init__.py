"""Helpers shared by the tests (tests/) and the benchmarks (benchmarks/): their one home.

  tokenizer      a small LLaMA-style tokenizer trained in-process (nothing is downloaded)
  checkpoints    tiny model folders (random weights + that tokenizer) and the greedy answer they give
  batches        training batches in the pipeline's format, and a stand-in for the data pipeline
  processes      subprocess runners with N host devices (multi-device / multi-process checks)
  hf_reference   transformers' PyTorch models built from our config (needs torch: the test extra)
  fault_server   an OpenAI-compatible chat server that injects faults, and our server on a tiny model

The tiny model itself is a recipe (llava_jax.recipes.tiny.tiny_llava_config), since configs/tiny.py
trains it too. Nothing here is imported by the rest of the package.
"""
