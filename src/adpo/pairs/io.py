"""Read any dataset the trainer reads, with images left undecoded; write built rows as JSONL or ``save_to_disk``.

Rows are read from the source lazily (``Source.row(i)``), so a builder holds only the small columns it needs
(prompts, responses, image fingerprints) and each image's bytes are read once more, when its output row is
written. Image values stay as the dataset stores them (a path, or the ``{"bytes", "path"}`` dict of an ``Image``
feature) and are copied byte for byte into the output: nothing is re-encoded.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import os
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image as PILImage
from tqdm.auto import tqdm

from ..data import ADPODataError, row_images

logger = logging.getLogger(__name__)

# Columns of our schema (and of swap input, which `import` writes) that hold lists of images.
OUTPUT_IMAGE_FIELDS = ("chosen_images", "rejected_images", "prompt_images", "images")


@dataclass
class Source:
    """A dataset to build from: its rows (images undecoded), the folder relative image paths start from (None
    when they were made absolute on loading), and the records that could not be read at all."""

    name: str
    dataset: Any  # datasets.Dataset
    image_root: str | None
    unreadable: list[ADPODataError] = field(default_factory=list)
    row_ids: list[int] | None = None  # each row's record number in the input (default: its position)

    def __post_init__(self) -> None:
        if self.row_ids is None:
            self.row_ids = list(range(len(self.dataset)))

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def columns(self) -> list[str]:
        return list(self.dataset.column_names)

    def column(self, name: str) -> list[Any]:
        return list(self.dataset[name]) if name in self.columns else [None] * len(self)

    def row(self, index: int) -> dict[str, Any]:
        return self.dataset[index]

    def rows(self, batch_size: int = 256) -> Iterator[dict[str, Any]]:
        """Every row in order, read in batches."""
        for batch in self.dataset.iter(batch_size=batch_size):
            columns = list(batch)
            for values in zip(*(batch[c] for c in columns), strict=True):
                yield dict(zip(columns, values, strict=True))


# Image columns of the rows builders read (swap input, ms-swift, LLaVA); the trainer's loader resolves its own.
SOURCE_IMAGE_FIELDS = ("images", "image", "rejected_images")


def load_source(
    name: str, split: str = "train", config: str | None = None, on_bad_rows: str = "error",
    image_root: str | None = None,
) -> Source:
    """Rows of any dataset the trainer reads (a JSONL/JSON/CSV/TSV/Parquet file or folder of them, read by the
    trainer's own readers; a ``save_to_disk`` folder; a hub id), whatever their columns, images undecoded.

    Relative image paths are resolved against the folder of the file that holds them, or, given ``image_root``,
    against that folder. An unreadable record raises (``on_bad_rows="error"``) or is kept in ``unreadable``.
    """
    from datasets import concatenate_datasets

    from .. import data

    path = Path(name).expanduser()
    if path.is_dir() and data._is_saved_dataset(path):
        return Source(name, undecoded(data._load_saved(path, split)), image_root)
    if path.is_file() or path.is_dir():
        parts, unreadable, row_ids, offset = [], [], [], 0
        for file in [path] if path.is_file() else data.data_files(path, split):
            loaded = data._load_files(name, [file], None, on_bad_rows)
            root = image_root or str(file.resolve().parent)
            parts.append(_resolve_paths(loaded.dataset, root).remove_columns([data.ROW_ID]))
            # Record numbers run on across the files, so every row and every unreadable record has its own.
            row_ids += [offset + i for i in loaded.dataset[data.ROW_ID]]
            unreadable += [ADPODataError(offset + err.row, err.field, err.problem, err.context)
                           if err.row is not None else err for err in loaded.skipped]
            offset += len(loaded.dataset) + len(loaded.skipped)
        dataset = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
        return Source(name, undecoded(dataset), None, unreadable, row_ids)
    if data._looks_like_a_path(name):
        raise ValueError(f"{name}: no such file or folder.")
    return Source(name, undecoded(data._load_hub(name, config, split)), image_root)


def _resolve_paths(dataset: Any, root: str) -> Any:
    """The builders' image columns with relative paths joined to ``root`` (the trainer's resolver)."""
    from ..data import resolve_image_paths

    fields = [f for f in SOURCE_IMAGE_FIELDS if f in dataset.column_names]
    if not fields:
        return dataset
    return dataset.map(lambda row: {f: resolve_image_paths(row[f], root) for f in fields},
                       desc="resolving image paths")


def undecoded(dataset: Any) -> Any:
    """The dataset with every ``Image`` column (or list of them) handing over ``{"bytes", "path"}`` dicts."""
    from datasets import Image, List, Sequence

    for name, feature in (dataset.features or {}).items():
        # cast_column only relabels a column whose feature decodes (no data is rewritten).
        if isinstance(feature, Image):
            dataset = dataset.cast_column(name, Image(decode=False))
        elif isinstance(feature, (List, Sequence)) and isinstance(feature.feature, Image):
            dataset = dataset.cast_column(name, List(Image(decode=False)))
    return dataset


# ------------------------------------------------------------------------------------------------ image values
def image_payload(value: Any, root: str | None, row: int | None, field: str) -> tuple[bytes, str]:
    """One stored image value → (its encoded bytes, a file extension such as ``.png``)."""
    if isinstance(value, dict) and value.get("bytes"):
        data = value["bytes"]
    elif isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, PILImage.Image):
        buffer = io.BytesIO()
        value.save(buffer, format=value.format or "PNG")
        data = buffer.getvalue()
    else:
        path = value.get("path") if isinstance(value, dict) else value
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise ADPODataError(row, field, f"unsupported image value of type {type(value).__name__}; expected a "
                                "path, bytes or a {'bytes', 'path'} dict")
        path = os.fspath(path)
        if root is not None and not os.path.isabs(path):
            path = os.path.join(root, path)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as err:
            raise ADPODataError(row, field, f"image file not found: {path} ({err.strerror})") from None
    return data, _extension(data)


def _extension(data: bytes) -> str:
    try:
        fmt = PILImage.open(io.BytesIO(data)).format or "png"
    except Exception:  # not decodable here: keep the bytes, the trainer's check will name the problem
        fmt = "bin"
    return "." + {"jpeg": "jpg"}.get(fmt.lower(), fmt.lower())


def image_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def row_image_list(row: dict[str, Any], field: str, row_id: int) -> list[Any]:
    """The row's image values for ``field`` (a list, one value, a JSON list string as CSV stores it)."""
    value = row.get(field)
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        return [value]  # a single Image feature
    return row_images(row, field, row_id)


