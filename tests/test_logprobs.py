"""The trainer's response log-probs equal a plain forward pass of each example on its own.

The plain path never touches the collator: it renders the prompt text by hand, calls the processor on one
example, appends the response ids, runs ``model(**inputs).logits`` over the whole sequence, takes a full
log-softmax and sums it at the response ids.

Tolerance: 1e-5 absolute, plus 1e-6 relative because a float32 sum near -150 has a spacing of 1.5e-5 (one ulp),
so an absolute 1e-5 alone would demand more than float32 can represent.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)

from adpo.collator import ADPOCollator
from adpo.config import ADPOConfig
from adpo.logprobs import response_logps, token_logps
from adpo.synthetic import draw_shape
from adpo.trainer import ADPOTrainer


def plain_logp(model, inputs: dict, response_ids: list[int]) -> float:
    """Σ log softmax(model(prompt + response).logits) at the response ids, for one unpadded example."""
    prompt_len = inputs["input_ids"].shape[1]
    ids = torch.cat([inputs["input_ids"], torch.tensor([response_ids])], dim=1)
    full = {**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        logits = model(**full).logits[0].float()
    logps = logits.log_softmax(-1)
    return sum(logps[prompt_len - 1 + t, tok].item() for t, tok in enumerate(response_ids))


def _check(model, processor, collator, rows, expected):
    batch = collator(rows)
    mask = batch.pop("response_mask")
    batch.pop("row_ids")
    with torch.no_grad():
        got = response_logps(model, model.get_output_embeddings(), batch, mask)
    torch.testing.assert_close(got.sums, torch.tensor(expected), rtol=1e-6, atol=1e-5)
    # The same numbers through ADPOTrainer's loss path (policy == reference here, so only logps differ from 0).
    trainer = ADPOTrainer(model=model, args=ADPOConfig(output_dir="/tmp/adpo-unused", report_to="none"),
                          ref_model=model, data_collator=collator, processing_class=processor)
    with torch.no_grad():
        loss, metrics = trainer.loss_and_metrics(model, collator(rows))
    b = len(rows)
    torch.testing.assert_close(metrics["logps/chosen"], torch.tensor(expected[:b]), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(metrics["logps/rejected"], torch.tensor(expected[b:]), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(loss, torch.tensor(0.6931471805599453), rtol=0, atol=1e-6)  # h = 0 → log 2


def test_idefics3_logps_equal_plain_forward(tiny_idefics3):
    model = AutoModelForImageTextToText.from_pretrained(tiny_idefics3, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(tiny_idefics3)
    red, green, blue = (draw_shape(s, c) for s, c in [("circle", "red"), ("square", "green"), ("triangle", "blue")])
    rows = [
        {"response": "A red circle.", "chosen": "What is it?", "chosen_images": [red],
         "rejected": "Describe the shape in the picture, please, in one short sentence.",
         "rejected_images": [green, blue]},
        {"response": "There are two green triangles and one yellow star, left and right.",
         "chosen": "How many shapes are there?", "chosen_images": [green, red, blue],
         "rejected": "What?", "rejected_images": [blue]},
    ]
    expected = []
    for side in ("chosen", "rejected"):
        for row in rows:
            images = row[f"{side}_images"]
            prompt = "<|im_start|>User:" + "<image>" * len(images) + row[side] + "<end_of_utterance>\nAssistant:"
            inputs = processor(text=[prompt], images=[images], return_tensors="pt", add_special_tokens=False)
            response_ids = processor.tokenizer(" " + row["response"] + "<end_of_utterance>\n",
                                               add_special_tokens=False)["input_ids"]
            expected.append(plain_logp(model, dict(inputs), response_ids))
    _check(model, processor, ADPOCollator(processor, multimodal=True), rows, expected)


def test_text_model_logps_equal_plain_forward(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    rows = [
        {"response": "A red apple.", "chosen": "Describe the red fruit in the bowl on the table.", "rejected": "Hi"},
        {"response": "The quick brown fox jumps over the lazy dog, twice.", "chosen": "Go", "rejected": "Say it."},
    ]
    expected = []
    for side in ("chosen", "rejected"):
        for row in rows:
            prompt = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n" + row[side]
                      + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
            inputs = tok([prompt], return_tensors="pt", add_special_tokens=False)
            response_ids = tok(row["response"] + "<|eot_id|>", add_special_tokens=False)["input_ids"]
            expected.append(plain_logp(model, dict(inputs), response_ids))
    _check(model, tok, ADPOCollator(tok, multimodal=False), rows, expected)


def test_text_model_without_chat_template_appends_eos(tmp_path):
    from adpo.testing.tiny import build_tiny_llama

    path = build_tiny_llama(tmp_path / "plain", chat_template=False)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    rows = [{"response": "A red apple.", "chosen": "Fruit: ", "rejected": "Colour of the fruit: "}]
    expected = []
    for side in ("chosen", "rejected"):
        inputs = tok([rows[0][side]], return_tensors="pt")  # raw text; BOS as the tokenizer adds it
        response_ids = tok("A red apple.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        expected.append(plain_logp(model, dict(inputs), response_ids))
    _check(model, tok, ADPOCollator(tok, multimodal=False), rows, expected)


def test_token_logps_chunking_is_exact():
    torch.manual_seed(0)
    logits = torch.randn(37, 11, dtype=torch.bfloat16)
    targets = torch.randint(0, 11, (37,))
    full = logits.float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(token_logps(logits, targets, chunk_size=5), full, rtol=0, atol=1e-6)
