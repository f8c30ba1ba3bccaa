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
from adpo.logprobs import (
    HeadLogps,
    choose_lm_head,
    head_blocker,
    head_logps,
    response_logps,
    token_logps,
)
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
    """A frozen head: the hidden states' gradient is right and backward does no weight-gradient matmul — it costs
    exactly the recomputation and the input gradient, 2 × 2·N·H·V FLOPs (a weight gradient would add a third)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(2)
    n, h, v = 9, 16, 50
    head = nn.Linear(h, v, bias=False).requires_grad_(False)
    hidden = torch.randn(n, h, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    got = head_logps(hidden, head, targets, chunk=16)
    with FlopCounterMode(display=False) as counter:
        (grad,) = _grads(got, [hidden])
    assert counter.get_total_flops() == 2 * (2 * n * h * v)
    (want,) = _grads(token_logps(head(hidden), targets), [hidden])
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6)


def _rounds_to(values: torch.Tensor, relative: float) -> torch.Tensor:
    """fp32 ``values`` moved by ``relative`` (random sign): half precision rounds them back to ``values``."""
    return values * (1 + relative * torch.sign(torch.randn(values.shape)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_runs_the_heads_matmul_in_the_autocast_dtype(dtype: torch.dtype) -> None:
    """Under autocast the head's F.linear runs in bf16/fp16 (fp32 master weights): the fused head does the same, so
    its log-probs equal the model's to fp32 rounding, and its gradients to half-precision rounding (its per-block
    products are summed in fp32 where the plain backward rounds one matmul).

    Equal on any CPU by construction: the fp32 weights (±1/8, ±2/8) and hidden states (±1, ±2) are offset by 3e-4
    relative, which autocast rounds away (half a bf16 ulp is 2^-9 relative); every product and partial sum is then
    a multiple of 1/8 below 40, exact in the fp32 accumulator in any summation order, so each logit is the same
    correctly rounded half-precision number whatever kernel the CPU picks for each matmul shape (AVX2, AVX-512,
    AMX). fp32 still sees the offsets, so autocast visibly changes the result."""
    torch.manual_seed(3)
    head = nn.Linear(64, 1000)
    with torch.no_grad():
        head.weight.copy_(_rounds_to(torch.randint(1, 3, (1000, 64)) * torch.sign(torch.randn(1000, 64)) / 8, 3e-4))
        head.bias.copy_(torch.randint(-8, 9, (1000,)) / 8)
    hidden = _rounds_to(torch.randint(1, 3, (30, 64)) * torch.sign(torch.randn(30, 64)), 3e-4).requires_grad_()
    targets = torch.randint(0, 1000, (30,))
    params = [hidden, head.weight, head.bias]
    with torch.autocast("cpu", dtype=dtype):
        got = head_logps(hidden, head, targets, chunk=300)
        want = token_logps(head(hidden), targets)
        got_grads, want_grads = _grads(got, params), _grads(want, params)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    fp32 = token_logps(nn.functional.linear(hidden, head.weight, head.bias), targets)
    assert (fp32 - want).abs().max() > 1e-4  # autocast really changed the numbers the two paths agree on
    for g, w in zip(got_grads, want_grads, strict=True):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2 * w.abs().max().item())


def test_float64_weights_are_not_cast_by_autocast() -> None:
    """Autocast never casts float64: neither does the fused head (float64 in, float64 out)."""
    torch.manual_seed(4)
    head = nn.Linear(8, 40).double()
    hidden = torch.randn(5, 8, dtype=torch.float64)
    targets = torch.randint(0, 40, (5,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = head_logps(hidden, head, targets, chunk=16)
    want = torch.log_softmax(head(hidden), -1).gather(1, targets[:, None]).squeeze(1)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def _saved_for_backward(fn) -> list[torch.Size]:
    shapes: list[torch.Size] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, nn.Parameter):
            shapes.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


def _text_batch(tok) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    batch = ADPOCollator(tok, multimodal=False)([dict(r, _adpo_row=i) for i, r in enumerate(ROWS)])
    mask = batch.pop("response_mask")
    batch.pop("row_ids")
    return batch, mask


def test_nothing_of_size_tokens_by_vocabulary_is_kept_for_backward(tmp_path) -> None:
    """With the fused head no tensor kept for backward has N × V elements (N response tokens, V = 16k vocabulary);
    the model's own head keeps some. The check itself is shown to catch them."""
    from adpo.testing.tiny import build_tiny_llama

    path = build_tiny_llama(tmp_path / "vocab16k", model_vocab_size=16384)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    batch, mask = _text_batch(AutoTokenizer.from_pretrained(path))
    n, vocab = int(mask.sum()), model.config.vocab_size
    head = model.get_output_embeddings()
    assert choose_lm_head(model, head, batch, mask).fused

    def vocabulary_sized(fused: bool) -> list[torch.Size]:
        shapes = _saved_for_backward(lambda: response_logps(model, head, batch, mask, fused=fused))
        assert shapes
        return [s for s in shapes if s.numel() >= n * vocab]

    assert vocab == 16384
    assert vocabulary_sized(fused=False)
    assert vocabulary_sized(fused=True) == []


