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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .collator import RESPONSE_MASK, ROW_IDS, ADPOCollator
from .config import ModelArguments
from .data import ROW_ID, iter_batches, load_adpo_dataset
from .logprobs import response_logps

logger = logging.getLogger(__name__)


@dataclass
class EvalArguments:
    model_name_or_path: str = field(
        metadata={"help": "Model to evaluate: a full model folder/hub id, or a PEFT adapter folder."}
    )
    dataset_name: str = field(
        metadata={"help": "Evaluation rows: hub id, save_to_disk folder, or .json/.jsonl/.parquet/.csv file."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split to evaluate."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate only the first N rows."})
    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Reference for reward metrics. Default: an adapter's base model (adapters disabled); "
                  "none for a full model (reward metrics are then skipped)."},
    )
    multimodal_mode: bool | None = field(
        default=None,
        metadata={"help": "Feed the rows' images to the model. Unset: on when the model takes images and the rows "
                  "carry them; false evaluates text-only (e.g. a text-only baseline)."},
    )
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
    separate_images: bool = field(
        default=True, metadata={"help": "Use rejected_images for the rejected prompt (as in training)."}
    )
    max_image_size: int | None = field(
        default=None, metadata={"help": "Downscale images to at most this many pixels on the longest edge."}
    )
    dtype: str = field(default="float32", metadata={"help": "dtype to load the weights in (float32, bfloat16...)."})
    device: str | None = field(default=None, metadata={"help": "torch device (default: cuda if available, else cpu)."})
    output_dir: str = field(default="adpo-eval", metadata={"help": "Folder for rows.csv, summary.json, plots."})

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
    reference: nn.Module | None  # a separate model, or None
    adapter_reference: bool = False  # the reference is the policy with its PEFT adapters disabled


# ---------------------------------------------------------------------------------------------------- loading
def load_for_eval(path: str, ref_path: str | None = None, dtype: str = "float32") -> LoadedModel:
    """Load a full model or a PEFT adapter folder (on its base model), and the reference if there is one."""
    from .modeling import load_model_and_processor

    args = ModelArguments(model_name_or_path=path, dtype=dtype)
    if (Path(path) / "adapter_config.json").exists():
        from peft import PeftConfig, PeftModel

        base = PeftConfig.from_pretrained(path).base_model_name_or_path
        base_model, processor = load_model_and_processor(ModelArguments(model_name_or_path=base, dtype=dtype))
        processor = _processor_from(path) or processor  # adpo-train saves the processor with the adapter
        model = PeftModel.from_pretrained(base_model, path)
        adapter_reference = ref_path is None
    else:
        model, processor = load_model_and_processor(args)
        adapter_reference = False
    reference = None
    if ref_path is not None:
        reference, _ = load_model_and_processor(ModelArguments(model_name_or_path=ref_path, dtype=dtype))
    for m in (model, reference):
        if m is not None:
            m.eval()
    return LoadedModel(model, processor, reference, adapter_reference)


