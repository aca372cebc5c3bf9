"""`llava-jax data prepare --json FILE --images DIR --out DIR [--split train]`: LLaVA JSON -> ArrayRecord."""
from __future__ import annotations

import argparse
import logging


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llava-jax data", description="data preparation")
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="LLaVA JSON/JSONL + image folder -> ArrayRecord shards (TFDS)")
    prep.add_argument("--json", required=True, help="LLaVA JSON list or JSONL file")
    prep.add_argument("--images", default="", help="folder the records' 'image' paths are relative to")
    prep.add_argument("--out", required=True, help="output folder (use it as data.arrayrecord_dir)")
    prep.add_argument("--split", default="train", help="split name (default: train)")
    prep.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from llava_jax.data.tfds_builder import prepare

    result = prepare(args.json, args.images, args.out, split=args.split, progress=not args.no_progress)
    print(f"wrote {result['records']} records to {result['directory']} (split {args.split!r})")
    missing = result["missing_images"]
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        print(f"{len(missing)} records have a missing image file and will be skipped in training: {shown}")
    return 0
