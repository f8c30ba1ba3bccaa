"""Padding-free batches: the step's sequences packed into one row, attention never crossing sequences.

The collator pads the ``R`` sequences of a batch (``[chosen; rejected]``, ``R = 2B``, or ``4B`` with
``--multitask_weight``) to the longest. With mixed image sizes (LLaVA-NeXT's any-resolution tiles, Qwen-VL's dynamic
resolution) token counts vary widely and a large share of the padded batch is padding, which every Linear layer of
the language model still computes. :func:`packed_forward` removes it right before the model call: the non-pad
tokens of all rows are concatenated into one row ``(1, T)``, ``T = Σ n_i``, each sequence with its own position ids
(``0 .. n_i − 1``; Qwen2-VL / Qwen2.5-VL: the model's own 3-D rotary positions of the padded rows, plus the text
positions that mark where sequences start), and the per-image tensors are left as they are (the images keep their
order, since the sequences do).

Attention within sequences only:

- ``sdpa`` / ``eager`` (what a CPU has): the language model's attention runs once per sequence on its slice of the
  packed row (the model's own kernel, ``is_causal``), so attention costs ``Σ n_i²``, never the ``T²`` of one long
  row. Models with a non-causal part (sliding windows) get transformers' block-diagonal mask built from the packed
  position ids, and each sequence its diagonal block. The language model's attention implementation is switched
  to adpo's wrapper of the same kernel at the first packed batch and stays (padded batches run the original kernel
  and mask; gradient checkpointing's recomputation in backward sees the boundaries as a layer input).
- ``flash_attention_*`` / ``flex_attention``: transformers' own packed-sequence support (varlen kernels from the
  position ids), untouched.

Families whose inputs are laid out per row in a way a packed row cannot express fall back to the padded batch,
once, with a log line (:func:`packing_blocker`): Mllama (its cross-attention mask is per row and per image),
PaliGemma (its prefix attention is built from the padded rows' token types) and Gemma 3 (transformers 5.24 builds
its packed sliding-window mask with the image blocks looked up at in-sequence positions). ``response_mask`` packs
with the tokens; ``sequence_ids`` (T,) gives each packed token's row, so log-probs are summed per sequence as before.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.modeling_utils import AttentionInterface
from transformers.models.llama.modeling_llama import eager_attention_forward

logger = logging.getLogger(__name__)

# Inputs laid out along the token sequence (rows, seq, ...) that pack with the tokens.
PACKABLE_SEQUENCE_KEYS = ("token_type_ids", "mm_token_type_ids")
# Model families (config.model_type) whose inputs a packed row cannot express, and why.
UNPACKABLE = {
    "mllama": "its cross-attention mask is laid out per row and per image",
    "paligemma": "its bidirectional prefix is built from the padded rows' token types",
    "gemma3": "transformers' packed mask looks its bidirectional image blocks up by in-sequence position in the "
              "sliding-window layers, which is wrong for every sequence after the first",
    "qwen3_5": "its linear-attention (Gated DeltaNet) layers carry their state along the row, across sequences",
}
# Attention implementations that pack natively in transformers (varlen from packed position ids).
NATIVE = ("flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention")

# Model input carrying the packed row's sequence boundaries (R + 1,) as a CPU long tensor, down to the attention
# layers (transformers passes model kwargs to every attention call). A layer input, so gradient checkpointing's
# recomputation in backward sees the same boundaries as the forward.
BOUNDS_KWARG = "adpo_packed_bounds"
# Set while a packed forward builds its masks: the causal-only families need none (each sequence runs is_causal).
_SKIP_MASK: ContextVar[bool] = ContextVar("adpo_packed_skip_mask", default=False)


def _per_sequence(kernel: Any) -> Any:
    """An attention function that runs ``kernel`` once per sequence of a packed row (query (1, H, T, D)) when the
    call carries :data:`BOUNDS_KWARG`, else exactly ``kernel`` (padded batches)."""

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        bounds = kwargs.pop(BOUNDS_KWARG, None)
        if bounds is None:
            return kernel(module, query, key, value, attention_mask, **kwargs)
        bounds = bounds.tolist()  # a CPU tensor: no device sync
        if query.shape[0] != 1 or query.shape[2] != bounds[-1]:
            raise RuntimeError(f"packed attention got a query of shape {tuple(query.shape)} for a packed row of "
                               f"{bounds[-1]} tokens")
        sizes = [end - start for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
        # split, not indexing: its backward is one concatenation, not a zero-filled full-size tensor per sequence
        pieces = zip(query.split(sizes, dim=2), key.split(sizes, dim=2), value.split(sizes, dim=2), strict=True)
        outs = []
        for start, (q, k, v) in zip(bounds, pieces, strict=False):
            mask = None if attention_mask is None else attention_mask[..., start:start + q.shape[2],
                                                                      start:start + q.shape[2]]
            outs.append(kernel(module, q, k, v, mask, **kwargs)[0])  # (1, n, H, D)
        return torch.cat(outs, dim=1), None

    return attention


def _mask_unless_skipped(builder: Any) -> Any:
    def build(*args: Any, **kwargs: Any) -> Any:
        return None if _SKIP_MASK.get() else builder(*args, **kwargs)

    return build


# Our name for each base implementation: the same kernel and mask for padded batches, per sequence when packed.
_WRAPPED = {"sdpa": "adpo_packed_sdpa", "eager": "adpo_packed_eager"}
for _base_name, _kernel, _mask in (("sdpa", sdpa_attention_forward, sdpa_mask),
                                   ("eager", eager_attention_forward, eager_mask)):
    AttentionInterface.register(_WRAPPED[_base_name], _per_sequence(_kernel))
    AttentionMaskInterface.register(_WRAPPED[_base_name], _mask_unless_skipped(_mask))


@dataclass
class PackedBatch:
    inputs: dict[str, torch.Tensor]  # model inputs, input_ids (1, T), position_ids (1, T) or (4, 1, T)
    response_mask: torch.Tensor  # (1, T) bool
    sequence_ids: torch.Tensor  # (T,) long: the padded row each packed token came from
    bounds: tuple[int, ...]  # (R + 1,) sequence boundaries in the packed row


def unwrapped_base(model: nn.Module) -> nn.Module:
    """The ``PreTrainedModel`` under torch.compile and PEFT wrappers (DDP/DeepSpeed are unwrapped by the caller)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def packing_blocker(model: nn.Module, inputs: dict[str, torch.Tensor]) -> str | None:
    """Why the batch ``inputs`` cannot be packed for ``model``, or None if it can."""
    config = unwrapped_base(model).config
    model_type = getattr(config, "model_type", "")
    if model_type in UNPACKABLE:
        return f"{model_type}: {UNPACKABLE[model_type]}"
    if "cross_attention_mask" in inputs:
        return "the batch has a per-row cross-attention mask"
    if getattr(unwrapped_base(model), "is_gradient_checkpointing", False):
        # The backward pass recomputes checkpointed layers outside packed_attention, i.e. with attention across
        # the packed sequences: wrong gradients (re-entrant) or a CheckpointError (non-re-entrant).
        return GRADIENT_CHECKPOINTING
    if not getattr(unwrapped_base(model), "_supports_attention_backend", False):
        return f"{type(unwrapped_base(model)).__name__} does not take transformers' attention backends"
    layer_types = set(getattr(config.get_text_config(), "layer_types", None) or ())
    if layer_types - {"full_attention", "sliding_attention"}:
        return (f"its language model has {sorted(layer_types - {'full_attention', 'sliding_attention'})} layers, "
                "whose state would run along the packed row across sequences")
    if "attention_mask" not in inputs:
        return "the batch has no attention mask to find its padding in"
    if inputs["attention_mask"].dim() != 2:
        return "the batch's attention mask is not a (rows, seq) padding mask"
    implementation = config.get_text_config()._attn_implementation
    if implementation not in (*NATIVE, *_WRAPPED, *_WRAPPED.values()):
        return f"attention implementation {implementation!r} has no packed form"
    return None


