"""``ADPOTrainer``: a ``transformers.Trainer`` that optimises the ADPO loss.

Each step runs one forward over the ``2B`` sequences ``[chosen; rejected]`` for the policy and, without
gradients, one for the reference; the loss is a pure function of the four log-prob vectors (:mod:`adpo.losses`).
With ``--multitask_weight`` the batch holds ``4B`` sequences (the rows' standard DPO pairs after the ADPO sides)
and the loss is ``λ·L_DPO + (1−λ)·L_ADPO``. With ``--precompute_ref_log_probs`` the reference's log-probs come
from an on-disk table computed once (:mod:`adpo.refcache`) and the reference model is freed.
"""

from __future__ import annotations

import gc
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.profiler import record_function
from transformers import PreTrainedModel, Trainer

from .collator import RESPONSE_MASK, ROW_IDS
from .config import ADPOConfig
from .distributed import dummy_image_inputs, prepare_reference, vision_tower_every_forward
from .guard import NonFiniteGuard, NonFiniteWeightsCheck
from .image_dedup import each_image_once
from .logprobs import ResponseLogps, response_logps
from .losses import adpo_loss, multitask_loss
from .packing import packed_forward, padding_free_decision
from .refcache import (
    RefLogpsTable,
    cache_key,
    check_row_ids,
    compute_table,
    dataset_fingerprint,
    default_cache_dir,
    load_or_compute,
    log_prob_settings,
    model_fingerprint,
)

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
        self._dummy_images: dict[str, torch.Tensor] | None = None  # built on first use (adpo.distributed)
        self.nonfinite_guard = NonFiniteGuard(lambda: self.model)
        if self.is_deepspeed_enabled:
            logger.warning("DeepSpeed steps inside backward: a non-finite loss or gradient cannot be kept from "
                           "the weights by adpo's guard (DeepSpeed's fp16 loss scaler skips overflowing steps).")
        else:
            self.add_callback(self.nonfinite_guard)
        self.add_callback(NonFiniteWeightsCheck(lambda: self.model))  # never save NaN/inf weights
        # --precompute_ref_log_probs: tables by dataset, and the ones in use for training / evaluation.
        self._ref_tables: dict[int, tuple[Any, RefLogpsTable]] = {}
        self._active_tables: dict[str, RefLogpsTable | None] = {"train": None, "eval": None}
        self.ref_cache_hits = 0  # tables loaded from disk rather than computed (for logs and tests)
        if args.precompute_ref_log_probs:
            self._precompute_reference()

    def _prepare_reference(self, ref_model: PreTrainedModel) -> nn.Module:
        # DDP: on the device, unwrapped; ZeRO-3 / FSDP: sharded like the policy (adpo.distributed).
        return prepare_reference(ref_model, self.accelerator)

    # ------------------------------------------------------------------ log-probs
    def _logps(self, model: nn.Module, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> ResponseLogps:
        unwrapped = self.accelerator.unwrap_model(model)
        with vision_tower_every_forward(unwrapped, inputs, self._image_placeholder()), \
                each_image_once(unwrapped, self.args.deduplicate_images):  # adpo.image_dedup
            fused = None if self.args.fused_lm_head else False  # None: wherever it gives the model's log-probs
            head = unwrapped.get_output_embeddings()
            if padding_free_decision(unwrapped, inputs, self.args.padding_free, self.args.gradient_checkpointing):
                with packed_forward(unwrapped, inputs, mask) as packed:  # adpo.packing
                    return response_logps(model, head, packed.inputs, packed.response_mask, fused=fused,
                                          sequence_ids=packed.sequence_ids, num_sequences=mask.shape[0])
            return response_logps(model, head, inputs, mask, fused=fused)

    def _image_placeholder(self) -> dict[str, torch.Tensor] | None:
        """A dummy image's inputs in multi-process multimodal runs (every rank must run the vision tower)."""
        if self.args.world_size == 1 or not getattr(self.data_collator, "multimodal", False):
            return None
        if self._dummy_images is None:
            self._dummy_images = dummy_image_inputs(self.processing_class)
        return self._dummy_images

    @torch.no_grad()
    def reference_logps(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], mask: torch.Tensor,
        row_ids: torch.Tensor | None = None,
    ) -> ResponseLogps | None:
        """The reference's log-probs (R,): precomputed (looked up by ``row_ids``), the frozen model, or the policy
        with adapters off (in eval mode)."""
        if self.args.reference_free:
            return None
        table = self._active_tables["train" if model.training else "eval"]
        if table is not None:
            found = table.lookup(row_ids, mask.sum(1))
            return ResponseLogps(found.sums.to(mask.device), found.counts.to(mask.device))
        return self._live_reference_logps(model, inputs, mask)

    @torch.no_grad()
    def _live_reference_logps(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], mask: torch.Tensor
    ) -> ResponseLogps:
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
        row_ids = inputs.pop(ROW_IDS, None)
        # Named ranges for torch.profiler traces (negligible cost when no profiler runs).
        with record_function("adpo.reference_logps"):
            ref = self.reference_logps(model, inputs, mask, row_ids)
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

    # ------------------------------------------------------------------ precomputed reference
    def _precompute_reference(self) -> None:
        """Load or compute the reference tables of the train and eval datasets, then free the reference model."""
        source = self.ref_model if self.ref_model is not None else self.model
        self._ref_model_fp = model_fingerprint(self.accelerator.unwrap_model(source))
        self._ref_settings = log_prob_settings(self.data_collator, str(self.accelerator.mixed_precision))
        self._ref_cache_dir = Path(self.args.ref_cache_dir) if self.args.ref_cache_dir else default_cache_dir()
        if self.train_dataset is not None:
            self._active_tables["train"] = self._table_for(self.train_dataset)
        evals = self.eval_dataset if isinstance(self.eval_dataset, dict) else {"": self.eval_dataset}
        for dataset in evals.values():
            if dataset is not None:
                self._active_tables["eval"] = self._table_for(dataset)
        if self.ref_model is not None:
            self._free_reference()

    def _free_reference(self) -> None:
        ref = self.ref_model
        self.ref_model = None
        # accelerate keeps every prepared model in _models; drop ours so its memory can be released.
        self.accelerator._models = [m for m in self.accelerator._models if m is not ref]
        del ref
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        logger.info("reference log-probs precomputed: reference model freed")

    def _table_for(self, dataset: Any) -> RefLogpsTable:
        """The reference table of ``dataset``: memoised, else from the disk cache, else computed (and saved)."""
        if id(dataset) in self._ref_tables:
            return self._ref_tables[id(dataset)][1]
        check_row_ids(dataset)
        key = cache_key(self._ref_model_fp, dataset_fingerprint(dataset), self._ref_settings)
        path = self._ref_cache_dir / f"{key}.pt"
        if self.ref_model is None and not hasattr(self.model, "disable_adapter") and not path.exists():
            raise ValueError("--precompute_ref_log_probs: this dataset's reference log-probs are not cached and the "
                             "reference model was freed; pass every evaluation dataset to the trainer up front.")
        meta = {"rows": len(dataset), "settings": self._ref_settings, "model": self._ref_model_fp}
        table, loaded = load_or_compute(path, self.accelerator, lambda: self._compute_table(dataset), meta)
        self.ref_cache_hits += int(loaded)
        self._ref_tables[id(dataset)] = (dataset, table)  # keep the dataset alive so its id stays unique
        return table

    def _compute_table(self, dataset: Any) -> RefLogpsTable:
        def batch_logps(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ResponseLogps]:
            batch = self._prepare_inputs(batch)
            mask = batch.pop(RESPONSE_MASK)
            row_ids = batch.pop(ROW_IDS)
            with self.accelerator.autocast():  # the numerics of the live reference under --bf16/--fp16
                return row_ids, self._live_reference_logps(self.model, batch, mask)

        return compute_table(dataset, self.data_collator, batch_logps, self.accelerator,
                             self.args.per_device_eval_batch_size, self.args.dataloader_num_workers,
                             show_progress=not self.args.disable_tqdm)

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """``Trainer.evaluate``; with precomputed reference log-probs, first selects the evaluated dataset's table."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(dataset, str):  # Trainer.evaluate names one of a dict of eval datasets
            dataset = self.eval_dataset[dataset]
        if self.args.precompute_ref_log_probs and dataset is not None and not isinstance(dataset, dict):
            self._active_tables["eval"] = self._table_for(dataset)
        return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    def predict(self, test_dataset: Any, ignore_keys: list[str] | None = None,
                metric_key_prefix: str = "test") -> Any:
        """``Trainer.predict``; with precomputed reference log-probs, first selects ``test_dataset``'s table."""
        if self.args.precompute_ref_log_probs:
            self._active_tables["eval"] = self._table_for(test_dataset)
        return super().predict(test_dataset, ignore_keys, metric_key_prefix)

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
