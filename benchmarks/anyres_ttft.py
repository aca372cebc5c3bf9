"""LLaVA-1.6 (AnyRes) time to first token vs image size, through `Generator.generate` (CPU).

An AnyRes image's prompt grows with its size: 576 base tokens plus the unpadded tile grid (up to
2,928 tokens on the v1.6 grids), against LLaVA-1.5's fixed 576. This measures what that costs before
the first answer token.

Model: the CPU benchmarks' language model (`_common.bench_config`: LLaMA 8 layers / 512 wide, fp32)
with a 336 px patch-14 CLIP tower of the bench model's width (4 layers / 256 wide), so token counts
are the real LLaVA-1.6 ones; the five v1.6 grids; random weights; max_position_embeddings 4096. The
LLaVA-1.5 row is the same model without AnyRes (one 336 px tile, 576 tokens).
Prompt: <s> + the image's placeholders + 31 text tokens; one row.

Per image size: `preprocess_ms` = host preprocessing of a photo of that size (`anyres.preprocess_anyres`
or `image.preprocess`); `ttft_ms` = a `Generator.generate(max_new_tokens=1)` call (vision tower on
every tile slot, prefill of the bucketed prompt, the first token), median of `--rounds` after one
warm-up call (whose wall time, mostly compilation, is `first_call_s`); `vision_ms` = the jitted tower
+ projector alone on the image's tile slots (AnyRes always runs `anyres.max_tiles` = 5 slots: a static
shape). With `--torch`, transformers' LlavaNextForConditionalGeneration.generate(max_new_tokens=1) on
the same weights, interleaved round by round.

  .venv/bin/python benchmarks/anyres_ttft.py [--rounds 3] [--sizes 336x336,672x336,336x1344,672x672]
      [--torch] [--json PATH]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import _common as C  # noqa: E402  (sets JAX_PLATFORMS before jax is imported)

import jax  # noqa: E402
import numpy as np  # noqa: E402

TEXT_TOKENS = 31
DEFAULT_SIZES = "336x336,672x336,336x1344,672x672"  # (height)x(width)


def anyres_config(anyres_on: bool = True):
    from llava_jax.data.anyres import DEFAULT_GRID_PINPOINTS
    from llava_jax.models.config import VisionConfig

    base = C.bench_config(remat_policy="none")
    vision = VisionConfig(image_size=336, patch_size=14, hidden_size=256, intermediate_size=1024, num_layers=4,
                          num_heads=4)
    text = dataclasses.replace(base.text, max_position_embeddings=4096)
    return base.replace(vision=vision, text=text, image_grid_pinpoints=DEFAULT_GRID_PINPOINTS if anyres_on else None)


def photo(size_hw):
    import skimage.data
    from PIL import Image

    return Image.fromarray(skimage.data.astronaut()).resize((size_hw[1], size_hw[0]), Image.BICUBIC)


def prompt(cfg, image_tokens: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, cfg.image_token_id, size=(1, 1 + image_tokens + TEXT_TOKENS)).astype(np.int32)
    ids[:, 0] = cfg.text.bos_token_id
    ids[:, 1:1 + image_tokens] = cfg.image_token_id
    return ids


class Case:
    """One image size on one model: its inputs and the calls to time."""

    def __init__(self, name, gen, size_hw, hf=None):
        from llava_jax.data import anyres, image as image_lib

        cfg = gen.config
        self.name, self.gen, self.size_hw, self.hf = name, gen, size_hw, hf
        self.image = photo(size_hw)
        if cfg.anyres:
            tiles = anyres.max_tiles(cfg.image_grid_pinpoints, cfg.vision.image_size)
            self.preprocess = lambda: anyres.preprocess_anyres(self.image, cfg.image_grid_pinpoints,
                                                               cfg.vision.image_size, tiles)
            pixels, size = self.preprocess()
            self.pixels, self.sizes = pixels[None], np.asarray([size])
            self.tokens = anyres.num_image_tokens(size, cfg.image_grid_pinpoints, cfg.vision.image_size,
                                                  cfg.vision.patch_size)
        else:
            self.preprocess = lambda: image_lib.preprocess(self.image, cfg.vision.image_size, "pad")
            self.pixels, self.sizes = self.preprocess()[None], None
            self.tokens = cfg.num_image_tokens
        self.ids = prompt(cfg, self.tokens)

    def ours(self):
        return self.gen.generate(self.ids, self.pixels, image_sizes=self.sizes, max_new_tokens=1, eos_token_id=[])

    def torch(self):
        import torch

        from llava_jax.testing.hf_reference import to_torch

        kw = dict(pixel_values=to_torch(self.pixels.transpose(0, 1, 4, 2, 3)), image_sizes=to_torch(self.sizes))
        with torch.no_grad():
            return self.hf.generate(input_ids=to_torch(self.ids.astype(np.int64)), max_new_tokens=1, min_new_tokens=1,
                                    do_sample=False, pad_token_id=0, **kw)[:, self.ids.shape[1]:].numpy()


def vision_call(gen):
    """The jitted vision tower + projector of the generator's model, on (tiles, H, W, 3)."""
    from flax import nnx

    graphdef, state = gen.graphdef, gen.state

    @jax.jit
    def run(state, tiles):
        return nnx.merge(graphdef, state).image_features(tiles)

    return lambda tiles: run(state, tiles).block_until_ready()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help="image sizes HxW, comma-separated")
    ap.add_argument("--torch", action="store_true", help="also time transformers' LlavaNext generate")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from flax import nnx

    from llava_jax.infer.generate import Generator, prompt_bucket
    from llava_jax.models.llava import LlavaModel

    info = C.machine_info()
    print(f"machine: {info}")
    cfg = anyres_config()
    hf = None
    if args.torch:
        import torch

        from llava_jax.testing.hf_reference import hf_llava_next, ours_from_hf

        torch.set_num_threads(2)
        hf = hf_llava_next(cfg, std=0.02)
        hf.set_attn_implementation("sdpa")
        model = ours_from_hf(hf, cfg)
    else:
        model = LlavaModel(cfg, rngs=nnx.Rngs(0))
    gen = Generator(model)
    gen15 = Generator(LlavaModel(anyres_config(False), rngs=nnx.Rngs(0)))
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",") if s]
    cases = [Case("LLaVA-1.5 (one tile)", gen15, sizes[0])] + [Case("LLaVA-1.6 AnyRes", gen, s, hf) for s in sizes]
    vision = {id(g): vision_call(g) for g in (gen, gen15)}

    rows = []
    for case in cases:
        t0 = C.time_calls(case.ours, 1)[0]
        if args.torch and case.hf is not None:
            case.torch()
        rows.append(dict(model=case.name, image_hw=f"{case.size_hw[0]}x{case.size_hw[1]}", image_tokens=case.tokens,
                         prompt_tokens=case.ids.shape[1], prompt_bucket=prompt_bucket(case.ids.shape[1]),
                         tiles=case.pixels.shape[1] if case.sizes is not None else 1, first_call_s=t0))
        print(f"{case.name} {case.size_hw}: {case.tokens} image tokens, first call {t0:.1f} s", flush=True)
    ttft = [[] for _ in cases]
    ttft_torch = [[] for _ in cases]
    for r in range(args.rounds):
        for i, case in enumerate(cases):
            ttft[i] += C.time_calls(case.ours, 1)
            if args.torch and case.hf is not None:
                ttft_torch[i] += C.time_calls(case.torch, 1)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{c.tokens} tok {C.median(t) * 1e3:.0f} ms"
                                                          for c, t in zip(cases, ttft))
              + f"  load {C.load_average()[0]:.2f}", flush=True)
    for row, case, t, tt in zip(rows, cases, ttft, ttft_torch):
        tiles = case.pixels[0] if case.sizes is not None else case.pixels
        run = vision[id(case.gen)]
        run(tiles)
        row["vision_ms"] = 1e3 * C.median(C.time_calls(lambda: run(tiles), args.rounds))
        row["preprocess_ms"] = 1e3 * C.median(C.time_calls(case.preprocess, args.rounds))
        row["ttft_ms"] = 1e3 * C.median(t)
        if tt:
            row["torch_ttft_ms"] = 1e3 * C.median(tt)
    base = rows[0]["ttft_ms"]
    for row in rows:
        row["ttft_vs_1.5"] = row["ttft_ms"] / base
    columns = ["model", "image_hw", "image_tokens", "prompt_tokens", "prompt_bucket", "tiles", "preprocess_ms",
               "vision_ms", "ttft_ms", "ttft_vs_1.5", "first_call_s"] + (["torch_ttft_ms"] if args.torch else [])
    C.print_table(rows, columns, f"time to first token, 1 row, <s> + image + {TEXT_TOKENS} text tokens")
    C.write_json("anyres_ttft", dict(machine=info, rounds=args.rounds, rows=rows, model=cfg.to_dict()), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
