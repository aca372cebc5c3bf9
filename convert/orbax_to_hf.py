"""Export a llava-jax model folder (or training workdir: its latest step) as a llava-hf folder.

    python convert/orbax_to_hf.py --ckpt CKPT --out DIR [--dtype float32|float16|bfloat16]
                                  [--max-shard-size-gb 5]

DIR gets safetensors weights (sharded with model.safetensors.index.json when larger than the shard
size), config.json and the tokenizer files: LlavaForConditionalGeneration.from_pretrained(DIR) loads it
(LlavaNextForConditionalGeneration for a LLaVA-1.6 / AnyRes model).
Only the mlp2x_gelu projector exists in that format (LLaVA v1's linear projector does not).

A LoRA training workdir exports merged into its base; with --peft, DIR gets its adapter alone as a
peft folder (adapter_config.json + adapter_model.safetensors) that peft loads onto the exported base:
    python convert/orbax_to_hf.py --ckpt BASE --out HF_BASE
    python convert/orbax_to_hf.py --ckpt LORA_WORKDIR --peft --out ADAPTER
"""
from __future__ import annotations

import argparse
import os
import sys

# Needed when run as a script from a checkout without the package installed: `python convert/X.py`
# puts convert/, not the checkout, on sys.path.
if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llava_jax import cli  # noqa: E402
from llava_jax.hf.convert import export_hf, export_peft  # noqa: E402


def main(argv=None) -> int:
    cli.choose_platform()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="llava-jax model folder or training workdir")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--max-shard-size-gb", type=float, default=5.0)
    parser.add_argument("--peft", action="store_true", help="--ckpt is a LoRA workdir: write its adapter as a "
                        "peft folder instead of the merged model")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user error")
    args = parser.parse_args(argv)

    def work() -> int:
        if args.peft:
            names = export_peft(args.ckpt, args.out)
        else:
            names = export_hf(args.ckpt, args.out, dtype=args.dtype,
                              max_shard_bytes=int(args.max_shard_size_gb * 2**30))
        print(f"wrote {args.out}: {', '.join(names)}")
        return 0

    return cli.run_script("orbax_to_hf", work, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
