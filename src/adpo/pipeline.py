"""Wire data, model, reference, collator and trainer together from the three argument dataclasses."""

from __future__ import annotations

import logging
from typing import Any

from datasets import Dataset

from .collator import ADPOCollator, collator_from_args
from .config import ADPOConfig, DataArguments, ModelArguments
from .data import IMAGE_FIELDS, ADPODataError, check_multitask_columns, has_images, load_adpo_rows
from .modeling import (
    apply_lora,
    enable_vision_input_grads,
    freeze_components,
    load_model,
    load_processor_for,
    load_reference,
)
from .output_dir import check_output_dir
from .preflight import preflight
from .trainer import ADPOTrainer
from .validate import validate_splits

logger = logging.getLogger(__name__)


def resolve_multimodal(flag: bool | None, processor: Any, dataset: Dataset) -> bool:
    """``--multimodal_mode``: explicit true/false, or (unset) on when both the model and the rows have images."""
    takes_images = getattr(processor, "image_processor", None) is not None
    if flag is None:
        flag = takes_images and has_images(dataset)
        if has_images(dataset) and not takes_images:
            # Rows whose sides differ only in their images are then refused (or counted and skipped) in validation.
            logger.warning("the model takes no images: the rows' chosen_images/rejected_images are ignored "
                           "(text only)")
        logger.info("multimodal mode %s (model takes images: %s, rows carry images: %s)",
                    "on" if flag else "off", takes_images, has_images(dataset))
    elif flag and not has_images(dataset):
        raise ValueError("--multimodal_mode is on but the dataset has no chosen_images/rejected_images column.")
    elif not flag and takes_images and has_images(dataset):
        logger.warning("--multimodal_mode false: the rows' images are withheld (text only).")
    return flag


def add_length_column(dataset: Dataset, collator: ADPOCollator, column: str) -> Dataset:
    """Estimate each row's token count (both sides) for length-grouped batching.

    Text is tokenised; each image counts as the processor's image sequence length where it declares one.
    """
    tokens_per_image = getattr(collator.processor, "image_seq_len", 0) if collator.multimodal else 0
    tokenizer = collator.tokenizer

    def lengths(batch: dict[str, list]) -> dict[str, list[int]]:
        out = [0] * len(batch["response"])
        for field in ("chosen", "rejected", "response"):
            texts = [t if isinstance(t, str) else "" for t in batch[field]]
            for i, ids in enumerate(tokenizer(texts, add_special_tokens=False)["input_ids"]):
                out[i] += len(ids) * (2 if field == "response" else 1)
        for field in IMAGE_FIELDS:
            for i, images in enumerate(batch.get(field) or []):
                out[i] += tokens_per_image * len(images or [])
        return {column: out}

    return dataset.map(lengths, batched=True, desc="measuring row lengths")


def build_trainer(
    model_args: ModelArguments, data_args: DataArguments, training_args: ADPOConfig
) -> tuple[ADPOTrainer, Any]:
    """Load everything the CLI flags describe and return the trainer and the processor."""
    if not data_args.dataset_name:
        raise ValueError("--dataset_name is required (hub id, save_to_disk folder, or .json/.jsonl/.parquet/.csv).")
    check_output_dir(training_args.output_dir, training_args.overwrite_output_dir)
    preflight(model_args, data_args, training_args)  # before anything is loaded
    loaded = load_adpo_rows(data_args.dataset_name, data_args.dataset_split, data_args.dataset_config,
                            data_args.max_train_samples, data_args.on_bad_rows)
    train, unreadable = loaded.dataset, {"train": loaded.skipped}
    eval_dataset = None
    if data_args.eval_split or data_args.eval_dataset_name:
        try:
            loaded = load_adpo_rows(data_args.eval_dataset_name or data_args.dataset_name,
                                    data_args.eval_split or data_args.dataset_split, data_args.dataset_config,
                                    data_args.max_eval_samples, data_args.on_bad_rows)
        except ADPODataError as err:
            raise err.within("evaluation data") from None
        except ValueError as err:
            raise ValueError(f"evaluation data: {err}") from None
        eval_dataset, unreadable["eval"] = loaded.dataset, loaded.skipped

    # Everything that reads only the rows and the processor comes first: a bad row fails before the weights load.
    processor = load_processor_for(model_args)
    multimodal = resolve_multimodal(data_args.multimodal_mode, processor, train)
    multitask = training_args.multitask_weight is not None
    collator = collator_from_args(processor, data_args, multimodal=multimodal, multitask=multitask)
    if multitask:
        check_multitask_columns(train, data_args.dataset_name)
        if eval_dataset is not None:
            check_multitask_columns(eval_dataset, data_args.eval_dataset_name or data_args.dataset_name)
    train, eval_dataset, reports = validate_splits(train, eval_dataset, collator, data_args, unreadable)
    if training_args.train_sampling_strategy in ("group_by_length", "batch_rebalance"):
        column = training_args.length_column_name
        if column not in train.column_names:
            train = add_length_column(train, collator, column)
    model = load_model(model_args)
    ref_model = None if training_args.reference_free else load_reference(model_args, model)
    if model_args.frozen_components():
        freeze_components(model, model_args.frozen_components())
    if model_args.use_peft:
        if training_args.gradient_checkpointing:
            model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
            enable_vision_input_grads(model)  # ... in the vision tower too, whatever its embedding
        model = apply_lora(model, model_args)
    if training_args.gradient_checkpointing:
        model.config.use_cache = False
    trainer = ADPOTrainer(
        model=model,
        args=training_args,
        ref_model=ref_model,
        data_collator=collator,
        train_dataset=train,
        eval_dataset=eval_dataset,
        processing_class=processor,
    )
    trainer.validation_reports = reports  # the CLI prints what was skipped
    return trainer, processor
