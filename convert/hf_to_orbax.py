"""Convert HuggingFace PyTorch weights into a llava-jax model folder.

    python convert/hf_to_orbax.py --hf-llava DIR --out CKPT
        a llava-hf folder (LlavaForConditionalGeneration, or LlavaNextForConditionalGeneration for
        LLaVA-1.6 `llava-v1.6-*-hf`: model.safetensors, sharded safetensors with
        model.safetensors.index.json, or pytorch_model.bin; new or old key layout)
    python convert/hf_to_orbax.py --clip DIR --llm DIR [--projector mm_projector.bin]
                                  [--projector-type mlp2x_gelu|linear|mlpNx_gelu] --out CKPT
        a CLIP repo (its text model is ignored) + a LLaMA/Vicuna repo + the original LLaVA projector
        (stage-1 output). Without --projector the LLM folder's model.mm_projector.* is used if it has
        one (an original LLaVA checkpoint), else the projector is freshly initialised (for stage 1).
        --anyres makes it a LLaVA-1.6 model (AnyRes grids and an image_newline, fresh unless the LLM
        folder holds model.image_newline; an original LLaVA-1.6 folder is recognised by itself).

The output folder holds config.json (our LlavaConfig), the tokenizer files and params/ (Orbax).
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
from llava_jax.hf.convert import import_hf  # noqa: E402


def main(argv=None) -> int:
    cli.choose_platform()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-llava", help="llava-hf folder (LlavaForConditionalGeneration)")
    parser.add_argument("--clip", help="CLIP folder (openai/clip-vit-large-patch14[-336] layout)")
    parser.add_argument("--llm", help="LLaMA/Vicuna folder (LlamaForCausalLM layout)")
    parser.add_argument("--projector", help="original projector weights (mm_projector.bin or .safetensors)")
    parser.add_argument("--projector-type", help="linear | mlp2x_gelu | mlpNx_gelu | identity "
                        "(default: the LLM config's mm_projector_type, else mlp2x_gelu)")
    parser.add_argument("--image-token-id", type=int, help="placeholder id (default: llava-hf's, or the "
                        "first id past the LLM's vocabulary)")
    parser.add_argument("--tokenizer", help="folder to copy tokenizer files from (default: --hf-llava or --llm)")
    parser.add_argument("--seed", type=int, default=0, help="seed of a freshly initialised projector")
    parser.add_argument("--anyres", action="store_true",
                        help="with --clip/--llm: a LLaVA-1.6 (AnyRes) model over the v1.6 grids, with an "
                             "image_newline (from the LLM folder if it has one, else fresh); an original "
                             "LLaVA-1.6 folder (image_aspect_ratio 'anyres') is recognised without it")
    parser.add_argument("--out", required=True, help="output model folder")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user error")
    args = parser.parse_args(argv)

    def work() -> int:
        config = import_hf(args.out, hf_llava=args.hf_llava, clip=args.clip, llm=args.llm, projector=args.projector,
                           projector_type=args.projector_type, image_token_id=args.image_token_id,
                           tokenizer=args.tokenizer, seed=args.seed, anyres=args.anyres)
        print(f"wrote {args.out} (projector {config.projector_type}, {config.text.num_layers}-layer LLM, "
              f"{config.vision.image_size}px vision tower)")
        return 0

    return cli.run_script("hf_to_orbax", work, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