class StepRecorder(ADPOTrainer):
    """Records, per training step, the shapes of the tensors kept for backward and of the policy head's outputs."""

    def training_step(self, model, inputs, num_items_in_batch=None):  # noqa: ANN001, ANN201
        self.n_tokens.append(int(inputs["response_mask"].sum()))
        saved: list[torch.Size] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            if not isinstance(t, nn.Parameter):
                saved.append(t.shape)
            return t

        self.head_outputs.append([])
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = super().training_step(model, inputs, num_items_in_batch)
        self.saved.append(saved)
        return loss


@pytest.mark.parametrize("mode", ["auto", "model"])
def test_first_step_with_a_frozen_reference_holds_no_tokens_by_vocabulary_logits(mode: str, tmp_path) -> None:
    """A separate frozen reference, --fused_lm_head auto: the head is chosen before step 1 (a no-grad probe with a
    few positions), so step 1 is like every later step: the policy's head returns (N,) log-probs and nothing of
    N × V elements is kept for backward. With ``model`` every step keeps them: the check can fail."""
    from datasets import Dataset

    from adpo.testing.tiny import build_tiny_llama

    path = build_tiny_llama(tmp_path / "vocab16k", model_vocab_size=16384)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    vocab = model.config.vocab_size
    args = ADPOConfig(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, max_steps=2, save_strategy="no",
                      per_device_train_batch_size=2, logging_steps=1, fused_lm_head=mode)
    train = Dataset.from_list([dict(r, _adpo_row=i) for i, r in enumerate(ROWS * 2)])
    trainer = StepRecorder(model=model, args=args, ref_model=ref, data_collator=ADPOCollator(tok, multimodal=False),
                           train_dataset=train, processing_class=tok)
    trainer.n_tokens, trainer.saved, trainer.head_outputs = [], [], []
    probes: list[tuple[int, ...]] = []
    model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: (trainer.head_outputs[-1] if trainer.head_outputs else probes).append(out.shape))
    assert trainer.lm_head == {}
    trainer.train()
    assert set(trainer.lm_head) == {"policy", "reference"}
    assert all(choice.fused is (mode == "auto") for choice in trainer.lm_head.values())
    if mode == "auto":
        assert len(probes) == 1 and probes[0][-1] == vocab and probes[0][0] <= 8  # the probe: a few positions
    for step, (n, saved, outputs) in enumerate(zip(trainer.n_tokens, trainer.saved, trainer.head_outputs,
                                                   strict=True), start=1):
        big = [shape for shape in saved if shape.numel() >= n * vocab]
        if mode == "auto":
            assert outputs == [(n,)] and big == [], f"step {step}"
        else:
            assert outputs == [(n, vocab)] and big, f"step {step}"


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied_embeddings"])
def test_response_logps_fused_equals_unfused_with_gradients(tiny_llama, tied: bool) -> None:
    """Through a whole model, with 64-entry vocabulary blocks (7 of them): the same per-row sums and the same
    gradient on every parameter, also when the head's weight is the input embedding's."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).train()
    if tied:
        model.lm_head.weight = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    batch, mask = _text_batch(AutoTokenizer.from_pretrained(tiny_llama))
    params = [p for p in model.parameters() if p.requires_grad]
    results = {}
    for fused in (True, False):
        sums = response_logps(model, head, batch, mask, fused=fused, vocab_chunk=64).sums
        results[fused] = (sums.detach(), _grads(sums, params))
    assert model.config.vocab_size > 6 * 64
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-6, atol=1e-5)
    for g, w in zip(results[True][1], results[False][1], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("flag, fused", [("auto", True), ("fused", True), ("true", True), ("model", False),
                                         ("false", False), (True, True), (False, False)])
def test_trainer_flag_selects_the_head(flag, fused: bool, tiny_llama, tmp_path, caplog) -> None:
    """--fused_lm_head auto|fused|model (true/false: old spellings of fused/model): the choice is made once, logged
    once, stored on the trainer; every call then uses it (fused: the head returns (N,) log-probs; model: (N, V)
    logits). The losses are the same either way."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    collator = ADPOCollator(tok, multimodal=False)
    rows = [dict(r, _adpo_row=i) for i, r in enumerate(ROWS)]
    n, vocab = int(collator(rows)["response_mask"].sum()), model.config.vocab_size
    outputs: list[tuple[int, ...]] = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: outputs.append(tuple(out.shape)))
    args = ADPOConfig(output_dir=str(tmp_path), report_to="none", fused_lm_head=flag)
    assert args.fused_lm_head == ("fused" if fused and flag not in ("auto",) else "model" if not fused else "auto")
    from datasets import Dataset

    trainer = ADPOTrainer(model=model, args=args, ref_model=model, data_collator=collator, processing_class=tok,
                          train_dataset=Dataset.from_list(rows))
    with caplog.at_level("INFO", logger="adpo.trainer"):
        trainer.choose_lm_heads(model)
        trainer.choose_lm_heads(model)  # already chosen: no second probe, no second log line
    assert set(trainer.lm_head) == {"policy", "reference"}  # logged once each
    assert {c.fused for c in trainer.lm_head.values()} == {fused} and len(caplog.records) == 2
    assert ("fused, vocabulary-chunked" if fused else "model's own LM head") in caplog.records[0].getMessage()
    outputs.clear()
    loss = [trainer.loss_and_metrics(model, collator(rows))[0] for _ in range(2)]
    assert outputs == [(n,) if fused else (n, vocab)] * 4  # reference and policy, twice
    plain = ADPOTrainer(model=model, args=ADPOConfig(output_dir=str(tmp_path), report_to="none",
                                                     fused_lm_head="model"),
                        ref_model=model, data_collator=collator, processing_class=tok)
    want = plain.loss_and_metrics(model, collator(rows))[0]
    torch.testing.assert_close(torch.stack(loss), torch.stack([want, want]), rtol=0, atol=1e-6)


