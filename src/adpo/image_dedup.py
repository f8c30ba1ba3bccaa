"""Each distinct image through the vision tower once per forward.

A step's batch holds the same picture several times whenever sides share images: ``--separate_images false``
(both sides show ``chosen_images``), text counterfactuals (``chosen_images == rejected_images``), the same image in
several rows. The processor encodes each occurrence, and the tower would run on each. :func:`each_image_once`
hooks the vision tower for the duration of a forward: its input is cut into images, identical images (bit-equal
pixels and companions such as Idefics3's ``patch_attention_mask``) are encoded once, and the features are copied
back to every occurrence with ``index_select``, so gradients from every use flow into the one encoding (the sum
the duplicated computation would give the tower's weights).

Layouts (found from the tower's inputs, see :data:`LAYOUTS`):

- ``per_image``: the first input is ``(images, ...)``, one image (or tile) per row, outputs likewise
  (LLaVA, LLaVA-NeXT tiles, Idefics3 / SmolVLM, Gemma 3, PaliGemma).
- ``patches``: Qwen2-VL / Qwen2.5-VL: ``(Σ patches, D)`` with ``grid_thw`` (images, 3); outputs are per patch
  (``last_hidden_state``) and per merged token (``pooler_output``).

Other towers (Mllama's per-row tiles with aspect ratios) run as before. Detecting duplicates costs one device sync
per tower call (a key per image from 64 sampled pixel values); images with equal keys are compared exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .modeling import component_path

logger = logging.getLogger(__name__)

# config.model_type → how its vision tower lays out images.
LAYOUTS = {
    "llava": "per_image", "llava_next": "per_image", "idefics3": "per_image", "smolvlm": "per_image",
    "gemma3": "per_image", "paligemma": "per_image", "qwen2_vl": "patches", "qwen2_5_vl": "patches",
}


@dataclass
class DedupStats:
    """Images (or tiles) the tower was given and encoded, over the calls inside one :func:`each_image_once`."""

    seen: int = 0
    encoded: int = 0
    calls: list[tuple[int, int]] = field(default_factory=list)


def _samples(item: torch.Tensor, count: int = 64) -> torch.Tensor:
    """``count`` values of ``item`` at evenly spaced positions: a key that equal items share exactly (no
    arithmetic, so no rounding that could differ between rows)."""
    flat = item.reshape(-1)
    index = torch.linspace(0, flat.numel() - 1, steps=min(count, flat.numel()), device=flat.device).long()
    return flat[index].float()


def _keys(items: list[tuple[torch.Tensor, ...]]) -> list[Any]:
    """One hashable key per item (shapes and sampled values), with one device sync for all items."""
    samples = torch.stack([torch.cat([_samples(t) for t in item]) for item in items]).tolist()
    return [(tuple(tuple(t.shape) for t in item), tuple(row)) for item, row in zip(items, samples, strict=True)]


def unique_items(items: list[tuple[torch.Tensor, ...]], keys: list[Any]) -> tuple[list[int], list[int]]:
    """Group equal items (tuples of tensors; ``keys`` equal for equal items, e.g. fingerprints) into (the index of
    each distinct item's first occurrence, for every item the position of its distinct item in that list).
    Equality is exact: items with equal keys are compared with ``torch.equal``."""
    firsts: list[int] = []
    inverse: list[int] = []
    by_key: dict[Any, list[int]] = {}
    for i, (item, key) in enumerate(zip(items, keys, strict=True)):
        match = next((u for u in by_key.get(key, []) if _equal(items[firsts[u]], item)), None)
        if match is None:
            match = len(firsts)
            firsts.append(i)
            by_key.setdefault(key, []).append(match)
        inverse.append(match)
    return firsts, inverse


def _equal(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _rows_of(sizes: list[int], items: list[int]) -> torch.Tensor:
    """Row indices of ``items`` in a tensor whose items have ``sizes`` rows each, in order."""
    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + size)
    return torch.cat([torch.arange(starts[i], starts[i + 1]) for i in items])


def _expand(output: Any, sizes: dict[int, list[int]]) -> Any:
    """Copy the distinct items' rows of every tensor in ``output`` back to all occurrences.

    ``sizes``: for each row count a tensor of the unique output may have, the (unique sizes, index) to use."""
    if isinstance(output, torch.Tensor):
        index = sizes.get(output.shape[0]) if output.dim() else None
        return output if index is None else output.index_select(0, index.to(output.device))
    if isinstance(output, tuple) and not hasattr(output, "_fields"):
        return tuple(_expand(o, sizes) for o in output)
    if isinstance(output, list):
        return [_expand(o, sizes) for o in output]
    if isinstance(output, dict):  # ModelOutput: update in place, keeps its class and attribute access
        for key in list(output.keys()):
            output[key] = _expand(output[key], sizes)
        return output
    return output


def _vision_tower(model: nn.Module) -> tuple[nn.Module, str] | None:
    from .packing import unwrapped_base

    base = unwrapped_base(model)
    layout = LAYOUTS.get(getattr(base.config, "model_type", ""))
    path = component_path(base, "vision_tower")
    if layout is None or path is None:
        return None
    return base.get_submodule(path), layout


@contextmanager
def each_image_once(model: nn.Module, enabled: bool = True) -> Iterator[DedupStats]:
    """Within the block, the vision tower of ``model`` (unwrapped; PEFT allowed) encodes each distinct image once
    per call. Yields the :class:`DedupStats` of the calls. A model without a known tower layout runs unchanged."""
    stats = DedupStats()
    found = _vision_tower(model) if enabled else None
    if found is None:
        yield stats
        return
    tower, layout = found
    pending: list[dict[int, torch.Tensor] | None] = []

    def before(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        plan = _per_image_plan(args, kwargs) if layout == "per_image" else _patches_plan(module, args, kwargs)
        if plan is None:
            pending.append(None)
            return args, kwargs
        args, kwargs, expand, seen, encoded = plan
        stats.seen += seen
        stats.encoded += encoded
        stats.calls.append((seen, encoded))
        pending.append(expand)
        return args, kwargs

    def after(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        expand = pending.pop() if pending else None
        return output if expand is None else _expand(output, expand)

    handles = [tower.register_forward_pre_hook(before, with_kwargs=True),
               tower.register_forward_hook(after, with_kwargs=True)]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


def _first_input(args: tuple[Any, ...], kwargs: dict[str, Any], names: tuple[str, ...]) -> tuple[str | int, Any]:
    if args and isinstance(args[0], torch.Tensor):
        return 0, args[0]
    for name in names:
        if isinstance(kwargs.get(name), torch.Tensor):
            return name, kwargs[name]
    return -1, None


def _replace(args: tuple[Any, ...], kwargs: dict[str, Any], where: str | int, value: Any) -> tuple[Any, Any]:
    if isinstance(where, int):
        return (value, *args[1:]), kwargs
    return args, {**kwargs, where: value}


def _per_image_plan(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
    where, pixels = _first_input(args, kwargs, ("pixel_values",))
    if pixels is None or pixels.dim() < 2 or pixels.shape[0] < 2:
        return None
    n = pixels.shape[0]
    # Companions laid out per image (Idefics3's patch_attention_mask): part of each image's identity.
    companions = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n
                  and k != where}
    items = [(pixels[i], *(c[i] for c in companions.values())) for i in range(n)]
    firsts, inverse = unique_items(items, _keys(items))
    if len(firsts) == n:
        return None
    keep = torch.tensor(firsts, device=pixels.device)
    args, kwargs = _replace(args, kwargs, where, pixels.index_select(0, keep))
    kwargs = {**kwargs, **{k: c.index_select(0, keep.to(c.device)) for k, c in companions.items()}}
    return args, kwargs, {len(firsts): torch.tensor(inverse)}, n, len(firsts)


def _patches_plan(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
    where, patches = _first_input(args, kwargs, ("hidden_states", "pixel_values"))
    grid = kwargs.get("grid_thw")
    if patches is None or grid is None or grid.shape[0] < 2:
        return None
    merge = getattr(module, "spatial_merge_size", None) or getattr(module.config, "spatial_merge_size", 1)
    per_image = grid.prod(-1).tolist()
    blocks = list(patches.split(per_image))
    items = [(b, g) for b, g in zip(blocks, grid, strict=True)]
    firsts, inverse = unique_items(items, _keys(items))
    if len(firsts) == len(blocks):
        return None
    unique_sizes = [per_image[i] for i in firsts]
    unique_merged = [s // merge**2 for s in unique_sizes]
    keep_rows = _rows_of(per_image, firsts).to(patches.device)
    args, kwargs = _replace(args, kwargs, where, patches.index_select(0, keep_rows))
    kwargs = {**kwargs, "grid_thw": grid[torch.tensor(firsts, device=grid.device)]}
    expand = {sum(unique_sizes): _rows_of(unique_sizes, inverse),
              sum(unique_merged): _rows_of(unique_merged, inverse)}
    return args, kwargs, expand, len(blocks), len(firsts)
