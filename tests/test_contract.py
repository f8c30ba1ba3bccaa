"""One contract for training and evaluation: the same flags, the same row checks, the same batches.

adpo-train and adpo-eval share the model-loading and row dataclasses and build their collator with one factory,
and both check every row with the processor before any weights are read.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image

from adpo.cli.evaluate import main as eval_main
from adpo.collator import RESPONSE_MASK, ROW_IDS
from adpo.config import ADPOConfig, DataArguments, ModelArguments
from adpo.data import ADPODataError
from adpo.logprobs import response_logps
from adpo.pipeline import build_trainer
from adpo.synthetic import counterfactual_rows, to_dataset, write_jsonl

# Every flag here changes the scored sequences or the forward: dropping any one on either side changes the numbers.
ROW_FLAGS = {"max_image_size": 24, "pad_to_multiple_of": 64, "image_processor_kwargs": '{"do_normalize": false}'}


def _argv(flags: dict) -> list[str]:
    return [item for name, value in flags.items() for item in (f"--{name}", str(value))]


def test_evaluation_scores_exactly_the_batches_training_optimises(tiny_idefics3, tmp_path, monkeypatch):
    """Stored 48 px images over twice PIL's (lowered) pixel limit: datasets' own decoding would raise; both
    commands hand them to adpo's loader, which shrinks them to --max_image_size. The evaluated log-probs are
    bitwise those of response_logps on the training collator's batch (same rows, same batch, same kernel)."""
    dataset_dir = tmp_path / "rows"
    to_dataset(counterfactual_rows(3, seed=2, size=48)).save_to_disk(str(dataset_dir))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    trainer, _ = build_trainer(
        ModelArguments(model_name_or_path=str(tiny_idefics3), attn_implementation="eager"),
        DataArguments(dataset_name=str(dataset_dir), **ROW_FLAGS),
        ADPOConfig(output_dir=str(tmp_path / "train"), report_to=[], reference_free=True),
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    assert batch["input_ids"].shape[1] % 64 == 0
    mask = batch.pop(RESPONSE_MASK)
    batch.pop(ROW_IDS)
    model = trainer.model.eval()
    with torch.no_grad():
        chosen, rejected = response_logps(model, model.get_output_embeddings(), batch, mask).sums.chunk(2)

    out = tmp_path / "eval"
    assert eval_main(["--model_name_or_path", str(tiny_idefics3), "--attn_implementation", "eager",
                      "--dataset_name", str(dataset_dir), "--batch_size", "3", "--image_ablation", "false",
                      "--output_dir", str(out), *_argv(ROW_FLAGS)]) == 0
    with (out / "rows.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [float(r["logp_chosen"]) for r in rows] == chosen.tolist()
    assert [float(r["logp_rejected"]) for r in rows] == rejected.tolist()


@pytest.fixture
def one_bad_row(tmp_path) -> Path:
    rows = counterfactual_rows(3, seed=0)
    rows[1]["response"] = " "
    return write_jsonl(rows, tmp_path / "bad")


@pytest.fixture
def no_weights(monkeypatch) -> None:
    """Loading any model's weights fails the test: the rows must be refused first."""

    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded before the rows were checked")

    for auto_class in (transformers.AutoModelForImageTextToText, transformers.AutoModelForCausalLM):
        monkeypatch.setattr(auto_class, "from_pretrained", refuse)


def test_training_refuses_a_bad_row_before_loading_the_weights(tiny_idefics3, one_bad_row, no_weights, tmp_path):
    with pytest.raises(ADPODataError, match=r"^row 1, field 'response': is empty"):
        build_trainer(ModelArguments(model_name_or_path=str(tiny_idefics3)),
                      DataArguments(dataset_name=str(one_bad_row)),
                      ADPOConfig(output_dir=str(tmp_path / "out"), report_to=[]))


def test_evaluation_refuses_a_bad_row_before_loading_the_weights(tiny_idefics3, one_bad_row, no_weights, tmp_path):
    with pytest.raises(ADPODataError, match=r"^evaluation data: row 1, field 'response': is empty"):
        eval_main(["--model_name_or_path", str(tiny_idefics3), "--dataset_name", str(one_bad_row),
                   "--output_dir", str(tmp_path / "eval")])


def test_evaluation_skips_bad_rows_like_training_and_says_so(tiny_idefics3, one_bad_row, tmp_path, capsys):
    out = tmp_path / "eval"
    assert eval_main(["--model_name_or_path", str(tiny_idefics3), "--dataset_name", str(one_bad_row),
                      "--on_bad_rows", "skip", "--output_dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())["models"]["model"]
    assert summary["n"] == 2 and summary["skipped_rows"] == 1
    assert "adpo-eval (model): eval: skipped 1 of 3 rows (--on_bad_rows skip), kept 2" in capsys.readouterr().out
