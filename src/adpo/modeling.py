"""Load the policy, its processor and the reference; set up LoRA by component name."""

from __future__ import annotations

import copy
import logging
import weakref
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

from .compat import repair_model
from .config import LoadArguments, ModelArguments
from .processing import load_processor

logger = logging.getLogger(__name__)

# Component names users write → where each family keeps that component (module paths relative to the model).
# Each entry is one layout: a path, or a tuple of paths whose first names the component and whose others belong
# to it where the model has them. The first layout whose first path exists in a model wins, so the table is keyed
# on the model's structure, not its name. A component never includes another component nested inside it (the
# Qwen-VL and GLM-4V merger sits inside model.visual). Verified on transformers 5.24 for every family in
# adpo.testing.tiny.FAMILIES and every model type in tests/test_families.py's SUPPORTED_MODEL_TYPES.
Layout = str | tuple[str, ...]
COMPONENTS: dict[str, tuple[Layout, ...]] = {
    "vision_tower": (
        "model.vision_model",  # Idefics3 / SmolVLM / SmolVLM2, Mllama
        "model.vision_tower",  # LLaVA(-NeXT/-OneVision), Gemma 3/3n/4, PaliGemma, InternVL, Aya, Mistral 3, LFM2-VL
        "model.visual",  # Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5, GLM-4V (without the merger: the mm_projector)
        "vision_model",  # Llama 4 (its pixel-shuffle vision_adapter included)
    ),
    "mm_projector": (
        "model.connector",  # Idefics3 / SmolVLM / SmolVLM2
        "model.multi_modal_projector",  # LLaVA family, Mllama, Gemma 3 (no Linear), PaliGemma, InternVL, Aya, ...
        ("model.visual.merger", "model.visual.deepstack_merger_list"),  # Qwen-VL (Qwen3-VL: + DeepStack), GLM-4V
        "model.embed_vision",  # Gemma 3n, Gemma 4
        "multi_modal_projector",  # Llama 4
    ),
    "language_model": (
        "model.text_model",  # Idefics3 / SmolVLM / SmolVLM2
        "model.language_model",  # the other image-text families
        "language_model.model",  # Llama 4 (its language_model holds the LM head)
        "model",  # text-only causal LMs (Llama, Mistral, ...): everything but the LM head
    ),
}


def is_vision_model(model_name_or_path: str, trust_remote_code: bool = False) -> bool:
    """Whether the checkpoint is an image-text model (its config has a vision part)."""
    config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    return getattr(config, "vision_config", None) is not None


def load_model_and_processor(args: LoadArguments) -> tuple[PreTrainedModel, Any]:
    """Load the policy and its processor (image-text models) or tokenizer (text-only models)."""
    return load_model(args), load_processor_for(args)


def load_processor_for(args: LoadArguments, saved_in: str | None = None) -> Any:
    """The processor (image-text models) or tokenizer (text-only models) of ``args.model_name_or_path``, with a
    pad token. Cheap: no weights are read, so rows can be checked before the model is loaded.

    ``saved_in``: the folder to read it from when not the model's own (a PEFT adapter folder).
    """
    _require_model(args)
    source = saved_in or args.model_name_or_path
    if is_vision_model(args.model_name_or_path, args.trust_remote_code):
        processor = load_processor(source, trust_remote_code=args.trust_remote_code)
    else:
        processor = AutoTokenizer.from_pretrained(source, trust_remote_code=args.trust_remote_code)
    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer.pad_token is None:
        # Pad ids are masked out everywhere; any existing token will do.
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("tokenizer has no pad token; using eos %r", tokenizer.eos_token)
    return processor


def load_model(args: LoadArguments) -> PreTrainedModel:
    """The model's weights, with ``--dtype``, ``--attn_implementation`` and ``--trust_remote_code``."""
    _require_model(args)
    kwargs: dict[str, Any] = {"trust_remote_code": args.trust_remote_code}
    if args.dtype != "auto":
        kwargs["dtype"] = getattr(torch, args.dtype)
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    vision = is_vision_model(args.model_name_or_path, args.trust_remote_code)
    auto_class = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    model = auto_class.from_pretrained(args.model_name_or_path, **kwargs)
    repair_model(model)  # adpo.compat: known bugs of the installed transformers, where they apply
    return model


def _require_model(args: LoadArguments) -> None:
    if not args.model_name_or_path:
        raise ValueError("--model_name_or_path is required (a hub id or a local folder).")


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


