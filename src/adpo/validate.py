"""Check every row before training, so a bad row gets a clear answer (row index and field) instead of a crash
deep inside the model or silently truncated training.

Each row goes through the collator's own encode path (:meth:`ADPOCollator.encode_side`), so validation and
training can never disagree about what a row means. With ``--max_length`` each side is also run through the
processor on its own, which counts the prompt's tokens exactly, image tokens included.

``--on_bad_rows error`` stops at the first bad row; ``skip`` leaves bad rows out and reports, per reason, how many
were skipped (:class:`ValidationReport`). Rows are never truncated.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset, Image, IterableDataset, List, Sequence

from .collator import ADPOCollator, EncodedSide
from .data import ALL_IMAGE_FIELDS, IMAGE_FIELDS, ROW_ID, ADPODataError, iter_rows

logger = logging.getLogger(__name__)

ON_BAD_ROWS = ("error", "skip")
_EXAMPLE_ROWS = 8  # row ids listed per reason in the summary


@dataclass
class ValidationReport:
    """What validation found in one split: rows seen, kept, and skipped row ids grouped by reason."""

    name: str
    total: int = 0
    kept: int = 0
    skipped: dict[str, list[int | None]] = field(default_factory=dict)
    # Rows kept although their two sides are the same input: they differ only in images that an explicit
    # --multimodal_mode false withholds (a text-only baseline). They carry no signal, so they are counted.
    no_signal: list[int | None] = field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        return sum(len(rows) for rows in self.skipped.values())

    def add(self, err: ADPODataError) -> None:
        self.skipped.setdefault(reason(err), []).append(err.row)

    def summary(self) -> str:
        """One line per reason, most frequent first, with the first few row ids."""
        lines = [f"{self.name}: skipped {self.n_skipped} of {self.total} rows (--on_bad_rows skip), "
                 f"kept {self.kept}"]
        for why, rows in sorted(self.skipped.items(), key=lambda item: -len(item[1])):
            shown = ", ".join(str(r) for r in rows[:_EXAMPLE_ROWS]) + (", ..." if len(rows) > _EXAMPLE_ROWS else "")
            lines.append(f"  {len(rows)} x {why} (rows {shown})")
        return "\n".join(lines)


def reason(err: ADPODataError) -> str:
    """A row error's reason without its specifics: the field and the problem up to its first colon, numbers
    replaced by N (so '2 placeholders but 1 image' and '3 ... but 2' count together)."""
    return f"{err.field or 'row'}: {re.sub(r'[0-9]+', 'N', err.problem.split(':')[0]).strip()}"


def check_row(
    row: dict[str, Any],
    collator: ADPOCollator,
    max_length: int | None = None,
    max_response_length: int | None = None,
    identical_sides_ok: bool = False,
    withheld_images_ok: bool = False,
) -> bool:
    """Raise :class:`ADPODataError` (naming the row and field) if the row cannot be trained on as given.

    ``identical_sides_ok``: two sides that are the same input are fine (evaluation: they score a tie).
    ``withheld_images_ok``: two sides that differ only in their images are fine when the images are withheld on
    request (``--multimodal_mode false``: a text-only baseline, which by design cannot tell them apart).
    Returns True for a pair kept although its two sides are the same input (it carries no signal).
    """
    row_id = row.get(ROW_ID)
    chosen = collator.encode_side(row, "chosen")
    rejected = collator.encode_side(row, "rejected")
    if chosen.response_ids != rejected.response_ids:
        raise ADPODataError(row_id, "response", "tokenises differently after the chosen and the rejected prompt")
    same = _same_side(chosen, rejected)
    if same and not identical_sides_ok and not (withheld_images_ok and _differs_in_withheld_images(row, collator)):
        raise ADPODataError(row_id, "rejected", _identical_sides_problem(row, collator))
    sides = {"chosen": chosen, "rejected": rejected}
    if collator.multitask:  # the row's standard DPO pair is trained on too: its fields and prompt_images
        dpo_chosen, dpo_rejected = collator.encode_dpo_side(row, "chosen"), collator.encode_dpo_side(row, "rejected")
        if dpo_chosen.response_ids == dpo_rejected.response_ids:
            raise ADPODataError(row_id, "rejected_response", "is the same as chosen_response: the DPO pair carries "
                                "no preference")
        sides |= {"chosen_response": dpo_chosen, "rejected_response": dpo_rejected}
    for name, side in sides.items():
        n_response = len(side.response_ids)
        if max_response_length is not None and n_response > max_response_length:
            raise ADPODataError(row_id, "response" if name in ("chosen", "rejected") else name,
                                f"too long: {n_response} tokens, over --max_response_length {max_response_length} "
                                "(rows are never truncated)")
    if max_length is not None:
        for name, n in zip(sides, pair_lengths(collator, list(sides.values()), list(sides), row_id), strict=True):
            if n > max_length:
                raise ADPODataError(row_id, name, f"too long: prompt + response is {n} tokens (image tokens "
                                    f"included), over --max_length {max_length} (rows are never truncated)")
    return same


def _same_side(a: EncodedSide, b: EncodedSide) -> bool:
    """Whether two sides are the same input: same prompt text and pixel-identical images."""
    if a.prompt != b.prompt or len(a.images) != len(b.images):
        return False
    return all(x is y or (x.size == y.size and x.mode == y.mode and x.tobytes() == y.tobytes())
               for x, y in zip(a.images, b.images, strict=True))


def _differs_in_withheld_images(row: dict[str, Any], collator: ADPOCollator) -> bool:
    return not collator.multimodal and any(row.get(f) for f in IMAGE_FIELDS)


def _identical_sides_problem(row: dict[str, Any], collator: ADPOCollator) -> str:
    if _differs_in_withheld_images(row, collator):
        return ("the two sides differ only in their images, which this run does not use (the model takes no "
                "images, or --multimodal_mode false): it would train on two identical inputs, which carry no "
                "signal. Use a vision-language model, leave such rows out (--on_bad_rows skip), or for a "
                "text-only baseline pass --multimodal_mode false explicitly")
    return "is the same as the chosen side (text and images): the pair carries no signal"


def pair_lengths(
    collator: ADPOCollator, sides: list[EncodedSide], names: list[str], row_id: int | None
) -> list[int]:
    """Exact token counts of a row's sides (prompt with its expanded image tokens + response), from one processor
    call, exactly as the collator builds a training batch. ``names``: each side's field, for errors."""
    try:
        return _lengths(collator.collate_sides(sides))
    except Exception:
        pass  # find the side to blame, then say which row and field
    for name, side in zip(names, sides, strict=True):
        field_name = (f"{name}_images" if name in ("chosen", "rejected") else "prompt_images") if side.images else name
        try:
            _lengths(collator.collate_sides([side]))
        except ADPODataError:
            raise
        except Exception as err:  # the processor refused the side: name the row, not a traceback from its depths
            raise ADPODataError(row_id, field_name, f"the processor cannot encode this side: "
                                f"{type(err).__name__}: {err}") from None
    raise ADPODataError(row_id, names[0], "the processor cannot encode the sides together")


