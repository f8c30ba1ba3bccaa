"""Load ADPO rows from the hub, a ``save_to_disk`` folder or a local JSON/JSONL/Parquet/CSV file.

A row is ``{response, chosen, chosen_images, rejected, rejected_images}``; text-only rows omit the image fields.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import Dataset

# `datasets` is imported inside the loading functions only: the collator and the trainer import this module, and
# they must work without it (bench/bench_gpu.py trains from a plain list on a machine that has no `datasets`).

logger = logging.getLogger(__name__)

TEXT_FIELDS = ("response", "chosen", "rejected")
IMAGE_FIELDS = ("chosen_images", "rejected_images")  # the ADPO pair's images
MULTITASK_FIELDS = ("prompt", "chosen_response", "rejected_response")  # + optional prompt_images
MULTITASK_IMAGE_FIELDS = ("prompt_images",)  # the standard DPO pair's (``--multitask_weight``)
ALL_IMAGE_FIELDS = (*IMAGE_FIELDS, *MULTITASK_IMAGE_FIELDS)  # every column whose values are images
ROW_ID = "_adpo_row"  # original row index, carried through shuffling so errors can name the row

_LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class ADPODataError(ValueError):
    """A row that cannot be trained on. The message names the row and the field."""

    def __init__(self, row: int | None, field: str, problem: str) -> None:
        where = f"row {row}" if row is not None else "dataset"
        super().__init__(f"{where}, field '{field}': {problem}")
        self.row, self.field, self.problem = row, field, problem


def load_adpo_dataset(
    name: str, split: str = "train", config: str | None = None, max_samples: int | None = None
) -> Dataset:
    """Load one split of ADPO rows, with a ``_adpo_row`` column holding each row's original index.

    Image paths in local files are made absolute (they are relative to the file's folder).
    """
    from datasets import DatasetDict, load_dataset, load_from_disk

    path = Path(name)
    image_root: str | None = None
    if path.is_file():
        builder = _LOCAL_FORMATS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"--dataset_name {name}: unsupported file type {path.suffix!r}; "
                             f"use one of {', '.join(sorted(_LOCAL_FORMATS))} or a save_to_disk folder.")
        dataset = load_dataset(builder, data_files=str(path), split="train")
        image_root = str(path.resolve().parent)
    elif path.is_dir() and _is_saved_dataset(path):
        dataset = load_from_disk(str(path))
        if isinstance(dataset, DatasetDict):
            if split not in dataset:
                raise ValueError(f"{name} has splits {sorted(dataset)}, not {split!r}: set --dataset_split.")
            dataset = dataset[split]
    else:
        dataset = load_dataset(name, config, split=split)
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    check_columns(dataset, name)
    if image_root is not None:
        dataset = _absolute_image_paths(dataset, image_root)
    if ROW_ID not in dataset.column_names:
        dataset = dataset.add_column(ROW_ID, list(range(len(dataset))))
    logger.info("loaded %d rows from %s (split %s)", len(dataset), name, split)
    return dataset


def _absolute_image_paths(dataset: Dataset, root: str) -> Dataset:
    """Resolve relative image paths in a local file's rows against the file's folder.

    Only columns that store paths (strings, or lists of strings) are touched; encoded images pass through.
    """
    fields = [f for f in ALL_IMAGE_FIELDS if f in dataset.column_names and _stores_paths(dataset.features[f])]

    def resolve(row: dict[str, Any], idx: int) -> dict[str, Any]:
        return {
            field: [v if os.path.isabs(v) else os.path.join(root, v) for v in row_images(row, field, idx)]
            for field in fields
        }

    if not fields:
        return dataset
    return dataset.map(resolve, with_indices=True, desc="resolving image paths")


def _stores_paths(feature: Any) -> bool:
    from datasets import Value

    inner = getattr(feature, "feature", feature)  # List(Value("string")) or Value("string")
    return isinstance(inner, Value) and inner.dtype in ("string", "large_string")


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (
        path / "state.json"
    ).exists()


def check_columns(dataset: Dataset, name: str) -> None:
    """Fail before training when a required column is missing from the whole dataset."""
    missing = [f for f in TEXT_FIELDS if f not in dataset.column_names]
    if missing:
        raise ADPODataError(
            None, missing[0],
            f"{name} has no column {missing[0]!r} (columns: {dataset.column_names}); an ADPO row needs "
            "response, chosen, rejected and, for images, chosen_images and rejected_images.",
        )


def check_multitask_columns(dataset: Dataset, name: str) -> None:
    """``--multitask_weight`` trains on each row's standard DPO pair too: its columns must exist."""
    missing = [f for f in MULTITASK_FIELDS if f not in dataset.column_names]
    if missing:
        raise ADPODataError(
            None, missing[0],
            f"{name} has no column {missing[0]!r} (columns: {dataset.column_names}); --multitask_weight needs rows "
            "that also carry a standard preference pair: prompt, optional prompt_images, chosen_response, "
            "rejected_response.",
        )


def has_images(dataset: Dataset) -> bool:
    """Whether the rows carry image columns."""
    return any(f in dataset.column_names for f in IMAGE_FIELDS)


def row_text(row: dict[str, Any], field: str, row_id: int | None) -> str:
    """A row's text field, checked to be a non-empty string."""
    value = row.get(field)
    if value is None:
        raise ADPODataError(row_id, field, "missing")
    if not isinstance(value, str):
        raise ADPODataError(row_id, field, f"must be a string, got {type(value).__name__}")
    if field == "response" and not value.strip():
        raise ADPODataError(row_id, field, "is empty")
    return value


def row_images(row: dict[str, Any], field: str, row_id: int | None) -> list[Any]:
    """A row's image field as a list of image values (paths, PIL images, bytes or {'bytes', 'path'} dicts).

    CSV files store lists as text: a JSON list string is parsed, a plain string is one path.
    """
    value = row.get(field)
    if value is None:
        return []
    if isinstance(value, str):
        if value.lstrip().startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise ADPODataError(row_id, field, f"looks like a JSON list but does not parse: {err.msg}") from None
        else:
            value = [value] if value else []
    if isinstance(value, dict) or not isinstance(value, (list, tuple)):
        raise ADPODataError(row_id, field, f"must be a list of images, got {type(value).__name__}")
    return list(value)


def iter_rows(dataset: Any, batch_size: int = 64, decode: bool = True) -> Iterator[dict[str, Any]]:
    """A dataset's rows one by one, as dicts, read in batches (much faster than indexing row by row).

    ``dataset`` is a ``datasets.Dataset`` or anything indexable with a length (a list of rows, a torch
    ``Subset``). ``decode=False`` gives a ``Dataset``'s stored values: images stay ``{"bytes", "path"}`` dicts or
    paths, whatever the features say.
    """
    if not hasattr(dataset, "with_format"):
        for index in range(len(dataset)):
            yield dataset[index]
        return
    if not decode:
        for table in dataset.with_format("arrow").iter(batch_size=batch_size):
            yield from table.to_pylist()
        return
    for batch in dataset.iter(batch_size=batch_size):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns), strict=True):
            yield dict(zip(columns, values, strict=True))


def iter_batches(dataset: Any, batch_size: int, decode: bool = True) -> Iterator[list[dict[str, Any]]]:
    """The rows of :func:`iter_rows`, ``batch_size`` at a time (the last batch may be shorter)."""
    batch: list[dict[str, Any]] = []
    for row in iter_rows(dataset, batch_size, decode):
        batch.append(row)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch
