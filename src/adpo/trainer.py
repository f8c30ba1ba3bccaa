"""``ADPOTrainer``: a ``transformers.Trainer`` that optimises the ADPO loss.

Each step runs one forward over the ``2B`` sequences ``[chosen; rejected]`` for the policy and, without
gradients, one for the reference; the loss is a pure function of the four log-prob vectors (:mod:`adpo.losses`).
With ``--multitask_weight`` the batch holds ``4B`` sequences (the rows' standard DPO pairs after the ADPO sides)
and the loss is ``λ·L_DPO + (1−λ)·L_ADPO``. Where the reference's log-probs come from is one object,
``trainer.reference`` (:mod:`adpo.reference`): a frozen model, the policy with adapters off, or (with
``--precompute_ref_log_probs``) columns joined to the datasets before training, after which a frozen reference
model is freed.
"""

from __future__ import annotations

import logging
import weakref
from collections import defaultdict
from typing import Any

import torch
from torch import nn
from torch.profiler import record_function
from transformers import PreTrainedModel, Trainer, TrainerCallback

from .collator import REF_COUNTS, REF_LOGPS, RESPONSE_MASK, ROW_IDS
from .compat import repair_model
from .config import ADPOConfig
from .guard import NonFiniteGuard, NonFiniteWeightsCheck
from .image_dedup import each_image_once
from .logprobs import HeadChoice, ResponseLogps, choose_lm_head, response_logps
from .losses import adpo_loss, multitask_loss
from .packing import packed_forward, padding_free_decision
from .refcache import RefLogpsTable, compute_table
from .reference import PrecomputedReference, Reference, build_reference, prepare_reference
from .rng import preserved_rng

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
        for each in (model, ref_model):  # models loaded outside adpo.modeling get the same repairs
            if each is not None:
                repair_model(each)
        super().__init__(model=model, args=args, **kwargs)
        self._metrics: dict[str, defaultdict[str, list[float]]] = {
            "train": defaultdict(list), "eval": defaultdict(list)
        }
        # --fused_lm_head: the head that scores each model ("policy", "reference"), chosen before training.
        self.lm_head: dict[str, HeadChoice] = {}
        self.add_callback(_ChooseLMHeads(self))
        self.nonfinite_guard = NonFiniteGuard(lambda: self.model)
        if self.is_deepspeed_enabled:
            logger.warning("DeepSpeed steps inside backward: a non-finite loss or gradient cannot be kept from "
                           "the weights by adpo's guard (DeepSpeed's fp16 loss scaler skips overflowing steps).")
        else:
            self.add_callback(self.nonfinite_guard)
        self.add_callback(NonFiniteWeightsCheck(lambda: self.model))  # never save NaN/inf weights
        # DDP: on the device, unwrapped; ZeRO-3 / FSDP: sharded like the policy (adpo.reference).
        placed = None if ref_model is None else prepare_reference(ref_model, self.accelerator)
        self.reference: Reference | None = build_reference(args, placed, self.model, self.data_collator,
                                                           self.accelerator, self._compute_table)
        if isinstance(self.reference, PrecomputedReference):  # join the columns, free the frozen model
            self.train_dataset, self.eval_dataset = self.reference.precompute(
                self.train_dataset, self.eval_dataset, self.accelerator)

    # ------------------------------------------------------------------ reference
    @property
    def ref_model(self) -> nn.Module | None:
        """The frozen reference model in use; None with adapters off, reference-free, or once precomputed."""
        return None if self.reference is None else self.reference.frozen_model

    def _compute_table(self, dataset: Any) -> RefLogpsTable:
        live = self.reference.live

        def batch_logps(batch: dict[str, torch.Tensor]) -> ResponseLogps:
            batch = self._prepare_inputs(batch)
            mask = batch.pop(RESPONSE_MASK)
            batch.pop(ROW_IDS)
            with self.accelerator.autocast():  # the numerics of the live reference under --bf16/--fp16
                return live.logps(self.model, batch, mask, self._logps)

        return compute_table(dataset, self.data_collator, batch_logps, self.accelerator,
                             self.args.per_device_eval_batch_size, self.args.dataloader_num_workers,
                             show_progress=not self.args.disable_tqdm)

    def reference_logps(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], mask: torch.Tensor,
        columns: dict[str, torch.Tensor] | None = None,
    ) -> ResponseLogps | None:
        """The reference's log-probs (R,) of ``inputs``; None when reference-free. ``columns``: the batch's
        precomputed ``ref_logps``/``ref_counts``."""
        if self.reference is None:
            return None
        return self.reference.logps(model, inputs, mask, self._logps, columns)

    def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
        """``Trainer.get_eval_dataloader``; with precomputed reference log-probs, over the dataset with them."""
        if self.reference is not None and not isinstance(eval_dataset, str):  # by name: joined at the start
            eval_dataset = self.reference.prepare_dataset(self.eval_dataset if eval_dataset is None else eval_dataset)
        return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset: Any) -> Any:
        """``Trainer.get_test_dataloader``; with precomputed reference log-probs, over the dataset with them."""
        if self.reference is not None:
            test_dataset = self.reference.prepare_dataset(test_dataset)
        return super().get_test_dataloader(test_dataset)

    # ------------------------------------------------------------------ LM head
    def choose_lm_heads(self, policy: nn.Module | None = None) -> dict[str, HeadChoice]:
        """Decide, without gradients, which LM head scores the policy and the frozen reference (``--fused_lm_head``),
        on one probe row of the training (else evaluation) data; store and log each choice once.

        Runs when training begins (after the Trainer wrapped the model), so step 1 already uses the chosen head:
        with the fused head it never holds ``N × V`` logits. Evaluation or precomputing outside ``train()`` decide
        on their first batch instead, also in a forward of their own without gradients."""
        models = {"policy": policy or self.model_wrapped, "reference": self.ref_model}
        for role, model in models.items():
            if model is not None and role not in self.lm_head:
                probe = self._probe_batch()
                if probe is not None:
                    self._choose_lm_head(role, model, *probe)
        return self.lm_head

    def _probe_batch(self) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
        dataset = self.train_dataset if self.train_dataset is not None else self.eval_dataset
        if isinstance(dataset, dict):
            dataset = next(iter(dataset.values()), None)
        if dataset is None or len(dataset) == 0:
            return None
        batch = self._prepare_inputs(self.data_collator([dataset[0]]))
        for key in (ROW_IDS, REF_LOGPS, REF_COUNTS):
            batch.pop(key, None)
        return batch, batch.pop(RESPONSE_MASK)

    def _choose_lm_head(
        self, role: str, model: nn.Module, inputs: dict[str, torch.Tensor], mask: torch.Tensor
    ) -> HeadChoice:
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        # The numerics of the steps to come (autocast); a probe in train mode draws dropout masks: not from the run's
        # random-number streams.
        with self.compute_loss_context_manager(), preserved_rng():
            choice = choose_lm_head(model, head, inputs, mask, self.args.fused_lm_head)
        self.lm_head[role] = choice
        logger.info("LM head of the %s: %s", role, choice.describe())
        return choice

    # ------------------------------------------------------------------ log-probs
    def _logps(self, model: nn.Module, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> ResponseLogps:
        role = "reference" if model is self.ref_model else "policy"  # adapters off: the policy's own head
        unwrapped = self.accelerator.unwrap_model(model)
        head = unwrapped.get_output_embeddings()
        with each_image_once(unwrapped, self.args.deduplicate_images):  # adpo.image_dedup
            if padding_free_decision(unwrapped, inputs, self.args.padding_free, self.args.gradient_checkpointing):
                with packed_forward(unwrapped, inputs, mask) as packed:  # adpo.packing
                    choice = self.lm_head.get(role) or self._choose_lm_head(role, model, packed.inputs,
                                                                             packed.response_mask)
                    return response_logps(model, head, packed.inputs, packed.response_mask, fused=choice.fused,
                                          sequence_ids=packed.sequence_ids, num_sequences=mask.shape[0])
            choice = self.lm_head.get(role) or self._choose_lm_head(role, model, inputs, mask)
            return response_logps(model, head, inputs, mask, fused=choice.fused)

    # ------------------------------------------------------------------ loss
    def training_step(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """The usual step; its loss and row ids go to the non-finite guard, which may skip the optimizer step."""
        row_ids = inputs.get(ROW_IDS)
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.nonfinite_guard.record(loss, row_ids)
        return loss

    def loss_and_metrics(
        self, model: nn.Module, inputs: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The batch's loss and its per-pair metrics (B,) each.

        Without ``multitask_weight`` the batch is ``[chosen; rejected]`` (2B rows) and the loss the mean ADPO
        loss; with it, ``[chosen; rejected; dpo chosen; dpo rejected]`` (4B rows), ``λ·L_DPO + (1−λ)·L_ADPO``, and
        every metric comes twice, as ``adpo/...`` and ``dpo/...``.
        """
        inputs = dict(inputs)
        mask = inputs.pop(RESPONSE_MASK)
        inputs.pop(ROW_IDS, None)
        columns = {key: inputs.pop(key) for key in (REF_LOGPS, REF_COUNTS) if key in inputs}
        # Named ranges for torch.profiler traces (negligible cost when no profiler runs).
        with record_function("adpo.reference_logps"):
            ref = self.reference_logps(model, inputs, mask, columns)
        with record_function("adpo.policy_logps"):
            policy = self._logps(model, inputs, mask)
        weight = self.args.multitask_weight
        groups = 2 if weight is None else 4
        pol = _split(policy, groups)
        refs = _split(ref, groups) if ref is not None else [None] * groups
        adpo_losses, adpo_metrics = self.pair_loss(pol[0], pol[1], refs[0], refs[1])
        if weight is None:
            return adpo_losses.mean(), adpo_metrics
        dpo_losses, dpo_metrics = self.pair_loss(pol[2], pol[3], refs[2], refs[3])
        metrics = {
            "adpo/loss": adpo_losses.detach(),
            "dpo/loss": dpo_losses.detach(),
            **{f"adpo/{key}": value for key, value in adpo_metrics.items()},
            **{f"dpo/{key}": value for key, value in dpo_metrics.items()},
        }
        return multitask_loss(dpo_losses, adpo_losses, weight), metrics

    def pair_loss(
        self,
        policy_c: ResponseLogps,
        policy_r: ResponseLogps,
        ref_c: ResponseLogps | None,
        ref_r: ResponseLogps | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-pair losses (B,) and metrics of one preference between two sides, each (B,) log-probs."""
        average = self.args.loss_type == "ipo"  # IPO compares per-token averages

        def pick(logps: ResponseLogps | None) -> torch.Tensor | None:
            return None if logps is None else (logps.means if average else logps.sums)

        out = adpo_loss(
            pick(policy_c), pick(policy_r), pick(ref_c), pick(ref_r),
            beta=self.args.beta, loss_type=self.args.loss_type,
            label_smoothing=self.args.label_smoothing, dpop_lambda=self.args.dpop_lambda,
        )
        sums_c, sums_r = policy_c.sums.detach(), policy_r.sums.detach()
        metrics = {
            "rewards/chosen": out.chosen_rewards,
            "rewards/rejected": out.rejected_rewards,
            "rewards/margins": out.chosen_rewards - out.rejected_rewards,
            "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float(),
            "logps/chosen": sums_c,
            "logps/rejected": sums_r,
            "logps/accuracies": (sums_c > sums_r).float(),
        }
        return out.losses, metrics

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
        """Gather the per-pair metrics of all processes in one collective and one device sync."""
        pairs = max(v.numel() for v in metrics.values())
        table = torch.stack([v.detach().float().reshape(-1).expand(pairs) for v in metrics.values()], dim=1)
        means = self.accelerator.gather_for_metrics(table).mean(0).tolist()  # (B·processes, K) → (K,)
        for key, value in zip(metrics, means, strict=True):
            self._metrics[mode][key].append(value)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the metrics averaged since the last log (``eval_``-prefixed during evaluation)."""
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        stored = self._metrics[mode]
        logs = {**logs, **{prefix + key: sum(values) / len(values) for key, values in stored.items() if values}}
        stored.clear()
        super().log(logs, start_time)


def _split(logps: ResponseLogps, groups: int) -> list[ResponseLogps]:
    """(G·B,) → G × (B,) along dim 0, in batch order."""
    return [ResponseLogps(s, c) for s, c in zip(logps.sums.chunk(groups), logps.counts.chunk(groups), strict=True)]


class _ChooseLMHeads(TrainerCallback):
    """Choose the LM heads when training begins: the model is wrapped (DDP, DeepSpeed, FSDP), no step has run."""

    def __init__(self, trainer: ADPOTrainer) -> None:
        self.trainer = weakref.ref(trainer)  # no cycle: the trainer (and its models) go when unreachable

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self.trainer()
        if trainer is not None:
            trainer.choose_lm_heads()
