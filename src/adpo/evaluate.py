"""``adpo-eval`` / ``python -m adpo.evaluate``: measure what ADPO training changed, on held-out pairs.

For every row ``(y, x_w, x_l)`` it computes ``log π(y|x_w)`` and ``log π(y|x_l)`` (summed response log-probs, from
:func:`adpo.logprobs.response_logps` on batches built by :class:`adpo.collator.ADPOCollator`, so exactly what the
trainer optimises), and from them:

- prompt-discrimination accuracy (policy only, the paper's metric): mean[log π(y|x_w) > log π(y|x_l)], with exact
  ties counted as half (so a model that cannot tell the prompts apart scores 0.5, not 0); the strict version and
  the tie rate are reported too;
- with a reference model: rewards β(log π − log π_ref) per side, reward margins and reward accuracy
  (margin > 0, as the trainer's ``rewards/accuracies``);
- image-ablation gap: mean of log π(y|x) − log π(y|x without its images), on the chosen prompts (how much the
  model relies on the images that explain the response) and on the rejected ones.

Outputs in ``--output_dir``: ``rows.csv`` (one line per model and row), ``summary.json`` and ``evaluation.png``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .collator import RESPONSE_MASK, ROW_IDS, ADPOCollator, collator_from_args
from .config import LoadArguments, RowArguments
from .data import ROW_ID, iter_batches, load_adpo_rows
from .logprobs import ResponseLogps, choose_lm_head, response_logps
from .modeling import is_vision_model, load_model, load_processor_for
from .preflight import check_model_source
from .reference import LiveReference, Score
from .validate import validate_dataset

logger = logging.getLogger(__name__)


@dataclass
class EvalArguments:
    """``adpo-eval``'s own flags. The model and the rows are described by the same dataclasses as in training
    (:class:`adpo.config.LoadArguments`, :class:`adpo.config.RowArguments`), so both read rows the same way."""

    compare: str | None = field(
        default=None, metadata={"help": "A second model (e.g. a text-only baseline) evaluated side by side."}
    )
    compare_ref_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Reference for --compare. Default: --ref_model_name_or_path."}
    )
    compare_multimodal_mode: bool | None = field(
        default=None, metadata={"help": "--multimodal_mode for --compare (unset: automatic)."}
    )
    label: str = field(default="model", metadata={"help": "Name of the evaluated model in tables and plots."})
    compare_label: str = field(default="compare", metadata={"help": "Name of the --compare model."})
    beta: float = field(default=0.1, metadata={"help": "β of the reward β(log π − log π_ref) (use training's)."})
    batch_size: int = field(default=8, metadata={"help": "Pairs per forward pass (2× as many sequences)."})
    group_by: str | None = field(
        default=None, metadata={"help": "Comma-separated row columns to break metrics down by, e.g. kind,attribute."}
    )
    image_ablation: bool = field(
        default=True, metadata={"help": "Also score each prompt without its images (one more forward per batch)."}
    )
    device: str | None = field(default=None, metadata={"help": "torch device (default: cuda if available, else cpu)."})
    output_dir: str = field(default="adpo-eval", metadata={"help": "Folder for rows.csv, summary.json, plots."})
    html: str | None = field(
        default=None, metadata={"help": "Also write a self-contained HTML report (summary, plots, every pair with "
                                "its images and log-probs, worst first) to this path."}
    )
    html_max_rows: int = field(default=1000, metadata={"help": "Pairs shown in the HTML report (the worst)."})

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be at least 1, got {self.batch_size}.")
        if self.beta <= 0:
            raise ValueError(f"--beta must be positive, got {self.beta}.")
        if self.compare and self.compare_label == self.label:
            raise ValueError("--label and --compare_label must differ.")


@dataclass
class LoadedModel:
    """A policy to evaluate, its processor, and where its reference log-probs come from."""

    model: nn.Module
    processor: Any
    ref_model: nn.Module | None = None  # a separate frozen reference model
    adapter_reference: bool = False  # the reference is the policy with its PEFT adapters disabled

    @property
    def reference(self) -> LiveReference | None:
        """The reference behind the trainer's own interface (:mod:`adpo.reference`), or None without one."""
        if self.ref_model is None and not self.adapter_reference:
            return None
        return LiveReference(self.ref_model)


