"""The reference: where ``log π_ref(y|x)`` comes from, behind one interface, and where a frozen reference model
is placed.

One of (``reference.logps(policy, inputs, mask, score)`` for each):

- :class:`LiveReference` with a model: a frozen copy of the initial model (or ``--ref_model_name_or_path``);
- :class:`LiveReference` without one: the PEFT policy with its adapters disabled;
- :class:`PrecomputedReference` (``--precompute_ref_log_probs``): computed once per dataset with a live reference,
  cached on disk (:mod:`adpo.refcache`) and joined to the dataset as columns that the collator passes on;
- none with ``--reference_free``.

Placement (:func:`prepare_reference`): the policy is wrapped by ``transformers.Trainer`` (accelerate); the frozen
reference is a second model the Trainer does not know about, placed here for DDP, DeepSpeed ZeRO and FSDP.
"""

from __future__ import annotations

import copy
import gc
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .collator import REF_COUNTS, REF_COUNTS_COLUMN, REF_LOGPS, REF_LOGPS_COLUMN
from .logprobs import ResponseLogps
from .refcache import ReferenceCache, RefLogpsTable

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- placement
def hidden_size_of(config: Any) -> int | None:
    """The model's hidden size, looking inside ``text_config`` for image-text models (as transformers does)."""
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is None:
            continue
        if getattr(cfg, "hidden_sizes", None):
            return max(cfg.hidden_sizes)
        if getattr(cfg, "hidden_size", None):
            return cfg.hidden_size
    return None


