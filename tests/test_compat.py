"""adpo.compat's repairs of the installed transformers, and the layer choices around them (no model download)."""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer

from adpo.compat import checkpointed_layers, repair_model
from adpo.logprobs import in_model_dtype
from adpo.modeling import lora_adaptable, lora_targets, not_lora_adaptable


class Layer(GradientCheckpointingLayer):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, hidden_state: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return torch.tanh(self.linear(hidden_state)) * scale


class Encoder(nn.Module):
    """Calls its layers with the hidden states as a keyword, as Llama 4's vision encoder does."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.layers = nn.ModuleList([Layer(), Layer()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(x)
        for layer in self.layers:
            hidden = layer(hidden_state=hidden, scale=0.5)
        return hidden.sum()


def _checkpointed(model: Encoder) -> Encoder:
    for layer in model.layers:
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=True)
    return model.train()


def test_keyword_input_keeps_gradients_under_reentrant_checkpointing() -> None:
    """Re-entrant checkpointing drops a layer whose input comes as a keyword out of the backward pass (nothing
    before it gets a gradient); after repair_model every layer takes its input positionally and the gradients
    equal those without checkpointing."""
    torch.manual_seed(0)
    plain = Encoder()
    x = torch.randn(2, 5, 3)
    plain(x).backward()
    expected = {n: p.grad.clone() for n, p in plain.named_parameters()}

    broken = _checkpointed(copy.deepcopy(plain))
    broken.zero_grad(set_to_none=True)
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad"):
        loss = broken(x)
    if loss.requires_grad:  # torch may still track the layers' own parameters; the embedding is cut off
        loss.backward()
    assert broken.embed.weight.grad is None

    repaired = _checkpointed(copy.deepcopy(plain))
    repaired.zero_grad(set_to_none=True)
    assert len(checkpointed_layers(repaired)) == 2
    repair_model(repaired)
    repaired(x).backward()
    for name, param in repaired.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=0, atol=0, msg=name)


def test_repair_keeps_calls_the_same_without_checkpointing() -> None:
    torch.manual_seed(0)
    model = Encoder()
    x = torch.randn(2, 5, 3)
    before = model(x)
    repair_model(model)
    repair_model(model)  # idempotent: one hook per layer
    assert all(len(layer._forward_pre_hooks) == 1 for layer in model.layers)
    assert torch.equal(model(x), before)
    assert torch.equal(copy.deepcopy(model)(x), before)  # the frozen reference is a deep copy


class Router(nn.Linear):
    """A Linear subclass with a forward of its own (as Llama 4's MoE router): returns a tuple."""

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        logits = super().forward(hidden)
        return logits.softmax(-1), logits


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(4, 4)
        self.router = Router(4, 2)


class ScaledLinear(nn.Linear):
    """A Linear subclass with a forward of its own that still returns the layer's output (as Falcon's)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(hidden) * 2


def test_linear_subclasses_returning_their_output_stay_adaptable() -> None:
    assert lora_adaptable(ScaledLinear(4, 3))
    assert not lora_adaptable(Router(4, 2))
    assert not lora_adaptable(nn.Conv2d(3, 3, 1))
    with torch.device("meta"):  # no weights materialised: the probe still runs
        assert lora_adaptable(ScaledLinear(4, 3)) and not lora_adaptable(Router(4, 2))
    sharded = Router(4, 2)
    sharded.weight = nn.Parameter(torch.empty(0))  # as a ZeRO-3 partition: the probe fails, PEFT decides
    assert lora_adaptable(sharded)


def test_llama4_output_repair_leaves_tuples_alone() -> None:
    """With return_dict=False the language model returns a tuple, which the wrapper never reads the field from."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from adpo.compat import _add_missing_image_outputs

    logits = torch.zeros(1, 2, 3)
    assert _add_missing_image_outputs(nn.Identity(), (), (logits,)) == (logits,)
    output = _add_missing_image_outputs(nn.Identity(), (), CausalLMOutputWithPast(logits=logits))
    assert output.image_outputs is None and output.logits is logits


def test_lora_never_targets_linear_layers_with_their_own_forward() -> None:
    model = nn.Module()
    model.model = nn.Module()
    model.model.language_model = nn.ModuleList([Block(), Block()])
    assert lora_adaptable(model.model.language_model[0].q_proj)
    assert not lora_adaptable(model.model.language_model[0].router)
    assert not_lora_adaptable(model) == ["model.language_model.0.router", "model.language_model.1.router"]
    assert lora_targets(model, "language_model") == ["model.language_model.0.q_proj", "model.language_model.1.q_proj"]
    assert lora_targets(model, "q_proj") == ["model.language_model.0.q_proj", "model.language_model.1.q_proj"]
    model.model.language_model[0].scaled = ScaledLinear(4, 4)
    assert lora_targets(model, "scaled") == ["model.language_model.0.scaled"]
    for spec in ("router", "q_proj,router"):  # asked for by name: an error, never a silent drop
        with pytest.raises(ValueError, match="'router' names only Linear layers whose forward returns something other"):
            lora_targets(model, spec)


def test_low_precision_inputs_take_the_models_dtype() -> None:
    """bfloat16 pixels (Llama 4's image processor) meet a float32 model in float32; float32 pixels, integer ids and
    masks are left alone; a bfloat16 model gets float16 inputs in bfloat16."""
    pixels16 = torch.rand(2, 3, 4, 4).to(torch.bfloat16)
    inputs = {"pixel_values": pixels16, "input_ids": torch.tensor([[1, 2]]), "pixel_attention_mask":
              torch.ones(2, 4, 4, dtype=torch.bool), "image_sizes": torch.tensor([[4, 4]])}
    cast = in_model_dtype(inputs, torch.float32)
    assert cast["pixel_values"].dtype == torch.float32
    assert torch.equal(cast["pixel_values"].to(torch.bfloat16), pixels16)  # exact: bf16 → fp32 loses nothing
    assert all(cast[k] is inputs[k] for k in ("input_ids", "pixel_attention_mask", "image_sizes"))
    pixels32 = torch.rand(2, 3, 4, 4)
    assert in_model_dtype({"pixel_values": pixels32}, torch.bfloat16)["pixel_values"] is pixels32
    half = in_model_dtype({"pixel_values": pixels32.half()}, torch.bfloat16)["pixel_values"]
    assert half.dtype == torch.bfloat16


def test_trainer_repairs_models_loaded_outside_adpo(tiny_llama: Any, tmp_path: Any) -> None:
    """A model loaded with plain from_pretrained (not adpo.modeling) gets the repairs when ADPOTrainer takes it:
    every checkpointed layer of the policy and of the reference holds the positional-input hook once."""
    from transformers import AutoModelForCausalLM

    from adpo.config import ADPOConfig
    from adpo.trainer import ADPOTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert not any(hasattr(m, "_adpo_first_parameter") for m in model.modules())
    ADPOTrainer(model=model, args=ADPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True), ref_model=ref)
    for each in (model, ref):
        layers = checkpointed_layers(each)
        assert layers and all(len(layer._forward_pre_hooks) == 1 for layer in layers)