# ---------------------------------------------------------------------------------------------------- loading
def adapter_base(path: str) -> str | None:
    """The base model of a PEFT adapter folder; None for a full model."""
    if not (Path(path) / "adapter_config.json").exists():
        return None
    from peft import PeftConfig

    return PeftConfig.from_pretrained(path).base_model_name_or_path


def load_eval_processor(args: LoadArguments) -> Any:
    """The processor of a full model, or of an adapter folder: the one ``adpo-train`` saved next to the adapter,
    else its base model's. No weights are read."""
    path = args.model_name_or_path
    base = adapter_base(path) if path else None
    if base is None:
        return load_processor_for(args)
    folder = Path(path)
    vision = is_vision_model(base, args.trust_remote_code)
    saved = [folder / name for name in (("processor_config.json", "preprocessor_config.json") if vision
                                        else ("tokenizer_config.json",))]
    return load_processor_for(replace(args, model_name_or_path=base),
                              saved_in=path if any(f.exists() for f in saved) else None)


def load_for_eval(args: LoadArguments, processor: Any | None = None) -> LoadedModel:
    """Load a full model or a PEFT adapter folder (on its base model), and ``--ref_model_name_or_path`` if set,
    with the same loading flags as training (dtype, attention kernel, remote code)."""
    if processor is None:
        processor = load_eval_processor(args)
    base = adapter_base(args.model_name_or_path)
    if base is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_model(replace(args, model_name_or_path=base)), args.model_name_or_path)
        adapter_reference = args.ref_model_name_or_path is None
    else:
        model = load_model(args)
        adapter_reference = False
    ref_model = None
    if args.ref_model_name_or_path is not None:
        ref_model = load_model(replace(args, model_name_or_path=args.ref_model_name_or_path))
    for m in (model, ref_model):
        if m is not None:
            m.eval()
    return LoadedModel(model, processor, ref_model, adapter_reference)