# ------------------------------------------------------------------------------------------------ writing
def write_rows(rows: Iterable[dict[str, Any]], output: str | Path, total: int | None = None) -> int:
    """Write rows of our schema; image fields hold ``(bytes, ext)`` payloads. Returns the number written.

    ``OUTPUT.jsonl``: a JSONL file whose image fields are paths relative to it, the image files written (once
    per distinct image, named by content) to the folder ``OUTPUT_images/`` beside it. Anything else: a
    ``save_to_disk`` folder with the images embedded as ``List(Image())`` columns.
    """
    output = Path(output)
    if output.suffix.lower() == ".jsonl":
        return _write_jsonl(rows, output, total)
    return _write_saved(rows, output, total)


def _write_jsonl(rows: Iterable[dict[str, Any]], output: Path, total: int | None) -> int:
    output.parent.mkdir(parents=True, exist_ok=True)
    folder = output.with_name(output.stem + "_images")
    folder.mkdir(exist_ok=True)
    written: set[str] = set()
    n = 0
    tmp = output.with_name(output.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in tqdm(rows, total=total, desc=f"writing {output.name}", unit="row"):
            out = dict(row)
            for field in OUTPUT_IMAGE_FIELDS:
                if field in out:
                    out[field] = [_store(data, ext, folder, written) for data, ext in out[field]]
            f.write(json.dumps(out, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(output)  # a crash mid-way leaves no half-written file under the final name
    return n


def _store(data: bytes, ext: str, folder: Path, written: set[str]) -> str:
    name = image_digest(data)[:20] + ext
    if name not in written:
        target = folder / name
        if not target.exists():
            target.write_bytes(data)
        written.add(name)
    return f"{folder.name}/{name}"


def _write_saved(rows: Iterable[dict[str, Any]], output: Path, total: int | None) -> int:
    """Stream the rows into an Arrow file (through a temporary cache, never all in memory), then save_to_disk."""
    from datasets import Dataset, Features

    iterator = iter(tqdm(rows, total=total, desc=f"writing {output.name}", unit="row"))
    first = next(iterator, None)
    if first is None:
        raise ValueError(f"{output}: no rows to write.")
    features = Features({name: _feature(name, value) for name, value in first.items()})

    def generate() -> Iterator[dict[str, Any]]:
        for row in itertools.chain([first], iterator):
            extra = set(row) - set(features)
            if extra:  # every row of one build has the same columns; anything else is a bug, not data to drop
                raise RuntimeError(f"row with unexpected columns {sorted(extra)}")
            yield {name: _cell(row.get(name), feature) for name, feature in features.items()}

    with tempfile.TemporaryDirectory() as cache:
        # A fingerprint of our own: the generator closes over an iterator, which datasets cannot hash.
        dataset = Dataset.from_generator(generate, features=features, cache_dir=cache,
                                         fingerprint=f"adpo-data-{uuid.uuid4().hex}")
        dataset.save_to_disk(str(output))
        n = len(dataset)
        del dataset  # release the memory-mapped cache file before its folder goes
    return n


_INT_COLUMNS = ("source_row", "negative_row", "turn")


def _feature(name: str, value: Any) -> Any:
    from datasets import Image, List, Value

    if name in OUTPUT_IMAGE_FIELDS:
        return List(Image())
    if name in _INT_COLUMNS:
        return Value("int64")
    return _value_feature([value])


def _cell(value: Any, feature: Any) -> Any:
    from datasets import Value

    if not isinstance(feature, Value):
        return [{"bytes": data, "path": None} for data, _ in value or []]
    if feature.dtype == "string" and value is not None and not isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return value


def _value_feature(values: list[Any]) -> Any:
    from datasets import Value

    kinds = {type(v) for v in values if v is not None}
    if kinds <= {int, bool} and bool not in kinds:
        return Value("int64")
    if kinds == {bool}:
        return Value("bool")
    if kinds <= {int, float}:
        return Value("float64")
    return Value("string")
