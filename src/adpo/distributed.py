"""Multi-process training: DeepSpeed configs given as YAML, the reference model under DDP / ZeRO / FSDP,
vision-tower calls that match across ranks, and a clean teardown.

The policy itself is wrapped by ``transformers.Trainer`` (accelerate); this module only handles what the Trainer
does not know about: our second (frozen) model and the rule ZeRO-3 imposes on every rank's forward.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

logger = logging.getLogger(__name__)

# Processor outputs that describe text, not images: never part of a dummy image's inputs.
_TEXT_KEYS = {"input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids", "cross_attention_mask"}


# ---------------------------------------------------------------------------------------------- DeepSpeed config
def load_deepspeed_config(value: str | dict | None) -> str | dict | None:
    """``--deepspeed``: a ``.yaml``/``.yml`` file becomes a dict; JSON paths and dicts pass through unchanged.

    ``transformers`` reads only JSON there, while the seed's recipes pass ``configs/deepspeed_zero3.yaml``.
    """
    if not isinstance(value, str) or Path(value).suffix.lower() not in (".yaml", ".yml"):
        return value
    try:
        config = yaml.safe_load(Path(value).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"--deepspeed {value}: cannot read it as YAML: {err}") from None
    if not isinstance(config, dict) or "zero_optimization" not in config:
        raise ValueError(f"--deepspeed {value}: expected a DeepSpeed config mapping with a zero_optimization "
                         "section (see configs/deepspeed_zero3.yaml).")
    return config


def prepare_deepspeed_launch(args: Any) -> None:
    """Make ``--deepspeed`` work however the script was started; call before ``TrainingArguments`` sets up devices.

    - Plain ``python train_adpo_multimodal.py --deepspeed ...`` (the seed's recipe): DeepSpeed would look for MPI
      to find its peers; we declare a world of one process instead (several GPUs need a launcher: torchrun,
      ``deepspeed`` or ``accelerate launch``).
    - Several CPU processes (tests, CPU-only machines): accelerate finds no backend for DeepSpeed there and
      silently counts each process as a world of one (every rank would train alone on all the data). We set up
      the process state over gloo first and tell ``TrainingArguments`` to use it.
    """
    if not args.deepspeed:
        return
    if "WORLD_SIZE" not in os.environ:
        defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(_free_port())}
        for key, value in defaults.items():
            os.environ.setdefault(key, value)
        logger.info("DeepSpeed in a single process; launch with torchrun, deepspeed or accelerate launch for more")
        return
    if args.use_cpu or torch.cuda.is_available() or int(os.environ["WORLD_SIZE"]) < 2:
        return
    if args.accelerator_config is not None and not isinstance(args.accelerator_config, dict):
        return  # the user configured the accelerator from a file: leave it alone
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo", timeout=args.ddp_timeout_delta)
    args.accelerator_config = {**(args.accelerator_config or {}), "use_configured_state": True}
    logger.info("DeepSpeed on CPU: %d processes over gloo", PartialState().num_processes)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


# ---------------------------------------------------------------------------------------------- reference model
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


# ---------------------------------------------------------------------------------------------- vision tower
def dummy_image_inputs(processor: Any) -> dict[str, torch.Tensor]:
    """Image inputs for one small blank image, in the layout the model's processor produces.

    Used to call the vision tower on a rank whose batch has no image (see :func:`vision_tower_every_forward`).
    """
    from PIL import Image

    token = getattr(processor, "image_token", None) or "<image>"
    encoded = processor(text=[f"{token} ."], images=[[Image.new("RGB", (32, 32), (127, 127, 127))]],
                        return_tensors="pt")
    return {k: v for k, v in dict(encoded).items() if k not in _TEXT_KEYS and isinstance(v, torch.Tensor)}


def _float_tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            yield value
    elif isinstance(value, dict):  # ModelOutput is a dict
        for item in value.values():
            yield from _float_tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _float_tensors(item)


def zero_image_term(model: nn.Module, image_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Run ``model.get_image_features`` (vision tower + projector) and return an exact scalar 0 tied to it.

    Adding it to any activation changes no value (x + 0.0 == x) but puts the vision tower in this forward and
    backward, with zero gradients.
    """
    accepted = inspect.signature(model.get_image_features).parameters
    device = next(model.parameters()).device
    kwargs = {k: v.to(device) for k, v in image_inputs.items() if k in accepted}
    outputs = model.get_image_features(**kwargs)
    # Multiply before summing: 0 * x is exactly 0 for finite x, while a half-precision sum could overflow.
    return sum((t * 0).sum() for t in _float_tensors(outputs))


@contextmanager
def vision_tower_every_forward(
    model: nn.Module, inputs: dict[str, Any], image_inputs: dict[str, torch.Tensor] | None
) -> Iterator[None]:
    """Make a forward on a batch without images still call the vision tower once (ZeRO-3, DeepSpeed #7170).

    ZeRO-3 gathers each module's weights with collectives as the module runs, so every rank must run the same
    modules in the same order; a rank whose batch holds no image would skip the vision tower and the others would
    wait for it forever. Image-text models embed the text tokens, then run the vision tower and merge its
    features into those embeddings; so right after the token embedding runs, a hook runs the vision tower on a
    dummy image and adds an exact zero tied to its output. Log-probs are unchanged bit for bit.

    ``model`` is the unwrapped model (a ``PreTrainedModel`` or a ``PeftModel``). Does nothing when the batch has
    images, when ``image_inputs`` is None, or when the model has no ``get_image_features`` (text-only models).
    """
    if image_inputs is None or "pixel_values" in inputs or not hasattr(model, "get_image_features"):
        yield
        return
    embedding = model.get_input_embeddings()
    calls = 0

    def add_zero(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls > 1:  # once per forward, like the real vision tower
            return output
        return output + zero_image_term(model, image_inputs).to(output.dtype)

    handle = embedding.register_forward_hook(add_zero)
    try:
        yield
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------- teardown
def destroy_process_group() -> None:
    """Tear the process group down after the last collective, so no process aborts (or warns) at exit.

    Call it once the trainer is unreachable: wrappers such as DDP hold the group, and a gloo group first freed during
    interpreter shutdown can abort the process. The garbage collection here frees such holders caught in cycles.
    """
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
