"""From the data people have to ADPO pairs: the library behind ``adpo-data``.

Each function reads any dataset the trainer reads, writes rows of our schema (``OUTPUT.jsonl`` with image files
beside it, or a ``save_to_disk`` folder), and returns a :class:`BuildReport` that accounts for every source row::

    from adpo.pairs import swap
    report = swap("vqa.jsonl", "pairs.jsonl", strategy="same-prompt", negatives=2, seed=0)
    lines = report.lines()  # counts: rows built, used, without output (and why)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .build import (
    STRATEGIES,
    BuildReport,
    count_unreadable,
    normalise,
    plan_prompt_swap,
    plan_swap,
    prompt_swap_rows,
    swap_rows,
)
from .check import CheckResult, check_dataset
from .io import Source, load_source, undecoded, write_rows

__all__ = ["STRATEGIES", "BuildReport", "CheckResult", "Source", "check", "from_dpo", "import_rows",
           "load_source", "normalise", "prompt_swap", "swap"]


def _source(data: str | Source, split: str, config: str | None, on_bad_rows: str = "error",
            image_root: str | None = None) -> Source:
    return data if isinstance(data, Source) else load_source(data, split, config, on_bad_rows, image_root)


def _embedder(model_name_or_path: str | None, images: str, cache_dir: str | None, dtype: str,
              device: str | None) -> Any:
    if model_name_or_path is None:
        return None

    def embed(source: Source, cols: Any) -> Any:
        from .embed import row_embeddings

        digests = {i: cols.images[i] for i in cols.usable()}  # computed once, when the rows were read
        return row_embeddings(source, images, digests, model_name_or_path, cache_dir=cache_dir, dtype=dtype,
                              device=device)

    return embed


def swap(
    data: str | Source,
    output: str | Path,
    *,
    strategy: str = "random",
    negatives: int = 1,
    seed: int = 0,
    model_name_or_path: str | None = None,
    prompt: str = "prompt",
    response: str = "response",
    images: str = "images",
    on_bad_rows: str = "error",
    split: str = "train",
    config: str | None = None,
    cache_dir: str | None = None,
    dtype: str = "float32",
    device: str | None = None,
) -> BuildReport:
    """(images, prompt, response) rows → ADPO rows whose rejected images come from another row (``strategy``:
    ``random``, ``same-prompt`` or ``similar``, see :mod:`adpo.pairs.build`)."""
    source = _source(data, split, config, on_bad_rows)
    plan, _ = plan_swap(source, strategy=strategy, negatives=negatives, seed=seed, prompt=prompt,
                        response=response, images=images, on_bad_rows=on_bad_rows,
                        embed=_embedder(model_name_or_path, images, cache_dir, dtype, device))
    _write(swap_rows(source, plan, strategy, prompt, response, images), output, plan.report)
    return plan.report


def from_dpo(
    data: str | Source,
    output: str | Path,
    *,
    prompt: str = "prompt",
    chosen: str = "chosen",
    rejected: str = "rejected",
    images: str = "images",
    **swap_options: Any,
) -> BuildReport:
    """DPO rows (prompt, images, chosen, rejected: two answers) → multitask rows: the DPO pair (``prompt``,
    ``prompt_images``, ``chosen_response``, ``rejected_response``) and an ADPO side built by :func:`swap` on the
    chosen answer, ready for ``adpo-train --multitask_weight``."""
    source = _source(data, swap_options.pop("split", "train"), swap_options.pop("config", None),
                     swap_options.get("on_bad_rows", "error"))
    embed = _embedder(swap_options.pop("model_name_or_path", None), images, swap_options.pop("cache_dir", None),
                      swap_options.pop("dtype", "float32"), swap_options.pop("device", None))
    strategy = swap_options.get("strategy", "random")
    plan, _ = plan_swap(source, prompt=prompt, response=chosen, images=images, embed=embed, built="from-dpo",
                        **swap_options)
    for i in (i for i, _ in plan.pairs):
        row = source.row(i)
        if not isinstance(row.get(rejected), str) or not row[rejected].strip():
            from ..data import ADPODataError

            raise ADPODataError(source.row_ids[i], rejected, "missing or empty (the DPO pair's rejected answer)")

    def dpo(row: dict[str, Any]) -> dict[str, Any]:
        return {"prompt": row[prompt], "chosen_response": row[chosen], "rejected_response": row[rejected]}

    rows = swap_rows(source, plan, strategy, prompt, chosen, images, extra=dpo)
    _write(rows, output, plan.report)
    return plan.report


def prompt_swap(
    data: str | Source,
    output: str | Path,
    *,
    negatives: int = 1,
    seed: int = 0,
    templates: Sequence[str] | None = None,
    prompt: str = "prompt",
    response: str = "response",
    images: str = "images",
    on_bad_rows: str = "error",
    split: str = "train",
    config: str | None = None,
) -> BuildReport:
    """Same images, another prompt: from another row showing the same images, or from ``templates``."""
    source = _source(data, split, config, on_bad_rows)
    plan, report = plan_prompt_swap(source, negatives=negatives, seed=seed, templates=templates, prompt=prompt,
                                    response=response, images=images, on_bad_rows=on_bad_rows)
    _write(prompt_swap_rows(source, plan, prompt, response, images), output, report)
    return report


def import_rows(
    data: str | Source, output: str | Path, *, on_bad_rows: str = "error", image_root: str | None = None,
    split: str = "train", config: str | None = None,
) -> tuple[str, BuildReport]:
    """ms-swift / LLaVA / ShareGPT rows → ours (see :mod:`adpo.pairs.imports`). Returns (``pairs`` or ``swap
    input``, the report)."""
    from .imports import import_rows as convert

    source = _source(data, split, config, on_bad_rows, image_root)
    report = BuildReport("import", source_rows=len(source))
    count_unreadable(source, report)
    kind, rows = convert(source, on_bad_rows, report)
    report.built = f"import ({'ADPO pairs' if kind == 'pairs' else 'images, prompt, response rows for swap'})"
    _write(rows, output, report, count=False)
    return kind, report


def _write(rows: Any, output: str | Path, report: BuildReport, count: bool = True) -> None:
    written = write_rows(rows, output, total=report.output_rows if count else None)
    if count and written != report.output_rows:  # the plan and the writer must agree row for row
        raise RuntimeError(f"planned {report.output_rows} rows but wrote {written}")
    report.output_rows = written


def check(
    data: str | Source,
    *,
    split: str = "train",
    config: str | None = None,
    **options: Any,
) -> CheckResult:
    """Check a dataset of ADPO rows, read exactly as the trainer reads it (see :mod:`adpo.pairs.check`)."""
    if isinstance(data, Source):
        return check_dataset(data, **options)
    from ..data import load_adpo_rows

    loaded = load_adpo_rows(data, split, config, on_bad_rows="skip")  # unreadable records are reported too
    return check_dataset(Source(data, undecoded(loaded.dataset), None, loaded.skipped), **options)
