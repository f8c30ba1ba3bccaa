"""``adpo-data SUBCOMMAND INPUT OUTPUT [options]``: build ADPO pairs from ordinary data, import, check.

INPUT is any dataset the trainer reads (``.jsonl``/``.json``/``.csv``/``.parquet``, a ``save_to_disk`` folder, a
hub id). OUTPUT ending in ``.jsonl`` is a JSONL file with image paths relative to it (the images are written to
``OUTPUT_images/`` beside it); anything else is a ``save_to_disk`` folder with the images embedded.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from . import run_entry_point

PROG = "adpo-data"


def _bool(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _common(p: argparse.ArgumentParser, output_required: bool = True) -> None:
    p.add_argument("input", help="dataset: .jsonl/.json/.csv/.parquet file, save_to_disk folder or hub id")
    if output_required:
        p.add_argument("output", help="OUTPUT.jsonl (images written beside it) or a save_to_disk folder")
    else:
        p.add_argument("output", nargs="?", default=None, help="optional JSON file for the full result")
    p.add_argument("--split", default="train", help="split of a hub dataset or a saved DatasetDict")
    p.add_argument("--dataset_config", default=None, help="hub dataset configuration name")
    if output_required:
        p.add_argument("--on_bad_rows", choices=("error", "skip"), default="error",
                       help="error: stop at the first bad source row (row and field named); skip: leave it out "
                            "and count it by reason")
        p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")


def _columns(p: argparse.ArgumentParser, response: str = "response") -> None:
    p.add_argument("--prompt_column", default="prompt", help="the question or instruction text")
    p.add_argument("--response_column", default=response, help="the answer kept on both sides")
    p.add_argument("--images_column", default="images", help="the row's images (a list, or one image)")


def _swap_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strategy", choices=("random", "same-prompt", "similar"), default="random",
                   help="where the rejected images come from: a random other row; another row with the same "
                        "normalised prompt and a different response; the row whose images look most alike by "
                        "the model's vision tower, with a different response")
    p.add_argument("--negatives", type=int, default=1, help="ADPO rows (negatives) per source row")
    p.add_argument("--seed", type=int, default=0, help="the same seed and data give the same rows")
    p.add_argument("--model_name_or_path", default=None, help="--strategy similar: the model whose vision tower "
                   "embeds the images (embeddings cached on disk)")
    p.add_argument("--embedding_cache_dir", default=None,
                   help="where image embeddings are cached (default ~/.cache/adpo/image_embeddings)")
    p.add_argument("--dtype", default="float32", help="dtype the embedding model loads in")
    p.add_argument("--device", default=None, help="torch device for the embeddings (default: cuda if available)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0].strip("`"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    p = sub.add_parser("swap", help="(images, prompt, response) rows → ADPO rows with another row's images")
    _common(p)
    _columns(p)
    _swap_options(p)

    p = sub.add_parser("prompt-swap", help="same images, the prompt of another row of the same images or a "
                       "template")
    _common(p)
    _columns(p)
    p.add_argument("--negatives", type=int, default=1, help="ADPO rows per source row")
    p.add_argument("--seed", type=int, default=0, help="the same seed and data give the same rows")
    p.add_argument("--templates", default=None,
                   help="text file, one rejected prompt per line, instead of other rows' prompts")

    p = sub.add_parser("from-dpo", help="DPO rows (prompt, images, chosen, rejected) → multitask rows")
    _common(p)
    p.add_argument("--prompt_column", default="prompt", help="the DPO prompt")
    p.add_argument("--chosen_column", default="chosen", help="the preferred answer (the ADPO response)")
    p.add_argument("--rejected_column", default="rejected", help="the other answer")
    p.add_argument("--images_column", default="images", help="the prompt's images")
    _swap_options(p)

    p = sub.add_parser("import", help="ms-swift or LLaVA/ShareGPT rows → ours")
    _common(p)
    p.add_argument("--image_root", default=None,
                   help="folder relative image paths start from (default: the input file's folder)")

    p = sub.add_parser("check", help="counts, images, token lengths, identical sides, duplicates, and every "
                       "row the trainer would refuse")
    _common(p, output_required=False)
    p.add_argument("--model_name_or_path", default=None,
                   help="check with this model's processor exactly as adpo-train would (no weights loaded)")
    p.add_argument("--multimodal_mode", type=_bool, nargs="?", const=True, default=None,
                   help="as adpo-train (unset: on when the model takes images and the rows carry them)")
    p.add_argument("--separate_images", type=_bool, nargs="?", const=True, default=True, help="as adpo-train")
    p.add_argument("--max_image_size", type=int, default=None, help="as adpo-train")
    p.add_argument("--max_length", type=int, default=None, help="as adpo-train: longer rows are refused")
    p.add_argument("--max_response_length", type=int, default=None, help="as adpo-train")
    p.add_argument("--html", default=None, help="also write a self-contained HTML report to this path")
    p.add_argument("--html_max_rows", type=int, default=1000,
                   help="rows shown in the HTML table (refused rows first); the page says how many are left out")
    return parser


def _prepare_output(args: argparse.Namespace) -> None:
    out = Path(args.output)
    if out.resolve() == Path(args.input).resolve():
        raise ValueError(f"OUTPUT {args.output} is the INPUT: write the pairs somewhere else.")
    if out.exists():
        if not args.overwrite:
            raise ValueError(f"OUTPUT {args.output} exists; pass --overwrite to replace it.")
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()


def main(argv: list[str] | None = None) -> int:
    from .. import pairs

    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    where = {"split": args.split, "config": args.dataset_config}
    if args.command == "check":
        return _check(args, where)
    _prepare_output(args)
    if args.command == "swap":
        report = pairs.swap(
            args.input, args.output, strategy=args.strategy, negatives=args.negatives, seed=args.seed,
            model_name_or_path=args.model_name_or_path, prompt=args.prompt_column, response=args.response_column,
            images=args.images_column, on_bad_rows=args.on_bad_rows, cache_dir=args.embedding_cache_dir,
            dtype=args.dtype, device=args.device, **where,
        )
    elif args.command == "prompt-swap":
        templates = None
        if args.templates:
            templates = [t.strip() for t in Path(args.templates).read_text().splitlines() if t.strip()]
            if not templates:
                raise ValueError(f"--templates {args.templates} holds no prompt.")
        report = pairs.prompt_swap(
            args.input, args.output, negatives=args.negatives, seed=args.seed, templates=templates,
            prompt=args.prompt_column, response=args.response_column, images=args.images_column,
            on_bad_rows=args.on_bad_rows, **where,
        )
    elif args.command == "from-dpo":
        report = pairs.from_dpo(
            args.input, args.output, prompt=args.prompt_column, chosen=args.chosen_column,
            rejected=args.rejected_column, images=args.images_column, strategy=args.strategy,
            negatives=args.negatives, seed=args.seed, model_name_or_path=args.model_name_or_path,
            on_bad_rows=args.on_bad_rows, cache_dir=args.embedding_cache_dir, dtype=args.dtype,
            device=args.device, **where,
        )
    else:
        kind, report = pairs.import_rows(args.input, args.output, on_bad_rows=args.on_bad_rows,
                                         image_root=args.image_root, **where)
        if kind != "pairs":
            print(f"{PROG}: these rows have no rejected side; build pairs from them with "
                  f"`{PROG} swap {args.output} PAIRS` (or prompt-swap)")
    print("\n".join(f"{PROG}: {line}" if k == 0 else line for k, line in enumerate(report.lines())))
    print(f"{PROG}: wrote {report.output_rows} rows to {args.output}")
    return 0


def _check(args: argparse.Namespace, where: dict[str, str | None]) -> int:
    from .. import pairs

    result = pairs.check(
        args.input, model_name_or_path=args.model_name_or_path, multimodal=args.multimodal_mode,
        separate_images=args.separate_images, max_image_size=args.max_image_size, max_length=args.max_length,
        max_response_length=args.max_response_length, **where,
    )
    print("\n".join(f"{PROG}: {line}" if k == 0 else line for k, line in enumerate(result.lines())))
    if args.output:
        Path(args.output).write_text(json.dumps({"summary": result.summary(), "rows": result.rows}, indent=2))
        print(f"{PROG}: wrote the full result to {args.output}")
    if args.html:
        from ..report import check_report

        check_report(result, args.input, args.html, max_rows=args.html_max_rows)
        print(f"{PROG}: wrote the HTML report to {args.html}")
    return 0


def run() -> None:
    """Console-script entry point (``adpo-data``): one-line errors for bad input."""
    run_entry_point(main, PROG)


if __name__ == "__main__":
    run()