def component_paths(model: nn.Module, name: str) -> list[str]:
    """Where ``model`` keeps component ``name`` (a key of :data:`COMPONENTS`): its module paths, [] if it has none."""
    module_names = {n for n, _ in model.named_modules()}
    for layout in COMPONENTS[name]:
        paths = (layout,) if isinstance(layout, str) else layout
        if paths[0] in module_names:
            return [p for p in paths if p in module_names]
    return []


def component_path(model: nn.Module, name: str) -> str | None:
    """The main module path of component ``name`` in ``model`` (see :func:`component_paths`), or None."""
    paths = component_paths(model, name)
    return paths[0] if paths else None


def component_modules(model: nn.Module, name: str) -> dict[str, nn.Module]:
    """The modules of component ``name`` (its roots included), without other components nested inside it."""
    paths = component_paths(model, name)
    if not paths:
        looked = ", ".join(p if isinstance(p, str) else p[0] for p in COMPONENTS[name])
        raise ValueError(f"{type(model).__name__} has no {name} (looked for {looked}).")
    nested = [p for other in COMPONENTS if other != name for p in component_paths(model, other)
              if any(p.startswith(path + ".") for path in paths)]
    return {n: m for n, m in model.named_modules()
            if any(_under(n, path) for path in paths) and not any(_under(n, p) for p in nested)}


def _under(name: str, path: str) -> bool:
    return name == path or name.startswith(path + ".")


_RETURNS_OUTPUTS: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def _returns_linear_output(module: nn.Linear) -> bool:
    """Whether a Linear subclass with a forward of its own still returns one tensor of ``out_features`` columns
    (Falcon's ``FalconLinear`` does; Llama 4's MoE router returns a tuple). One no-grad call on a zero row; a
    layer that cannot be called that way (sharded or quantized weights) is left to PEFT, as before."""
    if module not in _RETURNS_OUTPUTS:
        try:
            weight = module.weight
            with torch.no_grad():
                out = module(torch.zeros(1, module.in_features, dtype=weight.dtype, device=weight.device))
            _RETURNS_OUTPUTS[module] = isinstance(out, torch.Tensor) and out.shape[-1] == module.out_features
        except Exception:  # noqa: BLE001 - any failure means: cannot tell, keep PEFT's own judgement
            _RETURNS_OUTPUTS[module] = True
    return _RETURNS_OUTPUTS[module]


def lora_adaptable(module: nn.Module) -> bool:
    """Whether LoRA can wrap ``module``: a ``torch.nn.Linear`` whose output is one tensor of its ``out_features``.
    A subclass with a forward of its own may return something else (Llama 4's mixture-of-experts router returns a
    tuple of scores and logits), which a LoRA layer cannot add its update to; one probe call tells."""
    if not isinstance(module, nn.Linear):
        return False
    return type(module).forward is nn.Linear.forward or _returns_linear_output(module)


def lora_adaptable_conv(module: nn.Module) -> bool:
    """Whether LoRA can wrap ``module`` as a convolution: a plain ``torch.nn.Conv2d`` (its own forward, not timm's
    dynamically padded subclass) over all channels (``groups == 1``; a depthwise convolution has no low-rank
    update PEFT can add)."""
    return isinstance(module, nn.Conv2d) and type(module).forward is nn.Conv2d.forward and module.groups == 1


