"""``python -m adpo.datasets_tools ROWS OUT``: rows with image paths → a ``save_to_disk`` folder."""

from __future__ import annotations

import argparse

from ..datasets_tools import rows_to_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m adpo.datasets_tools",
        description="Convert ADPO rows with image paths (.jsonl/.json/.csv) into a save_to_disk dataset folder "
        "with the images embedded (datasets Image features).",
    )
    parser.add_argument("rows", help="input .jsonl, .json or .csv file")
    parser.add_argument("output", help="folder to write with Dataset.save_to_disk")
    parser.add_argument("--image_root", default=None, help="folder relative image paths start from "
                        "(default: the input file's folder)")
    args = parser.parse_args(argv)
    dataset = rows_to_dataset(args.rows, args.image_root)
    dataset.save_to_disk(args.output)
    print(f"adpo: wrote {len(dataset)} rows to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
