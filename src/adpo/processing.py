"""Load a model's processor with every saved setting, also where some of its parts cannot be built.

ADPO feeds a processor text and images only. Many processors also hold a video processor (Qwen-VL, GLM-4V,
SmolVLM2, InternVL, LLaVA-OneVision, Gemma 4 ...) or an audio feature extractor (Gemma 4), and those need
packages a machine may lack (the video processors need torchvision) or files a folder may not hold (adpo's tiny
models are saved without one). ``AutoProcessor.from_pretrained`` then fails although images would work.

:func:`load_processor` first tries ``AutoProcessor``; if that fails it loads the same processor class part by
part: the tokenizer and the image processor must load (otherwise the error says what is missing: the package to
install or the absent file), every other part that cannot be built is replaced by an :class:`UnavailablePart`
that keeps its saved settings (SmolVLM2 reads its video settings even for image-only chats) and refuses to process
anything. The processor's own settings (image tokens per image, ...) are all passed on by name, whatever the order
of its constructor's arguments, and saving the processor writes the unavailable parts' settings back.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import re
from pathlib import Path
from typing import Any

from transformers import AutoProcessor, ProcessorMixin
from transformers.models.auto.processing_auto import processor_class_from_name
from transformers.utils import is_torchvision_available

logger = logging.getLogger(__name__)

# Parts a processor cannot work without for image-text rows.
REQUIRED_PARTS = ("tokenizer", "image_processor")
# Legacy per-part files a checkpoint may hold instead of a section of processor_config.json.
_LEGACY_PART_FILES = {"video_processor": "video_preprocessor_config.json"}


class ProcessorLoadError(OSError):
    """A processor could not be loaded; the message says what is missing. (An OSError, as transformers raises.)"""


class UnavailablePart:
    """Stands in for a processor part that cannot be built here (a video processor without torchvision).

    Its saved settings stay readable as attributes (``processor.video_processor.num_frames``); settings it never
    had read as None. Calling it raises, so a video can never be processed by something else than the real part.
    """

    def __init__(self, name: str, settings: dict[str, Any], reason: str) -> None:
        self.__dict__.update(settings)
        self._name, self._settings, self._reason = name, dict(settings), reason

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):
            raise AttributeError(key)
        return None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"The processor's {self._name} is not available here ({self._reason}).")

    def to_dict(self) -> dict[str, Any]:
        return dict(self._settings)

    def __repr__(self) -> str:
        return f"UnavailablePart({self._name}: {self._reason})"


class _KeywordProcessorInit(ProcessorMixin):
    """Sits between a processor class and ProcessorMixin (see :func:`processor_class_without`): maps the parts
    a constructor passes up, positionally in its own order, to their names and keeps unavailable parts out of
    ProcessorMixin's type checks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        names = self._all_parts
        parts = dict(zip(names, args, strict=False)) | {k: v for k, v in kwargs.items() if k in names}
        rest = {k: v for k, v in kwargs.items() if k not in names}
        unavailable = {k: v for k, v in parts.items() if isinstance(v, UnavailablePart) or v is None}
        ProcessorMixin.__init__(self, **{k: v for k, v in parts.items() if k not in unavailable}, **rest)
        for name, part in unavailable.items():
            setattr(self, name, part)


@functools.cache
def processor_class_without(cls: type[ProcessorMixin], parts: tuple[str, ...]) -> type[ProcessorMixin]:
    """A subclass of ``cls`` built without the processor parts ``parts`` (e.g. ``("video_processor",)``).

    It has ``cls``'s name, so a folder it saves names ``cls`` as its processor class, as the real checkpoint does,
    and loads with ``AutoProcessor`` where the parts can be built. Pass an :class:`UnavailablePart` (or None) for
    each left-out part; every other constructor argument is ``cls``'s own.
    """
    all_parts = tuple(cls.get_attributes())
    unknown = set(parts) - set(all_parts)
    if unknown:
        raise ValueError(f"{cls.__name__} has no parts {sorted(unknown)} (it has {', '.join(all_parts)}).")
    kept = [p for p in all_parts if p not in parts]

    def get_attributes(_: type) -> list[str]:
        return list(kept)

    def to_dict(self: Any) -> dict[str, Any]:
        output = cls.to_dict(self)
        for name in parts:
            part = getattr(self, name, None)
            if isinstance(part, UnavailablePart) and part.to_dict():
                output[name] = part.to_dict()  # written back: the folder keeps the settings it was loaded with
            else:
                output.pop(name, None)
        return output

    @functools.wraps(cls.__init__)  # keeps cls's signature, which to_dict reads the settings to save from
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        for name in parts:
            kwargs.setdefault(name, None)  # a left-out part may simply not be passed
        cls.__init__(self, *args, **kwargs)

    namespace = {"__init__": __init__, "get_attributes": classmethod(get_attributes), "to_dict": to_dict,
                 "_all_parts": all_parts,
                 "__module__": __name__, "__doc__": f"{cls.__name__} without its {', '.join(parts)}."}
    return type(cls.__name__, (cls, _KeywordProcessorInit), namespace)