def test_bad_fused_lm_head_value_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ValueError, match="auto, fused, model"):
        ADPOConfig(output_dir=str(tmp_path), report_to="none", fused_lm_head="sometimes")


def test_head_blocker_names_what_stops_the_fused_head() -> None:
    assert head_blocker(nn.Linear(4, 8)) is None

    class QuantisedLinear(nn.Linear):
        pass

    assert "QuantisedLinear, not a plain torch.nn.Linear" in head_blocker(QuantisedLinear(4, 8))
    assert "not a plain torch.nn.Linear" in head_blocker(nn.Embedding(8, 4))
    hooked = nn.Linear(4, 8)
    hooked.forward = lambda x: x  # what accelerate's device-map hooks do
    assert "already replaced" in head_blocker(hooked)


class Transformed(nn.Module):
    """A causal LM that changes its logits after the head, as some models do (slicing off padded vocabulary
    entries, or scaling)."""

    def __init__(self, inner: nn.Module, how: str, keep: int) -> None:
        super().__init__()
        self.inner, self.how, self.keep = inner, how, keep

    def get_output_embeddings(self) -> nn.Module:
        return self.inner.get_output_embeddings()

    def forward(self, **kwargs):  # noqa: ANN003, ANN201
        out = self.inner(**kwargs)
        out.logits = out.logits[..., : self.keep] if self.how == "slice" else out.logits * 2.0
        return out


