"""Model shapes and training recipes shared by the config files in configs/ (`llava.py`: LLaVA-1 and
1.5, stage 1 / stage 2 / LoRA; `llava_next.py`: LLaVA-1.6; `tiny.py`: the tiny model of configs/tiny.py,
the tests and the benchmarks). They live in the package so that a config file, loaded by path from
anywhere, imports them like any module, with no sys.path edits."""
