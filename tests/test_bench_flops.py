"""The GPU benchmark's analytic FLOP count (bench/flops.py) against torch's FLOP counter.

On the scaled-down configs, with eager attention so every product is a counted matmul: one forward through adpo's
response_logps must cost exactly what ``forward_flops`` says (LLaVA-NeXT: within the class token's share of the
patch convolution, which the count includes and CLIP does not convolve), and a LoRA policy's forward + backward what
``step_flops`` says (hardware FLOPs: the fused LM head recomputes its forward in backward) minus the reference
forward.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from adpo import ADPOCollator, ModelArguments
from adpo.logprobs import response_logps
from adpo.modeling import apply_lora

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # the benchmark's modules, as it runs them
import archs  # noqa: E402
import flops  # noqa: E402


def tiny_setup(key: str, lora: bool, image_size: int):
    family = flops.FAMILIES[key]
    config = archs.load_config(family.config_file, tiny=True)
    processor = (archs.smolvlm_processor(split=False) if key == "smolvlm"
                 else archs.llava_processor(config.image_grid_pinpoints))
    archs.point_config_at_tokenizer(config, processor.tokenizer)
    torch.manual_seed(0)
    model = archs.build_model(config, torch.float32, "cpu", attn="eager")
    arch = flops.measure_arch(model, family)
    if lora:
        model = apply_lora(model, ModelArguments(use_peft=True, lora_dropout=0.0))
        arch.lora_w = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    collator = ADPOCollator(processor, multimodal=True)
    work, batch, _ = flops.measure_work(collator, archs.synthetic_rows(1, image_size), family, model.config)
    batch = dict(batch)
    mask = batch.pop("response_mask")
    batch.pop("row_ids")
    return model, arch, work, batch, mask


def counted(model, batch, mask, backward: bool) -> int:
    """FLOPs of one response_logps call with adpo's fused head, decided up front as the trainer does (left to
    decide, the call would run one more forward to choose)."""
    with FlopCounterMode(display=False) as counter:
        with torch.set_grad_enabled(backward):
            out = response_logps(model, model.get_output_embeddings(), batch, mask, fused=True)
            if backward:
                out.sums.sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("key,lora,image_size,tolerance", [
    ("smolvlm", False, 384, 0.0),  # one 384 tile per side: every FLOP accounted for exactly
    ("llava", True, 336, 1e-4),  # anyres 1 x 2 grid + base = 3 tiles per side; the CLS position is not convolved
])
def test_forward_flops_match_torch_flop_counter(key, lora, image_size, tolerance):
    model, arch, work, batch, mask = tiny_setup(key, lora, image_size)
    analytic = sum(flops.forward_flops(arch, work).values())
    assert counted(model, batch, mask, backward=False) == pytest.approx(analytic, rel=tolerance, abs=0)


@pytest.mark.parametrize("text_input_grads,tolerance", [
    # Without input gradients the hidden states entering the first layer's q/k/v need no gradient, so those layers'
    # input gradients (base and LoRA-A), which the count includes, are skipped: 0.5% here.
    (False, 0.01),
    # With them on the text embeddings only (bench_gpu.py --input_grads text) the count is exact.
    (True, 1e-4),
])
def test_lora_policy_forward_backward_flops_match_torch_flop_counter(text_input_grads, tolerance):
    """LoRA: frozen vision and projector run forward only; frozen Linear layers pass input gradients only."""
    model, arch, work, batch, mask = tiny_setup("llava", lora=True, image_size=336)
    if text_input_grads:
        model.get_input_embeddings().register_forward_hook(lambda module, inputs, out: out.requires_grad_(True))
    f = flops.forward_flops(arch, work)
    # Hardware FLOPs: the fused LM head recomputes the policy's head forward in backward (+1·head).
    _, step = flops.step_flops(arch, work, lora=True, checkpointing=False)
    model_only, _ = flops.step_flops(arch, work, lora=True, checkpointing=False, fused_head=False)
    assert step - model_only == f["head"] > 0
    policy = step - sum(v for k, v in f.items() if k != "lora")  # minus the reference forward
    assert counted(model, batch, mask, backward=True) == pytest.approx(policy, rel=tolerance, abs=0)