def pack(inputs: dict[str, torch.Tensor], response_mask: torch.Tensor,
         rope_positions: torch.Tensor | None = None) -> PackedBatch:
    """Pack right-padded rows (R, L) into one row (1, T) of their non-pad tokens, in row order.

    ``rope_positions``: (3, R, L) rotary positions of the padded rows (Qwen2-VL's ``get_rope_index``); packed they
    become (4, 1, T) with the per-sequence text positions first, the layout transformers takes for packed
    multimodal rotary positions.
    """
    keep = inputs["attention_mask"].bool()  # (R, L)
    lengths = keep.sum(1)
    packed = {key: value for key, value in inputs.items() if key != "attention_mask"}
    packed["input_ids"] = inputs["input_ids"][keep][None]
    for key in PACKABLE_SEQUENCE_KEYS:
        if key in inputs:
            packed[key] = inputs[key][keep][None]
    positions = (keep.long().cumsum(1) - 1)[keep][None]  # (1, T): 0 .. n_i - 1 per sequence
    if rope_positions is not None:
        positions = torch.cat([positions[None], rope_positions[:, keep][:, None]], dim=0)  # (4, 1, T)
    packed["position_ids"] = positions
    counts = lengths.tolist()
    bounds = (0, *torch.tensor(counts).cumsum(0).tolist())
    sequence_ids = torch.repeat_interleave(torch.arange(len(counts), device=keep.device), lengths)
    return PackedBatch(packed, response_mask[keep][None], sequence_ids, tuple(bounds))


