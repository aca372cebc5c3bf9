"""`llava-jax datagen instruct|filter-cc3m ...`"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys


def _instruct_parser(sub):
    p = sub.add_parser("instruct", help="generate LLaVA instruction data from COCO captions + boxes")
    p.add_argument("--annotations", required=True, help="COCO instances JSON (boxes), e.g. instances_train2017.json")
    p.add_argument("--captions", required=True, help="COCO captions JSON, e.g. captions_train2017.json")
    p.add_argument("--kinds", default="conversation,detail,complex", help="comma-separated subset of conversation,detail,complex")
    p.add_argument("--out", required=True, help="output JSON; progress is kept in the same name with .jsonl")
    p.add_argument("--base-url", required=True, help="OpenAI-compatible base URL including /v1")
    p.add_argument("--model", required=True)
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--requests-per-minute", type=float, default=None)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per HTTP request")
    p.add_argument("--max-retries", type=int, default=6, help="HTTP retries on 429/5xx/timeouts")
    p.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds (doubles each retry)")
    p.add_argument("--parse-attempts", type=int, default=3, help="requests per pair before an unparsable reply is skipped")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--image-prefix", default="", help="prepended to COCO file names, e.g. coco/train2017/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def _filter_parser(sub):
    p = sub.add_parser("filter-cc3m", help="noun-phrase-balanced subset of image-caption pairs -> stage-1 JSON")
    p.add_argument("--pairs", required=True, help=".json/.jsonl of {image, caption} or CC3M .tsv (caption<TAB>image)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-count", type=int, default=3, help="noun phrases seen fewer times are rare")
    p.add_argument("--max-per-phrase", type=int, default=100, help="captions kept per frequent noun phrase")
    p.add_argument("--spacy-model", default="en_core_web_sm")
    p.add_argument("--extractor", default=None, help="MODULE:FUNCTION, a callable caption -> list of noun phrases")


def run_instruct(args) -> int:
    from .client import ChatClient
    from .context import load_coco_contexts
    from .instruct import generate, progress_path

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    contexts = load_coco_contexts(args.annotations, args.captions, args.max_images)
    client = ChatClient(args.base_url, args.model, os.environ.get(args.api_key_env), timeout=args.timeout,
                        max_retries=args.max_retries, backoff=args.backoff,
                        requests_per_minute=args.requests_per_minute, temperature=args.temperature,
                        max_tokens=args.max_tokens)
    print(f"datagen: {len(contexts)} images x {len(kinds)} kinds -> {args.out} "
          f"(progress in {progress_path(args.out)})", file=sys.stderr)
    summary = generate(contexts, kinds, client, args.out, concurrency=args.concurrency,
                       parse_attempts=args.parse_attempts, image_prefix=args.image_prefix, seed=args.seed,
                       progress=not args.no_progress)
    print(summary.format())
    print(f"HTTP requests {client.requests} (retries {client.retries})")
    return 0


def _load_extractor(spec: str):
    module, _, name = spec.partition(":")
    if not name:
        raise SystemExit(f"--extractor expects MODULE:FUNCTION, got {spec!r}")
    return getattr(importlib.import_module(module), name)


def run_filter(args) -> int:
    from .cc3m_filter import SpacyNounPhrases, filter_cc3m, load_pairs

    try:
        extract = _load_extractor(args.extractor) if args.extractor else SpacyNounPhrases(args.spacy_model)
    except RuntimeError as e:
        print(f"filter-cc3m: {e}", file=sys.stderr)
        return 2
    pairs = load_pairs(args.pairs)
    records = filter_cc3m(pairs, extract, min_count=args.min_count, max_per_phrase=args.max_per_phrase, seed=args.seed)
    with open(args.out, "w") as f:
        json.dump(records, f, indent=1)
    print(f"filter-cc3m: kept {len(records)} of {len(pairs)} pairs -> {args.out}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="llava-jax datagen", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _instruct_parser(sub)
    _filter_parser(sub)
    args = parser.parse_args(argv)
    return run_instruct(args) if args.command == "instruct" else run_filter(args)


if __name__ == "__main__":
    sys.exit(main())
