"""``python -m adpo.synthetic OUT``: write synthetic counterfactual rows (see :mod:`adpo.synthetic`)."""

from __future__ import annotations

from pathlib import Path

from ..synthetic import ATTRIBUTES, scene_rows, to_dataset, write_jsonl


def main(argv: list[str] | None = None) -> int:
    """``python -m adpo.synthetic OUT``: write scene counterfactual rows as JSONL + PNG or a save_to_disk folder."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m adpo.synthetic", description=main.__doc__)
    parser.add_argument("output", help="folder to write")
    parser.add_argument("--rows", type=int, default=256, help="number of rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default="image", help="comma-separated: image, text")
    parser.add_argument("--attributes", default=",".join(ATTRIBUTES), help="comma-separated attributes to vary")
    parser.add_argument("--size", type=int, default=48, help="image side in pixels")
    parser.add_argument("--format", choices=("jsonl", "dataset"), default="jsonl",
                        help="jsonl: OUT/train.jsonl + OUT/images/*.png; dataset: Dataset.save_to_disk(OUT)")
    args = parser.parse_args(argv)
    rows = scene_rows(args.rows, args.seed, tuple(args.kinds.split(",")), tuple(args.attributes.split(",")),
                      args.size)
    if args.format == "jsonl":
        path = write_jsonl(rows, args.output)
    else:
        to_dataset(rows).save_to_disk(args.output)
        path = Path(args.output)
    print(f"adpo: wrote {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
