"""The trained output folder's ``README.md``: a Hugging Face model card, so ``push_to_hub`` publishes a usable page.

YAML metadata (``base_model``, ``library_name``, ``tags``, ``datasets``, ``license`` when the base model's card
states one) followed by the training command, the hyper-parameters, the final training metrics (including the
paper's prompt-discrimination accuracy ``logps/accuracies``), the evaluation table when evaluation ran during
training, how to load the model, and the paper's citation.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CITATION = """@article{ni2025abductive,
  title   = {Abductive Preference Learning},
  author  = {Ni and Qi},
  journal = {arXiv preprint arXiv:2510.09887},
  year    = {2025},
  url     = {https://arxiv.org/abs/2510.09887}
}"""

# Training metrics shown in the card, in this order (TRL's names; logps/accuracies is the paper's metric).
METRICS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
           "logps/accuracies", "logps/chosen", "logps/rejected")
# Hyper-parameters always listed (with their values even when left at the default).
KEY_HPARAMS = ("learning_rate", "lr_scheduler_type", "num_train_epochs", "max_steps", "per_device_train_batch_size",
               "gradient_accumulation_steps", "seed", "beta", "loss_type", "label_smoothing", "reference_free",
               "multitask_weight", "use_peft", "lora_r", "lora_alpha", "lora_target_modules", "dtype", "bf16",
               "fp16")
# TrainingArguments fields that __post_init__ fills in from others (not something the user chose).
_DERIVED = {"logging_dir", "run_name", "output_dir", "hub_model_id", "local_rank", "distributed_state",
            "deepspeed_plugin", "_n_gpu", "world_size"}


def _is_hub_id(name: str | None) -> bool:
    """A hub repository id (``owner/name`` or ``name``), not a local path."""
    if not name or Path(name).exists() or name.startswith((".", "/", "~")) or "\\" in name:
        return False
    return name.count("/") <= 1


def chosen_flags(*args: Any) -> dict[str, Any]:
    """Every field of the argument dataclasses ``args`` whose value differs from a freshly built default instance
    (so values that ``__post_init__`` derives from others are not mistaken for the user's choices)."""
    out: dict[str, Any] = {}
    for obj in args:
        default = _default_instance(obj)
        for f in dataclasses.fields(obj):
            if f.name in _DERIVED or f.name.startswith("_") or not f.init:
                continue
            value = _plain(getattr(obj, f.name))
            if default is None or value != _plain(getattr(default, f.name, object())):
                out[f.name] = value
    return out


def _default_instance(obj: Any) -> Any | None:
    """``type(obj)`` built with only its required fields (taken from ``obj``), or None if that fails."""
    required = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)
                if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    if "output_dir" in {f.name for f in dataclasses.fields(obj)}:
        required["output_dir"] = obj.output_dir
    try:
        return type(obj)(**required)
    except Exception:  # a class whose defaults alone do not validate: fall back to listing every field
        logger.debug("cannot build a default %s", type(obj).__name__, exc_info=True)
        return None


def _plain(value: Any) -> Any:
    """Enums as their value, so ``IntervalStrategy.STEPS == "steps"`` compares and prints as the flag."""
    return getattr(value, "value", value)


def training_command(model_args: Any, data_args: Any, training_args: Any) -> str:
    """An ``adpo-train`` command line that repeats this run."""
    flags = chosen_flags(model_args, data_args, training_args)
    flags = {"model_name_or_path": model_args.model_name_or_path, "dataset_name": data_args.dataset_name,
             "output_dir": training_args.output_dir} | flags
    pieces = ["adpo-train"]
    for name, value in flags.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            text = " ".join(shlex.quote(str(v)) for v in value)
        else:
            text = shlex.quote(str(value).lower() if isinstance(value, bool) else str(value))
        pieces.append(f"--{name} {text}")
    return " \\\n    ".join(pieces)


def _base_license(base: str) -> str | None:
    """The license the base model's own card declares (a local folder's README.md), if any."""
    card = Path(base) / "README.md"
    if not card.is_file():
        return None
    try:
        from huggingface_hub import ModelCard

        return ModelCard.load(card).data.license
    except Exception:  # an unparsable card is the base model's business: leave the license out
        return None


def _last(history: list[dict[str, Any]], prefix: str = "") -> dict[str, float]:
    """The latest value of each metric (``prefix`` ``eval_`` for evaluation) over the log history."""
    out: dict[str, float] = {}
    for entry in history:
        for key in METRICS:
            if isinstance(entry.get(prefix + key), (int, float)):
                out[key] = entry[prefix + key]
    return out


def _table(rows: list[tuple[str, Any]], header: tuple[str, str]) -> str:
    def cell(v: Any) -> str:
        text = f"{v:.4g}" if isinstance(v, float) else str(v)
        return text.replace("|", "\\|").replace("\n", " ")

    return "\n".join([f"| {header[0]} | {header[1]} |", "|---|---|", *(f"| `{k}` | {cell(v)} |" for k, v in rows)])


def model_card_text(
    model_args: Any, data_args: Any, training_args: Any, log_history: list[dict[str, Any]], global_step: int,
) -> str:
    """The card's markdown, YAML metadata first."""
    from huggingface_hub import ModelCardData

    base = model_args.model_name_or_path
    dataset = data_args.dataset_name
    data = ModelCardData(
        base_model=base if _is_hub_id(base) else None,
        library_name="peft" if model_args.use_peft else "transformers",
        tags=["adpo", "abductive-preference-learning", "dpo", "vision-language", "generated_from_trainer",
              *(["lora"] if model_args.use_peft else [])],
        datasets=[dataset] if _is_hub_id(dataset) else None,
        license=_base_license(base) if Path(base).is_dir() else None,
    )
    name = Path(training_args.output_dir).name
    repo = getattr(training_args, "hub_model_id", None) or training_args.output_dir
    kind = "LoRA adapter" if model_args.use_peft else "model"
    hparams = {k: getattr(a, k) for a in (model_args, data_args, training_args) for k in KEY_HPARAMS
               if hasattr(a, k)}
    hparams |= chosen_flags(model_args, data_args, training_args)
    for shown_above in ("model_name_or_path", "dataset_name", "output_dir"):
        hparams.pop(shown_above, None)
    train = _last(log_history)
    evaluation = _last(log_history, "eval_")
    lines = [
        "---", data.to_yaml(), "---", "", f"# {name}", "",
        f"A {kind} trained from `{base}` with Abductive DPO (ADPO) using "
        "adpo: for one fixed response, the model learns to find it more likely "
        "after the chosen prompt (text and images) than after the rejected one, relative to a frozen reference "
        f"(\"Abductive Preference Learning\", Ni & Qi, arXiv 2510.09887). Training data: `{dataset}`; "
        f"{global_step} optimisation steps.", "",
        "## Training command", "", "```bash", training_command(model_args, data_args, training_args), "```", "",
        "## Hyper-parameters", "", _table([(k, _plain(v)) for k, v in hparams.items() if v is not None],
                                          ("flag", "value")), "",
    ]
    if train:
        lines += ["## Final training metrics", "",
                  "`logps/accuracies` is the paper's prompt-discrimination accuracy: the fraction of pairs where "
                  "log π(y|x_w) > log π(y|x_l) under the trained model alone; `rewards/*` compare it with the "
                  "reference (β-scaled log-ratios).", "", _table(list(train.items()), ("metric", "value")), ""]
    if evaluation:
        lines += ["## Evaluation (held-out rows, during training)", "",
                  _table(list(evaluation.items()), ("metric", "value")), ""]
    lines += ["## Usage", "", "```python"]
    if model_args.use_peft:
        lines += ["from peft import PeftModel", "from transformers import AutoModelForImageTextToText, AutoProcessor",
                  "", f'base = AutoModelForImageTextToText.from_pretrained("{base}")',
                  f'model = PeftModel.from_pretrained(base, "{repo}")',
                  f'processor = AutoProcessor.from_pretrained("{repo}")']
    else:
        lines += ["from transformers import AutoModelForImageTextToText, AutoProcessor", "",
                  f'model = AutoModelForImageTextToText.from_pretrained("{repo}")',
                  f'processor = AutoProcessor.from_pretrained("{repo}")']
    lines += ["```", "", "(For a text-only model use `AutoModelForCausalLM` and `AutoTokenizer`.)", "",
              "## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(lines)


def use_adpo_model_card(trainer: Any, model_args: Any, data_args: Any, training_args: Any) -> None:
    """Make ``trainer.create_model_card()`` write this card into ``training_args.output_dir`` (from the
    trainer's state at the time of the call). ``push_to_hub`` calls it after saving the model (a PEFT adapter's
    save writes a card of its own) and before uploading, so ``--push_to_hub`` and ``trainer.push_to_hub()``
    publish this card, not the Trainer's generic one."""

    def create_model_card(**_: Any) -> Path | None:
        return _write(trainer, model_args, data_args, training_args)

    trainer.create_model_card = create_model_card


def _write(trainer: Any, model_args: Any, data_args: Any, training_args: Any) -> Path | None:
    from huggingface_hub import ModelCard

    if not trainer.is_world_process_zero():
        return None
    text = model_card_text(model_args, data_args, training_args, trainer.state.log_history,
                           trainer.state.global_step)
    path = Path(training_args.output_dir) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    ModelCard(text).save(path)  # parses the metadata on the way: a card the hub cannot read fails here
    logger.info("wrote the model card %s", path)
    return path