def _lengths(batch: dict[str, torch.Tensor]) -> list[int]:
    for key, value in batch.items():
        if torch.is_floating_point(value) and not torch.isfinite(value).all():
            raise ValueError(f"non-finite values: the processor's {key} holds NaN or inf")
    return batch["attention_mask"].sum(1).tolist()


def validate_dataset(
    dataset: Dataset | IterableDataset,
    collator: ADPOCollator,
    *,
    on_bad_rows: str = "error",
    max_length: int | None = None,
    max_response_length: int | None = None,
    name: str = "train",
    unreadable: list[ADPODataError] | None = None,
    identical_sides_ok: bool = False,
    withheld_images_ok: bool = False,
) -> tuple[Dataset | IterableDataset, ValidationReport]:
    """Check every row; return the rows to train on and a report.

    A map-style dataset is checked now. The returned dataset keeps the good rows and hands stored images to the
    collator undecoded, so decoding, size checks and shrinking always go through :func:`adpo.images.load_image`
    (validation decodes each image once, with that same loader). A streamed ``IterableDataset`` cannot be read
    twice, so its rows are checked as they stream (its report fills as training reads it).

    ``unreadable``: records the loader could not read (``adpo.data.LoadedRows.skipped``), counted in the report.
    ``identical_sides_ok``, ``withheld_images_ok``: see :func:`check_row` (``adpo-eval`` scores identical sides as
    ties; a text-only baseline keeps pairs that differ only in the images it withholds, counted in
    ``report.no_signal`` and logged).
    Errors in any split but ``train`` say which data they are in (e.g. ``evaluation data: row 3, ...``).
    """
    try:
        limits = {"max_length": max_length, "max_response_length": max_response_length,
                  "identical_sides_ok": identical_sides_ok, "withheld_images_ok": withheld_images_ok}
        return _validate(dataset, collator, on_bad_rows, limits, name, unreadable or [])
    except ADPODataError as err:
        context = SPLIT_CONTEXT.get(name)
        raise (err.within(context) if context and not err.context else err) from None


SPLIT_CONTEXT = {"train": None, "eval": "evaluation data"}  # how errors name a split's rows


