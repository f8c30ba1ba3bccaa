"""ADPO learns: after a short training on image counterfactuals, the chosen image explains the response better."""

from __future__ import annotations

import torch

from adpo.cli import parse_args
from adpo.logprobs import response_logps
from adpo.pipeline import build_trainer


def mean_margin(trainer) -> float:
    """mean over rows of log πθ(y|x_w) − log πθ(y|x_l), the policy alone."""
    model = trainer.model.eval()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    mask = batch.pop("response_mask")
    batch.pop("row_ids")
    with torch.no_grad():
        chosen, rejected = response_logps(model, model.get_output_embeddings(), batch, mask).sums.chunk(2)
    return (chosen - rejected).mean().item()


def test_margin_grows_on_counterfactual_images(tiny_idefics3, image_jsonl, tmp_path):
    trainer, _ = build_trainer(*parse_args([
        "--model_name_or_path", str(tiny_idefics3), "--dataset_name", str(image_jsonl), "--output_dir",
        str(tmp_path), "--multimodal_mode", "--num_train_epochs", "3", "--per_device_train_batch_size", "4",
        "--learning_rate", "2e-3", "--beta", "0.1", "--report_to", "none", "--save_strategy", "no", "--seed", "0",
    ]))
    before = mean_margin(trainer)
    trainer.train()
    after = mean_margin(trainer)
    assert after > before + 1.0, (before, after)
