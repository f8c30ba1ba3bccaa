"""Load ADPO rows from the hub, a ``save_to_disk`` folder, or local JSON/JSONL/CSV/TSV/Parquet files or folders.

A row is ``{response, chosen, chosen_images, rejected, rejected_images}``; text-only rows omit the image fields.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
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


class ADPODataError(ValueError):
    """A row that cannot be trained on. The message names the row and the field."""

    def __init__(self, row: int | None, field: str | None, problem: str, context: str | None = None) -> None:
        where = f"row {row}" if row is not None else "dataset"
        message = f"{where}, field '{field}': {problem}" if field else f"{where}: {problem}"
        super().__init__(f"{context}: {message}" if context else message)
        self.row, self.field, self.problem, self.context = row, field, problem, context

    def within(self, context: str) -> ADPODataError:
        """The same error, its message prefixed with where the row comes from (e.g. 'evaluation data')."""
        return ADPODataError(self.row, self.field, self.problem, context)


@dataclass
class LoadedRows:
    """A loaded split and the records that could not be read at all (kept out under ``--on_bad_rows skip``)."""

    dataset: Dataset
    skipped: list[ADPODataError] = field(default_factory=list)


def load_adpo_dataset(
    name: str, split: str = "train", config: str | None = None, max_samples: int | None = None,
    on_bad_rows: str = "error",
) -> Dataset:
    """Load one split of ADPO rows, with a ``_adpo_row`` column holding each row's original index.

    See :func:`load_adpo_rows`; records that cannot be read are an error, or (``on_bad_rows="skip"``) left out
    with a warning.
    """
    loaded = load_adpo_rows(name, split, config, max_samples, on_bad_rows)
    if loaded.skipped:
        logger.warning("%s: left out %d unreadable record(s), e.g. %s", name, len(loaded.skipped), loaded.skipped[0])
    return loaded.dataset


def load_adpo_rows(
    name: str, split: str = "train", config: str | None = None, max_samples: int | None = None,
    on_bad_rows: str = "error",
) -> LoadedRows:
    """Load one split of ADPO rows from a local file, a folder of files, a ``save_to_disk`` folder or the hub.

    Local files (``.jsonl``, ``.json``, ``.csv``, ``.tsv``, each optionally ``.gz``, and ``.parquet``) are read
    record by record (:mod:`adpo.readers`): a malformed record is an :class:`ADPODataError` naming the row, the
    line and the file, raised at once or (``on_bad_rows="skip"``) returned in ``skipped``. Relative image paths
    (plain, in lists, or in ``{"bytes": null, "path": ...}`` dicts) are resolved against the folder of the file
    that holds them. Every row gets a ``_adpo_row`` column with its record index (first ``max_samples`` only).
    """
    path = Path(name).expanduser()
    if path.is_file():
        loaded = _load_files(name, [path], max_samples, on_bad_rows)
    elif path.is_dir() and _is_saved_dataset(path):
        loaded = LoadedRows(_load_saved(path, split))
    elif path.is_dir():
        loaded = _load_files(name, data_files(path, split), max_samples, on_bad_rows)
    elif _looks_like_a_path(name):
        raise ValueError(f"--dataset_name {name}: no such file or folder.")
    else:
        loaded = LoadedRows(_load_hub(name, config, split))
    dataset = loaded.dataset
    if max_samples is not None and len(dataset) > max_samples:
        dataset = dataset.select(range(max_samples))
    check_columns(dataset, name)
    if ROW_ID not in dataset.column_names:
        dataset = dataset.add_column(ROW_ID, list(range(len(dataset))))
    logger.info("loaded %d rows from %s (split %s)", len(dataset), name, split)
    return LoadedRows(dataset, loaded.skipped)


def _looks_like_a_path(name: str) -> bool:
    from .readers import text_format

    # A hub id is "name" or "owner/name"; anything else that does not exist is a mistyped local path.
    return (name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
            or text_format(Path(name)) is not None or name.lower().endswith(".parquet"))


def _load_saved(path: Path, split: str) -> Dataset:
    from datasets import DatasetDict, load_from_disk

    dataset = load_from_disk(str(path))
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise ValueError(f"{path} has splits {sorted(dataset)}, not {split!r}: set --dataset_split.")
        dataset = dataset[split]
    return dataset


def _load_hub(name: str, config: str | None, split: str) -> Dataset:
    from datasets import load_dataset

    try:
        return load_dataset(name, config, split=split)
    except Exception as err:  # datasets raises many types here (not found, offline, no such split, gated ...)
        offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in
                      ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        hint = (" The hub is offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set) and it is not in the local cache."
                if offline else "")
        raise ValueError(f"--dataset_name {name}: not a local file or folder, and loading it from the hub failed "
                         f"({type(err).__name__}: {err}).{hint}") from None


_SPLIT_NAMES = ("train", "training", "test", "testing", "validation", "valid", "val", "dev", "eval")


def data_files(folder: Path, split: str) -> list[Path]:
    """The data files of ``split`` in a folder: files whose path names the split (``train.jsonl``,
    ``data/train-0001.parquet``, ``test/a.csv``), or, when no file names any split, every file for ``train``."""
    from .readers import text_format

    files = [p for p in sorted(folder.rglob("*")) if p.is_file()
             and not any(part.startswith((".", "_")) for part in p.relative_to(folder).parts)
             and (text_format(p) is not None or p.suffix.lower() == ".parquet")]
    if not files:
        raise ValueError(f"{folder} holds no data files (.jsonl, .json, .csv, .tsv, .parquet, optionally .gz) and "
                         "is not a save_to_disk folder.")

    def names(p: Path, word: str) -> bool:
        return re.search(rf"(^|[/_.\- ]){re.escape(word)}($|[/_.\- 0-9])", p.relative_to(folder).as_posix().lower())

    matched = [p for p in files if names(p, split.lower())]
    if matched:
        return matched
    if split == "train" and not any(names(p, word) for p in files for word in _SPLIT_NAMES):
        return files
    raise ValueError(f"{folder}: no data file names the split {split!r} (files: "
                     f"{', '.join(p.relative_to(folder).as_posix() for p in files[:10])}); set --dataset_split.")


def _load_files(name: str, paths: list[Path], max_samples: int | None, on_bad_rows: str) -> LoadedRows:
    """Rows of local data files, in order, each file's relative image paths resolved against its folder."""
    from .readers import read_text_file, text_format

    parquet = [p for p in paths if p.suffix.lower() == ".parquet"]
    if parquet and len(parquet) != len(paths):
        raise ValueError(f"--dataset_name {name} mixes Parquet and text files; keep one kind per split.")
    unsupported = [p for p in paths if p not in parquet and text_format(p) is None]
    if unsupported:
        raise ValueError(f"--dataset_name {name}: unsupported file type {unsupported[0].suffix!r}; use .jsonl, "
                         ".json, .csv, .tsv (optionally .gz), .parquet or a save_to_disk folder.")
    if parquet:
        return LoadedRows(_load_parquet(parquet))
    rows: list[dict[str, Any]] = []
    skipped: list[ADPODataError] = []
    for path in paths:
        if max_samples is not None and len(rows) + len(skipped) >= max_samples:
            break
        read = read_text_file(path, first_row=len(rows) + len(skipped))
        root = str(path.resolve().parent)
        for index, row in read.rows:
            rows.append({**row, **_resolved(row, root), ROW_ID: index})
        skipped += [err for _, err in read.errors]
    if max_samples is not None:
        rows = [r for r in rows if r[ROW_ID] < max_samples]
        skipped = [err for err in skipped if err.row is not None and err.row < max_samples]
    if skipped and on_bad_rows == "error":
        raise min(skipped, key=lambda err: err.row or 0)
    if not rows:
        raise ValueError(f"--dataset_name {name}: none of its {len(skipped)} records can be read, e.g. {skipped[0]}")
    return LoadedRows(_from_rows(rows), skipped)


