"""Property tests: generated files (JSONL, CSV, Parquet, folders of files) and generated flag values either load
and validate, or fail with adpo's own error naming the row or the file; never a traceback from a library, and
under ``--on_bad_rows skip`` every record is counted exactly once.

Example counts are small and derandomized (CI runs them every time); raise them locally to search harder.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from adpo.cli import parse_args
from adpo.collator import ADPOCollator
from adpo.data import ROW_ID, ADPODataError, load_adpo_rows
from adpo.validate import validate_dataset

FUZZ = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

words = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
values = st.one_of(words, words, words, st.none(), st.integers(-5, 5), st.floats(allow_nan=True),
                   st.lists(st.one_of(words, st.none(), st.integers()), max_size=2), st.booleans(),
                   st.fixed_dictionaries({"path": st.one_of(words, st.none()), "bytes": st.none()}))
FIELDS = ("response", "chosen", "rejected", "chosen_images", "rejected_images", "extra")
records = st.dictionaries(st.sampled_from(FIELDS), values, max_size=len(FIELDS)).map(
    lambda r: {"response": "Yes.", "chosen": "A?", "rejected": "B?", **r})
garbage = st.sampled_from(['{"response": ', "[1, 2]", "null", "{'single': 'quotes'}", "\x00\x01", '"text"',
                           '{"response": "a"} trailing', "\xff\xfe"])
lines = st.lists(st.one_of(records, records, records, garbage), min_size=1, max_size=6)


@pytest.fixture(scope="module")
def collator(tiny_llama: Path) -> ADPOCollator:
    return ADPOCollator(AutoTokenizer.from_pretrained(tiny_llama), multimodal=False)


def _jsonl(items: list[Any], crlf: bool, bom: bool, blank: bool) -> bytes:
    out = []
    for item in items:
        text = item if isinstance(item, str) else json.dumps(item, allow_nan=True)
        out.append(text.encode("utf-8", "surrogatepass") if "\xff" not in text else b"\xff\xfe{}")
        if blank:
            out.append(b"   ")
    data = (b"\r\n" if crlf else b"\n").join(out)
    return (b"\xef\xbb\xbf" if bom else b"") + data


def _csv(items: list[Any]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(FIELDS)
    for item in items:
        if isinstance(item, str):
            buffer.write(item + "\n")  # a raw, possibly malformed, line
        else:
            writer.writerow(["" if item.get(f) is None else
                             (json.dumps(item[f]) if isinstance(item[f], (list, dict)) else str(item[f]))
                             for f in FIELDS])
    return buffer.getvalue().encode()


def _check(path: Path, n_records: int | None, collator: ADPOCollator) -> None:
    """Load and validate in both modes; only adpo's errors; skip mode counts every record once."""
    try:
        loaded = load_adpo_rows(str(path), on_bad_rows="skip")
    except ADPODataError:
        raise AssertionError("skip mode must not stop at a bad record") from None
    except ValueError as err:  # a file-level problem: it names the file
        assert str(path.name) in str(err) or "none of its" in str(err), err
        return
    try:
        kept, report = validate_dataset(loaded.dataset, collator, on_bad_rows="skip", unreadable=loaded.skipped)
    except ADPODataError as err:
        assert "every one of the" in str(err), err
        return
    if n_records is not None:
        assert report.total == n_records
    assert report.kept + report.n_skipped == report.total == len(loaded.dataset) + len(loaded.skipped)
    assert len(set(kept[ROW_ID])) == len(kept) == report.kept
    try:
        load_adpo_rows(str(path), on_bad_rows="error")
    except ADPODataError as err:
        assert str(err).startswith(f"row {err.row}"), err
        assert loaded.skipped and err.row == loaded.skipped[0].row


@FUZZ
@given(items=lines, crlf=st.booleans(), bom=st.booleans(), blank=st.booleans())
def test_fuzzed_jsonl_files(items, crlf, bom, blank, collator, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "rows.jsonl"
    path.write_bytes(_jsonl(items, crlf, bom, blank))
    _check(path, len(items), collator)


@FUZZ
@given(items=lines)
def test_fuzzed_csv_files(items, collator, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "rows.csv"
    path.write_bytes(_csv(items))
    _check(path, None, collator)  # a raw line with a quote can join the next ones into one record


@FUZZ
@given(items=st.lists(records, min_size=1, max_size=5))
def test_fuzzed_parquet_files(items, collator, tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path_factory.mktemp("fuzz") / "rows.parquet"
    # Parquet holds one type per column: every value as its JSON text, the way a careless export would.
    table = pa.table({f: [None if r.get(f) is None else json.dumps(r[f]) for r in items] for f in FIELDS})
    pq.write_table(table, path)
    _check(path, len(items), collator)


@FUZZ
@given(parts=st.lists(lines, min_size=1, max_size=3), nested=st.booleans())
def test_fuzzed_folders_of_files(parts, nested, collator, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    for i, items in enumerate(parts):
        where = folder / f"part{i}" if nested else folder
        where.mkdir(exist_ok=True)
        (where / f"rows{i}.jsonl").write_bytes(_jsonl(items, False, False, False))
    _check(folder, sum(len(items) for items in parts), collator)


# ------------------------------------------------------------------------------ flag values
NUMERIC_FLAGS = ("--beta", "--learning_rate", "--adam_epsilon", "--weight_decay", "--max_grad_norm",
                 "--adam_beta1", "--adam_beta2", "--label_smoothing", "--dpop_lambda", "--multitask_weight",
                 "--lora_alpha", "--lora_r", "--lora_dropout", "--pad_to_multiple_of", "--max_length",
                 "--max_image_size", "--num_train_epochs", "--max_steps", "--per_device_train_batch_size")
flag_values = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers(-10**6, 10**6).map(str),
                        st.sampled_from(["nan", "inf", "-inf", "1e309", "0", "-0.0", "1e-320", "", "abc", "0x10",
                                         "1_000", " 3 ", "true"]))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(flag=st.sampled_from(NUMERIC_FLAGS), value=flag_values)
def test_fuzzed_flag_values_parse_or_fail_with_a_message(flag, value):
    argv = ["--model_name_or_path", "m", "--dataset_name", "d.jsonl", "--output_dir", "o", "--report_to", "none",
            f"{flag}={value}"]
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            model, data, args = parse_args(argv)
    except ValueError as err:
        assert flag.lstrip("-") in str(err), err  # the message names the flag
        return
    except SystemExit:  # argparse: "invalid float value" with the usage line
        assert "invalid" in stderr.getvalue() and flag in stderr.getvalue()
        return
    name = flag.lstrip("-")
    parsed = next(getattr(obj, name) for obj in (model, data, args) if hasattr(obj, name))
    if isinstance(parsed, float):
        assert math.isfinite(parsed)
    if name in ("beta", "learning_rate", "adam_epsilon", "lora_alpha", "lora_r"):
        assert parsed > 0
    if name in ("weight_decay", "max_grad_norm", "dpop_lambda"):
        assert parsed >= 0
