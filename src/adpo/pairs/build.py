"""Build ADPO rows from ordinary vision-language data: the paper's "data swap" and its variants.

Every builder plans first (which source row gets which negative: indices only, from the small columns) and
writes second, so memory stays small and a plan depends only on the data and the seed. Each source row draws
from its own generator, seeded with ``seed`` and the row's index (not from one shared stream, so the plan does
not depend on the order rows are visited in).

A negative never has the source row's response (after normalisation) or the same pictures: either would make the
pair's two sides explain the response equally well, and the pair would carry no signal.
"""

from __future__ import annotations

import logging
import random
import re
import unicodedata
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from ..data import ADPODataError, row_text
from .io import Source, image_payload, row_image_list

logger = logging.getLogger(__name__)

STRATEGIES = ("random", "same-prompt", "similar")
ON_BAD_ROWS = ("error", "skip")
_PLACEHOLDER = re.compile(r"<image>\s*", re.IGNORECASE)
_RANDOM_TRIES = 64  # random draws before a row's candidates are listed exhaustively


def normalise(text: str) -> str:
    """Text compared for equality: Unicode-normalised, ``<image>`` placeholders removed, case and runs of white
    space ignored, trailing punctuation dropped (so "What colour is the car?" == "what colour is the car")."""
    text = unicodedata.normalize("NFKC", _PLACEHOLDER.sub(" ", text)).casefold()
    return " ".join(text.split()).rstrip(" ?.!。？！")


@dataclass
class BuildReport:
    """What a builder did with every source row: rows in, rows out, and each row not used, by reason."""

    built: str
    source_rows: int = 0
    output_rows: int = 0
    skipped: dict[str, list[int]] = field(default_factory=dict)  # reason → source rows given no output
    short: dict[str, list[int]] = field(default_factory=dict)  # reason → rows given fewer negatives than asked

    def skip(self, why: str, row: int) -> None:
        self.skipped.setdefault(why, []).append(row)

    @property
    def n_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    def lines(self) -> list[str]:
        used = self.source_rows - self.n_skipped
        out = [f"{self.built}: {self.source_rows} source rows → {self.output_rows} rows "
               f"({used} source rows used, {self.n_skipped} without output)"]
        for title, table in (("without output", self.skipped), ("with fewer negatives than asked", self.short)):
            for why, rows in sorted(table.items(), key=lambda item: -len(item[1])):
                shown = ", ".join(map(str, rows[:8])) + (", ..." if len(rows) > 8 else "")
                out.append(f"  {len(rows)} rows {title}: {why} (rows {shown})")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"built": self.built, "source_rows": self.source_rows, "output_rows": self.output_rows,
                "skipped": self.skipped, "fewer_negatives": self.short}


@dataclass
class SourceColumns:
    """The small per-row columns the planners read (row ``i`` of each list is source row ``i``)."""

    prompts: list[str | None]
    responses: list[str | None]
    images: list[tuple[str, ...]]  # sha256 of each image's bytes
    bad: dict[int, str]  # row → why it cannot be used
    ids: list[int]  # each row's record number in the input (seeds its generator)

    def usable(self) -> list[int]:
        return [i for i in range(len(self.prompts)) if i not in self.bad]


def count_unreadable(source: Source, report: BuildReport) -> None:
    """Records the loader could not parse (left out under ``--on_bad_rows skip``) count as source rows without
    output, under their reason."""
    for err in source.unreadable:
        report.skip(f"{err.field}: {err.problem.split(':')[0]}", err.row)
    report.source_rows += len(source.unreadable)


