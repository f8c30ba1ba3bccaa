"""``adpo-eval`` / ``python -m adpo.evaluate``: parse, evaluate (:func:`adpo.evaluate.evaluate`), print."""

from __future__ import annotations

import logging

from transformers import HfArgumentParser

from ..config import LoadArguments, RowArguments
from ..evaluate import EvalArguments, evaluate, format_summary
from . import run_entry_point


def main(argv: list[str] | None = None) -> int:
    parser = HfArgumentParser((LoadArguments, RowArguments, EvalArguments),
                              description="Evaluate ADPO models on preference pairs, with the rows read, checked and "
                              "collated exactly as adpo-train does (the same flags mean the same).")
    for action in parser._actions:
        if action.dest in ("multimodal_mode", "compare_multimodal_mode"):
            action.nargs, action.const = "?", True  # a bare flag means true, as in adpo-train
    model_args, row_args, args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    report = evaluate(model_args, row_args, args)
    for label, summary in report["skipped"].items():
        print(f"adpo-eval ({label}): {summary}")
    print(format_summary(report))
    print(f"adpo-eval: wrote rows.csv, summary.json and evaluation.png to {args.output_dir}")
    if args.html:
        print(f"adpo-eval: wrote the HTML report to {args.html}")
    return 0


def run() -> None:
    """Console-script entry point (``adpo-eval``): one-line errors for bad input."""
    run_entry_point(main, "adpo-eval")


if __name__ == "__main__":
    run()
