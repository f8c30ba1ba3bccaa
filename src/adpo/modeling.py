"""Load the policy, its processor and the reference; set up LoRA by component name."""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
    PreTrainedModel,
)
from transformers.integrations import is_deepspeed_zero3_enabled

from .config import ModelArguments
from .processing import load_processor

logger = logging.getLogger(__name__)

# Component names users write → where each family keeps that component (module paths relative to the model).
# The first path that exists in a model wins, so the table is keyed on the model's structure, not its name.
# A component never includes another component nested inside it (Qwen's merger sits inside model.visual).
# Verified on transformers 5.24 for every family in adpo.testing.tiny.FAMILIES (tests/test_families.py).
COMPONENTS: dict[str, tuple[str, ...]] = {
    "vision_tower": (
        "model.vision_model",  # Idefics3 / SmolVLM, Mllama
        "model.vision_tower",  # LLaVA, LLaVA-NeXT, Gemma 3, PaliGemma
        "model.visual",  # Qwen2-VL, Qwen2.5-VL (without its merger, the mm_projector)
    ),
    "mm_projector": (
        "model.connector",  # Idefics3 / SmolVLM
        "model.multi_modal_projector",  # LLaVA, LLaVA-NeXT, Mllama (a single Linear), Gemma 3 (no Linear), PaliGemma
        "model.visual.merger",  # Qwen2-VL, Qwen2.5-VL
    ),
    "language_model": (
        "model.text_model",  # Idefics3 / SmolVLM
        "model.language_model",  # LLaVA, LLaVA-NeXT, Mllama, Qwen2-VL, Gemma 3, PaliGemma
        "model",  # text-only causal LMs (Llama, Mistral, ...): everything but the LM head
    ),
}


def is_vision_model(model_name_or_path: str, trust_remote_code: bool = False) -> bool:
    """Whether the checkpoint is an image-text model (its config has a vision part)."""
    config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    return getattr(config, "vision_config", None) is not None


def load_model_and_processor(args: ModelArguments) -> tuple[PreTrainedModel, Any]:
    """Load the policy and its processor (image-text models) or tokenizer (text-only models)."""
    if not args.model_name_or_path:
        raise ValueError("--model_name_or_path is required (a hub id or a local folder).")
    kwargs: dict[str, Any] = {"trust_remote_code": args.trust_remote_code}
    if args.dtype != "auto":
        kwargs["dtype"] = getattr(torch, args.dtype)
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    if is_vision_model(args.model_name_or_path, args.trust_remote_code):
        model = AutoModelForImageTextToText.from_pretrained(args.model_name_or_path, **kwargs)
        processor = load_processor(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, **kwargs)
        processor = AutoTokenizer.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer.pad_token is None:
        # Pad ids are masked out everywhere; any existing token will do.
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("tokenizer has no pad token; using eos %r", tokenizer.eos_token)
    return model, processor


def load_reference(args: ModelArguments, model: PreTrainedModel) -> PreTrainedModel | None:
    """The frozen reference: ``--ref_model_name_or_path``, else a copy of the initial ``model``.

    Returns None with ``--use_peft``: the reference is then the policy with its adapters disabled.
    Call before LoRA is applied, so the copy holds the initial weights.
    """
    if args.use_peft and not args.ref_model_name_or_path:
        return None
    if args.ref_model_name_or_path or is_deepspeed_zero3_enabled():
        # Under ZeRO-3 the policy's weights are already sharded at load time and cannot be deep-copied: load the
        # reference again so DeepSpeed shards it too.
        ref_args = copy.copy(args)
        ref_args.model_name_or_path = args.ref_model_name_or_path or args.model_name_or_path
        ref, _ = load_model_and_processor(ref_args)
    else:
        ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref


def component_path(model: nn.Module, name: str) -> str | None:
    """Where ``model`` keeps component ``name`` (a key of :data:`COMPONENTS`), or None if it has none."""
    module_names = {n for n, _ in model.named_modules()}
    return next((p for p in COMPONENTS[name] if p in module_names), None)


