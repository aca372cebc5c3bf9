"""`llava-jax <command>`: dispatch to the command's own module (each parses its own arguments)."""
from __future__ import annotations

import importlib
import sys

# name -> (module with main(argv), one-line help)
COMMANDS = {
    "quickstart": ("llava_jax.quickstart", "the whole recipe on a synthetic world, on a CPU"),
    "train": ("llava_jax.train.loop", "train a stage from a config (--config configs/X.py:ARG --workdir DIR)"),
    "info": ("llava_jax.info", "parameter counts of a config, per component"),
    "aot": ("llava_jax.aot", "compile the train step for a TPU topology and report memory"),
    "chat": ("llava_jax.infer.chat", "chat with a checkpoint in the terminal"),
    "serve": ("llava_jax.infer.server", "OpenAI-compatible HTTP server with a chat page"),
    "eval": ("llava_jax.eval.cli", "scienceqa | llava-bench | vqa evaluations"),
    "datagen": ("llava_jax.datagen.cli", "instruction-data generation and the CC3M filter"),
    "data": ("llava_jax.data.cli", "data preparation (LLaVA JSON -> ArrayRecord shards)"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: llava-jax <command> [args]", "", "commands:"]
    lines += [f"  {name:<{width}}  {doc}" for name, (_, doc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"llava-jax: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
