"""adpo: Abductive DPO for vision-language and text models.

For one response ``y``, train the model to find ``y`` more likely after the chosen prompt (text + images) than
after the rejected one, relative to a frozen reference.

The names below are imported on first use, so ``import adpo`` (and every command built on it, such as
``adpo-data``) does not pay for importing the trainer and ``transformers.Trainer`` until it needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name → the module that defines it.
_EXPORTS = {
    "ADPOCollator": "collator",
    "ADPOConfig": "config",
    "DataArguments": "config",
    "ModelArguments": "config",
    "ADPODataError": "data",
    "load_adpo_dataset": "data",
    "ResponseLogps": "logprobs",
    "response_logps": "logprobs",
    "ADPOLossOutput": "losses",
    "adpo_loss": "losses",
    "ADPOTrainer": "trainer",
}

__all__ = [
    "ADPOCollator",
    "ADPOConfig",
    "ADPODataError",
    "ADPOLossOutput",
    "ADPOTrainer",
    "DataArguments",
    "ModelArguments",
    "ResponseLogps",
    "adpo_loss",
    "load_adpo_dataset",
    "response_logps",
]

if TYPE_CHECKING:
    from .collator import ADPOCollator
    from .config import ADPOConfig, DataArguments, ModelArguments
    from .data import ADPODataError, load_adpo_dataset
    from .logprobs import ResponseLogps, response_logps
    from .losses import ADPOLossOutput, adpo_loss
    from .trainer import ADPOTrainer


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'adpo' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
