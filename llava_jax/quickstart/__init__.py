"""`llava-jax quickstart`: the whole LLaVA recipe on a synthetic world, on a CPU (see run.py)."""


def main(argv=None) -> int:
    from llava_jax.quickstart.run import main as run_main

    return run_main(argv)