def _rope_positions(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """(3, R, L) multimodal rotary positions of the padded rows, for models that compute them (Qwen-VL)."""
    owner = next((m for m in unwrapped_base(model).modules() if hasattr(type(m), "get_rope_index")), None)
    if owner is None:
        return None
    accepted = inspect.signature(owner.get_rope_index).parameters
    kwargs = {k: v for k, v in inputs.items() if k in accepted}
    if "mm_token_type_ids" in accepted and "mm_token_type_ids" not in kwargs:
        kwargs["mm_token_type_ids"] = torch.zeros_like(inputs["input_ids"])  # text only
    positions, _ = owner.get_rope_index(**kwargs)
    return positions


def _needs_mask(config: Any, longest: int) -> bool:
    """Whether the language model's attention is more than causal for sequences of up to ``longest`` tokens: a
    sliding window shorter than a sequence, bidirectional attention."""
    text = config.get_text_config()
    window = getattr(text, "sliding_window", None)
    if getattr(text, "use_sliding_window", True) is False:
        window = None
    if window and longest > window:
        return True
    return getattr(config, "model_type", "") == "gemma3" or bool(getattr(text, "use_bidirectional_attention", False))


def use_packable_attention(model: nn.Module) -> None:
    """Switch the language model of ``model`` from ``sdpa``/``eager`` to adpo's wrapper of the same kernel (for
    good: padded batches run the original kernel and mask unchanged; not saved with the model). It must stay in
    place through backward, where gradient checkpointing re-runs the attention layers."""
    text = unwrapped_base(model).config.get_text_config()
    if text._attn_implementation in _WRAPPED:
        text._attn_implementation = _WRAPPED[text._attn_implementation]


@contextmanager
def packed_attention(model: nn.Module, batch: PackedBatch) -> Iterator[None]:
    """For the duration, the model's attention runs per sequence of ``batch``'s packed row (adds
    :data:`BOUNDS_KWARG` to ``batch.inputs`` where the attention is adpo's)."""
    base = unwrapped_base(model)
    use_packable_attention(model)
    if base.config.get_text_config()._attn_implementation in NATIVE:
        yield
        return
    batch.inputs[BOUNDS_KWARG] = torch.tensor(batch.bounds)
    longest = max(end - start for start, end in zip(batch.bounds[:-1], batch.bounds[1:], strict=True))
    token = _SKIP_MASK.set(not _needs_mask(base.config, longest))
    try:
        yield
    finally:
        _SKIP_MASK.reset(token)


_logged: set[str] = set()


GRADIENT_CHECKPOINTING = "gradient checkpointing recomputes attention outside the packed forward"


# Auto packs a batch only when at least this share of its padded tokens is padding. Packing saves the padding's
# compute in every layer but runs attention once per sequence; on a batch without padding that is pure cost (the
# demo's SmolVLM-architecture model, no padding: 10% slower per step packed, CPU), while 26.8% and 37.9% padding
# gave 1.31x and 1.81x (bench/bench_packing.py).
MIN_PADDING_SHARE = 0.1


def padding_share(inputs: dict[str, torch.Tensor]) -> float:
    """The share of the padded batch's token positions that are padding (0 without an attention mask)."""
    mask = inputs.get("attention_mask")
    return 0.0 if mask is None or mask.numel() == 0 else 1.0 - float(mask.count_nonzero()) / mask.numel()


def padding_free_decision(model: nn.Module, inputs: dict[str, torch.Tensor], requested: bool | None,
                          gradient_checkpointing: bool = False) -> bool:
    """Whether to pack this batch: ``requested`` None (auto) packs where possible and worth it (at least
    :data:`MIN_PADDING_SHARE` of the batch is padding), logging a fallback once; True packs every batch and raises
    where packing is impossible; False never packs. ``gradient_checkpointing``: the run's, so that the reference
    (a copy without checkpointing, or run under no_grad) is computed as the policy is."""
    if requested is False:
        return False
    reason = GRADIENT_CHECKPOINTING if gradient_checkpointing else packing_blocker(model, inputs)
    if reason is None:
        return bool(requested) or padding_share(inputs) >= MIN_PADDING_SHARE
    if requested:
        raise ValueError(f"--padding_free true: this batch cannot be packed: {reason} (use --padding_free auto or "
                         "false).")
    if reason not in _logged:
        _logged.add(reason)
        logger.warning("padding-free batches off, padding each batch to its longest row: %s.", reason)
    return False


@contextmanager
def packed_forward(
    model: nn.Module, inputs: dict[str, torch.Tensor], response_mask: torch.Tensor
) -> Iterator[PackedBatch]:
    """Pack ``inputs`` (padded rows) and, within the block, make the model's attention respect the packing.

    ``model``: the unwrapped model (PEFT allowed). Yields the :class:`PackedBatch` to call the model with."""
    batch = pack(inputs, response_mask, _rope_positions(model, inputs))
    with packed_attention(model, batch):
        yield batch
