"""Each distinct image through the vision tower once (adpo.image_dedup): same log-probs and gradients as
encoding every occurrence, per family."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from PIL import Image

from adpo.collator import ADPOCollator
from adpo.config import ModelArguments
from adpo.image_dedup import LAYOUTS, each_image_once, unique_items
from adpo.logprobs import response_logps
from adpo.modeling import load_model_and_processor
from adpo.synthetic import draw_shape
from adpo.testing.tiny import FAMILIES

DEDUP = [f for f in FAMILIES if f in LAYOUTS]


def _image(shape: str, colour: str, width: int, height: int) -> Image.Image:
    return draw_shape(shape, colour, 32).resize((width, height))


SHARED = _image("circle", "red", 32, 32)
# With separate_images=False both sides show chosen_images: 6 occurrences of 2 distinct images (SHARED 4 times).
ROWS = [
    {"response": "A red circle.", "chosen": "What is shown?", "chosen_images": [SHARED],
     "rejected": "What is shown here, in one sentence?", "rejected_images": [SHARED]},
    {"response": "A blue square next to it.", "chosen": "Describe.",
     "chosen_images": [_image("square", "blue", 40, 24), SHARED],
     "rejected": "Describe the pictures.", "rejected_images": [_image("square", "green", 24, 40)]},
]



def _logps_and_grads(model: Any, batch: dict[str, torch.Tensor], mask: torch.Tensor,
                     dedup: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], Any]:
    model.zero_grad()
    with each_image_once(model, dedup) as stats:
        logps = response_logps(model, model.get_output_embeddings(), batch, mask, fused=True)
    logps.sums.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logps.sums.detach(), grads, stats


@pytest.mark.parametrize("family", DEDUP)
def test_each_image_encoded_once_gives_the_duplicated_computation(family: str, tiny: Any) -> None:
    """fp32: log-prob sums to 1e-5 and every gradient (the vision tower's included: the sum over each image's uses)
    to 1e-5 relative to its largest entry; the tower encoded fewer images than the batch holds."""
    model, processor = load_model_and_processor(ModelArguments(model_name_or_path=str(tiny(family))))
    model.eval()
    batch = ADPOCollator(processor, multimodal=True, separate_images=False)(ROWS)
    batch.pop("row_ids")
    mask = batch.pop("response_mask")
    response_logps(model, model.get_output_embeddings(), batch, mask)  # the fused head's first-call check
    expected, expected_grads, off = _logps_and_grads(model, batch, mask, dedup=False)
    got, grads, stats = _logps_and_grads(model, batch, mask, dedup=True)
    assert off.seen == 0 and stats.calls and stats.encoded < stats.seen
    if family not in ("llava_next", "idefics3"):  # tiles / splits: several per image
        assert (stats.seen, stats.encoded) == (6, 2)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert grads.keys() == expected_grads.keys()
    assert any("vision" in name or "visual" in name for name in grads)
    for name, e in expected_grads.items():
        torch.testing.assert_close(grads[name], e, rtol=0, atol=1e-5 * max(1.0, float(e.abs().max())), msg=name)


def test_unique_items_compares_exactly() -> None:
    """Equal keys are only candidates: items are merged when their tensors are equal, bit for bit."""
    a, b = torch.zeros(2, 3), torch.zeros(2, 3)
    c = torch.zeros(2, 3)
    c[1, 2] = 1e-30
    firsts, inverse = unique_items([(a,), (b,), (c,), (a,)], ["k", "k", "k", "k"])
    assert firsts == [0, 2] and inverse == [0, 0, 1, 0]
