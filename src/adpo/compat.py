"""Repairs for known bugs of the installed transformers, applied to a loaded model instance (never to a class).

Each repair checks that the bug is present in the code it is about to run, so it does nothing once a release fixes
it; :func:`repair_model` applies every one that matches and logs it. Kept apart from the rest of adpo: nothing
else in the code is allowed to know a model class by name.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from torch import nn
from transformers.utils import ModelOutput

logger = logging.getLogger(__name__)


def _forward_source(model: nn.Module) -> str:
    try:
        return inspect.getsource(type(model).forward)
    except (OSError, TypeError):  # no source (compiled, frozen): assume fixed rather than guess
        return ""


def llama4_reads_missing_image_outputs(model: nn.Module) -> bool:
    """transformers 5.24's ``Llama4ForConditionalGeneration.forward`` ends by reading ``outputs.image_outputs``
    from its language model's output, which has no such field: every forward raises ``AttributeError`` after the
    logits are computed. True when ``model`` runs that code."""
    language_model = getattr(model, "language_model", None)
    if type(model).__name__ != "Llama4ForConditionalGeneration" or not isinstance(language_model, nn.Module):
        return False
    return "image_outputs=outputs.image_outputs" in _forward_source(model)


def _add_missing_image_outputs(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    """Forward hook on the language model: give its output the ``image_outputs`` field the wrapper reads (None:
    the language model saw no images itself; the logits are untouched)."""
    if isinstance(output, ModelOutput) and not hasattr(output, "image_outputs"):  # return_dict=False: a tuple
        output.image_outputs = None
    return output


def _first_parameter(module: nn.Module) -> str | None:
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    first = parameters[0] if parameters else None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return first.name if first is not None and first.kind in positional else None


def _input_as_positional(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Forward pre-hook: a checkpointed layer called with its input (hidden states) as a keyword gets it
    positionally; the call means the same."""
    name = module._adpo_first_parameter
    if args or name not in kwargs or not getattr(module, "gradient_checkpointing", False):
        return None
    kwargs = dict(kwargs)
    return (kwargs.pop(name),), kwargs


def checkpointed_layers(model: nn.Module) -> list[nn.Module]:
    """The layers transformers checkpoints (``GradientCheckpointingLayer``) that have a positional first input."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and _first_parameter(m)]


def repair_model(model: nn.Module) -> list[str]:
    """Apply every repair whose bug ``model`` runs into; returns what was repaired (for the log and for tests).

    The repairs are forward hooks on the instance: they travel with ``copy.deepcopy`` (the frozen reference) and
    PEFT wrapping, and are not saved with the weights. Idempotent: the loader and the trainer both call it (a
    model built or loaded outside adpo is repaired when the trainer gets it)."""
    repaired = []
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model  # PEFT
    if llama4_reads_missing_image_outputs(base) and \
            _add_missing_image_outputs not in base.language_model._forward_hooks.values():
        base.language_model.register_forward_hook(_add_missing_image_outputs)
        repaired.append("Llama4ForConditionalGeneration.forward reads image_outputs from its language model's "
                        "output, which lacks it (transformers bug): the field is added as None")
    # Re-entrant gradient checkpointing only sees tensors passed positionally: a layer called with its hidden states
    # as a keyword (Llama 4's vision encoder calls ``encoder_layer(hidden_state=...)``) is cut out of the backward
    # pass, and nothing before it gets a gradient. Every checkpointed layer gets its first input positionally.
    layers = [m for m in checkpointed_layers(model) if not hasattr(m, "_adpo_first_parameter")]
    for layer in layers:
        layer._adpo_first_parameter = _first_parameter(layer)
        layer.register_forward_pre_hook(_input_as_positional, with_kwargs=True)
    for what in repaired:
        logger.info("repaired in the installed transformers: %s", what)
    return repaired
