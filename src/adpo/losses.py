"""ADPO losses: pure functions of log-prob tensors.

For one response ``y`` and two prompts, chosen ``x_w`` and rejected ``x_l``:

    h = [log πθ(y|x_w) − log πθ(y|x_l)] − [log π_ref(y|x_w) − log π_ref(y|x_l)]

Every function takes per-pair log-probs of shape ``(B,)`` and returns an :class:`ADPOLossOutput` of per-pair
losses ``(B,)`` and detached rewards ``(B,)``; reduction is the caller's.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class ADPOLossOutput(NamedTuple):
    losses: torch.Tensor  # (B,) per-pair loss, differentiable
    chosen_rewards: torch.Tensor  # (B,) β(log πθ(y|x_w) − log π_ref(y|x_w)), detached
    rejected_rewards: torch.Tensor  # (B,) β(log πθ(y|x_l) − log π_ref(y|x_l)), detached


def adpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    dpop_lambda: float = 0.0,
) -> ADPOLossOutput:
    """The ADPO loss of one batch of pairs.

    The same function gives the standard DPO loss when the two "sides" are two responses to one prompt,
    ``log π(y_w|x)`` and ``log π(y_l|x)`` (the multitask objective's DPO term).

    Args:
        policy_chosen_logps: (B,) log πθ(y|x_w) (summed over response tokens; averaged for ``ipo``).
        policy_rejected_logps: (B,) log πθ(y|x_l).
        ref_chosen_logps: (B,) log π_ref(y|x_w), or None for reference-free training.
        ref_rejected_logps: (B,) log π_ref(y|x_l), or None for reference-free training.
        beta: β > 0.
        loss_type: ``sigmoid``: −(1−ε)·log σ(βh) − ε·log σ(−βh); ``ipo``: (h − 1/(2β))²;
            ``hinge``: relu(1 − βh).
        label_smoothing: ε, for ``sigmoid``.
        dpop_lambda: λ of A-DPOP, for ``sigmoid``: h' = h − λ·max(0, log π_ref(y|x_w) − log πθ(y|x_w)).
    """
    if loss_type != "sigmoid" and (label_smoothing or dpop_lambda):
        raise ValueError(f"label_smoothing and dpop_lambda apply to loss_type 'sigmoid' only, not {loss_type!r}.")
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("Give both reference log-probs or neither (reference-free).")
    if ref_chosen_logps is None:
        ref_chosen_logps = torch.zeros_like(policy_chosen_logps)
        ref_rejected_logps = torch.zeros_like(policy_rejected_logps)
        if dpop_lambda:
            raise ValueError("A-DPOP (dpop_lambda > 0) needs reference log-probs.")

    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios

    if loss_type == "sigmoid":
        if dpop_lambda:
            h = h - dpop_lambda * torch.clamp(ref_chosen_logps - policy_chosen_logps, min=0)
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"Unknown loss_type {loss_type!r}; expected one of sigmoid, ipo, hinge.")

    return ADPOLossOutput(
        losses=losses,
        chosen_rewards=(beta * chosen_logratios).detach(),
        rejected_rewards=(beta * rejected_logratios).detach(),
    )


def multitask_loss(dpo_losses: torch.Tensor, adpo_losses: torch.Tensor, weight: float) -> torch.Tensor:
    """The paper's multitask objective ``λ·mean(L_DPO) + (1−λ)·mean(L_ADPO)``, a scalar.

    Args:
        dpo_losses: (B,) per-pair DPO losses.
        adpo_losses: (B,) per-pair ADPO losses.
        weight: λ in [0, 1]; 1 is plain DPO, 0 plain A-DPO.
    """
    if not 0 <= weight <= 1:
        raise ValueError(f"multitask weight must be in [0, 1], got {weight}.")
    return weight * dpo_losses.mean() + (1 - weight) * adpo_losses.mean()