def _processor_from(path: str) -> Any | None:
    from transformers import AutoProcessor, AutoTokenizer

    folder = Path(path)
    if (folder / "processor_config.json").exists() or (folder / "preprocessor_config.json").exists():
        return AutoProcessor.from_pretrained(path)
    if (folder / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(path)
    return None


# ---------------------------------------------------------------------------------------------------- scoring
@torch.no_grad()
def pair_logps(
    model: nn.Module, collator: ADPOCollator, rows: list[dict[str, Any]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed response log-probs, each (B,) fp32 on the CPU, for ``rows``."""
    batch = collator(rows)
    mask = batch.pop(RESPONSE_MASK).to(device)
    batch.pop(ROW_IDS)
    inputs = {k: v.to(device) for k, v in batch.items()}
    head = model.get_output_embeddings()
    chosen, rejected = response_logps(model, head, inputs, mask).sums.cpu().chunk(2)
    return chosen, rejected


def reference_pair_logps(
    loaded: LoadedModel, collator: ADPOCollator, rows: list[dict[str, Any]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    if loaded.reference is not None:
        return pair_logps(loaded.reference, collator, rows, device)
    if loaded.adapter_reference:
        with loaded.model.disable_adapter():
            return pair_logps(loaded.model, collator, rows, device)
    return None


def score_rows(
    loaded: LoadedModel,
    dataset: Any,
    *,
    multimodal: bool,
    beta: float = 0.1,
    batch_size: int = 8,
    image_ablation: bool = True,
    group_by: list[str] | None = None,
    separate_images: bool = True,
    max_image_size: int | None = None,
    device: torch.device | None = None,
    desc: str = "evaluating",
) -> list[dict[str, Any]]:
    """One record per row: log-probs of both sides, and rewards / image-ablation log-probs when available."""
    device = device or torch.device("cpu")
    for m in (loaded.model, loaded.reference):
        if m is not None:
            m.to(device)
    collator = ADPOCollator(loaded.processor, multimodal=multimodal, separate_images=separate_images,
                            max_image_size=max_image_size)
    text_collator = ADPOCollator(loaded.processor, multimodal=False) if multimodal and image_ablation else None
    records: list[dict[str, Any]] = []
    progress = tqdm(total=len(dataset), desc=desc, unit="pair")
    for rows in iter_batches(dataset, batch_size):
        chosen, rejected = pair_logps(loaded.model, collator, rows, device)
        ref = reference_pair_logps(loaded, collator, rows, device)
        blind = pair_logps(loaded.model, text_collator, rows, device) if text_collator else None
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


def evaluate(args: EvalArguments) -> dict[str, Any]:
    """Evaluate ``args.model_name_or_path`` (and ``args.compare``); write the outputs; return the summaries."""
    from .pipeline import resolve_multimodal

    dataset = load_adpo_dataset(args.dataset_name, args.dataset_split, args.dataset_config, args.max_eval_samples)
    group_by = [c.strip() for c in (args.group_by or "").split(",") if c.strip()]
    missing = [c for c in group_by if c not in dataset.column_names]
    if missing:
        raise ValueError(f"--group_by: the dataset has no column {missing[0]!r} (columns: {dataset.column_names}).")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    runs = [(args.label, args.model_name_or_path, args.ref_model_name_or_path, args.multimodal_mode)]
    if args.compare:
        ref = args.compare_ref_model_name_or_path or args.ref_model_name_or_path
        runs.append((args.compare_label, args.compare, ref, args.compare_multimodal_mode))
    records: dict[str, list[dict[str, Any]]] = {}
    summaries: dict[str, Any] = {}
    for label, path, ref_path, flag in runs:
        loaded = load_for_eval(path, ref_path, args.dtype)
        multimodal = resolve_multimodal(flag, loaded.processor, dataset)
        records[label] = score_rows(
            loaded, dataset, multimodal=multimodal, beta=args.beta, batch_size=args.batch_size,
            image_ablation=args.image_ablation, group_by=group_by, separate_images=args.separate_images,
            max_image_size=args.max_image_size, device=device, desc=f"evaluating {label}",
        )
        summaries[label] = {"model": path, "reference": ref_path or ("adapter base" if loaded.adapter_reference
                                                                      else None),
                            "multimodal": multimodal, **summarise(records[label], group_by)}
        del loaded
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_rows_csv(records, out / "rows.csv")
    report = {"dataset": args.dataset_name, "split": args.dataset_split, "beta": args.beta, "models": summaries}
    (out / "summary.json").write_text(json.dumps(report, indent=2))
    from .plots import plot_evaluation

    plot_evaluation(summaries, records, out / "evaluation.png", group_by=group_by)
    return report


def format_summary(report: dict[str, Any]) -> str:
    """A small text table of the headline metrics per model."""
    keys = ["n", "prompt_accuracy", "reward_accuracy", "reward_margin", "image_ablation_gap"]
    lines = [f"{'model':<16}" + "".join(f"{k:>20}" for k in keys)]
    for label, s in report["models"].items():
        cells = [f"{s[k]:>20.4f}" if isinstance(s.get(k), float) else f"{s.get(k, '-')!s:>20}" for k in keys]
        lines.append(f"{label:<16}" + "".join(cells))
    return "\n".join(lines)


if __name__ == "__main__":
    from .cli.evaluate import run

    run()
