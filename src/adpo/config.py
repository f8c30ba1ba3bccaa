"""Configuration dataclasses: model, data and training (a ``TrainingArguments`` subclass).

Every field has ``help`` text (shown by ``--help``) and checks that fail fast, saying how to fix the problem.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from transformers import TrainingArguments

logger = logging.getLogger(__name__)


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def runs_on_cpu(use_cpu: bool, bf16: bool = False, fp16: bool = False) -> bool:
    """The run's effective ``--use_cpu``: asked for, or mixed precision requested on a machine without a GPU."""
    return use_cpu or ((bf16 or fp16) and not _has_accelerator())


def auto_dataloader_workers(accelerator: bool) -> int:
    """Dataloader workers for ``--dataloader_num_workers -1``: with a GPU, half the CPU cores up to 8, so decoding
    and collation overlap the GPU's step; on a CPU-only machine, none (workers would take cores from the step)."""
    if not accelerator:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(8, cores // 2))


@dataclass
class LoadArguments:
    """How a model and its reference are loaded: shared by ``adpo-train`` and ``adpo-eval``."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "The model: a hub id or a local folder that loads with from_pretrained (adpo-eval also "
                  "takes a PEFT adapter folder, loaded on its base model)."},
    )
    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Reference model (hub id or folder). Default in training: a frozen copy of the initial "
                  "model, or with --use_peft the same model with its adapters disabled; in adpo-eval: an "
                  "adapter's base model (adapters disabled), none for a full model (reward metrics skipped)."},
    )
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = field(
        default="float32",
        metadata={"help": "dtype the weights are loaded in. Mixed precision (--bf16/--fp16) is separate: it keeps "
                  "float32 weights and computes in half precision."},
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention kernel, e.g. sdpa, eager, flash_attention_2 (default: model's)."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom code from the model repository."})


@dataclass
class ModelArguments(LoadArguments):
    """:class:`LoadArguments` plus what training changes in the model (LoRA, frozen components)."""

    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of the full model."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: str | None = field(
        default=None,
        metadata={"help": "Comma-separated LoRA targets: component names (vision_tower, mm_projector, "
                  "language_model), module-name suffixes (q_proj,v_proj) or all-linear. LoRA on a component "
                  "wraps the Linear layers inside it. Default: the language model's Linear layers."},
    )
    freeze_vision_tower: bool = field(
        default=False, metadata={"help": "Full fine-tuning: keep the vision tower's weights fixed."}
    )
    freeze_mm_projector: bool = field(
        default=False,
        metadata={"help": "Full fine-tuning: keep the multimodal projector's weights fixed (the layers that map "
                  "image features into the language model)."},
    )

    def __post_init__(self) -> None:
        if self.lora_r <= 0:
            raise ValueError(f"--lora_r must be positive, got {self.lora_r}.")
        if not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            # alpha / r scales the LoRA update: 0 trains nothing, a negative value reverses it.
            raise ValueError(f"--lora_alpha must be positive, got {self.lora_alpha} (the update is scaled by "
                             "lora_alpha / lora_r).")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        if self.use_peft and (self.freeze_vision_tower or self.freeze_mm_projector):
            raise ValueError("--freeze_vision_tower/--freeze_mm_projector are for full fine-tuning. With --use_peft "
                             "only the LoRA targets train: leave the component out of --lora_target_modules.")

    def frozen_components(self) -> list[str]:
        """Component names (see adpo.modeling.COMPONENTS) that --freeze_* keep fixed."""
        return [name for name, on in (("vision_tower", self.freeze_vision_tower),
                                      ("mm_projector", self.freeze_mm_projector)) if on]


@dataclass
class RowArguments:
    """Which rows are read and how they become batches: shared by ``adpo-train`` and ``adpo-eval``, so evaluation
    measures exactly what training optimises (see :func:`adpo.collator.collator_from_args`)."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "The rows (training rows for adpo-train): a hub dataset id, a folder written by "
                  "save_to_disk, or a local .json/.jsonl/.parquet/.csv file (image fields there are paths relative "
                  "to the file)."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Split of --dataset_name to read."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation rows."})
    multimodal_mode: bool | None = field(
        default=None,
        metadata={"help": "Feed each side's images to the model. Unset: on when the model takes images and the "
                  "rows carry them. --multimodal_mode false withholds the images (text only), e.g. for a "
                  "text-only baseline."},
    )
    separate_images: bool = field(
        default=True,
        metadata={"help": "Use rejected_images for the rejected prompt. false: both sides use chosen_images "
                  "(the sides then differ only in text)."},
    )
    max_image_size: int | None = field(
        default=None,
        metadata={"help": "Downscale images so their longest edge is at most this many pixels (aspect kept), "
                  "before the processor."},
    )
    image_processor_kwargs: str | None = field(
        default=None,
        metadata={"help": "JSON object of image-processor arguments, e.g. "
                  "'{\"size\": {\"height\": 336, \"width\": 336}, \"do_rescale\": true}'."},
    )
    pad_to_multiple_of: int | None = field(
        default=None,
        metadata={"help": "Pad each batch to a multiple of this many tokens (default: to its longest row only)."},
    )
    on_bad_rows: Literal["error", "skip"] = field(
        default="error",
        metadata={"help": "Every row is checked before the model is loaded; a row that cannot be used exactly as "
                  "given (missing or empty field, unreadable image, placeholder/image count mismatch, too long, "
                  "...): error: stop, naming the row and field. skip: leave it out and report how many rows were "
                  "skipped and why (the run still fails if no row is left)."},
    )
    max_length: int | None = field(
        default=None,
        metadata={"help": "Most tokens per side: prompt (image tokens included) + response. Longer rows are "
                  "refused or skipped (--on_bad_rows), never truncated. Setting it runs the processor on every "
                  "row before training, to count exactly."},
    )
    max_response_length: int | None = field(
        default=None,
        metadata={"help": "Most response tokens (end-of-turn token included). Longer rows are refused or skipped "
                  "(--on_bad_rows), never truncated."},
    )

    def __post_init__(self) -> None:
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"--pad_to_multiple_of must be a positive number of tokens, got {self.pad_to_multiple_of}"
                             " (leave it out to pad each batch to its longest row).")
        for name in ("max_length", "max_response_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be a positive number of tokens, got {value}.")
        if self.on_bad_rows not in ("error", "skip"):
            raise ValueError(f"--on_bad_rows must be error or skip, got {self.on_bad_rows!r}.")
        if self.max_image_size is not None and self.max_image_size < 1:
            raise ValueError(f"--max_image_size must be a positive number of pixels, got {self.max_image_size}.")
        if self.max_eval_samples is not None and self.max_eval_samples < 1:
            raise ValueError(f"--max_eval_samples must be at least 1, got {self.max_eval_samples}.")
        self.image_processor_kwargs_dict()  # fail on bad JSON now, not at the first batch

    def image_processor_kwargs_dict(self) -> dict[str, Any]:
        """``--image_processor_kwargs`` parsed into a dict ({} when unset)."""
        if not self.image_processor_kwargs:
            return {}
        try:
            value = json.loads(self.image_processor_kwargs)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"--image_processor_kwargs is not valid JSON ({err.msg} at character {err.pos}): "
                f"{self.image_processor_kwargs!r}. Example: '{{\"size\": {{\"longest_edge\": 384}}}}'."
            ) from None
        if not isinstance(value, dict):
            raise ValueError(f"--image_processor_kwargs must be a JSON object, got {type(value).__name__}.")
        return value


