"""Wire data, model, reference, collator and trainer together from the three argument dataclasses."""

from __future__ import annotations

import logging
from typing import Any

from datasets import Dataset

from .collator import ADPOCollator
from .config import ADPOConfig, DataArguments, ModelArguments
from .data import has_images, load_adpo_dataset
from .modeling import apply_lora, freeze_components, load_model_and_processor, load_reference
from .trainer import ADPOTrainer

logger = logging.getLogger(__name__)


def resolve_multimodal(flag: bool | None, processor: Any, dataset: Dataset) -> bool:
    """``--multimodal_mode``: explicit true/false, or (unset) on when both the model and the rows have images."""
    takes_images = getattr(processor, "image_processor", None) is not None
    if flag is None:
        flag = takes_images and has_images(dataset)
        logger.info("multimodal mode %s (model takes images: %s, rows carry images: %s)",
                    "on" if flag else "off", takes_images, has_images(dataset))
    elif flag and not has_images(dataset):
        raise ValueError("--multimodal_mode is on but the dataset has no chosen_images/rejected_images column.")
    elif not flag and takes_images and has_images(dataset):
        logger.warning("--multimodal_mode false: the rows' images are withheld; training on text only.")
    return flag


def build_trainer(
    model_args: ModelArguments, data_args: DataArguments, training_args: ADPOConfig
) -> tuple[ADPOTrainer, Any]:
    """Load everything the CLI flags describe and return the trainer and the processor."""
    if not data_args.dataset_name:
        raise ValueError("--dataset_name is required (hub id, save_to_disk folder, or .json/.jsonl/.parquet/.csv).")
    train = load_adpo_dataset(
        data_args.dataset_name, data_args.dataset_split, data_args.dataset_config, data_args.max_train_samples
    )
    eval_dataset = None
    if data_args.eval_split or data_args.eval_dataset_name:
        eval_dataset = load_adpo_dataset(
            data_args.eval_dataset_name or data_args.dataset_name,
            data_args.eval_split or data_args.dataset_split,
            data_args.dataset_config,
            data_args.max_eval_samples,
        )

    model, processor = load_model_and_processor(model_args)
    multimodal = resolve_multimodal(data_args.multimodal_mode, processor, train)
    collator = ADPOCollator(
        processor,
        multimodal=multimodal,
        separate_images=data_args.separate_images,
        max_image_size=data_args.max_image_size,
        image_processor_kwargs=data_args.image_processor_kwargs_dict(),
    )
    ref_model = None if training_args.reference_free else load_reference(model_args, model)
    if model_args.frozen_components():
        freeze_components(model, model_args.frozen_components())
    if model_args.use_peft:
        if training_args.gradient_checkpointing:
            model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
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
    return trainer, processor