def read_columns(
    source: Source, prompt: str, response: str, images: str, on_bad_rows: str, report: BuildReport
) -> SourceColumns:
    """Read and check the columns a swap needs; a bad row raises (``error``) or is counted (``skip``)."""
    count_unreadable(source, report)
    missing = [c for c in (prompt, response, images) if c not in source.columns]
    if missing:
        raise ADPODataError(None, missing[0], f"{source.name} has no column {missing[0]!r} (columns: "
                            f"{source.columns}); rows need {images!r} (a list of images), {prompt!r} and {response!r}")
    prompts, responses, bad = source.column(prompt), source.column(response), {}
    fingerprints: list[tuple[str, ...]] = []
    for i, row in enumerate(tqdm(source.rows(), total=len(source), desc="reading rows", unit="row")):
        rid = source.row_ids[i]  # errors and reports name the record's number in the input
        try:
            row_text(row, prompt, rid)
            row_text(row, response, rid)
            values = row_image_list(row, images, rid)
            if not values:
                raise ADPODataError(rid, images, "has no image")
            fingerprints.append(tuple(_digest(v, source, rid, images) for v in values))
        except ADPODataError as err:
            if on_bad_rows == "error":
                raise
            bad[i] = f"{err.field}: {err.problem.split(':')[0]}"
            fingerprints.append(())
            report.skip(bad[i], rid)
    return SourceColumns(prompts, responses, fingerprints, bad, list(source.row_ids))


def _digest(value: Any, source: Source, row: int, field: str) -> str:
    from .io import image_digest

    return image_digest(image_payload(value, source.image_root, row, field)[0])


# ------------------------------------------------------------------------------------------------ planning
def row_rng(seed: int, row: int) -> random.Random:
    """A generator of its own for each source row (``random.Random`` seeds strings through sha512: stable across
    runs, machines and Python versions)."""
    return random.Random(f"adpo-data:{seed}:{row}")


def is_negative(cols: SourceColumns, source: int, other: int, norm_responses: Sequence[str]) -> bool:
    """Whether row ``other`` may give row ``source`` its rejected images."""
    return (other != source and other not in cols.bad and norm_responses[other] != norm_responses[source]
            and cols.images[other] != cols.images[source])


def plan_random(cols: SourceColumns, negatives: int, seed: int) -> Iterator[tuple[int, list[int]]]:
    """For each usable row, ``negatives`` distinct other rows drawn uniformly among its valid negatives."""
    responses = [normalise(r) if r is not None else "" for r in cols.responses]
    usable = cols.usable()
    for i in usable:
        rng = row_rng(seed, cols.ids[i])
        picked: list[int] = []
        for _ in range(_RANDOM_TRIES):  # most draws succeed: try cheaply before listing every candidate
            j = usable[rng.randrange(len(usable))]
            if j not in picked and is_negative(cols, i, j, responses):
                picked.append(j)
                if len(picked) == negatives:
                    break
        if len(picked) < negatives:
            rest = [j for j in usable if j not in picked and is_negative(cols, i, j, responses)]
            picked += rng.sample(rest, min(negatives - len(picked), len(rest)))
        yield i, picked


def plan_same_prompt(cols: SourceColumns, negatives: int, seed: int) -> Iterator[tuple[int, list[int]]]:
    """For each usable row, ``negatives`` distinct rows with the same normalised prompt and a different response
    (and different pictures), drawn uniformly."""
    responses = [normalise(r) if r is not None else "" for r in cols.responses]
    groups: dict[str, list[int]] = defaultdict(list)
    for i in cols.usable():
        groups[normalise(cols.prompts[i])].append(i)
    for i in cols.usable():
        rest = [j for j in groups[normalise(cols.prompts[i])] if is_negative(cols, i, j, responses)]
        yield i, row_rng(seed, cols.ids[i]).sample(rest, min(negatives, len(rest)))


def plan_similar(
    cols: SourceColumns, negatives: int, embeddings: Any, chunk: int = 1024
) -> Iterator[tuple[int, list[int]]]:
    """For each usable row, its ``negatives`` nearest rows by cosine similarity of the image embeddings
    (``embeddings``: (N, D) float tensor, one row per source row, L2-normalised), among its valid negatives.
    Ties go to the lower row index, so the plan is deterministic without a seed."""
    import torch

    responses = [normalise(r) if r is not None else "" for r in cols.responses]
    usable = cols.usable()
    n = len(cols.prompts)
    blocked = torch.zeros(n, dtype=torch.bool)
    blocked[list(cols.bad)] = True
    response_id = _ids(responses)
    image_id = _ids(cols.images)
    for start in range(0, len(usable), chunk):
        rows = usable[start : start + chunk]
        sims = embeddings[rows].double() @ embeddings.double().T  # (chunk, N)
        invalid = blocked.expand(len(rows), n).clone()
        invalid |= response_id[rows][:, None] == response_id[None, :]
        invalid |= image_id[rows][:, None] == image_id[None, :]
        sims[invalid] = float("-inf")
        # The k-th largest value of each row; every candidate at least as large is then ordered exactly.
        threshold = sims.topk(min(negatives, n), dim=1).values[:, -1:]
        for k, i in enumerate(rows):
            yield i, _ordered(sims[k], threshold[k], negatives)


