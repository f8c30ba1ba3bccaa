"""adpo: Abductive DPO for vision-language and text models.

For one response ``y``, train the model to find ``y`` more likely after the chosen prompt (text + images) than
after the rejected one, relative to a frozen reference.
"""

from .collator import ADPOCollator
from .config import ADPOConfig, DataArguments, ModelArguments
from .data import ADPODataError, load_adpo_dataset
from .logprobs import ResponseLogps, response_logps
from .losses import ADPOLossOutput, adpo_loss
from .trainer import ADPOTrainer

__version__ = "0.1.0"

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
