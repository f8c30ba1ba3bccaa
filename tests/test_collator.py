"""The collator's exact tensors: which positions are prompt, response and padding."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoProcessor, AutoTokenizer

from adpo.collator import ADPOCollator
from adpo.data import ROW_ID, ADPODataError
from adpo.synthetic import draw_shape

HEADER = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
GEN = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_two_row_text_batch_exact(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    rows = [
        {"response": "A red apple.", "chosen": "Describe the red fruit.", "rejected": "What?", ROW_ID: 7},
        {"response": "Three.", "chosen": "How many?", "rejected": "Question: how many shapes are there?", ROW_ID: 3},
    ]
    batch = ADPOCollator(tok, multimodal=False)(rows)

    # Expected rows, built from the template's literal text: [chosen0, chosen1, rejected0, rejected1].
    sides = [(r["chosen"], r["response"]) for r in rows] + [(r["rejected"], r["response"]) for r in rows]
    prompts = [_ids(tok, HEADER + text + GEN) for text, _ in sides]
    responses = [_ids(tok, response + "<|eot_id|>") for _, response in sides]
    length = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    assert batch["input_ids"].shape == (4, length)
    pad = tok.pad_token_id
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        n = len(p) + len(r)
        assert batch["input_ids"][i].tolist() == p + r + [pad] * (length - n)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (length - n)
        assert batch["response_mask"][i].tolist() == [False] * len(p) + [True] * len(r) + [False] * (length - n)
    assert batch["row_ids"].tolist() == [7, 3]
    # The response's ids are the same after both prompts.
    rm = batch["response_mask"]
    assert batch["input_ids"][0][rm[0]].tolist() == batch["input_ids"][2][rm[2]].tolist()
    assert set(batch) == {"input_ids", "attention_mask", "response_mask", "row_ids"}


def test_multimodal_batch_carries_every_processor_output(tiny_idefics3):
    processor = AutoProcessor.from_pretrained(tiny_idefics3)
    red, green = draw_shape("circle", "red"), draw_shape("circle", "green")
    rows = [
        {"response": "A red circle.", "chosen": "What is it?", "chosen_images": [red],
         "rejected": "What is it?", "rejected_images": [green]},
        {"response": "Two circles.", "chosen": "How many shapes are there?", "chosen_images": [red, red],
         "rejected": "How many?", "rejected_images": [green]},
    ]
    batch = ADPOCollator(processor, multimodal=True)(rows)
    # Images per side: [1, 2, 1, 1]; the processor pads the image dimension to 2.
    assert batch["pixel_values"].shape == (4, 2, 3, 32, 32)
    assert batch["pixel_attention_mask"].shape == (4, 2, 32, 32)
    assert batch["pixel_values"][0, 1].abs().sum() == 0  # padding image
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    n_image_tokens = (batch["input_ids"] == image_token).sum(1).tolist()
    assert n_image_tokens == [4, 8, 4, 4]  # 4 tokens per 32-pixel image (see build_tiny_idefics3)
    # Image tokens are never part of the response, and no padding is.
    assert not (batch["response_mask"] & (batch["input_ids"] == image_token)).any()
    assert not (batch["response_mask"] & (batch["attention_mask"] == 0)).any()
    end = processor.tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    for i in range(4):
        response = batch["input_ids"][i][batch["response_mask"][i]].tolist()
        assert end in response  # the assistant turn ends with the template's end-of-turn token


def test_separate_images_false_uses_chosen_images_on_both_sides(tiny_idefics3):
    processor = AutoProcessor.from_pretrained(tiny_idefics3)
    row = {"response": "A red circle.", "chosen": "What is it?", "chosen_images": [draw_shape("circle", "red")],
           "rejected": "What is that?", "rejected_images": [draw_shape("square", "blue")]}
    batch = ADPOCollator(processor, multimodal=True, separate_images=False)([row])
    torch.testing.assert_close(batch["pixel_values"][0], batch["pixel_values"][1], rtol=0, atol=0)
    batch = ADPOCollator(processor, multimodal=True, separate_images=True)([row])
    assert not torch.equal(batch["pixel_values"][0], batch["pixel_values"][1])


def test_text_may_place_its_image_placeholder(tiny_idefics3):
    processor = AutoProcessor.from_pretrained(tiny_idefics3)
    img = draw_shape("circle", "red")
    collator = ADPOCollator(processor, multimodal=True)
    placed = collator.encode_side({"response": "x", "chosen": "Look: <image> what is it?", "chosen_images": [img]},
                                  "chosen")
    assert placed.prompt.count("<image>") == 1 and "Look: <image> what" in placed.prompt
    with pytest.raises(ADPODataError, match="row 5, field 'chosen'.*2 <image> placeholder"):
        collator.encode_side({"response": "x", "chosen": "<image><image>", "chosen_images": [img], ROW_ID: 5},
                             "chosen")


def test_max_image_size_shrinks_before_the_processor(tiny_idefics3):
    processor = AutoProcessor.from_pretrained(tiny_idefics3)
    big = draw_shape("circle", "red", size=200)
    side = ADPOCollator(processor, multimodal=True, max_image_size=50).encode_side(
        {"response": "x", "chosen": "q", "chosen_images": [big]}, "chosen")
    assert side.images[0].size == (50, 50)
