"""Model shapes and training recipes shared by the config files in configs/ (`llava.py`: LLaVA-1 and
1.5, stage 1 / stage 2 / LoRA; `llava_next.py`: LLaVA-1.6). They live in the package so that a config
file, loaded by path from anywhere, imports them like any module, with no sys.path edits."""