# ---------------------------------------------------------------------------------------------------- scoring
def collate(collator: ADPOCollator, rows: list[dict[str, Any]], device: torch.device
            ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``rows`` as the trainer sees them: model inputs (2B, L) on ``device`` and the (2B, L) response mask."""
    batch = collator(rows)
    mask = batch.pop(RESPONSE_MASK).to(device)
    batch.pop(ROW_IDS)
    return {k: v.to(device) for k, v in batch.items()}, mask


def scorer(heads: dict[int, bool]) -> Score:
    """The trainer's scoring, ``(model, inputs, mask) → (R,)`` log-probs, with the LM head chosen once per model
    on its first batch (:func:`adpo.logprobs.choose_lm_head`) and remembered in ``heads`` (by ``id``)."""

    @torch.no_grad()
    def score(model: nn.Module, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> ResponseLogps:
        head = model.get_output_embeddings()
        if id(model) not in heads:
            heads[id(model)] = choose_lm_head(model, head, inputs, mask).fused
        return response_logps(model, head, inputs, mask, fused=heads[id(model)])

    return score


def pair_logps(logps: ResponseLogps) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed response log-probs, each (B,) fp32 on the CPU, of a ``[chosen; rejected]`` batch."""
    chosen, rejected = logps.sums.float().cpu().chunk(2)
    return chosen, rejected


def score_rows(
    loaded: LoadedModel,
    dataset: Any,
    collator: ADPOCollator,
    *,
    text_collator: ADPOCollator | None = None,
    beta: float = 0.1,
    batch_size: int = 8,
    group_by: list[str] | None = None,
    device: torch.device | None = None,
    desc: str = "evaluating",
) -> list[dict[str, Any]]:
    """One record per row: log-probs of both sides, rewards when there is a reference, and with ``text_collator``
    (the same rows without their images) the image-ablation log-probs."""
    device = device or torch.device("cpu")
    for m in (loaded.model, loaded.ref_model):
        if m is not None:
            m.to(device)
    records: list[dict[str, Any]] = []
    score = scorer({})  # the LM head of each model, chosen on its first batch
    progress = tqdm(total=len(dataset), desc=desc, unit="pair")
    for rows in iter_batches(dataset, batch_size):
        inputs, mask = collate(collator, rows, device)  # one batch for the policy and its reference
        chosen, rejected = pair_logps(score(loaded.model, inputs, mask))
        reference = loaded.reference
        ref = None if reference is None else pair_logps(reference.logps(loaded.model, inputs, mask, score))
        blind = None
        if text_collator is not None:
            blind = pair_logps(score(loaded.model, *collate(text_collator, rows, device)))
        for i, row in enumerate(rows):
            record: dict[str, Any] = {"row": row.get(ROW_ID, len(records))}
            record |= {g: row.get(g) for g in group_by or []}
            record |= {"logp_chosen": chosen[i].item(), "logp_rejected": rejected[i].item()}
            if ref is not None:
                record |= {"ref_logp_chosen": ref[0][i].item(), "ref_logp_rejected": ref[1][i].item()}
            if blind is not None:
                record |= {"noimage_logp_chosen": blind[0][i].item(), "noimage_logp_rejected": blind[1][i].item()}
            records.append(derive(record, beta))
        progress.update(len(rows))
    progress.close()
    return records


def derive(record: dict[str, Any], beta: float) -> dict[str, Any]:
    """Add the per-row quantities computed from the log-probs (margins, rewards, image gaps)."""
    out = dict(record)
    out["logp_margin"] = out["logp_chosen"] - out["logp_rejected"]
    if "ref_logp_chosen" in out:
        out["reward_chosen"] = beta * (out["logp_chosen"] - out["ref_logp_chosen"])
        out["reward_rejected"] = beta * (out["logp_rejected"] - out["ref_logp_rejected"])
        out["reward_margin"] = out["reward_chosen"] - out["reward_rejected"]
    if "noimage_logp_chosen" in out:
        out["image_gap_chosen"] = out["logp_chosen"] - out["noimage_logp_chosen"]
        out["image_gap_rejected"] = out["logp_rejected"] - out["noimage_logp_rejected"]
    return out


# ---------------------------------------------------------------------------------------------------- metrics
def summarise(records: list[dict[str, Any]], group_by: list[str] | None = None) -> dict[str, Any]:
    """Metrics over ``records`` (see the module docstring), plus the same per value of each ``group_by`` column."""
    summary = metrics(records)
    for column in group_by or []:
        values = sorted({str(r.get(column)) for r in records})
        summary.setdefault("groups", {})[column] = {
            v: metrics([r for r in records if str(r.get(column)) == v]) for v in values
        }
    return summary


def metrics(records: list[dict[str, Any]]) -> dict[str, float | int]:
    """Aggregate metrics of one set of records (means over rows)."""
    n = len(records)
    if n == 0:
        return {"n": 0}
    margins = [r["logp_margin"] for r in records]
    out: dict[str, float | int] = {
        "n": n,
        "prompt_accuracy": _mean(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins),
        "prompt_accuracy_strict": _mean(float(m > 0) for m in margins),
        "ties": _mean(float(m == 0) for m in margins),
        "logp_chosen": _mean(r["logp_chosen"] for r in records),
        "logp_rejected": _mean(r["logp_rejected"] for r in records),
        "logp_margin": _mean(margins),
    }
    if "reward_margin" in records[0]:
        out |= {
            "reward_accuracy": _mean(float(r["reward_margin"] > 0) for r in records),
            "reward_margin": _mean(r["reward_margin"] for r in records),
            "reward_chosen": _mean(r["reward_chosen"] for r in records),
            "reward_rejected": _mean(r["reward_rejected"] for r in records),
        }
    if "image_gap_chosen" in records[0]:
        out |= {
            "image_ablation_gap": _mean(r["image_gap_chosen"] for r in records),
            "image_ablation_gap_rejected": _mean(r["image_gap_rejected"] for r in records),
        }
    return out


def _mean(values: Any) -> float:
    values = list(values)
    return math.fsum(values) / len(values)


# ---------------------------------------------------------------------------------------------------- outputs
def write_rows_csv(records_by_model: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Long format: one line per (model, row)."""
    columns: list[str] = ["model"]
    for records in records_by_model.values():
        for record in records:
            columns += [k for k in record if k not in columns]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for label, records in records_by_model.items():
            for record in records:
                writer.writerow({"model": label, **record})


def evaluate(model: LoadArguments, rows: RowArguments, args: EvalArguments) -> dict[str, Any]:
    """Evaluate ``model`` (and ``args.compare``) on ``rows``; write the outputs; return the summaries.

    Rows are read, checked and collated exactly as in training (one collator factory, the same validation), and
    each model's rows are checked with its processor before its weights are loaded.
    """
    from .pipeline import resolve_multimodal

    if not rows.dataset_name:
        raise ValueError("--dataset_name is required (hub id, save_to_disk folder, or .json/.jsonl/.parquet/.csv).")
    if not model.model_name_or_path:
        raise ValueError("--model_name_or_path is required (a model folder, hub id or PEFT adapter folder).")
    check_model_source(model.model_name_or_path, "--model_name_or_path")  # before the rows are read
    loaded_rows = load_adpo_rows(rows.dataset_name, rows.dataset_split, rows.dataset_config, rows.max_eval_samples,
                                 rows.on_bad_rows)
    dataset = loaded_rows.dataset
    group_by = [c.strip() for c in (args.group_by or "").split(",") if c.strip()]
    missing = [c for c in group_by if c not in dataset.column_names]
    if missing:
        raise ValueError(f"--group_by: the dataset has no column {missing[0]!r} (columns: {dataset.column_names}).")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    runs = [(args.label, model, rows.multimodal_mode)]
    if args.compare:
        ref = args.compare_ref_model_name_or_path or model.ref_model_name_or_path
        runs.append((args.compare_label, replace(model, model_name_or_path=args.compare, ref_model_name_or_path=ref),
                     args.compare_multimodal_mode))
    records: dict[str, list[dict[str, Any]]] = {}
    summaries: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for label, load, flag in runs:
        processor = load_eval_processor(load)
        multimodal = resolve_multimodal(flag, processor, dataset)
        collator = collator_from_args(processor, rows, multimodal=multimodal)
        checked, validation = validate_dataset(
            dataset, collator, on_bad_rows=rows.on_bad_rows, max_length=rows.max_length,
            max_response_length=rows.max_response_length, name="eval", unreadable=loaded_rows.skipped,
            identical_sides_ok=True,  # sides the model cannot tell apart are a tie, which is what we measure
        )
        if validation.n_skipped:
            skipped[label] = validation.summary()
        ablation = multimodal and args.image_ablation
        text_collator = collator_from_args(processor, rows, multimodal=False) if ablation else None
        loaded = load_for_eval(load, processor)
        records[label] = score_rows(
            loaded, checked, collator, text_collator=text_collator, beta=args.beta, batch_size=args.batch_size,
            group_by=group_by, device=device, desc=f"evaluating {label}",
        )
        reference = load.ref_model_name_or_path or ("adapter base" if loaded.adapter_reference else None)
        summaries[label] = {"model": load.model_name_or_path, "reference": reference, "multimodal": multimodal,
                            "skipped_rows": validation.n_skipped, **summarise(records[label], group_by)}
        del loaded
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_rows_csv(records, out / "rows.csv")
    report = {"dataset": rows.dataset_name, "split": rows.dataset_split, "beta": args.beta, "models": summaries}
    (out / "summary.json").write_text(json.dumps(report, indent=2))
    from .plots import plot_evaluation

    plot = plot_evaluation(summaries, records, out / "evaluation.png", group_by=group_by)
    if args.html:
        from .report import eval_report

        eval_report(report, records, dataset, args.html, plot=plot, group_by=group_by, max_rows=args.html_max_rows)
    return {**report, "skipped": skipped}


def format_summary(report: dict[str, Any]) -> str:
    """A small text table of the headline metrics per model."""
    keys = ["n", "prompt_accuracy", "reward_accuracy", "reward_margin", "image_ablation_gap"]
    lines = [f"{'model':<16}" + "".join(f"{k:>20}" for k in keys)]
    for label, s in report["models"].items():
        cells = [f"{s[k]:>20.4f}" if isinstance(s.get(k), float) else f"{s.get(k, '-')!s:>20}" for k in keys]
        lines.append(f"{label:<16}" + "".join(cells))
    return "\n".join(lines)


if __name__ == "__main__":  # python -m adpo.evaluate
    # The CLI imports this module by name: hand it this copy, so the module is not executed a second time.
    sys.modules.setdefault("adpo.evaluate", sys.modules[__name__])
    from .cli.evaluate import run

    run()
