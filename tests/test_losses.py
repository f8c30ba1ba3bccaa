"""The ADPO losses against hand-computed values, and the multitask objective's extremes on tiny models.

Shared numbers (one pair): log πθ(y|x_w) = −10, log πθ(y|x_l) = −12, log π_ref(y|x_w) = −11,
log π_ref(y|x_l) = −11.5, so h = (−10 + 12) − (−11 + 11.5) = 2 − 0.5 = 1.5.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from adpo.collator import RESPONSE_MASK, ROW_IDS, ADPOCollator
from adpo.config import ADPOConfig, DataArguments, ModelArguments
from adpo.data import ROW_ID, ADPODataError, check_multitask_columns
from adpo.logprobs import ResponseLogps
from adpo.losses import adpo_loss, multitask_loss
from adpo.modeling import load_model_and_processor, load_reference
from adpo.pipeline import build_trainer
from adpo.synthetic import counterfactual_rows
from adpo.trainer import ADPOTrainer

PC, PR, RC, RR = -10.0, -12.0, -11.0, -11.5
H = 1.5


def t(*values: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


def softplus(x: float) -> float:
    """−log σ(−x) = log(1 + eˣ)."""
    return math.log1p(math.exp(x))


# ---------------------------------------------------------------------------------------------- closed forms
def test_sigmoid_closed_form_and_rewards() -> None:
    """βh = 0.1·1.5 = 0.15, so L = −log σ(0.15) = log(1 + e^−0.15) ≈ 0.6209570.

    rewards: chosen β(−10 + 11) = 0.1, rejected β(−12 + 11.5) = −0.05.
    """
    out = adpo_loss(t(PC), t(PR), t(RC), t(RR), beta=0.1)
    assert out.losses.item() == pytest.approx(softplus(-0.15), abs=1e-12)
    assert out.losses.item() == pytest.approx(0.6209570, abs=1e-7)
    assert out.chosen_rewards.item() == pytest.approx(0.1, abs=1e-12)
    assert out.rejected_rewards.item() == pytest.approx(-0.05, abs=1e-12)
    assert not out.chosen_rewards.requires_grad


@pytest.mark.parametrize(("loss_type", "expected"), [("sigmoid", math.log(2)), ("ipo", 25.0), ("hinge", 1.0)])
def test_policy_equal_to_reference(loss_type: str, expected: float) -> None:
    """h = 0 when πθ = π_ref: sigmoid −log σ(0) = log 2; ipo (0 − 1/(2·0.1))² = 25; hinge relu(1 − 0) = 1.

    Holds for any log-probs, so a batch of several different pairs gives the same value per pair.
    """
    logps_c, logps_r = t(-3.0, -40.0, -7.5), t(-9.0, -1.0, -7.5)
    out = adpo_loss(logps_c, logps_r, logps_c.clone(), logps_r.clone(), beta=0.1, loss_type=loss_type)
    torch.testing.assert_close(out.losses, torch.full((3,), expected, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.all(out.chosen_rewards == 0) and torch.all(out.rejected_rewards == 0)


def test_label_smoothing_closed_form() -> None:
    """ε = 0.2, βh = 0.15: L = 0.8·log(1 + e^−0.15) + 0.2·log(1 + e^0.15). Since log(1 + eˣ) − log(1 + e⁻ˣ) = x,
    this is log(1 + e^−0.15) + 0.2·0.15 ≈ 0.6209570 + 0.03 = 0.6509570."""
    out = adpo_loss(t(PC), t(PR), t(RC), t(RR), beta=0.1, label_smoothing=0.2)
    expected = 0.8 * softplus(-0.15) + 0.2 * softplus(0.15)
    assert out.losses.item() == pytest.approx(expected, abs=1e-12)
    assert out.losses.item() == pytest.approx(0.6509570, abs=1e-7)


def test_label_smoothing_symmetry() -> None:
    """L_ε(h) = −(1−ε)log σ(βh) − ε log σ(−βh), so swapping the sides (h → −h) equals flipping ε → 1−ε,
    and at ε = ½ the loss is even in h: L(h) = L(−h), with zero gradient at h = 0."""
    for eps in (0.0, 0.1, 0.3):
        a = adpo_loss(t(PC), t(PR), t(RC), t(RR), label_smoothing=eps).losses
        b = adpo_loss(t(PR), t(PC), t(RR), t(RC), label_smoothing=1 - eps).losses
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    half = adpo_loss(t(PC), t(PR), t(RC), t(RR), label_smoothing=0.5).losses
    swapped = adpo_loss(t(PR), t(PC), t(RR), t(RC), label_smoothing=0.5).losses
    torch.testing.assert_close(half, swapped, rtol=0, atol=1e-12)
    pc = t(-5.0, grad=True)
    adpo_loss(pc, t(-5.0), t(-5.0), t(-5.0), label_smoothing=0.5).losses.sum().backward()
    assert pc.grad.item() == pytest.approx(0.0, abs=1e-12)


def test_ipo_closed_form() -> None:
    """β = 0.1: 1/(2β) = 5, so L = (1.5 − 5)² = 12.25; β = 0.5: (1.5 − 1)² = 0.25."""
    assert adpo_loss(t(PC), t(PR), t(RC), t(RR), beta=0.1, loss_type="ipo").losses.item() == pytest.approx(12.25)
    assert adpo_loss(t(PC), t(PR), t(RC), t(RR), beta=0.5, loss_type="ipo").losses.item() == pytest.approx(0.25)


def test_hinge_closed_form() -> None:
    """β = 0.1: relu(1 − 0.15) = 0.85; β = 1: relu(1 − 1.5) = 0 (the pair is past the margin)."""
    assert adpo_loss(t(PC), t(PR), t(RC), t(RR), beta=0.1, loss_type="hinge").losses.item() == pytest.approx(0.85)
    assert adpo_loss(t(PC), t(PR), t(RC), t(RR), beta=1.0, loss_type="hinge").losses.item() == 0.0


def test_reference_free_closed_form() -> None:
    """No reference: h = −10 − (−12) = 2, L = log(1 + e^−0.2); rewards are β·log πθ: −1 and −1.2."""
    out = adpo_loss(t(PC), t(PR), None, None, beta=0.1)
    assert out.losses.item() == pytest.approx(softplus(-0.2), abs=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(-1.0)
    assert out.rejected_rewards.item() == pytest.approx(-1.2)


def test_dpop_penalty_zero_while_policy_chosen_at_or_above_reference() -> None:
    """log πθ(y|x_w) = −10 ≥ −11 = log π_ref(y|x_w): max(0, −11 + 10) = 0, so A-DPOP = plain sigmoid for any λ.
    Equality (−11 vs −11) is the boundary and also gives 0."""
    plain = adpo_loss(t(PC), t(PR), t(RC), t(RR)).losses
    for lam in (0.5, 5.0, 50.0):
        torch.testing.assert_close(adpo_loss(t(PC), t(PR), t(RC), t(RR), dpop_lambda=lam).losses, plain,
                                   rtol=0, atol=0)
    at = adpo_loss(t(RC), t(PR), t(RC), t(RR), dpop_lambda=5.0).losses
    torch.testing.assert_close(at, adpo_loss(t(RC), t(PR), t(RC), t(RR)).losses, rtol=0, atol=0)


def test_dpop_penalty_closed_form_and_gradient() -> None:
    """log πθ(y|x_w) = −12 < −11 = log π_ref(y|x_w); log πθ(y|x_l) = −14, log π_ref(y|x_l) = −13.5.

    h = (−12 + 14) − (−11 + 13.5) = −0.5; penalty max(0, −11 + 12) = 1; λ = 5: h' = −0.5 − 5 = −5.5;
    L = −log σ(0.1·−5.5) = log(1 + e^0.55) ≈ 1.0054925.
    dL/d log πθ(y|x_w) = −β(1 + λ)σ(−βh') = −0.6·σ(0.55) (plain DPO: −0.1·σ(0.05)): the penalty pushes harder.
    """
    pc = t(-12.0, grad=True)
    out = adpo_loss(pc, t(-14.0), t(-11.0), t(-13.5), beta=0.1, dpop_lambda=5.0)
    assert out.losses.item() == pytest.approx(softplus(0.55), abs=1e-12)
    assert out.losses.item() == pytest.approx(1.0054925, abs=1e-7)
    out.losses.sum().backward()
    sigmoid = 1 / (1 + math.exp(-0.55))
    assert pc.grad.item() == pytest.approx(-0.6 * sigmoid, abs=1e-12)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_gradient_signs(loss_type: str) -> None:
    """Every loss raises log πθ(y|x_w) and lowers log πθ(y|x_l) (h = 1.5 is inside each loss's active region:
    ipo target 1/(2β) = 5 > 1.5, hinge βh = 0.15 < 1). For sigmoid the value is closed-form:
    dL/d log πθ(y|x_w) = −β σ(−βh) = −0.1·σ(−0.15), and the reverse for x_l."""
    pc, pr = t(PC, grad=True), t(PR, grad=True)
    adpo_loss(pc, pr, t(RC), t(RR), beta=0.1, loss_type=loss_type).losses.sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()
    assert pc.grad.item() == pytest.approx(-pr.grad.item(), abs=1e-12)
    if loss_type == "sigmoid":
        assert pc.grad.item() == pytest.approx(-0.1 / (1 + math.exp(0.15)), abs=1e-12)


def test_loss_argument_errors() -> None:
    with pytest.raises(ValueError, match="sigmoid"):
        adpo_loss(t(PC), t(PR), t(RC), t(RR), loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="sigmoid"):
        adpo_loss(t(PC), t(PR), t(RC), t(RR), loss_type="hinge", dpop_lambda=1.0)
    with pytest.raises(ValueError, match="reference"):
        adpo_loss(t(PC), t(PR), None, None, dpop_lambda=1.0)
    with pytest.raises(ValueError, match="both"):
        adpo_loss(t(PC), t(PR), t(RC), None)
    with pytest.raises(ValueError, match="Unknown loss_type"):
        adpo_loss(t(PC), t(PR), t(RC), t(RR), loss_type="kto")


def test_trainer_ipo_uses_per_token_means_and_sigmoid_sums(tmp_path) -> None:
    """sums (−10, −12), ref sums (−11, −11.5), 5 and 4 response tokens → means (−2, −3) and (−2.2, −2.875):
    ipo h = (−2 + 3) − (−2.2 + 2.875) = 0.325, L = (0.325 − 5)² = 21.855625; sigmoid keeps the sums (h = 1.5)."""
    pc, pr = ResponseLogps(t(PC), torch.tensor([5])), ResponseLogps(t(PR), torch.tensor([4]))
    rc, rr = ResponseLogps(t(RC), torch.tensor([5])), ResponseLogps(t(RR), torch.tensor([4]))
    ipo = SimpleNamespace(args=ADPOConfig(output_dir=str(tmp_path), loss_type="ipo", report_to=[]))
    losses, metrics = ADPOTrainer.pair_loss(ipo, pc, pr, rc, rr)
    assert losses.item() == pytest.approx(21.855625, abs=1e-12)
    assert metrics["logps/chosen"].item() == PC  # the logged log-probs stay sums
    sig = SimpleNamespace(args=ADPOConfig(output_dir=str(tmp_path), report_to=[]))
    losses, _ = ADPOTrainer.pair_loss(sig, pc, pr, rc, rr)
    assert losses.item() == pytest.approx(softplus(-0.15), abs=1e-12)


def test_multitask_loss_closed_form() -> None:
    """λ = 0.3: 0.3·mean(1, 3) + 0.7·mean(2, 6) = 0.6 + 2.8 = 3.4; λ = 1 and 0 return one term exactly."""
    dpo, adpo = t(1.0, 3.0), t(2.0, 6.0)
    assert multitask_loss(dpo, adpo, 0.3).item() == pytest.approx(3.4, abs=1e-12)
    assert multitask_loss(dpo, adpo, 1.0).item() == 2.0
    assert multitask_loss(dpo, adpo, 0.0).item() == 4.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        multitask_loss(dpo, adpo, 1.5)


def test_config_checks(tmp_path) -> None:
    with pytest.raises(ValueError, match="multitask_weight"):
        ADPOConfig(output_dir=str(tmp_path), multitask_weight=1.2)
    with pytest.raises(ValueError, match="reference_free"):
        ADPOConfig(output_dir=str(tmp_path), precompute_ref_log_probs=True, reference_free=True)
    with pytest.raises(ValueError, match="label_smoothing"):
        ADPOConfig(output_dir=str(tmp_path), loss_type="hinge", label_smoothing=0.1)


# ---------------------------------------------------------------------------------------------- multitask
def text_rows() -> list[dict]:
    rows = [
        {"response": "This is a red apple.", "chosen": "Describe the red fruit.", "rejected": "Describe the fruit.",
         "prompt": "What fruit is shown?", "chosen_response": "A red apple.", "rejected_response": "A blue star."},
        {"response": "The shape is a blue square.", "chosen": "What blue shape is it?", "rejected": "What is it?",
         "prompt": "Which shape?", "chosen_response": "A square.",
         "rejected_response": "There are two green triangles and one yellow star."},
        {"response": "Three.", "chosen": "How many shapes are there?", "rejected": "Say a number.",
         "prompt": "Count the shapes.", "chosen_response": "Three.", "rejected_response": "Nine hundred."},
    ]
    return [{**row, ROW_ID: i} for i, row in enumerate(rows)]


def image_rows() -> list[dict]:
    rows = counterfactual_rows(3, seed=3)
    for i, row in enumerate(rows):
        row.update({ROW_ID: i, "prompt": "Describe the picture.", "prompt_images": row["chosen_images"],
                    "chosen_response": row["response"], "rejected_response": "A purple star."})
    rows[2]["prompt_images"] = []  # a text-only DPO prompt in a multimodal batch
    return rows


def full_logits_logps(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Textbook log π(y|x): full-vocabulary logits, log-softmax, shifted labels, summed over response tokens."""
    inputs = {k: v for k, v in batch.items() if k not in (RESPONSE_MASK, ROW_IDS)}
    logits = model(**inputs).logits[:, :-1].float()
    labels = batch["input_ids"][:, 1:]
    per_token = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    return (per_token * batch[RESPONSE_MASK][:, 1:]).sum(1)


def grads(model: torch.nn.Module, loss: torch.Tensor) -> torch.Tensor:
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("kind", ["text", "image"])
def test_multitask_extremes_equal_dpo_and_adpo(kind: str, tiny_llama, tiny_idefics3, tmp_path) -> None:
    """λ = 1 gives plain DPO (−log σ(β h_DPO) from textbook full-logit log-probs of the rows' standard pairs) and
    λ = 0 gives plain A-DPO (the trainer without --multitask_weight), losses and gradients, from one forward
    over all 4B sequences; λ = ½ is the average of the two logged terms."""
    path, rows, multimodal = (tiny_llama, text_rows(), False) if kind == "text" else (tiny_idefics3, image_rows(), True)
    torch.manual_seed(0)
    model, processor = load_model_and_processor(ModelArguments(model_name_or_path=str(path)))
    ref = load_reference(ModelArguments(model_name_or_path=str(path)), model)
    with torch.no_grad():  # move the policy off the reference so every term is non-trivial
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    multi = ADPOCollator(processor, multimodal=multimodal, multitask=True)(rows)
    plain = ADPOCollator(processor, multimodal=multimodal)(rows)
    assert multi["input_ids"].shape[0] == 4 * len(rows) and plain["input_ids"].shape[0] == 2 * len(rows)

    def trainer(weight: float | None) -> ADPOTrainer:
        args = ADPOConfig(output_dir=str(tmp_path), multitask_weight=weight, report_to=[], use_cpu=True)
        return ADPOTrainer(model=model, args=args, ref_model=ref)

    model.train()
    loss_1, metrics_1 = trainer(1.0).loss_and_metrics(model, multi)
    grad_1 = grads(model, loss_1)
    # The DPO rows of the same batch (Idefics3 lays images out per row, so pixel tensors slice the same way).
    dpo_sides = {k: v[2 * len(rows):] if v.shape[0] == 4 * len(rows) else v for k, v in multi.items()}
    with torch.no_grad():
        ref_c, ref_r = full_logits_logps(ref, dpo_sides).chunk(2)
    pol_c, pol_r = full_logits_logps(model, dpo_sides).chunk(2)
    dpo = -F.logsigmoid(0.1 * ((pol_c - pol_r) - (ref_c - ref_r))).mean()
    assert loss_1.item() == pytest.approx(dpo.item(), abs=1e-6)
    torch.testing.assert_close(grad_1, grads(model, dpo), rtol=1e-4, atol=1e-6)

    loss_0, _ = trainer(0.0).loss_and_metrics(model, multi)
    grad_0 = grads(model, loss_0)
    adpo, adpo_metrics = trainer(None).loss_and_metrics(model, plain)
    assert loss_0.item() == pytest.approx(adpo.item(), abs=1e-6)
    torch.testing.assert_close(grad_0, grads(model, adpo), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(metrics_1["adpo/rewards/margins"], adpo_metrics["rewards/margins"], rtol=0, atol=1e-6)

    half, metrics = trainer(0.5).loss_and_metrics(model, multi)
    assert half.item() == pytest.approx(0.5 * dpo.item() + 0.5 * adpo.item(), abs=1e-6)
    assert metrics["dpo/loss"].mean().item() == pytest.approx(dpo.item(), abs=1e-6)


def test_multitask_missing_fields_name_row_and_field(tiny_llama) -> None:
    from datasets import Dataset

    _, tokenizer = load_model_and_processor(ModelArguments(model_name_or_path=str(tiny_llama)))
    rows = text_rows()
    del rows[1]["rejected_response"]
    with pytest.raises(ADPODataError, match="row 1, field 'rejected_response'"):
        ADPOCollator(tokenizer, multimodal=False, multitask=True)(rows)
    with pytest.raises(ADPODataError, match="chosen_response"):
        check_multitask_columns(Dataset.from_list([{"prompt": "p", "rejected_response": "r"}]), "rows.jsonl")


def test_pipeline_wires_multitask(tiny_llama, text_jsonl, tmp_path) -> None:
    """--multitask_weight makes the CLI's collator emit 4B sequences, and rows without the DPO pair fail up front."""
    import json

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({k: v for k, v in row.items() if k != ROW_ID}) + "\n" for row in text_rows()))
    args = ADPOConfig(output_dir=str(tmp_path / "out"), multitask_weight=0.5, report_to=[], use_cpu=True)
    model_args = ModelArguments(model_name_or_path=str(tiny_llama))
    trainer, _ = build_trainer(model_args, DataArguments(dataset_name=str(path)), args)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    assert batch["input_ids"].shape[0] == 8
    loss, metrics = trainer.loss_and_metrics(trainer.model, batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # policy == reference: both terms are log 2
    assert {"dpo/rewards/accuracies", "adpo/logps/accuracies", "dpo/loss"} <= set(metrics)
    with pytest.raises(ADPODataError, match="'prompt'"):
        build_trainer(model_args, DataArguments(dataset_name=str(text_jsonl)), args)