def _validate(
    dataset: Dataset | IterableDataset, collator: ADPOCollator, on_bad_rows: str, limits: dict[str, Any], name: str,
    unreadable: list[ADPODataError],
) -> tuple[Dataset | IterableDataset, ValidationReport]:
    if on_bad_rows not in ON_BAD_ROWS:
        raise ValueError(f"on_bad_rows must be one of {ON_BAD_ROWS}, got {on_bad_rows!r}")
    if isinstance(dataset, IterableDataset):
        return _validate_stream(dataset, collator, on_bad_rows, limits, name)
    if ROW_ID not in dataset.column_names:
        dataset = dataset.add_column(ROW_ID, list(range(len(dataset))))
    report = ValidationReport(name, total=len(dataset) + len(unreadable))
    for err in unreadable:
        report.add(err)
    if len(dataset) == 0:
        raise ADPODataError(None, "rows", f"the {name} dataset has no rows")
    # Check the rows exactly as training will read them: a copy (so changing its features leaves the caller's
    # dataset alone) that hands images over undecoded.
    dataset = dataset.select(range(len(dataset)))
    _stop_decoding_images(dataset)
    start, kept = time.perf_counter(), []
    for index, row in enumerate(iter_rows(dataset)):
        if _checked(row, collator, on_bad_rows, limits, report) is None:
            kept.append(index)
    report.kept = len(kept)
    logger.info("validated %d %s rows in %.1f s", report.total, name, time.perf_counter() - start)
    if not kept:
        raise ADPODataError(None, "rows", f"every one of the {report.total} {name} rows is bad, nothing to train "
                            f"on:\n{report.summary()}")
    if report.n_skipped:
        logger.warning("%s", report.summary())
        dataset = dataset.select(kept)
    if report.no_signal:
        logger.warning("%s: %d of %d pairs differ only in their images, which --multimodal_mode false withholds: "
                       "their two sides are the same input and carry no signal (as a text-only baseline expects)",
                       name, len(report.no_signal), report.kept)
    return dataset, report


def _checked(
    row: dict[str, Any], collator: ADPOCollator, on_bad_rows: str, limits: dict[str, Any],
    report: ValidationReport,
) -> ADPODataError | None:
    """None for a good row; a bad row raises (error mode) or is counted in ``report`` and its error returned."""
    try:
        same = check_row(row, collator, **limits)
    except ADPODataError as err:
        if on_bad_rows == "error":
            raise
        report.add(err)
        return err
    if same:
        report.no_signal.append(row.get(ROW_ID))
    return None


def _stop_decoding_images(dataset: Dataset) -> None:
    """Hand stored image bytes to the collator instead of PIL images that datasets decoded (which skips our bomb
    check, draft-mode shrinking and error messages). ``dataset`` must be a fresh copy: its info is changed."""
    features = dataset.info.features
    for name in ALL_IMAGE_FIELDS:
        feature = features.get(name) if features else None
        if isinstance(feature, Image):
            features[name] = Image(decode=False)
        elif isinstance(feature, (List, Sequence)) and isinstance(feature.feature, Image):
            features[name] = List(Image(decode=False))


def _validate_stream(
    dataset: IterableDataset, collator: ADPOCollator, on_bad_rows: str, limits: dict[str, Any], name: str
) -> tuple[IterableDataset, ValidationReport]:
    report = ValidationReport(name)
    if dataset.features is not None:
        dataset = dataset.decode(False)

    def keep(row: dict[str, Any], index: int) -> bool:
        row = row if ROW_ID in row else {**row, ROW_ID: index}
        report.total += 1
        try:
            err = _checked(row, collator, on_bad_rows, limits, report)
        except ADPODataError as bad:
            context = SPLIT_CONTEXT.get(name)
            raise (bad.within(context) if context else bad) from None
        if err is not None:
            logger.warning("%s: skipping %s", name, err)
            return False
        report.kept += 1
        return True

    return dataset.filter(keep, with_indices=True), report


def validate_splits(
    train: Dataset | IterableDataset,
    eval_dataset: Dataset | IterableDataset | None,
    collator: ADPOCollator,
    data_args: Any,
    unreadable: dict[str, list[ADPODataError]] | None = None,
) -> tuple[Dataset | IterableDataset, Dataset | IterableDataset | None, dict[str, ValidationReport]]:
    """Validate the training and (if any) evaluation rows with the ``DataArguments`` settings.

    ``unreadable``: per split (``train``/``eval``), records the loader left out (counted in the reports)."""
    settings = {"on_bad_rows": data_args.on_bad_rows, "max_length": data_args.max_length,
                "max_response_length": data_args.max_response_length,
                # An explicit --multimodal_mode false asks for a text-only baseline: pairs whose sides differ only
                # in the withheld images are expected there (counted and logged, never silently).
                "withheld_images_ok": getattr(data_args, "multimodal_mode", None) is False}
    unreadable = unreadable or {}
    reports: dict[str, ValidationReport] = {}
    train, reports["train"] = validate_dataset(train, collator, name="train", unreadable=unreadable.get("train"),
                                               **settings)
    if eval_dataset is not None:
        eval_dataset, reports["eval"] = validate_dataset(eval_dataset, collator, name="eval",
                                                         unreadable=unreadable.get("eval"), **settings)
    return train, eval_dataset, reports