def _from_rows(rows: list[dict[str, Any]]) -> Dataset:
    """A Dataset of dict rows; a column whose type varies across rows is kept as JSON values (each row's own)."""
    from datasets import Dataset

    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    return Dataset.from_dict({c: [row.get(c) for row in rows] for c in columns}, on_mixed_types="use_json")


def _load_parquet(paths: list[Path]) -> Dataset:
    from datasets import concatenate_datasets, load_dataset

    parts = []
    for path in paths:
        try:
            part = load_dataset("parquet", data_files=str(path), split="train")
        except Exception as err:  # pyarrow / datasets errors of a corrupt or truncated file
            cause = f": {err.__cause__}" if err.__cause__ else ""
            raise ValueError(f"{path}: cannot read it as Parquet ({type(err).__name__}: {err}{cause}).") from None
        parts.append(_absolute_image_paths(part, str(path.resolve().parent)))
    try:
        return parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    except ValueError as err:
        raise ValueError(f"the Parquet files {', '.join(map(str, paths))} do not share one schema: {err}") from None


_PATH_FIELDS = ALL_IMAGE_FIELDS


def _resolved(row: dict[str, Any], root: str) -> dict[str, Any]:
    """The row's image fields with relative paths made absolute against ``root`` (other values unchanged)."""
    return {f: resolve_image_paths(row[f], root) for f in _PATH_FIELDS if f in row}


