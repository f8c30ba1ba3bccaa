"""``adpo-data check``: what a dataset holds and every row the trainer would refuse, before a GPU is rented.

With ``--model_name_or_path`` each row goes through the trainer's own check (:func:`adpo.validate.check_row` on
the model's processor, so exactly the rows ``adpo-train`` would refuse, for the same reasons) and gets its token
count per side (:func:`adpo.validate.pair_lengths`, image tokens included). Without a model, the rows' text fields
and every image are checked with the trainer's readers (:func:`adpo.data.row_text`, :func:`adpo.images.load_image`).
Both report image sizes and modes, pairs whose two sides are identical (no signal) and duplicate rows.
"""

from __future__ import annotations

import io
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from PIL import Image as PILImage
from tqdm.auto import tqdm

from ..data import ROW_ID, TEXT_FIELDS, ADPODataError, row_text
from ..images import ImageLoadError, load_image
from .io import Source, image_digest, image_payload, row_image_list

logger = logging.getLogger(__name__)

SIDE_IMAGES = {"chosen": "chosen_images", "rejected": "rejected_images"}


@dataclass
class CheckResult:
    """Everything ``check`` found; ``rows`` holds one record per row (its problems, lengths, image digests)."""

    name: str
    total: int = 0
    model: str | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    image_sizes: Counter = field(default_factory=Counter)  # "WxH" → images
    image_modes: Counter = field(default_factory=Counter)
    identical: list[int] = field(default_factory=list)
    duplicates: list[list[int]] = field(default_factory=list)  # groups of rows equal in every schema field
    source: Source | None = None  # the rows checked (the HTML report shows their images)

    @property
    def refused(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["problem"]]

    def reasons(self) -> Counter:
        from ..validate import reason

        return Counter(reason(ADPODataError(r["row"], r["field"], r["problem"])) for r in self.refused)

    def lengths(self, side: str) -> list[int]:
        return [r[f"tokens_{side}"] for r in self.rows if r.get(f"tokens_{side}") is not None]

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dataset": self.name, "model": self.model, "rows": self.total,
                               "refused": len(self.refused), "refused_by_reason": dict(self.reasons()),
                               "identical_sides": len(self.identical),
                               "duplicate_rows": sum(len(g) - 1 for g in self.duplicates),
                               "image_sizes": dict(self.image_sizes.most_common(20)),
                               "image_modes": dict(self.image_modes)}
        for side in SIDE_IMAGES:
            values = sorted(self.lengths(side))
            if values:
                out[f"tokens_{side}"] = {"min": values[0], "median": values[len(values) // 2], "max": values[-1]}
        return out

    def lines(self) -> list[str]:
        s = self.summary()
        out = [f"{self.name}: {self.total} rows, {s['refused']} the trainer would refuse"
               + ("" if self.model else " (schema and images only; --model_name_or_path adds the trainer's "
                  "full check and token counts)"),
               f"  identical sides (no signal): {s['identical_sides']}; duplicate rows: {s['duplicate_rows']}",
               f"  images: modes {s['image_modes']}; most common sizes {dict(self.image_sizes.most_common(5))}"
               if self.image_modes else "  images: none"]
        for side in SIDE_IMAGES:
            if f"tokens_{side}" in s:
                t = s[f"tokens_{side}"]
                out.append(f"  tokens per {side} side (prompt + images + response): min {t['min']}, median "
                           f"{t['median']}, max {t['max']}")
        for why, n in self.reasons().most_common():
            rows = [r["row"] for r in self.refused if _reason_of(r) == why][:8]
            out.append(f"  {n} x {why} (rows {', '.join(map(str, rows))})")
        return out


def _reason_of(record: dict[str, Any]) -> str:
    from ..validate import reason

    return reason(ADPODataError(record["row"], record["field"], record["problem"]))


def make_collator(model_name_or_path: str, multimodal: bool | None, separate_images: bool,
                  max_image_size: int | None, source: Source) -> Any:
    """The trainer's collator for this model (its processor only: no weights are loaded)."""
    from transformers import AutoTokenizer

    from ..collator import ADPOCollator
    from ..modeling import is_vision_model
    from ..pipeline import resolve_multimodal
    from ..processing import load_processor

    if is_vision_model(model_name_or_path):
        processor = load_processor(model_name_or_path)
    else:
        processor = AutoTokenizer.from_pretrained(model_name_or_path)
    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # as load_model_and_processor does
    flag = resolve_multimodal(multimodal, processor, source.dataset)
    return ADPOCollator(processor, multimodal=flag, separate_images=separate_images, max_image_size=max_image_size)


def check_dataset(
    source: Source,
    *,
    model_name_or_path: str | None = None,
    multimodal: bool | None = None,
    separate_images: bool = True,
    max_image_size: int | None = None,
    max_length: int | None = None,
    max_response_length: int | None = None,
) -> CheckResult:
    """Check every row of ``source`` (see the module docstring)."""
    from ..data import check_columns

    check_columns(source.dataset, source.name)
    collator = (make_collator(model_name_or_path, multimodal, separate_images, max_image_size, source)
                if model_name_or_path else None)
    result = CheckResult(source.name, total=len(source), model=model_name_or_path, source=source)
    seen: dict[tuple, list[int]] = defaultdict(list)
    for position, row in enumerate(tqdm(source.rows(), total=len(source), desc="checking rows", unit="row")):
        i = row.get(ROW_ID, position)  # the record's number in the file, as the trainer names it
        row = {**row, ROW_ID: i}
        record: dict[str, Any] = {"row": i, "position": position, "field": None, "problem": None}
        digests = {side: _describe_images(source, row, f, i, result) for side, f in SIDE_IMAGES.items()}
        try:
            if collator is not None:
                _trainer_check(row, collator, max_length, max_response_length, record)
            else:
                _schema_check(source, row, i)
        except ADPODataError as err:
            record |= {"field": err.field, "problem": err.problem}
        texts = tuple(row.get(f) if isinstance(row.get(f), str) else None for f in TEXT_FIELDS)
        rejected_images = digests["rejected"] if separate_images else digests["chosen"]
        if texts[1] == texts[2] and digests["chosen"] == rejected_images:
            result.identical.append(i)
        seen[(texts, digests["chosen"], digests["rejected"])].append(i)
        result.rows.append(record)
    result.duplicates = [rows for rows in seen.values() if len(rows) > 1]
    for err in source.unreadable:  # records the trainer's reader could not even parse
        result.rows.append({"row": err.row, "position": None, "field": err.field, "problem": err.problem})
    result.total += len(source.unreadable)
    result.rows.sort(key=lambda r: (r["row"] is None, r["row"] or 0))
    return result


def _describe_images(source: Source, row: dict[str, Any], field: str, i: int, result: CheckResult,
                     ) -> tuple[str, ...]:
    """The digests of a side's images; their sizes and modes are counted (header only, no decoding)."""
    if field not in row:
        return ()
    out = []
    try:
        values = row_image_list(row, field, i)
    except ADPODataError:
        return ("<unreadable>",)
    for value in values:
        try:
            data, _ = image_payload(value, source.image_root, i, field)
        except ADPODataError:
            out.append("<missing>")
            continue
        out.append(image_digest(data))
        try:
            with PILImage.open(io.BytesIO(data)) as image:
                result.image_sizes[f"{image.width}x{image.height}"] += 1
                result.image_modes[image.mode] += 1
        except Exception:  # undecodable: the trainer's check names it
            result.image_modes["unreadable"] += 1
    return tuple(out)


def _trainer_check(row: dict[str, Any], collator: Any, max_length: int | None, max_response_length: int | None,
                   record: dict[str, Any]) -> None:
    from ..validate import check_row, pair_lengths

    check_row(row, collator, max_length=max_length, max_response_length=max_response_length)
    chosen, rejected = collator.encode_side(row, "chosen"), collator.encode_side(row, "rejected")
    record["tokens_response"] = len(chosen.response_ids)
    record["tokens_chosen"], record["tokens_rejected"] = pair_lengths(collator, [chosen, rejected],
                                                                      ["chosen", "rejected"], row[ROW_ID])


def _schema_check(source: Source, row: dict[str, Any], i: int) -> None:
    for name in TEXT_FIELDS:
        text = row_text(row, name, i)
        if name == "response" and not text.strip():
            raise ADPODataError(i, name, "is empty")
    for name in SIDE_IMAGES.values():
        if name not in row:
            continue
        for value in row_image_list(row, name, i):
            data, _ = image_payload(value, source.image_root, i, name)
            try:
                load_image(data)
            except ImageLoadError as err:
                raise ADPODataError(i, name, str(err)) from None