@pytest.mark.parametrize("how", ["slice", "scale"])
def test_a_model_that_transforms_its_logits_keeps_its_own_head(tiny_llama, how: str) -> None:
    """The choice finds the transform (a vocabulary slice is invisible to a value check on (N,) log-probs, so the
    probe compares the head's logits with the model's); the chosen head gives the model's log-probs; forcing the
    fused head is refused."""
    inner = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    batch, mask = _text_batch(AutoTokenizer.from_pretrained(tiny_llama))
    keep = int(batch["input_ids"].max()) + 1  # like a padded vocabulary: the entries past it are never targets
    assert keep < inner.config.vocab_size
    model = Transformed(inner, how, keep)
    head = model.get_output_embeddings()
    with torch.no_grad():
        logits = model(**batch).logits.float()
        predictors = torch.zeros_like(mask)
        predictors[:, :-1] = mask[:, 1:]
        want = torch.zeros(mask.shape[0]).index_add(
            0, mask.nonzero()[:, 0], token_logps(logits[predictors], batch["input_ids"][mask]))
        choice = choose_lm_head(model, head, batch, mask, "auto")
        assert choice.fused is False and "transforms its LM head's output" in choice.reason
        for fused in (choice.fused, None):  # None: chosen for the call
            got = response_logps(model, head, batch, mask, fused=fused).sums
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
        with pytest.raises(ValueError, match="transforms its LM head's output"):
            choose_lm_head(model, head, batch, mask, "fused")
        plain = response_logps(inner, head, batch, mask, fused=False).sums
    assert (plain - want).abs().max() > 0.1  # the transform matters


def test_nan_weights_give_nan_log_probs_not_an_error(tiny_llama) -> None:
    """A NaN in the head's weight (the non-finite guard's business) is not mistaken for a transform."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight[5, 0] = float("nan")
    batch, mask = _text_batch(AutoTokenizer.from_pretrained(tiny_llama))
    assert choose_lm_head(model, head, batch, mask).fused is True
    with torch.no_grad():
        fused = response_logps(model, head, batch, mask, fused=True).sums
        plain = response_logps(model, head, batch, mask, fused=False).sums
    assert plain.isnan().all() and fused.isnan().all()


def test_a_head_with_its_own_forward_is_left_alone(tiny_llama) -> None:
    """A head whose forward is already replaced (accelerate's hooks) is scored through that forward, which stays in
    place (no probe needed to decide); forcing the fused head is refused."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    head = model.get_output_embeddings()
    calls = []
    original = head.forward

    def wrapped(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        return original(*args, **kwargs)

    head.forward = wrapped
    batch, mask = _text_batch(AutoTokenizer.from_pretrained(tiny_llama))
    with torch.no_grad():
        choice = choose_lm_head(model, head, batch, mask)
        assert choice.fused is False and "already replaced" in choice.reason
        got = response_logps(model, head, batch, mask, fused=choice.fused).sums
        with pytest.raises(ValueError, match="already replaced"):
            choose_lm_head(model, head, batch, mask, "fused")
        with pytest.raises(ValueError, match="already replaced"):
            response_logps(model, head, batch, mask, fused=True)
        del head.forward
        want = response_logps(model, head, batch, mask, fused=False).sums
    assert calls == [1]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_float64_model_through_response_logps(tiny_llama) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float64).eval()
    head = model.get_output_embeddings()
    batch, mask = _text_batch(AutoTokenizer.from_pretrained(tiny_llama))
    assert choose_lm_head(model, head, batch, mask).fused
    with torch.no_grad():
        results = [response_logps(model, head, batch, mask, fused=fused).sums for fused in (False, True)]
    assert results[1].dtype == torch.float32
    torch.testing.assert_close(results[1], results[0], rtol=1e-6, atol=1e-5)


def test_fused_lm_head_flag_spellings_on_the_command_line_and_in_yaml(tmp_path) -> None:
    """Old commands keep working: a bare --fused_lm_head means fused, true/false mean fused/model (also as YAML
    booleans); the default is auto."""
    from adpo.cli import parse_args

    base = ["--output_dir", str(tmp_path), "--report_to", "none"]
    for argv, want in (([], "auto"), (["--fused_lm_head"], "fused"), (["--fused_lm_head", "true"], "fused"),
                       (["--fused_lm_head", "false"], "model"), (["--fused_lm_head", "model"], "model")):
        assert parse_args([*base, *argv])[2].fused_lm_head == want, argv
    config = tmp_path / "run.yaml"
    config.write_text("fused_lm_head: false\n")
    assert parse_args([*base, "--config", str(config)])[2].fused_lm_head == "model"
