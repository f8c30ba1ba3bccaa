"""The reference: where ``log π_ref(y|x)`` comes from, and where a frozen reference model is placed.

Placement (:func:`prepare_reference`): the policy is wrapped by ``transformers.Trainer`` (accelerate); the frozen
reference is a second model the Trainer does not know about, placed here for DDP, DeepSpeed ZeRO and FSDP.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from torch import nn

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