def component_modules(model: nn.Module, name: str) -> dict[str, nn.Module]:
    """The modules of component ``name`` (its root included), without other components nested inside it."""
    path = component_path(model, name)
    if path is None:
        raise ValueError(f"{type(model).__name__} has no {name} (looked for {', '.join(COMPONENTS[name])}).")
    nested = [p for other in COMPONENTS if other != name and (p := component_path(model, other))
              and p.startswith(path + ".")]
    return {n: m for n, m in model.named_modules()
            if (n == path or n.startswith(path + ".")) and not any(n == p or n.startswith(p + ".") for p in nested)}


def resolve_components(model: nn.Module, names: list[str]) -> list[str]:
    """Names of the ``nn.Linear`` modules inside the named components (see :data:`COMPONENTS`)."""
    targets: list[str] = []
    for name in names:
        targets.extend(n for n, m in component_modules(model, name).items()
                       if isinstance(m, nn.Linear) and n not in targets)
    return targets


def freeze_components(model: nn.Module, names: list[str]) -> int:
    """Stop training the named components (``--freeze_vision_tower``, ``--freeze_mm_projector``).

    Returns the number of parameters frozen.
    """
    frozen = 0
    for name in names:
        for module in component_modules(model, name).values():
            for param in module.parameters(recurse=False):
                if param.requires_grad:
                    param.requires_grad_(False)
                    frozen += param.numel()
        logger.info("froze %s (%s)", name, component_path(model, name))
    return frozen


def lora_targets(model: nn.Module, spec: str | None) -> list[str] | str:
    """Turn ``--lora_target_modules`` into PEFT's ``target_modules``.

    Component names become the Linear layers inside them, ``all-linear`` passes through (PEFT then takes Linear
    layers only, never a Conv patch embedding), anything else must be a module-name suffix present in the model.
    """
    names = _split(spec)
    if names == ["all-linear"]:
        return "all-linear"
    module_names = [n for n, _ in model.named_modules()]
    components = [n for n in names if n in COMPONENTS]
    suffixes = [n for n in names if n not in COMPONENTS]
    for suffix in suffixes:
        if not any(m == suffix or m.endswith("." + suffix) for m in module_names):
            linear_suffixes = sorted({m.rsplit(".", 1)[-1] for m, mod in model.named_modules()
                                      if isinstance(mod, nn.Linear)})
            raise ValueError(
                f"--lora_target_modules: {suffix!r} matches no module of {type(model).__name__}. Valid: "
                f"components {', '.join(c for c in COMPONENTS if component_path(model, c))}; all-linear; "
                f"or Linear-layer names {', '.join(linear_suffixes)}."
            )
    targets = resolve_components(model, components)
    for suffix in suffixes:
        targets.extend(m for m in module_names if (m == suffix or m.endswith("." + suffix)) and m not in targets)
    return targets


def lora_modules_to_save(model: nn.Module, spec: str | None) -> list[str]:
    """Named components with no Linear layer for LoRA (Gemma 3's projector): PEFT trains and saves them whole."""
    return [component_path(model, name) for name in _split(spec) if name in COMPONENTS
            and not any(isinstance(m, nn.Linear) for m in component_modules(model, name).values())]


def _split(spec: str | None) -> list[str]:
    return [n.strip() for n in (spec or "language_model").split(",") if n.strip()]


def apply_lora(model: PreTrainedModel, args: ModelArguments) -> nn.Module:
    """Wrap ``model`` with LoRA adapters per ``--lora_*``."""
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(model, args.lora_target_modules)
    to_save = lora_modules_to_save(model, args.lora_target_modules)
    if to_save:
        logger.info("%s have no Linear layer for LoRA; training them fully (saved with the adapter)", to_save)
    if not targets:
        raise ValueError(f"--lora_target_modules {args.lora_target_modules!r} selects no layer LoRA can adapt"
                         + (f" ({', '.join(to_save)} has no Linear layer)" if to_save else "")
                         + "; add another component, e.g. language_model.")
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        modules_to_save=to_save or None,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info("LoRA: %d trainable of %d parameters (%.2f%%)", trainable, total, 100 * trainable / total)
    return peft_model