def resolve_image_paths(value: Any, root: str) -> Any:
    """An image field's value with each relative path (a string, or a dict's ``path`` when it has no bytes)
    joined to ``root``. A CSV cell holding a JSON list is parsed; anything else is returned as it is, for
    validation to judge."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                return resolve_image_paths(json.loads(text), root)
            except json.JSONDecodeError:
                return value
        return _join(root, value)
    if isinstance(value, (list, tuple)):
        return [_join(root, v) if isinstance(v, str) else _resolve_dict(v, root) for v in value]
    return _resolve_dict(value, root)


def _resolve_dict(value: Any, root: str) -> Any:
    if isinstance(value, dict) and not value.get("bytes") and isinstance(value.get("path"), str):
        return {**value, "path": _join(root, value["path"])}
    return value


def _join(root: str, path: str) -> str:
    if not path or "://" in path:
        return path
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.join(root, path)


def _absolute_image_paths(dataset: Dataset, root: str) -> Dataset:
    """Resolve relative image paths in a Parquet file's rows against the file's folder (plain paths, lists of
    paths, and ``Image`` features whose rows hold a path without bytes); encoded images pass through."""
    from datasets import Image, List, Sequence

    fields = []
    for name in _PATH_FIELDS:
        feature = dataset.features.get(name)
        inner = getattr(feature, "feature", feature)
        if isinstance(inner, Image):
            # Keep the stored bytes/paths (validation hands them to adpo.images undecoded anyway).
            dataset = dataset.cast_column(name, List(Image(decode=False)) if isinstance(feature, (List, Sequence))
                                          else Image(decode=False))
        if feature is not None and _stores_paths(inner):
            fields.append(name)
    if not fields:
        return dataset
    def resolve(value: Any) -> Any:
        resolved = resolve_image_paths(value, root)
        # A string column stays a string column: a JSON list is written back as JSON.
        return json.dumps(resolved) if isinstance(value, str) and not isinstance(resolved, str) else resolved

    return dataset.map(lambda row: {f: resolve(row[f]) for f in fields}, desc="resolving image paths")


def _stores_paths(feature: Any) -> bool:
    from datasets import Image, Value

    return isinstance(feature, Image) or isinstance(feature, Value) and feature.dtype in ("string", "large_string")


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
    for position, item in enumerate(value, start=1):
        if item is None:
            raise ADPODataError(row_id, field, f"image {position} of {len(value)} is null (an image list holds "
                                "paths or images; leave the entry out)")
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
