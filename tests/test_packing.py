"""Padding-free batches (adpo.packing): packed log-probs and gradients equal the padded batch's, per family; the
families that cannot pack fall back explicitly."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from adpo.collator import ADPOCollator
from adpo.config import ModelArguments
from adpo.logprobs import response_logps
from adpo.modeling import load_model_and_processor
from adpo.packing import UNPACKABLE, pack, packed_forward, packing_blocker, padding_free_decision
from adpo.synthetic import draw_shape
from adpo.testing.tiny import FAMILIES

PACKING = [f for f in FAMILIES if f not in UNPACKABLE]


def _image(colour: str, width: int, height: int) -> Image.Image:
    return draw_shape("circle", colour, 32).resize((width, height))


# Sides of very different lengths (image counts and sizes differ), so the padded batch carries 10-35% padding.
ROWS = [
    {"response": "A red circle.", "chosen": "What is shown?", "chosen_images": [_image("red", 32, 32)],
     "rejected": "What is shown in this image, in one sentence?",
     "rejected_images": [_image("green", 40, 24), _image("blue", 24, 40)]},
    {"response": "There are two green triangles and one yellow star.", "chosen": "Describe the image.",
     "chosen_images": [_image("green", 20, 36), _image("red", 32, 32), _image("yellow", 48, 20)],
     "rejected": "Describe.", "rejected_images": [_image("blue", 32, 32)]},
]



def _load(path: Path) -> tuple[Any, Any]:
    model, processor = load_model_and_processor(ModelArguments(model_name_or_path=str(path)))
    return model.eval(), processor


def _batch(processor: Any, multimodal: bool = True) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    rows = ROWS if multimodal else [{"response": r["response"], "chosen": r["chosen"], "rejected": r["rejected"]}
                                    for r in ROWS]
    batch = ADPOCollator(processor, multimodal=multimodal)(rows)
    batch.pop("row_ids")
    return batch, batch.pop("response_mask")


def _padded_and_packed(model: Any, batch: dict[str, torch.Tensor], mask: torch.Tensor,
                       fused: bool) -> tuple[Any, Any]:
    head = model.get_output_embeddings()
    padded = response_logps(model, head, batch, mask, fused=fused)
    with packed_forward(model, batch, mask) as packed:
        assert packed.inputs["input_ids"].shape == (1, int(batch["attention_mask"].sum()))
        got = response_logps(model, head, packed.inputs, packed.response_mask, fused=fused,
                             sequence_ids=packed.sequence_ids, num_sequences=mask.shape[0])
    return padded, got


def _grads(model: Any) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", [*PACKING, "llama"])
def test_packed_log_probs_and_gradients_equal_padded(family: str, tiny: Any, tiny_llama: Path) -> None:
    """fp32: per-sequence response log-prob sums of the packed row equal the padded batch's to 1e-5, with adpo's
    fused head and with the model's own; so do the gradients of every weight (vision tower included) to 1e-5
    (absolute, relative to the largest entry): the same sums of the same products, in another order."""
    model, processor = _load(tiny_llama if family == "llama" else tiny(family))
    batch, mask = _batch(processor, multimodal=family != "llama")
    assert packing_blocker(model, batch) is None
    assert 1 - batch["attention_mask"].float().mean() > 0.08  # the padded batch does carry padding
    for fused in (False, True):
        with torch.no_grad():
            padded, packed = _padded_and_packed(model, batch, mask, fused)
        assert torch.equal(padded.counts, packed.counts)
        torch.testing.assert_close(packed.sums, padded.sums, rtol=0, atol=1e-5)

    model.zero_grad()
    padded, _ = _padded_and_packed(model, batch, mask, fused=True)
    padded.sums.sum().backward()
    expected = _grads(model)
    model.zero_grad()
    _, packed = _padded_and_packed(model, batch, mask, fused=True)
    packed.sums.sum().backward()
    got = _grads(model)
    assert got.keys() == expected.keys() and len(got) > sum(1 for _ in model.parameters()) * 0.9
    for name, e in expected.items():
        torch.testing.assert_close(got[name], e, rtol=0, atol=1e-5 * max(1.0, float(e.abs().max())), msg=name)


def test_pack_layout() -> None:
    """Right-padded rows → one row of their tokens, positions restarting at 0, response mask and row ids alike."""
    inputs = {"input_ids": torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]]),
              "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]),
              "mm_token_type_ids": torch.tensor([[0, 1, 0, 0], [1, 0, 0, 0]]),
              "pixel_values": torch.ones(3, 2)}
    mask = torch.tensor([[0, 0, 1, 0], [0, 1, 0, 0]], dtype=torch.bool)
    batch = pack(inputs, mask)
    assert batch.inputs["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch.inputs["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch.inputs["mm_token_type_ids"].tolist() == [[0, 1, 0, 1, 0]]
    assert "attention_mask" not in batch.inputs and batch.inputs["pixel_values"] is inputs["pixel_values"]
    assert batch.response_mask.tolist() == [[False, False, True, False, True]]
    assert batch.sequence_ids.tolist() == [0, 0, 0, 1, 1] and batch.bounds == (0, 3, 5)


@pytest.mark.parametrize("family", sorted(UNPACKABLE))
def test_unpackable_families_fall_back_once_with_a_log_line(family: str, tiny: Any,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    model, processor = _load(tiny(family))
    batch, _ = _batch(processor)
    with caplog.at_level(logging.WARNING, logger="adpo.packing"):
        assert padding_free_decision(model, batch, None) is False
        assert padding_free_decision(model, batch, None) is False
    lines = [r.getMessage() for r in caplog.records if "padding-free batches off" in r.getMessage()]
    assert len(lines) <= 1 and all(family in line for line in lines)  # once per process (another test may log it)
    with pytest.raises(ValueError, match=f"--padding_free true.*{family}"):
        padding_free_decision(model, batch, True)
    assert padding_free_decision(model, batch, False) is False


def test_auto_packs_only_batches_with_enough_padding(tiny: Any) -> None:
    """auto leaves a batch without padding as it is (packing it would only add per-sequence attention calls) and
    packs one whose padding reaches MIN_PADDING_SHARE; true packs both."""
    from adpo.packing import MIN_PADDING_SHARE, padding_share

    model, processor = _load(tiny("llava"))
    batch, _ = _batch(processor)
    assert padding_share(batch) >= MIN_PADDING_SHARE
    assert padding_free_decision(model, batch, None) is True
    row = {"response": "A red circle.", "chosen": "What is shown?", "rejected": "What is shown?",
           "chosen_images": [_image("red", 32, 32)], "rejected_images": [_image("blue", 32, 32)]}
    even = ADPOCollator(processor, multimodal=True)([row, row])
    assert padding_share(even) == 0.0
    assert padding_free_decision(model, even, None) is False
    assert padding_free_decision(model, even, True) is True
    almost = {**even, "attention_mask": even["attention_mask"].clone()}
    almost["attention_mask"][0, -1] = 0  # one padded position in the batch: below the share
    assert 0 < padding_share(almost) < MIN_PADDING_SHARE and padding_free_decision(model, almost, None) is False


def test_trainer_packs_by_default_with_the_padded_loss(tiny: Any, tmp_path: Path) -> None:
    """Through the trainer (policy + frozen reference): --padding_free auto packs, same loss and metrics as false."""
    import json

    from adpo.config import ADPOConfig, DataArguments
    from adpo.pipeline import build_trainer

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({k: r[k] for k in ("response", "chosen", "rejected")}) + "\n" for r in ROWS))
    results = {}
    for padding_free in (None, False):
        trainer, _ = build_trainer(
            ModelArguments(model_name_or_path=str(tiny("llava_next"))), DataArguments(dataset_name=str(data)),
            ADPOConfig(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True, max_steps=1,
                       padding_free=padding_free, per_device_train_batch_size=2))
        batch = ADPOCollator(trainer.data_collator.processor, multimodal=True)(ROWS)
        calls: list[torch.Size] = []  # the hidden states the LM head sees: (rows, seq, hidden)
        head = trainer.model.get_output_embeddings()
        head.register_forward_pre_hook(lambda m, a, calls=calls: calls.append(a[0].shape))
        with torch.no_grad():
            loss, metrics = trainer.loss_and_metrics(trainer.model, batch)
        assert calls and all(shape[0] == (1 if padding_free is None else 4) for shape in calls)
        results[padding_free] = (loss, metrics)
    torch.testing.assert_close(results[None][0], results[False][0], rtol=0, atol=1e-6)
    for key, value in results[False][1].items():
        torch.testing.assert_close(results[None][1][key], value, rtol=0, atol=1e-5, msg=key)


def test_dataloader_workers_auto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """-1 (the default): workers where a GPU computes (half the cores, at most 8), none on a CPU-only machine."""
    import os

    from adpo import config as config_module
    from adpo.config import ADPOConfig, auto_dataloader_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert auto_dataloader_workers(True) == 8 and auto_dataloader_workers(False) == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert auto_dataloader_workers(True) == 1
    monkeypatch.setattr(config_module, "_has_accelerator", lambda: False)
    assert ADPOConfig(output_dir=str(tmp_path), report_to=[]).dataloader_num_workers == 0
    assert ADPOConfig(output_dir=str(tmp_path), report_to=[], dataloader_num_workers=3).dataloader_num_workers == 3
    with pytest.raises(ValueError, match="--dataloader_num_workers must be >= 0, or -1"):
        ADPOConfig(output_dir=str(tmp_path), report_to=[], dataloader_num_workers=-2)


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
def test_packed_gradients_under_gradient_checkpointing(family: str, use_reentrant: bool, tiny: Any) -> None:
    """Checkpointing re-runs the attention in backward, after the packed forward returned: it must see the same
    sequence boundaries, so the gradients equal the padded batch's (as without checkpointing)."""
    model, processor = _load(tiny(family))
    model.train()
    model.gradient_checkpointing_enable({"use_reentrant": use_reentrant})
    model.enable_input_require_grads()
    batch, mask = _batch(processor)
    grads = []
    for packed in (False, True):
        model.zero_grad()
        padded, got = _padded_and_packed(model, batch, mask, fused=True)
        (got if packed else padded).sums.sum().backward()
        grads.append(_grads(model))
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, e in grads[0].items():
        torch.testing.assert_close(grads[1][name], e, rtol=0, atol=1e-5 * max(1.0, float(e.abs().max())), msg=name)
