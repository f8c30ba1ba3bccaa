"""adpo's vocabulary-chunked LM head (:class:`adpo.logprobs.HeadLogps`, ``--fused_lm_head``).

It must be the model's head numerically (values and gradients) and must never keep an ``N × V`` tensor for
backward: that is what makes the step's memory independent of the vocabulary.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from adpo.collator import ADPOCollator
from adpo.config import ADPOConfig
from adpo.logprobs import HeadLogps, fused_head_blocker, head_logps, response_logps, token_logps
from adpo.trainer import ADPOTrainer

ROWS = [
    {"response": "A red apple.", "chosen": "Describe the red fruit in the bowl on the table.", "rejected": "Hi"},
    {"response": "The quick brown fox jumps over the lazy dog, twice.", "chosen": "Go", "rejected": "Say it."},
]


def _grads(out: torch.Tensor, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    # A non-uniform upstream gradient, so a wrong per-row scaling cannot hide.
    weights = torch.linspace(0.5, 2.0, out.shape[0], dtype=out.dtype)
    return torch.autograd.grad((out * weights).sum(), tensors)


def test_gradcheck_float64_blocks_across_the_vocabulary() -> None:
    """Exact derivatives (finite differences, float64) with a bias, 4-entry blocks and a ragged last block."""
    torch.manual_seed(0)
    hidden = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(23, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(23, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 3, 4, 11, 20, 22, 22])  # first, last and block-edge entries

    def fn(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return HeadLogps.apply(h, w, b, targets, 4, torch.float64)

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))
    full = torch.log_softmax(hidden @ weight.T + bias, -1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(fn(hidden, weight, bias), full, rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk", [97, 300, 1000, 4096])
def test_float32_equals_the_unfused_head(chunk: int) -> None:
    """Values and gradients (hidden, weight, bias) equal F.linear → fp32 log-softmax, for one block and several."""
    torch.manual_seed(1)
    head = nn.Linear(64, 1000)
    hidden = torch.randn(30, 64, requires_grad=True)
    targets = torch.randint(0, 1000, (30,))
    got = head_logps(hidden, head, targets, chunk=chunk)
    want = token_logps(head(hidden), targets)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    params = [hidden, head.weight, head.bias]
    for g, w in zip(_grads(got, params), _grads(want, params), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_frozen_head_gets_no_gradient_but_hidden_does() -> None:
    torch.manual_seed(2)
    head = nn.Linear(16, 50, bias=False).requires_grad_(False)
    hidden = torch.randn(9, 16, requires_grad=True)
    targets = torch.randint(0, 50, (9,))
    got = head_logps(hidden, head, targets, chunk=16)
    (grad,) = _grads(got, [hidden])
    (want,) = _grads(token_logps(head(hidden), targets), [hidden])
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6)
    assert head.weight.grad is None


def test_bf16_autocast_runs_the_heads_matmul_in_bf16() -> None:
    """Under autocast the head's F.linear runs in bf16 (fp32 master weights): the fused head does the same, so its
    log-probs equal the model's to fp32 rounding, and its gradients to bf16 rounding (it accumulates the hidden
    states' gradient over blocks in fp32, where the plain backward rounds one bf16 matmul)."""
    torch.manual_seed(3)
    head = nn.Linear(64, 1000)
    hidden = torch.randn(30, 64, requires_grad=True)
    targets = torch.randint(0, 1000, (30,))
    params = [hidden, head.weight, head.bias]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = head_logps(hidden, head, targets, chunk=300)
        want = token_logps(head(hidden), targets)
        got_grads, want_grads = _grads(got, params), _grads(want, params)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    fp32 = token_logps(nn.functional.linear(hidden, head.weight, head.bias), targets)
    assert (fp32 - want).abs().max() > 1e-3  # autocast really changed the numbers the two paths agree on
    for g, w in zip(got_grads, want_grads, strict=True):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2 * w.abs().max().item())


def _saved_for_backward(fn) -> list[torch.Size]:
    shapes: list[torch.Size] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, nn.Parameter):
            shapes.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


def test_nothing_of_size_tokens_by_vocabulary_is_kept_for_backward(tmp_path) -> None:
    """With the fused head no tensor kept for backward has N × V elements (N response tokens, V = 16k vocabulary);
    the model's own head keeps some. The check itself is shown to catch them."""
    from adpo.tiny import build_tiny_llama

    path = build_tiny_llama(tmp_path / "vocab16k", model_vocab_size=16384)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    tok = AutoTokenizer.from_pretrained(path)
    batch = ADPOCollator(tok, multimodal=False)([dict(r, _adpo_row=i) for i, r in enumerate(ROWS)])
    mask = batch.pop("response_mask")
    batch.pop("row_ids")
    n, vocab = int(mask.sum()), model.config.vocab_size
    head = model.get_output_embeddings()

    def vocabulary_sized(fused: bool) -> list[torch.Size]:
        shapes = _saved_for_backward(lambda: response_logps(model, head, batch, mask, fused=fused))
        assert shapes
        return [s for s in shapes if s.numel() >= n * vocab]

    assert vocab == 16384
    assert vocabulary_sized(fused=False)
    assert vocabulary_sized(fused=True) == []


def test_response_logps_fused_equals_unfused_with_gradients(tiny_llama) -> None:
    """Through a whole model: the same per-row sums and the same gradient on every parameter."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).train()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    batch = ADPOCollator(tok, multimodal=False)([dict(r, _adpo_row=i) for i, r in enumerate(ROWS)])
    mask = batch.pop("response_mask")
    batch.pop("row_ids")
    params = [p for p in model.parameters() if p.requires_grad]
    results = {}
    for fused in (True, False):
        sums = response_logps(model, model.get_output_embeddings(), batch, mask, fused=fused).sums
        results[fused] = (sums.detach(), _grads(sums, params))
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-6, atol=1e-5)
    for g, w in zip(results[True][1], results[False][1], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_trainer_flag_selects_the_head(tiny_llama, tmp_path) -> None:
    """--fused_lm_head (default) vs false: the head returns (N,) log-probs vs (N, V) logits; the loss is the same."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    collator = ADPOCollator(tok, multimodal=False)
    rows = [dict(r, _adpo_row=i) for i, r in enumerate(ROWS)]
    head = model.get_output_embeddings()
    outputs: list[tuple[int, ...]] = []
    head.register_forward_hook(lambda module, args, out: outputs.append(tuple(out.shape)))
    losses = {}
    for fused in (True, False):
        trainer = ADPOTrainer(model=model, args=ADPOConfig(output_dir=str(tmp_path), report_to="none",
                                                           fused_lm_head=fused),
                              ref_model=model, data_collator=collator, processing_class=tok)
        outputs.clear()
        losses[fused], _ = trainer.loss_and_metrics(model, collator(rows))
        n = int(collator(rows)["response_mask"].sum())
        assert outputs == ([(n,)] * 2 if fused else [(n, model.config.vocab_size)] * 2)  # policy and reference
    torch.testing.assert_close(losses[True], losses[False], rtol=0, atol=1e-6)


def test_blocker_names_what_stops_the_fused_head(tiny_llama) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    assert fused_head_blocker(model) is None
    model.config.logit_scale = 0.5
    assert "logit_scale=0.5" in fused_head_blocker(model)
    model.config.logit_scale = None

    class ScaledLinear(nn.Linear):
        pass

    model.lm_head = ScaledLinear(model.config.hidden_size, model.config.vocab_size, bias=False)
    assert "ScaledLinear, not a plain torch.nn.Linear" in fused_head_blocker(model)