def _ids(values: Sequence[Any]) -> Any:
    import torch

    index: dict[Any, int] = {}
    return torch.tensor([index.setdefault(v, len(index)) for v in values], dtype=torch.long)


def _ordered(sims: Any, threshold: Any, k: int | None = None) -> list[int]:
    """Indices of the finite values ``>= threshold``, largest first, ties by lower index."""
    import torch

    candidates = ((sims >= threshold) & torch.isfinite(sims)).nonzero().flatten()  # ascending index
    order = torch.sort(-sims[candidates], stable=True).indices
    picked = candidates[order].tolist()
    return picked if k is None else picked[:k]


# ------------------------------------------------------------------------------------------------ builders
@dataclass
class SwapPlan:
    """Which negative rows each source row gets, and how many it should have got."""

    pairs: list[tuple[int, int]]  # (source row, negative row) in output order
    report: BuildReport


def plan_swap(
    source: Source,
    *,
    strategy: str = "random",
    negatives: int = 1,
    seed: int = 0,
    prompt: str = "prompt",
    response: str = "response",
    images: str = "images",
    on_bad_rows: str = "error",
    embed: Callable[[Source, SourceColumns], Any] | None = None,
    built: str = "swap",
) -> tuple[SwapPlan, SourceColumns]:
    """Plan a swap: for each row, ``negatives`` other rows whose images become its rejected images."""
    if strategy not in STRATEGIES:
        raise ValueError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}.")
    if negatives < 1:
        raise ValueError(f"--negatives must be at least 1, got {negatives}.")
    if on_bad_rows not in ON_BAD_ROWS:
        raise ValueError(f"--on_bad_rows must be one of {', '.join(ON_BAD_ROWS)}, got {on_bad_rows!r}.")
    report = BuildReport(f"{built} ({strategy}, {negatives} negative{'s' if negatives > 1 else ''})",
                         source_rows=len(source))
    cols = read_columns(source, prompt, response, images, on_bad_rows, report)
    if strategy == "random":
        plan = plan_random(cols, negatives, seed)
    elif strategy == "same-prompt":
        plan = plan_same_prompt(cols, negatives, seed)
    else:
        if embed is None:
            raise ValueError("--strategy similar needs --model_name_or_path (the model whose vision tower embeds "
                             "the images).")
        plan = plan_similar(cols, negatives, embed(source, cols))
    why = {"random": "no other row has a different response and other images",
           "same-prompt": "no other row has the same prompt, a different response and other images",
           "similar": "no other row has a different response and other images"}[strategy]
    pairs: list[tuple[int, int]] = []
    for i, chosen in plan:
        if not chosen:
            report.skip(why, source.row_ids[i])
        elif len(chosen) < negatives:
            report.short.setdefault(f"only {len(chosen)} valid negative(s): {why.replace('no other', 'few other')}",
                                    []).append(source.row_ids[i])
        pairs += [(i, j) for j in chosen]
    report.output_rows = len(pairs)
    return SwapPlan(pairs, report), cols


def passthrough_columns(source: Source, used: Sequence[str]) -> list[str]:
    """Source columns copied to every output row (ids, categories...: scalar columns we do not consume)."""
    from datasets import Value

    features = source.dataset.features or {}
    taken = set(used) | set(OUR_COLUMNS)
    return [c for c in source.columns if c not in taken and isinstance(features.get(c), Value)]


OUR_COLUMNS = ("response", "chosen", "chosen_images", "rejected", "rejected_images", "prompt", "prompt_images",
               "chosen_response", "rejected_response", "source_row", "negative_row", "strategy", "_adpo_row")


