"""--torch_compile (inductor on the CPU) with adpo's fused LM head, packed batches, hooks and frozen reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adpo.config import ADPOConfig, DataArguments, ModelArguments
from adpo.pipeline import build_trainer


@pytest.mark.slow
def test_torch_compile_trains_like_eager(tiny_llama: Path, tmp_path: Path) -> None:
    """Two optimizer steps, compiled and eager, from the same weights on the same batches: the logged losses and
    log-probs agree to 1e-5 and the trained weights to 1e-6 (inductor fuses and reorders fp32 sums; nothing
    else differs). Plain SGD, so weight differences are the gradients' times the learning rate (Adam's
    normalisation would blow a 1e-7 difference in a near-zero gradient up to the learning rate)."""
    rows = [{"response": "This is a red apple.", "chosen": "Describe the red fruit " * k, "rejected": "Say."}
            for k in (1, 3, 2, 4)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        trainer, _ = build_trainer(
            ModelArguments(model_name_or_path=str(tiny_llama)), DataArguments(dataset_name=str(data)),
            ADPOConfig(output_dir=str(tmp_path / f"run{compiled}"), report_to=[], use_cpu=True, max_steps=2,
                       per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1, optim="sgd",
                       save_strategy="no",
                       torch_compile=compiled, seed=0, disable_tqdm=True))
        trainer.train()
        logs = [e for e in trainer.state.log_history if "loss" in e]
        weights = {n: p.detach().clone() for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()}
        runs[compiled] = (logs, weights, type(trainer.model_wrapped).__name__)
    assert runs[True][2] == "OptimizedModule"  # the compiled model did the training
    for eager, comp in zip(runs[False][0], runs[True][0], strict=True):
        for key in ("loss", "logps/chosen", "logps/rejected"):
            assert comp[key] == pytest.approx(eager[key], abs=1e-5), key
    for name, value in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], value, rtol=0, atol=1e-6, msg=name)