def image_only_processor_class(cls: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """``cls`` without its video processor (:func:`processor_class_without`), for folders saved without one."""
    return processor_class_without(cls, ("video_processor",))


def load_processor(name_or_path: str, trust_remote_code: bool = False) -> Any:
    """``AutoProcessor.from_pretrained``; where a part other than the tokenizer and the image processor cannot be
    built, the same class without it (every saved setting kept). Raises :class:`ProcessorLoadError` naming the
    missing package or file when the processor cannot be loaded at all."""
    try:
        return _check_tokenizer(AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code),
                                name_or_path)
    except ProcessorLoadError:
        raise
    except Exception as err:  # noqa: BLE001 - diagnosed below; processors raise anything from their constructors
        auto_error = err
    cls = _saved_processor_class(name_or_path, trust_remote_code)
    if cls is None:
        raise ProcessorLoadError(f"Cannot load the processor of {name_or_path}: {_explain(auto_error)}") from auto_error
    processor_dict, _ = cls.get_processor_dict(name_or_path, trust_remote_code=trust_remote_code)
    parts: dict[str, Any] = {}
    unavailable: dict[str, UnavailablePart] = {}
    for name in cls.get_attributes():
        try:
            parts[name] = _load_part(cls, name, name_or_path, processor_dict, trust_remote_code)
        except Exception as err:  # noqa: BLE001 - the reason is reported or kept with the part
            if name in REQUIRED_PARTS or not any(name.endswith(p) for p in ("video_processor", "feature_extractor")):
                raise ProcessorLoadError(f"Cannot load the {name} of {cls.__name__} from {name_or_path}: "
                                         f"{_explain(err)}") from err
            reason = _explain(err)
            if name.endswith("video_processor") and not is_torchvision_available() and "torchvision" not in reason:
                reason += "; video processors need torchvision, which is not installed"
            unavailable[name] = UnavailablePart(name, _part_settings(name_or_path, name, processor_dict), reason)
    if not unavailable:  # every part loads: the processor itself failed (its constructor, a missing package)
        raise ProcessorLoadError(f"Cannot build {cls.__name__} from {name_or_path}: {_explain(auto_error)}") \
            from auto_error
    sub = processor_class_without(cls, tuple(unavailable))
    try:
        processor = sub(**parts, **unavailable, **_init_settings(cls, processor_dict))
    except Exception as err:  # noqa: BLE001
        raise ProcessorLoadError(f"Cannot build {cls.__name__} from {name_or_path}: {_explain(err)}") from err
    _check_tokenizer(processor, name_or_path)
    for name, part in unavailable.items():
        logger.warning("%s: its %s cannot be built (%s); loaded without it (images and text are processed as "
                       "usual, its saved settings are kept).", cls.__name__, name, part._reason)
    return processor


def _check_tokenizer(processor: Any, path: str) -> Any:
    """Refuse an empty tokenizer: transformers builds one (1 token) for a folder without tokenizer files."""
    tokenizer = getattr(processor, "tokenizer", processor)
    if hasattr(tokenizer, "__len__") and len(tokenizer) < 2:
        raise ProcessorLoadError(f"The tokenizer of {path} is empty: the folder has no tokenizer files "
                                 "(tokenizer.json, tokenizer_config.json, vocab files).")
    return processor


def _load_part(cls: type[ProcessorMixin], name: str, path: str, processor_dict: dict[str, Any],
               trust_remote_code: bool) -> Any:
    """One part of ``cls`` loaded exactly as ``cls.from_pretrained`` loads it (its own special cases included)."""
    one = type(cls.__name__, (cls,), {"get_attributes": classmethod(lambda _: [name])})
    return one._get_arguments_from_pretrained(path, processor_dict, trust_remote_code=trust_remote_code)[0]


def _init_settings(cls: type[ProcessorMixin], processor_dict: dict[str, Any]) -> dict[str, Any]:
    """The saved settings ``cls``'s constructor takes by name (what ``from_args_and_dict`` passes it)."""
    params = inspect.signature(cls.__init__).parameters
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
    named -= set(cls.get_attributes())
    ignored = sorted(set(processor_dict) - named - set(cls.get_attributes()) - {"auto_map", "processor_class"})
    if ignored:
        logger.info("%s does not take the saved settings %s (ignored, as AutoProcessor does)", cls.__name__, ignored)
    return {k: v for k, v in processor_dict.items() if k in named}


def _part_settings(path: str, name: str, processor_dict: dict[str, Any]) -> dict[str, Any]:
    """The saved settings of part ``name``: its section of processor_config.json, or its legacy file."""
    if isinstance(processor_dict.get(name), dict):
        return dict(processor_dict[name])
    legacy = _LEGACY_PART_FILES.get(name)
    if legacy and (Path(path) / legacy).is_file():
        try:
            return json.loads((Path(path) / legacy).read_text())
        except (OSError, ValueError):
            return {}
    return {}


def _saved_processor_class(name_or_path: str, trust_remote_code: bool) -> type[ProcessorMixin] | None:
    try:
        config, _ = ProcessorMixin.get_processor_dict(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None
    name = config.get("processor_class")
    return processor_class_from_name(name) if name else None


def _explain(err: BaseException) -> str:
    """What is missing, in one line: the package to install, or the file that is absent."""
    message = str(err).strip().splitlines()[0][:400] if str(err).strip() else type(err).__name__
    absent = re.search(r"directory containing an? (\S+) file", str(err))
    if absent:
        return f"the folder has no {absent.group(1)} (nor a section for it in processor_config.json)"
    if isinstance(err, ModuleNotFoundError) and err.name:
        return f"the Python package {err.name!r} is not installed (pip install {err.name.split('.')[0]})"
    if "torchvision" in str(err).lower() or (not is_torchvision_available() and _mentions_torchvision_only(err)):
        return f"{message} (torchvision is not installed: pip install torchvision, the build matching your torch)"
    return message


def _mentions_torchvision_only(err: BaseException) -> bool:
    """transformers' placeholders for torchvision-only classes say they need the 'torchvision' backend."""
    return "requires the torchvision library" in str(err) or "TorchVision" in str(err)
