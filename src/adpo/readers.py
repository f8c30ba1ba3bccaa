"""Read ADPO rows from local text files (JSON Lines, JSON, CSV/TSV, optionally gzip-compressed) with answers
that name the file, the line and the row.

Why not ``datasets.load_dataset("json"/"csv")``: it stops at the first malformed line with an Arrow message that
names neither the file nor the line, renames repeated CSV columns silently (``chosen``, ``chosen.1``), turns a
numeric CSV column into integers, and cannot skip one bad record. Here each record is parsed on its own, so a
broken record is one :class:`~adpo.data.ADPODataError` (``row 3: not valid JSON: line 4 of data.jsonl: ...``)
that ``--on_bad_rows skip`` can count and leave out, while file-level problems (no rows at all, repeated column
names, not UTF-8 text in a CSV) are a ``ValueError`` naming the file.

Accepted: a UTF-8 byte-order mark, CRLF line ends, blank lines (they hold no row), ``.gz`` compression.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import ADPODataError

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv"}


class DuplicateKeyError(ValueError):
    """A JSON object names one key twice (json.loads would silently keep the last value)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise DuplicateKeyError(key)
        seen[key] = value
    return seen


def _loads(text: str) -> Any:
    return json.loads(text, object_pairs_hook=_unique_keys)


@dataclass
class FileRows:
    """The records of one file: good rows (with their record index) and bad records as errors."""

    path: Path
    rows: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    errors: list[tuple[int, ADPODataError]] = field(default_factory=list)

    @property
    def n_records(self) -> int:
        return len(self.rows) + len(self.errors)


def text_format(path: Path) -> str | None:
    """``jsonl``/``json``/``csv``/``tsv`` for a (possibly ``.gz``) text data file, else None."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return TEXT_SUFFIXES.get(suffixes[-1]) if suffixes else None


def read_text_file(path: Path, first_row: int = 0) -> FileRows:
    """Parse every record of ``path``; record ``i`` gets row id ``first_row + i``."""
    data = _read_bytes(path)
    fmt = text_format(path)
    if fmt in ("csv", "tsv"):
        out = _read_csv(path, data, first_row, "\t" if fmt == "tsv" else ",")
    else:
        out = _read_json(path, data, first_row, fmt == "json")
    if out.n_records == 0:
        raise ValueError(f"{path} holds no rows (the file is empty or has only blank lines"
                         f"{' and a header' if fmt in ('csv', 'tsv') else ''}).")
    return out


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix.lower() == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as err:  # gzip raises BadGzipFile (an OSError) or EOFError when cut short
        raise ValueError(f"{path}: cannot read it: {err}") from None


# ------------------------------------------------------------------------------------------------------ JSON
def _read_json(path: Path, data: bytes, first_row: int, whole_file_allowed: bool) -> FileRows:
    out = FileRows(path)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if whole_file_allowed:  # .json: one JSON document (a list of rows, or {"column": [values]}), else JSON lines
        records = _whole_json(path, data)
        if records is not None:
            for i, record in enumerate(records):
                _add_record(out, first_row + i, record, f"item {i} of {path}")
            return out
    index = first_row
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        where = f"line {lineno} of {path}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            out.errors.append((index, ADPODataError(index, None, f"not UTF-8 text: {where}: byte "
                                                    f"0x{raw[err.start]:02x} at column {err.start + 1}")))
            index += 1
            continue
        try:
            record = _loads(text)
        except json.JSONDecodeError as err:
            out.errors.append((index, ADPODataError(index, None, f"not valid JSON: {where}: {err.msg} (column "
                                                    f"{err.colno})")))
        except DuplicateKeyError as err:
            out.errors.append((index, ADPODataError(index, str(err), f"appears twice in the object on {where} "
                                                    "(which one is meant?)")))
        else:
            _add_record(out, index, record, where)
        index += 1
    return out


def _whole_json(path: Path, data: bytes) -> list[Any] | None:
    """A ``.json`` file's records if it is one JSON document, None if it is JSON lines."""
    head = data.lstrip()[:1]
    if head not in (b"[", b"{"):
        return None
    try:
        document = _loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ValueError(f"{path} is not UTF-8 text: byte 0x{data[err.start]:02x} on line {line}.") from None
    except json.JSONDecodeError as err:
        if head == b"{" and err.msg == "Extra data":
            return None  # several objects, one per line
        raise ValueError(f"{path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}.") from None
    except DuplicateKeyError as err:
        raise ValueError(f"{path}: the key {str(err)!r} appears twice in one object (which one is meant?).") from None
    if isinstance(document, list):
        return document
    if isinstance(document, dict):
        columns = [v for v in document.values() if isinstance(v, list)]
        if len(document) == 1 and columns and columns[0] and all(isinstance(r, dict) for r in columns[0]):
            return columns[0]  # {"data": [rows]}
        if document and len(columns) == len(document) and len({len(c) for c in columns}) == 1:
            # {"response": [...], "chosen": [...], ...}: one list per column
            return [dict(zip(document, values, strict=True)) for values in zip(*columns, strict=True)]
        return [document]  # a single row
    raise ValueError(f"{path}: expected JSON rows (objects), got a {type(document).__name__}.")