@dataclass
class DataArguments(RowArguments):
    """:class:`RowArguments` plus the training run's own splits."""

    eval_dataset_name: str | None = field(
        default=None, metadata={"help": "Evaluation rows (same forms as --dataset_name). Default: --dataset_name."}
    )
    eval_split: str | None = field(
        default=None, metadata={"help": "Split to evaluate on (with --eval_strategy steps|epoch)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ValueError(f"--max_train_samples must be at least 1, got {self.max_train_samples}.")


@dataclass
class ADPOConfig(TrainingArguments):
    """``TrainingArguments`` plus the ADPO objective. Every Trainer flag works as usual."""

    beta: float = field(default=0.1, metadata={"help": "β: strength of the implicit KL penalty to the reference."})
    label_smoothing: float = field(
        default=0.0, metadata={"help": "ε: assumed probability that a pair's chosen/rejected labels are flipped."}
    )
    loss_type: Literal["sigmoid", "ipo", "hinge"] = field(
        default="sigmoid",
        metadata={"help": "sigmoid: -log σ(βh); ipo: (h - 1/(2β))² on per-token averaged log-probs; "
                  "hinge: relu(1 - βh)."},
    )
    reference_free: bool = field(
        default=False, metadata={"help": "Drop the reference terms (an implicit uniform reference)."}
    )
    dpop_lambda: float = field(
        default=0.0,
        metadata={"help": "A-DPOP λ: penalise the policy's chosen log-prob falling below the reference's."},
    )
    multitask_weight: float | None = field(
        default=None,
        metadata={"help": "λ of the paper's multitask objective λ·L_DPO + (1−λ)·L_ADPO. Rows must then also carry "
                  "a standard preference pair: prompt, optional prompt_images, chosen_response, rejected_response. "
                  "Unset: A-DPO only."},
    )
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={"help": "Compute the reference's log-probs once before training (one pass over the data), cache "
                  "them on disk and free the reference model. Reused across epochs and runs while the model, data "
                  "and log-prob settings are unchanged (see docs/losses.md)."},
    )
    ref_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Folder for --precompute_ref_log_probs caches. Default: $ADPO_CACHE_DIR, else "
                  "$XDG_CACHE_HOME/adpo/ref_logps, else ~/.cache/adpo/ref_logps."},
    )
    fused_lm_head: str = field(
        default="auto",
        metadata={"help": "Which LM head scores the response tokens, decided once before training (one forward "
                  "without gradients on the first row) and logged. fused: adpo's vocabulary-chunked head, which "
                  "never holds all tokens × vocabulary logits (backward recomputes them), so step memory does not "
                  "grow with the vocabulary; an error where it cannot stand in for the model's head. model: the "
                  "model's own head at the response positions. auto (default): fused where the head is a plain "
                  "Linear whose output the model returns unchanged (not e.g. with Gemma-2 logit soft-capping), "
                  "else model. true/false are accepted for fused/model."},
    )
    padding_free: bool | None = field(
        default=None,
        metadata={"help": "Padding-free batches: the step's sequences packed into one row of their tokens, each with "
                  "its own positions, attention within each sequence only (so no compute on padding). Unset "
                  "(auto): batches with at least 10% padding, wherever the model family allows (not Mllama, "
                  "PaliGemma, Gemma 3: logged once, then padded batches); true: every batch, an error where it "
                  "cannot; false: padded batches."},
    )
    deduplicate_images: bool = field(
        default=True,
        metadata={"help": "Run each distinct image of a batch through the vision tower once and reuse its features "
                  "wherever it appears (both sides with --separate_images false, text counterfactuals, the same "
                  "image in several rows); gradients from every use reach the tower. false: encode every "
                  "occurrence."},
    )
    # Defaults that differ from TrainingArguments'.
    dataloader_num_workers: int = field(
        default=-1,
        metadata={"help": "Processes that decode images and collate batches while the model computes. -1 (auto): "
                  "with a GPU, min(8, CPU cores / 2) (collation then leaves the step's critical path); without "
                  "one, 0 (the CPU that collates is the one that computes). 0: collate in the main process."},
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the collator needs the raw rows (text and images)."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every N optimizer steps."})
    # transformers 5 dropped this TrainingArguments flag; we keep it so a finished model is never overwritten.
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Allow an --output_dir that already holds a trained model (config.json, "
                  "adapter_config.json, model.safetensors ...); it is overwritten. Without it such a folder is "
                  "refused."},
    )

    def __post_init__(self) -> None:
        if self.dataloader_num_workers == -1:
            self.dataloader_num_workers = auto_dataloader_workers(_has_accelerator())
        elif self.dataloader_num_workers < -1:
            raise ValueError(f"--dataloader_num_workers must be >= 0, or -1 (auto); got {self.dataloader_num_workers}.")
        check_training_values(self)  # before anything is set up for a run that cannot work
        if not _has_accelerator():
            self.dataloader_pin_memory = False  # nothing to pin for
            if (self.bf16 or self.fp16) and not self.use_cpu:
                # The seed's commands pass --bf16; without a GPU they still run, as CPU autocast.
                logger.warning("no GPU found: --bf16/--fp16 run as mixed precision on the CPU (use_cpu=True)")
                self.use_cpu = True
        from .launch import load_deepspeed_config

        # The seed passes YAML; transformers reads JSON. The process environment a DeepSpeed launch needs is
        # prepared by adpo.launch.compute_init (called by the CLI), never here.
        self.deepspeed = load_deepspeed_config(self.deepspeed)
        super().__post_init__()
        from .logprobs import head_mode

        self.fused_lm_head = head_mode(self.fused_lm_head)
        if self.beta <= 0:
            raise ValueError(f"--beta must be positive, got {self.beta}.")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"--label_smoothing must be in [0, 0.5), got {self.label_smoothing}.")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError("--label_smoothing applies to --loss_type sigmoid only.")
        if not self.dpop_lambda >= 0:  # NaN fails this too
            raise ValueError(f"--dpop_lambda must be >= 0, got {self.dpop_lambda}.")
        if self.dpop_lambda and (self.loss_type != "sigmoid" or self.reference_free):
            raise ValueError("--dpop_lambda (A-DPOP) needs --loss_type sigmoid and a reference model.")
        if self.multitask_weight is not None and not 0 <= self.multitask_weight <= 1:
            raise ValueError(f"--multitask_weight must be in [0, 1], got {self.multitask_weight}.")
        if self.precompute_ref_log_probs and self.reference_free:
            raise ValueError("--precompute_ref_log_probs has nothing to compute with --reference_free; drop one.")
        if self.remove_unused_columns:
            raise ValueError("--remove_unused_columns must stay false: the collator reads the raw rows.")