def reference_deepspeed_config(train_config: dict, hidden_size: int | None) -> dict:
    """The DeepSpeed config for the frozen reference, derived from the training one.

    ZeRO-3 shards the reference like the policy; below stage 3 the reference is replicated (stage 0), since only
    optimizer state and gradients would be sharded and it has neither. Optimizer and scheduler sections are
    dropped (nothing is trained), and "auto" bucket sizes that the Trainer fills only later for the policy are
    filled here from the hidden size.
    """
    config = copy.deepcopy(train_config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage", 0) != 3:
        zero["stage"] = 0
    size = hidden_size or 1024
    fills = {
        "reduce_bucket_size": size * size,
        "stage3_prefetch_bucket_size": int(0.9 * size * size),
        "stage3_param_persistence_threshold": 10 * size,
    }
    for key, fill in fills.items():
        if zero.get(key) == "auto":
            zero[key] = fill
    return config


def prepare_reference(ref_model: nn.Module, accelerator: Any) -> nn.Module:
    """Place the frozen reference for the run's distributed setup (eval mode, no gradients).

    - DeepSpeed: its own inference engine from :func:`reference_deepspeed_config` (ZeRO-3: sharded).
    - FSDP: sharded like the policy (FSDP1 wrapper or FSDP2 ``fully_shard``), so no rank holds it whole.
    - DDP / one process: moved to the device, not wrapped (it has no gradients to all-reduce).
    """
    from accelerate.utils import DistributedType

    ref_model.eval()
    ref_model.requires_grad_(False)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        import deepspeed

        config = reference_deepspeed_config(
            accelerator.state.deepspeed_plugin.deepspeed_config, hidden_size_of(getattr(ref_model, "config", None))
        )
        engine, *_ = deepspeed.initialize(model=ref_model, config=config)
        engine.eval()
        return engine
    if accelerator.distributed_type == DistributedType.FSDP:
        return _prepare_fsdp_reference(ref_model, accelerator)
    return accelerator.prepare_model(ref_model, evaluation_mode=True)


def _prepare_fsdp_reference(ref_model: nn.Module, accelerator: Any) -> nn.Module:
    if accelerator.is_fsdp2:
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        model = fsdp2_prepare_model(accelerator, ref_model)
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel

        plugin = accelerator.state.fsdp_plugin
        plugin.set_auto_wrap_policy(ref_model)
        model = FullyShardedDataParallel(
            ref_model,
            sharding_strategy=plugin.sharding_strategy or plugin.reshard_after_forward,
            cpu_offload=plugin.cpu_offload,
            auto_wrap_policy=plugin.auto_wrap_policy,
            mixed_precision=plugin.mixed_precision_policy,
            sync_module_states=plugin.sync_module_states,
            use_orig_params=plugin.use_orig_params,
            limit_all_gathers=plugin.limit_all_gathers,
            device_id=accelerator.device,
        )
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------- the reference
# (model, inputs, (R, L) response mask) → (R,) log-probs: the trainer's scorer (its LM-head choice, packing).
Score = Callable[[nn.Module, dict[str, torch.Tensor], torch.Tensor], ResponseLogps]


class LiveReference:
    """The reference computed on every batch: a frozen model, or the policy with its PEFT adapters disabled.

    Args:
        model: the frozen reference, placed by :func:`prepare_reference`; None: the policy with adapters off.
        unwrap: maps a (DDP/DeepSpeed-)wrapped policy to the module whose adapters are switched off.
    """

    def __init__(self, model: nn.Module | None, unwrap: Callable[[nn.Module], nn.Module] = lambda m: m) -> None:
        self.model = model
        self.unwrap = unwrap

    @property
    def frozen_model(self) -> nn.Module | None:
        return self.model

    def prepare_dataset(self, dataset: Any) -> Any:
        """What a dataloader iterates: ``dataset`` itself (a live reference needs nothing joined)."""
        return dataset

    @torch.no_grad()
    def logps(
        self, policy: nn.Module, inputs: dict[str, torch.Tensor], mask: torch.Tensor, score: Score,
        columns: dict[str, torch.Tensor] | None = None,
    ) -> ResponseLogps:
        """(R,) reference log-probs of ``inputs`` (R, L) bool ``mask``, scored by ``score(model, inputs, mask)``
        (the trainer's scorer: its LM-head choice, packing). ``columns`` is not used."""
        if self.model is not None:
            return score(self.model, inputs, mask)
        unwrapped = self.unwrap(policy)
        was_training = unwrapped.training
        unwrapped.eval()  # the reference is deterministic: no dropout
        try:
            with unwrapped.disable_adapter():
                return score(policy, inputs, mask)
        finally:
            unwrapped.train(was_training)


class PrecomputedReference:
    """Reference log-probs computed once per dataset, before training, and joined to it as columns.

    :meth:`attach` loads a dataset's table from the disk cache (:mod:`adpo.refcache`, keyed by model, data and
    settings) or computes it with ``live``, and returns the dataset with two more columns per row,
    ``_adpo_ref_logps`` and ``_adpo_ref_counts`` (one value per side). The collator passes them on, so a step
    reads its reference log-probs from its own batch: nothing is looked up or switched at step time.
    """

    def __init__(
        self, live: LiveReference, cache: ReferenceCache, compute: Callable[[Any], RefLogpsTable]
    ) -> None:
        self.live: LiveReference | None = live
        self.cache = cache
        self.compute = compute  # dataset → its table, with the live reference (a pass over the data)
        self.cache_hits = 0  # tables loaded from disk rather than computed
        self._attached: dict[int, tuple[Any, Any]] = {}  # id(dataset) → (dataset, with columns)

    @property
    def frozen_model(self) -> nn.Module | None:
        """The frozen reference model, until :meth:`precompute` frees it."""
        return None if self.live is None else self.live.model

    def precompute(self, train: Any, evals: Any, accelerator: Any) -> tuple[Any, Any]:
        """The train dataset and the eval dataset(s) (one, a dict, or None) with their columns; then the frozen
        reference model is freed (every dataset given later needs its table on disk)."""
        if train is not None:
            train = self.attach(train)
        if isinstance(evals, dict):
            evals = {name: self.attach(data) for name, data in evals.items()}
        elif evals is not None:
            evals = self.attach(evals)
        self._free_model(accelerator)
        return train, evals

    def prepare_dataset(self, dataset: Any) -> Any:
        """What a dataloader iterates: ``dataset`` with its columns (a dict of datasets, or None: unchanged)."""
        return dataset if dataset is None or isinstance(dataset, dict) else self.attach(dataset)

    def attach(self, dataset: Any) -> Any:
        """``dataset`` with its reference columns (memoised; a dataset that has them is returned as is)."""
        if has_reference_columns(dataset):
            return dataset
        if id(dataset) in self._attached:
            return self._attached[id(dataset)][1]
        table, loaded = self.cache.load_or_compute(dataset, None if self.live is None else self.compute)
        self.cache_hits += int(loaded)
        joined = with_reference_columns(dataset, table)
        self._attached[id(dataset)] = (dataset, joined)  # the dataset stays alive, so its id stays unique
        return joined

    def _free_model(self, accelerator: Any) -> None:
        model = self.frozen_model
        if model is None:
            return  # adapters off costs nothing to keep: the policy is needed anyway
        self.live = None
        # accelerate keeps every prepared model in _models; drop ours so its memory can be released.
        accelerator._models = [m for m in accelerator._models if m is not model]
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        logger.info("reference log-probs precomputed: reference model freed")

    def logps(
        self, policy: nn.Module, inputs: dict[str, torch.Tensor], mask: torch.Tensor, score: Score,
        columns: dict[str, torch.Tensor] | None = None,
    ) -> ResponseLogps:
        """The batch's precomputed ``columns`` (``ref_logps``, ``ref_counts``: (R,) side-major like the batch)."""
        sums, counts = (columns or {}).get(REF_LOGPS), (columns or {}).get(REF_COUNTS)
        if sums is None:
            raise ValueError("--precompute_ref_log_probs: this batch has no precomputed reference log-probs; pass "
                             "every dataset to the trainer up front, or give it to trainer.reference.attach.")
        if not torch.equal(counts.to(mask.device), mask.sum(1)):
            raise RuntimeError("precomputed reference log-probs do not match this batch: their response token "
                               "counts differ, so they were computed with other data or settings.")
        return ResponseLogps(sums.to(mask.device), counts.to(mask.device))


Reference = LiveReference | PrecomputedReference


def build_reference(
    args: Any, ref_model: nn.Module | None, policy: nn.Module, collator: Any, accelerator: Any,
    compute: Callable[[Any], RefLogpsTable],
) -> Reference | None:
    """The run's reference from its config (``reference_free``, ``precompute_ref_log_probs``, ``ref_cache_dir``).

    Args:
        ref_model: the frozen reference, already placed (:func:`prepare_reference`); None: the PEFT policy with
            adapters off.
        compute: dataset → its table, one pass with the live reference (the trainer's scoring).
    """
    if args.reference_free:
        return None
    live = LiveReference(ref_model, accelerator.unwrap_model)
    if not args.precompute_ref_log_probs:
        return live
    source = accelerator.unwrap_model(ref_model if ref_model is not None else policy)
    cache = ReferenceCache(source, collator, str(accelerator.mixed_precision), accelerator, args.ref_cache_dir)
    return PrecomputedReference(live, cache, compute)


def has_reference_columns(dataset: Any) -> bool:
    return REF_LOGPS_COLUMN in (getattr(dataset, "column_names", None) or ())


def with_reference_columns(dataset: Any, table: RefLogpsTable) -> Any:
    """``dataset`` (a ``datasets.Dataset``) plus its table as two columns, row ``i`` ↔ table row ``i``."""
    if len(dataset) != table.sums.shape[0]:
        raise ValueError(f"reference table has {table.sums.shape[0]} rows for a dataset of {len(dataset)}.")
    dataset = dataset.add_column(REF_LOGPS_COLUMN, table.sums.tolist())
    return dataset.add_column(REF_COUNTS_COLUMN, table.counts.tolist())
