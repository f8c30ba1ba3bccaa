"""``ADPOTrainer``: a ``transformers.Trainer`` that optimises the ADPO loss.

Each step runs one forward over the ``2B`` sequences ``[chosen; rejected]`` for the policy and, without
gradients, one for the reference; the loss is a pure function of the four log-prob vectors (:mod:`adpo.losses`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer

from .collator import RESPONSE_MASK, ROW_IDS
from .config import ADPOConfig
from .distributed import dummy_image_inputs, prepare_reference, vision_tower_every_forward
from .logprobs import ResponseLogps, response_logps
from .losses import adpo_loss

logger = logging.getLogger(__name__)


class ADPOTrainer(Trainer):
    """Trainer for Abductive DPO.

    Args:
        model: the policy (a ``PreTrainedModel``, or a ``PeftModel`` whose disabled adapters give the reference).
        args: an :class:`~adpo.config.ADPOConfig`.
        ref_model: the frozen reference, or None for PEFT (adapters disabled) or ``reference_free``.
        **kwargs: passed to ``transformers.Trainer`` (``data_collator``, ``train_dataset``, ``processing_class``...).
    """

    # Our loss is a per-batch mean: the Trainer divides it by the gradient accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self, model: nn.Module, args: ADPOConfig, ref_model: PreTrainedModel | None = None, **kwargs: Any
    ) -> None:
        if ref_model is None and not args.reference_free and not hasattr(model, "disable_adapter"):
            raise ValueError("ADPOTrainer needs a ref_model, a PEFT model (adapters off = reference) or "
                             "reference_free=True.")
        super().__init__(model=model, args=args, **kwargs)
        self._metrics: dict[str, defaultdict[str, list[float]]] = {
            "train": defaultdict(list), "eval": defaultdict(list)
        }
        self.ref_model = None if ref_model is None else self._prepare_reference(ref_model)
        self._dummy_images: dict[str, torch.Tensor] | None = None

    def _prepare_reference(self, ref_model: PreTrainedModel) -> nn.Module:
        # DDP: on the device, unwrapped; ZeRO-3 / FSDP: sharded like the policy (adpo.distributed).
        return prepare_reference(ref_model, self.accelerator)

    # ------------------------------------------------------------------ log-probs
    def _logps(self, model: nn.Module, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> ResponseLogps:
        unwrapped = self.accelerator.unwrap_model(model)
        with vision_tower_every_forward(unwrapped, inputs, self._image_placeholder()):
            return response_logps(model, unwrapped.get_output_embeddings(), inputs, mask)

    def _image_placeholder(self) -> dict[str, torch.Tensor] | None:
        """A dummy image's inputs in multi-process multimodal runs (every rank must run the vision tower)."""
        if self.args.world_size == 1 or not getattr(self.data_collator, "multimodal", False):
            return None
        if self._dummy_images is None:
            self._dummy_images = dummy_image_inputs(self.processing_class)
        return self._dummy_images

    @torch.no_grad()
    def reference_logps(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], mask: torch.Tensor
    ) -> ResponseLogps | None:
        """The reference's log-probs: the frozen model, or the policy with adapters off (in eval mode)."""
        if self.args.reference_free:
            return None
        if self.ref_model is not None:
            return self._logps(self.ref_model, inputs, mask)
        unwrapped = self.accelerator.unwrap_model(model)
        was_training = unwrapped.training
        unwrapped.eval()  # the reference is deterministic: no dropout
        try:
            with unwrapped.disable_adapter():
                return self._logps(model, inputs, mask)
        finally:
            unwrapped.train(was_training)

    # ------------------------------------------------------------------ loss
    def loss_and_metrics(
        self, model: nn.Module, inputs: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The batch's mean ADPO loss and its per-pair metrics (B,) each."""
        inputs = dict(inputs)
        mask = inputs.pop(RESPONSE_MASK)
        inputs.pop(ROW_IDS, None)
        ref = self.reference_logps(model, inputs, mask)
        policy = self._logps(model, inputs, mask)
        average = self.args.loss_type == "ipo"  # IPO compares per-token averages
        policy_c, policy_r = (policy.means if average else policy.sums).chunk(2)
        ref_c, ref_r = (ref.means if average else ref.sums).chunk(2) if ref is not None else (None, None)
        out = adpo_loss(
            policy_c, policy_r, ref_c, ref_r,
            beta=self.args.beta, loss_type=self.args.loss_type,
            label_smoothing=self.args.label_smoothing, dpop_lambda=self.args.dpop_lambda,
        )
        sums_c, sums_r = policy.sums.detach().chunk(2)
        metrics = {
            "rewards/chosen": out.chosen_rewards,
            "rewards/rejected": out.rejected_rewards,
            "rewards/margins": out.chosen_rewards - out.rejected_rewards,
            "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float(),
            "logps/chosen": sums_c,
            "logps/rejected": sums_r,
            "logps/accuracies": (sums_c > sums_r).float(),
        }
        return out.losses.mean(), metrics

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, metrics = self.loss_and_metrics(model, inputs)
        self._store(metrics, "train" if model.training else "eval")
        return (loss, metrics) if return_outputs else loss

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor, None, None]:
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, metrics = self.loss_and_metrics(model, inputs)
        self._store(metrics, "eval")
        return loss.detach(), None, None

    # ------------------------------------------------------------------ metrics
    def _store(self, metrics: dict[str, torch.Tensor], mode: str) -> None:
        for key, value in metrics.items():
            self._metrics[mode][key].append(self.accelerator.gather_for_metrics(value).float().mean().item())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the metrics averaged since the last log (``eval_``-prefixed during evaluation)."""
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        stored = self._metrics[mode]
        logs = {**logs, **{prefix + key: sum(values) / len(values) for key, values in stored.items() if values}}
        stored.clear()
        super().log(logs, start_time)
