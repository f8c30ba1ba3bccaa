"""Turn rows whose images are file paths into a ``datasets.Dataset`` with ``Image`` features.

This is the seed README's "Option 2: create a custom dataset" as a function::

    from adpo.datasets_tools import rows_to_dataset
    dataset = rows_to_dataset("pairs.jsonl")          # or .json / .csv, or a list of dicts
    dataset.save_to_disk("my_adpo_dataset")          # then: adpo-train --dataset_name my_adpo_dataset ...

or from the shell: ``python -m adpo.datasets_tools pairs.jsonl my_adpo_dataset``.

Each row needs ``response``, ``chosen``, ``rejected``; ``chosen_images`` / ``rejected_images`` hold a list of
images (or one image) as paths (relative ones are resolved against the file's folder, or ``image_root``),
``PIL.Image`` objects, bytes, or ``{"bytes", "path"}`` dicts. In CSV files a list is written as a JSON list string
(``"[""a.png"", ""b.png""]"``) or a single path. The images' bytes are stored in the dataset, so the saved folder
is self-contained: it no longer needs the image files. Any other columns (ids, metadata) are kept as they are.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from datasets import Dataset, Features, Image, List, Value
from PIL import Image as PILImage

from .data import IMAGE_FIELDS, TEXT_FIELDS, ADPODataError, row_images, row_text

logger = logging.getLogger(__name__)


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``.jsonl``, ``.json``, ``.csv`` or ``.tsv`` file (optionally ``.gz``), read as training reads
    them (:mod:`adpo.readers`): a malformed record is an error naming its row, line and file."""
    from .readers import read_text_file, text_format

    path = Path(path)
    if text_format(path) is None:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json, .csv or .tsv.")
    read = read_text_file(path)
    if read.errors:
        raise read.errors[0][1]
    return [row for _, row in read.rows]


def image_bytes(value: Any, root: str | None, row: int, field: str) -> dict[str, Any]:
    """One image value as the ``{"bytes", "path"}`` dict the ``Image`` feature stores (bytes always filled)."""
    if isinstance(value, PILImage.Image):
        buffer = io.BytesIO()
        value.save(buffer, format=value.format or "PNG")
        return {"bytes": buffer.getvalue(), "path": None}
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value), "path": None}
    if isinstance(value, dict) and value.get("bytes"):
        return {"bytes": value["bytes"], "path": value.get("path")}
    if isinstance(value, dict) and value.get("path"):
        value = value["path"]
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if root is not None and not os.path.isabs(path):
            path = os.path.join(root, path)
        if not os.path.isfile(path):
            raise ADPODataError(row, field, f"image file not found: {path}")
        with open(path, "rb") as f:
            return {"bytes": f.read(), "path": os.path.basename(path)}
    raise ADPODataError(row, field, f"unsupported image value of type {type(value).__name__}; expected a path, "
                        "a PIL image, bytes or a {'bytes', 'path'} dict")


def rows_to_dataset(
    rows: str | Path | Iterable[dict[str, Any]], image_root: str | Path | None = None
) -> Dataset:
    """ADPO rows → a ``Dataset`` whose ``chosen_images``/``rejected_images`` are ``List(Image())`` columns.

    Args:
        rows: a ``.jsonl``/``.json``/``.csv`` file, or a list of dicts.
        image_root: folder that relative image paths are relative to. Default: the file's folder (or the current
            directory for a list of dicts).

    Raises:
        ADPODataError: a row lacks a text field or names an image that cannot be found (the message names both).
    """
    if isinstance(rows, (str, Path)):
        root = str(image_root) if image_root is not None else str(Path(rows).resolve().parent)
        rows = read_rows(rows)
    else:
        root = str(image_root) if image_root is not None else None
        rows = list(rows)
    if not rows:
        raise ValueError("rows_to_dataset: no rows.")
    fields = [f for f in IMAGE_FIELDS if any(f in row for row in rows)]
    extra = [k for k in rows[0] if k not in (*TEXT_FIELDS, *IMAGE_FIELDS)]
    columns: dict[str, list[Any]] = {k: [] for k in (*TEXT_FIELDS, *fields, *extra)}
    for i, row in enumerate(rows):
        for name in TEXT_FIELDS:
            columns[name].append(row_text(row, name, i))
        for name in fields:
            columns[name].append([image_bytes(v, root, i, name) for v in row_images(row, name, i)])
        for name in extra:
            columns[name].append(row.get(name))
    features = Features({name: Value("string") for name in TEXT_FIELDS})
    features.update({name: List(Image()) for name in fields})
    dataset = Dataset.from_dict({k: columns[k] for k in (*TEXT_FIELDS, *fields)}, features=features)
    for name in extra:
        dataset = dataset.add_column(name, columns[name])
    logger.info("built a dataset of %d rows (image columns: %s)", len(dataset), fields or "none")
    return dataset


if __name__ == "__main__":  # python -m adpo.datasets_tools
    import sys

    # The CLI imports this module by name: hand it this copy, so the module is not executed a second time.
    sys.modules.setdefault("adpo.datasets_tools", sys.modules[__name__])
    from .cli.datasets_tools import main

    raise SystemExit(main())
