"""Load a model's processor, also where its video processor cannot be built.

Qwen2-VL / Qwen2.5-VL processors (and others that take videos) build a video processor that needs torchvision;
on machines without it ``AutoProcessor.from_pretrained`` fails although ADPO only ever feeds images, and so does a
folder saved without a video processor (adpo.testing.tiny's Qwen models). There we load the same processor class without
its video processor: images and text are processed exactly as before.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from transformers import AutoProcessor, ProcessorMixin
from transformers.models.auto.processing_auto import processor_class_from_name
from transformers.utils import is_torchvision_available

logger = logging.getLogger(__name__)


@functools.cache
def image_only_processor_class(cls: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """A subclass of ``cls`` whose constructor takes no video processor (``cls``'s own name, so a folder it saves
    names ``cls`` as its processor class, as the real checkpoint does)."""

    def __init__(self: Any, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None,
                 **kwargs: Any) -> None:
        # ProcessorMixin reads the sub-processors from this signature, so video_processor is not one of them.
        cls.__init__(self, image_processor, tokenizer, video_processor=None, chat_template=chat_template, **kwargs)

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": __name__,
                                       "__doc__": f"{cls.__name__} without a video processor (images only)."})


def load_processor(name_or_path: str, trust_remote_code: bool = False) -> Any:
    """``AutoProcessor.from_pretrained``, falling back to an image-only processor when the video processor cannot be
    built (no torchvision, or a folder saved without one, like adpo.testing.tiny's Qwen models)."""
    try:
        return AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ImportError, ValueError) as err:
        cls = _saved_processor_class(name_or_path)
        if cls is None or "video_processor" not in cls.get_attributes():
            raise
        try:
            processor = image_only_processor_class(cls).from_pretrained(
                name_or_path, trust_remote_code=trust_remote_code
            )
        except Exception:
            raise err from None
        logger.warning("%s: its video processor cannot be built (%s%s); loaded for images only.", cls.__name__,
                       str(err).splitlines()[0][:200], "" if is_torchvision_available() else "; torchvision is missing")
        return processor


def _saved_processor_class(name_or_path: str) -> type[ProcessorMixin] | None:
    try:
        config, _ = ProcessorMixin.get_processor_dict(name_or_path)
    except (OSError, ValueError):
        return None
    name = config.get("processor_class")
    return processor_class_from_name(name) if name else None