# (flag, lowest allowed, whether the lowest is allowed, why): values outside make training impossible or destructive.
_TRAINING_BOUNDS = (
    ("beta", 0.0, False, "β scales the log-ratio margin; 0 or less gives no (or a reversed) preference"),
    ("learning_rate", 0.0, False, "0 trains nothing; a negative rate climbs the loss"),
    ("adam_epsilon", 0.0, False, "Adam divides by sqrt(v) + ε: with 0 a parameter whose gradient is 0 becomes NaN"),
    ("weight_decay", 0.0, True, "negative decay grows every weight without bound"),
    ("max_grad_norm", 0.0, True, "a negative clipping norm is meaningless (0 switches clipping off)"),
    ("adam_beta1", 0.0, True, "Adam's first-moment decay"),
    ("adam_beta2", 0.0, True, "Adam's second-moment decay (1 never forgets, and divides by 0 at step 1)"),
)
_BELOW_ONE = ("adam_beta1", "adam_beta2")


def check_training_values(args: Any) -> None:
    """Refuse NaN/inf in any numeric flag, and values that cannot train (``--beta 0``, ``--adam_epsilon 0``...),
    saying why."""
    for f in fields(args):
        value = getattr(args, f.name, None)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{f.name} must be a finite number, got {value}.")
    for name, low, inclusive, why in _TRAINING_BOUNDS:
        value = getattr(args, name, None)
        if value is None:
            continue
        if name in _BELOW_ONE and not low <= value < 1:
            raise ValueError(f"--{name} must be in [0, 1), got {value}: {why}.")
        if value < low or (value == low and not inclusive):
            bound = f">= {low:g}" if inclusive else "positive"
            raise ValueError(f"--{name} must be {bound}, got {value}: {why}.")
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}.")
    if args.max_steps <= 0 and args.num_train_epochs <= 0:
        raise ValueError(f"--num_train_epochs {args.num_train_epochs} (and no --max_steps) trains nothing; give a "
                         "positive number of epochs or --max_steps.")
    if args.use_cpu and args.deepspeed and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # DeepSpeed would count each CPU process as a world of one and fail its batch-size check.
        raise ValueError("--use_cpu with --deepspeed under a multi-process launcher (torchrun, accelerate launch) "
                         "cannot work: DeepSpeed would see each process as a world of one. On a machine without GPUs "
                         "leave --use_cpu out (adpo then runs DeepSpeed over gloo on the CPUs); with GPUs drop "
                         "--use_cpu, or drop --deepspeed to train on the CPUs.")