def swap_rows(
    source: Source, plan: SwapPlan, strategy: str, prompt: str = "prompt", response: str = "response",
    images: str = "images", extra: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> Iterator[dict[str, Any]]:
    """The planned ADPO rows: the source's prompt text and response on both sides, the source's images chosen,
    the negative's images rejected."""
    keep = passthrough_columns(source, (prompt, response, images))
    ids = source.row_ids
    for i, j in plan.pairs:
        row, other = source.row(i), source.row(j)
        chosen_images = _payloads(source, row, images, ids[i])
        out = {"response": row[response], "chosen": row[prompt], "chosen_images": chosen_images,
               "rejected": row[prompt], "rejected_images": _payloads(source, other, images, ids[j]),
               "source_row": ids[i], "negative_row": ids[j], "strategy": strategy}
        out |= {c: row[c] for c in keep}
        if extra is not None:
            out |= extra(row) | {"prompt_images": chosen_images}
        yield out


def _payloads(source: Source, row: dict[str, Any], field: str, index: int) -> list[tuple[bytes, str]]:
    return [image_payload(v, source.image_root, index, field) for v in row_image_list(row, field, index)]


# ------------------------------------------------------------------------------------------------ prompt swap
def plan_prompt_swap(
    source: Source,
    *,
    negatives: int = 1,
    seed: int = 0,
    templates: Sequence[str] | None = None,
    prompt: str = "prompt",
    response: str = "response",
    images: str = "images",
    on_bad_rows: str = "error",
) -> tuple[list[tuple[int, int | None, str]], BuildReport]:
    """For each row, ``negatives`` other prompts for the same pictures: from other rows showing the same images
    (with a different prompt and a different response), or, given ``templates``, from that list (any template
    whose normalised text differs from the row's prompt). Returns (source row, other row or None, prompt)."""
    if negatives < 1:
        raise ValueError(f"--negatives must be at least 1, got {negatives}.")
    report = BuildReport(f"prompt-swap ({'templates' if templates else 'same image'}, {negatives} negative"
                         f"{'s' if negatives > 1 else ''})", source_rows=len(source))
    cols = read_columns(source, prompt, response, images, on_bad_rows, report)
    responses = [normalise(r) if r is not None else "" for r in cols.responses]
    by_image: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for i in cols.usable():
        by_image[cols.images[i]].append(i)
    plan: list[tuple[int, int | None, str]] = []
    for i in cols.usable():
        rng, mine = row_rng(seed, cols.ids[i]), normalise(cols.prompts[i])
        if templates:
            options: list[tuple[int | None, str]] = [(None, t) for t in templates if normalise(t) != mine]
            why = "every template equals the row's prompt"
        else:
            options = [(j, cols.prompts[j]) for j in by_image[cols.images[i]]
                       if j != i and normalise(cols.prompts[j]) != mine and responses[j] != responses[i]]
            why = "no other row shows the same images with another prompt and another response"
        chosen = rng.sample(options, min(negatives, len(options)))
        if not chosen:
            report.skip(why, source.row_ids[i])
        elif len(chosen) < negatives:
            report.short.setdefault(f"only {len(chosen)} other prompt(s)", []).append(source.row_ids[i])
        plan += [(i, j, text) for j, text in chosen]
    report.output_rows = len(plan)
    return plan, report


def prompt_swap_rows(
    source: Source, plan: list[tuple[int, int | None, str]], prompt: str = "prompt", response: str = "response",
    images: str = "images",
) -> Iterator[dict[str, Any]]:
    """Rows whose two sides show the same images and differ in the prompt text (chosen: the row's own)."""
    keep = passthrough_columns(source, (prompt, response, images))
    ids = source.row_ids
    for i, j, text in plan:
        row = source.row(i)
        pictures = _payloads(source, row, images, ids[i])
        yield {"response": row[response], "chosen": row[prompt], "chosen_images": pictures, "rejected": text,
               "rejected_images": pictures, "source_row": ids[i], "negative_row": None if j is None else ids[j],
               "strategy": "prompt-swap" if j is not None else "prompt-template"} | {c: row[c] for c in keep}
