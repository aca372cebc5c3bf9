"""`llava-jax eval scienceqa|llava-bench|vqa ...`"""
from __future__ import annotations

import argparse
import sys


def _vqa_parser(sub):
    p = sub.add_parser("vqa", help="VQAv2-style accuracy (or --pope metrics) of a predictions JSONL")
    p.add_argument("--preds", required=True, help="JSONL of {question_id, text}")
    p.add_argument("--annotations", required=True,
                   help="VQAv2 annotations JSON (or JSONL of {question_id, answers}); with --pope: POPE labels")
    p.add_argument("--pope", action="store_true", help="POPE: accuracy, precision, recall, F1, yes-ratio")


def run_vqa(args) -> int:
    from .vqa import evaluate_pope, evaluate_vqa

    if args.pope:
        m = evaluate_pope(args.preds, args.annotations)
        print(f"POPE: accuracy {m['accuracy']:.4f}  precision {m['precision']:.4f}  recall {m['recall']:.4f}  "
              f"F1 {m['f1']:.4f}  yes-ratio {m['yes_ratio']:.4f}  (TP {m['tp']} TN {m['tn']} FP {m['fp']} FN {m['fn']})")
    else:
        r = evaluate_vqa(args.preds, args.annotations)
        print(f"VQA accuracy: {r['accuracy']:.2f} over {r['num_questions']} questions "
              f"({r['unmatched_predictions']} predictions without annotation)")
        for answer_type, acc in r["per_answer_type"].items():
            print(f"  {answer_type}: {acc:.2f}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="llava-jax eval", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from . import llava_bench, scienceqa  # light imports: models load only when a command runs

    parsers = {"scienceqa": (scienceqa.add_parser, scienceqa.run_cli),
               "llava-bench": (llava_bench.add_parser, llava_bench.run_cli),
               "vqa": (_vqa_parser, run_vqa)}
    for add, _ in parsers.values():
        add(sub)
    args = parser.parse_args(argv)
    return parsers[args.command][1](args)


if __name__ == "__main__":
    sys.exit(main())