def _add_record(out: FileRows, index: int, record: Any, where: str) -> None:
    if isinstance(record, dict):
        out.rows.append((index, record))
    else:
        out.errors.append((index, ADPODataError(index, None, f"not a JSON object: {where}: got "
                                                f"{type(record).__name__}")))


# ------------------------------------------------------------------------------------------------------ CSV
def _read_csv(path: Path, data: bytes, first_row: int, delimiter: str) -> FileRows:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ValueError(f"{path} is not UTF-8 text: byte 0x{data[err.start]:02x} on line {line}; save it as "
                         "UTF-8.") from None
    out = FileRows(path)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    records = _nonblank(reader)
    try:
        _, header = next(records)
    except StopIteration:
        return out
    except csv.Error as err:
        raise ValueError(f"{path}: malformed CSV header: {err}") from None
    names = _header(path, header)
    index = first_row
    while True:
        try:
            item = next(records)
        except StopIteration:
            break
        except csv.Error as err:  # e.g. a NUL byte; the reader can go on after the bad line
            out.errors.append((index, ADPODataError(index, None, f"malformed CSV: line {reader.line_num} of "
                                                    f"{path}: {err}")))
            index += 1
            continue
        line, cells = item
        if len(cells) != len(header):
            out.errors.append((index, ADPODataError(
                index, None, f"malformed CSV: line {line} of {path}: {len(cells)} fields, the header has "
                f"{len(header)} (an unquoted {delimiter!r} or an unclosed quote?)")))
        else:
            out.rows.append((index, {name: cell for name, cell in zip(names, cells, strict=True) if name}))
        index += 1
    return out


def _nonblank(reader: Any) -> Iterator[tuple[int, list[str]]]:
    """(line the record starts on, cells) for every record that is not a blank line."""
    start = 1
    for cells in reader:
        if len(cells) > 1 or (cells and cells[0].strip()):  # a lone empty or blank cell is a blank line
            yield start, cells
        start = reader.line_num + 1


def _header(path: Path, header: list[str]) -> list[str]:
    names = [name.strip() for name in header]
    seen: dict[str, int] = {}
    for position, name in enumerate(names, start=1):
        if name and name in seen:
            raise ValueError(f"{path}: the column name {name!r} appears twice (columns {seen[name]} and {position});"
                             " rename one: adpo would otherwise have to guess which one holds the data.")
        seen.setdefault(name, position)
    unnamed = [i for i, name in enumerate(names, start=1) if not name]
    if unnamed:
        logger.warning("%s: column(s) %s have no name in the header and are ignored", path, unnamed)
    return names