def not_lora_adaptable(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` modules of ``model`` that LoRA cannot wrap (see :func:`lora_adaptable`)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not lora_adaptable(m)]


def component_lora_layers(model: nn.Module, name: str) -> list[str]:
    """The layers LoRA adapts in component ``name``: its Linear layers (:func:`lora_adaptable`; a ViT's Conv patch
    embedding is left alone), or, in a convolutional component without any (Gemma 3n's MobileNetV5 tower), its
    ungrouped convolutions (:func:`lora_adaptable_conv`). Empty when it has neither (Gemma 3's projector)."""
    modules = component_modules(model, name)
    linear = [n for n, m in modules.items() if lora_adaptable(m)]
    if linear or any(isinstance(m, nn.Linear) for m in modules.values()):
        return linear
    return [n for n, m in modules.items() if lora_adaptable_conv(m)]


def resolve_components(model: nn.Module, names: list[str]) -> list[str]:
    """Names of the layers LoRA adapts inside the named components (:func:`component_lora_layers`)."""
    targets: list[str] = []
    for name in names:
        targets.extend(n for n in component_lora_layers(model, name) if n not in targets)
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
        logger.info("froze %s (%s)", name, ", ".join(component_paths(model, name)))
    return frozen


def lora_targets(model: nn.Module, spec: str | None) -> list[str] | str:
    """Turn ``--lora_target_modules`` into PEFT's ``target_modules``.

    Component names become the Linear layers inside them, ``all-linear`` passes through (PEFT then takes Linear
    layers only, never a Conv patch embedding; :func:`apply_lora` excludes those LoRA cannot wrap), anything else
    must be a module-name suffix present in the model. Linear layers whose forward returns something other than
    their output are never targets (:func:`lora_adaptable`).
    """
    names = _split(spec)
    if names == ["all-linear"]:
        return "all-linear"
    module_names = [n for n, _ in model.named_modules()]
    unadaptable = set(not_lora_adaptable(model))
    components = [n for n in names if n in COMPONENTS]
    suffixes = [n for n in names if n not in COMPONENTS]
    for suffix in suffixes:
        if not any(m == suffix or m.endswith("." + suffix) for m in module_names):
            linear_suffixes = sorted({m.rsplit(".", 1)[-1] for m, mod in model.named_modules()
                                      if lora_adaptable(mod)})
            raise ValueError(
                f"--lora_target_modules: {suffix!r} matches no module of {type(model).__name__}. Valid: "
                f"components {', '.join(c for c in COMPONENTS if component_path(model, c))}; all-linear; "
                f"or Linear-layer names {', '.join(linear_suffixes)}."
            )
    targets = resolve_components(model, components)
    for suffix in suffixes:
        matches = [m for m in module_names if m == suffix or m.endswith("." + suffix)]
        if all(m in unadaptable for m in matches):
            raise ValueError(f"--lora_target_modules: {suffix!r} names only Linear layers whose forward returns "
                             "something other than their output "
                             f"({type(model.get_submodule(matches[0])).__name__}, e.g. {matches[0]}): LoRA cannot "
                             "wrap them; target the layers around them instead.")
        skipped = [m for m in matches if m in unadaptable]
        if skipped:
            logger.warning("--lora_target_modules %r: leaving out %d Linear layers LoRA cannot wrap (%s, e.g. %s)",
                           suffix, len(skipped), type(model.get_submodule(skipped[0])).__name__, skipped[0])
        targets.extend(m for m in matches if m not in targets and m not in unadaptable)
    return targets


def lora_modules_to_save(model: nn.Module, spec: str | None) -> list[str]:
    """Named components with no layer for LoRA (Gemma 3's projector): PEFT trains and saves them whole."""
    return [path for name in _split(spec) if name in COMPONENTS and not component_lora_layers(model, name)
            for path in component_paths(model, name)]


def enable_vision_input_grads(model: nn.Module) -> list[Any]:
    """Make the vision tower's floating-point inputs (pixel values) require grad, on a copy.

    Re-entrant gradient checkpointing only back-propagates into a checkpointed block whose input requires grad.
    With LoRA the patch embedding is frozen, so in towers whose embedding ``enable_input_require_grads`` does not
    find (Qwen3-VL's, GLM-4V's, ...) no LoRA layer of the tower would get a gradient. Returns the hook handles.
    """
    handles = []
    for path in component_paths(model, "vision_tower")[:1]:
        tower = model.get_submodule(path)

        def require_grad(_: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            def copy(value: Any) -> Any:
                if isinstance(value, torch.Tensor) and value.is_floating_point() and not value.requires_grad:
                    return value.detach().requires_grad_(True)
                return value
            return tuple(copy(a) for a in args), {k: copy(v) for k, v in kwargs.items()}

        handles.append(tower.register_forward_pre_hook(require_grad, with_kwargs=True))
    return handles


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
                         + (f" ({', '.join(to_save)} has no Linear layer or ungrouped convolution)"
                            if to_save else "")
                         + "; add another component, e.g. language_model.")
    # "all-linear" is PEFT's: it would also take Linear subclasses LoRA cannot wrap (Llama 4's MoE router).
    exclude = not_lora_adaptable(model) if targets == "all-linear" else []
    if targets == "all-linear":
        for name in COMPONENTS:
            if component_path(model, name) and not any(lora_adaptable(m)
                                                       for m in component_modules(model, name).values()):
                logger.warning("LoRA all-linear: the %s (%s) has no Linear layer LoRA can wrap and gets no adapter; "
                               "name it in --lora_target_modules to adapt its convolutions or train it whole", name,
                               component_path(model, name))
    if exclude:
        logger.info("LoRA all-linear: leaving out %d Linear layers whose forward does not return their output (%s)",
                    len(exclude), type(model.get_submodule(exclude[0])).__name__)
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        exclude_modules=exclude or None,
        modules_to_save=to_save or None,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info("LoRA: %d trainable of %d parameters (%.2f%%)", trainable, total, 100 * trainable / total)
    return peft_model
