"""Per-row log-probabilities of the response tokens, from one forward pass.

The LM head only ever sees the hidden states that predict a response token, so full-vocabulary logits are never
materialised for prompt, image or pad positions. Two ways to score those positions:

- **fused** (default, :func:`fused_lm_head_at`): for the duration of the forward, the head's ``forward`` is
  replaced by :class:`HeadLogps`, which walks the vocabulary in chunks with an online log-sum-exp and returns the
  per-token log-probs directly. It never holds all ``N × V`` logits: forward and backward keep one ``N × chunk``
  block at a time and backward recomputes the logits it needs, so the step's memory does not grow with the
  vocabulary. Numerically it is the model's own head: the same ``F.linear`` in the same dtype (autocast included),
  then an fp32 log-softmax.
- **model** (:func:`lm_head_only_at`): a forward pre-hook selects the response-predicting hidden states, the head
  returns their ``(N, V)`` logits and :func:`token_logps` takes an fp32 log-softmax, chunked over rows. Used where
  the head is not a plain ``nn.Linear`` (:func:`head_blocker`) or the model transforms the head's output before
  returning it (e.g. Gemma-2 logit soft-capping).

Which one scores a model is decided once, before training, by :func:`choose_lm_head` (one forward without
gradients on a probe batch, whose head sees a few positions only); the trainer stores and logs the choice and
passes it to every :func:`response_logps` call. No state is kept here.

Both hook the module the model itself calls, so the forward still goes through whatever wraps the model
(DDP, DeepSpeed, PEFT), and under ZeRO-3 the head's weight is gathered exactly when the head runs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

logger = logging.getLogger(__name__)

VOCAB_CHUNK = 8192  # vocabulary entries per block of the fused head: N × 8192 fp32 logits at a time


class ResponseLogps(NamedTuple):
    sums: torch.Tensor  # (R,) fp32: Σ_t log π(y_t | x, y_<t) over each row's response tokens
    counts: torch.Tensor  # (R,) number of response tokens per row

    @property
    def means(self) -> torch.Tensor:
        """(R,) per-token average log-prob."""
        return self.sums / self.counts.clamp(min=1)


def _check_positions(hidden: torch.Tensor, positions: torch.Tensor) -> None:
    if hidden.shape[:2] != positions.shape:
        raise RuntimeError(f"LM head got hidden states of shape {tuple(hidden.shape)}, expected "
                           f"{tuple(positions.shape)} + (hidden,): the model shortened the sequence.")


@contextmanager
def lm_head_only_at(head: nn.Module, positions: torch.Tensor) -> Iterator[None]:
    """Within the block, ``head`` maps hidden states (R, L, H) to logits at ``positions`` (R, L) bool only.

    The head then returns (N, V) with N = positions.sum(), rows in row-major order of ``positions``.
    """

    def select(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        _check_positions(args[0], positions)
        return (args[0][positions], *args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


def token_logps(logits: torch.Tensor, targets: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """log softmax(logits)[targets] in fp32, (N, V) × (N,) → (N,), ``chunk_size`` rows at a time.

    Chunking bounds the fp32 copy of the logits that log-softmax needs to ``chunk_size × V``.
    """
    out = []
    for start in range(0, logits.shape[0], chunk_size):
        chunk = logits[start : start + chunk_size].float()
        tgt = targets[start : start + chunk_size, None]
        out.append((chunk.gather(-1, tgt) - torch.logsumexp(chunk, dim=-1, keepdim=True)).squeeze(-1))
    return torch.cat(out) if out else logits.new_zeros(0, dtype=torch.float32)


def _block_logits(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, start: int, end: int
) -> torch.Tensor:
    """Logits of vocabulary entries [start, end): ``F.linear`` in ``h``'s dtype, as the model's head computes, then
    at least fp32 (float64 stays float64)."""
    b = None if bias is None else bias[start:end].to(h.dtype)
    return F.linear(h, weight[start:end].to(h.dtype), b).to(_acc_dtype(h.dtype))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _target_slot(targets: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(column of each target inside block [start, end), clamped; whether the target lies in the block).

    Computed without data-dependent indexing, so the loop never waits for the device."""
    inside = (targets >= start) & (targets < end)
    return (targets - start).clamp(0, end - start - 1), inside


class HeadLogps(torch.autograd.Function):
    """log softmax(hidden @ weightᵀ + bias)[targets], (N,) fp32 (float64 for float64), one vocabulary block of
    ``chunk`` entries at a time.

    ``compute_dtype`` is the dtype the model's ``F.linear`` would run in (autocast's, else the weight's); the
    log-softmax over blocks uses an online log-sum-exp in fp32. Backward recomputes each block's logits, so nothing
    of size ``N × V`` is ever saved or held: d logp_i / d z_ij = 1[j = t_i] − softmax(z_i)_j. The hidden states'
    gradient is the sum of one ``compute_dtype`` matmul per block, summed in fp32 (in bf16 that is one rounding per
    block, where the plain backward rounds one matmul over the whole vocabulary: equal to bf16 precision). Not
    twice differentiable.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
        chunk: int, compute_dtype: torch.dtype,
    ) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            h = hidden.to(compute_dtype)
            n, vocab = h.shape[0], weight.shape[0]
            acc = _acc_dtype(compute_dtype)
            running_max = torch.full((n,), float("-inf"), dtype=acc, device=h.device)
            running_sum = torch.zeros(n, dtype=acc, device=h.device)
            target_logit = torch.zeros(n, dtype=acc, device=h.device)
            for start in range(0, vocab, chunk):
                end = min(start + chunk, vocab)
                z = _block_logits(h, weight, bias, start, end)
                new_max = torch.maximum(running_max, z.amax(dim=1))
                running_sum = running_sum * torch.exp(running_max - new_max) + torch.exp(z - new_max[:, None]).sum(1)
                running_max = new_max
                col, inside = _target_slot(targets, start, end)
                target_logit = torch.where(inside, z.gather(1, col[:, None]).squeeze(1), target_logit)
            lse = running_max + running_sum.log()
        ctx.save_for_backward(h, weight, bias, targets, lse)
        ctx.chunk, ctx.hidden_dtype = chunk, hidden.dtype
        return target_logit - lse

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        h, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        g = grad_out.to(lse.dtype)
        vocab = weight.shape[0]
        grad_h = torch.zeros(h.shape, dtype=lse.dtype, device=h.device) if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = torch.empty_like(bias) if need_b else None
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, vocab, ctx.chunk):
                end = min(start + ctx.chunk, vocab)
                # dL/dz = g · (onehot(target) − softmax(z)), built in place on the recomputed block.
                gz = torch.exp(_block_logits(h, weight, bias, start, end).sub_(lse[:, None])).mul_(-g[:, None])
                col, inside = _target_slot(targets, start, end)
                gz.scatter_add_(1, col[:, None], (g * inside)[:, None])
                if need_b:
                    grad_b[start:end] = gz.sum(0).to(bias.dtype)
                gz = gz.to(h.dtype)
                if need_h:
                    grad_h.add_(gz @ weight[start:end].to(h.dtype))
                if need_w:
                    grad_w[start:end] = (gz.T @ h).to(weight.dtype)
        return (None if grad_h is None else grad_h.to(ctx.hidden_dtype)), grad_w, grad_b, None, None, None


def head_logps(
    hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, chunk: int = VOCAB_CHUNK
) -> torch.Tensor:
    """(N,) log-probs of ``targets`` under ``head`` applied to ``hidden`` (N, H), without (N, V) logits.

    The matmuls run in the dtype the head's own ``F.linear`` would use: autocast's where autocast is on and the
    weight is not float64 (autocast never casts float64), else the weight's. Output: fp32 (float64 for float64)."""
    device = hidden.device.type
    dtype = head.weight.dtype
    if torch.is_autocast_enabled(device) and dtype != torch.float64:
        dtype = torch.get_autocast_dtype(device)
    return HeadLogps.apply(hidden, head.weight, head.bias, targets, chunk, dtype)


def head_blocker(head: nn.Module) -> str | None:
    """Why the fused head cannot stand in for ``head`` (the model's output embedding), or None if it can."""
    if type(head) is not nn.Linear:
        return f"its LM head is a {type(head).__name__}, not a plain torch.nn.Linear"
    if "forward" in vars(head):
        return "its LM head's forward is already replaced (e.g. by accelerate's device_map hooks)"
    return None


@contextmanager
def fused_lm_head_at(
    head: nn.Linear, positions: torch.Tensor, targets: torch.Tensor, chunk: int = VOCAB_CHUNK
) -> Iterator[list[torch.Tensor]]:
    """Within the block, calling ``head`` on hidden states (R, L, H) returns the (N,) log-probs of ``targets`` at
    ``positions`` (R, L) bool (row-major order) instead of logits. Yields the list the results are appended to.

    The head's ``forward`` is shadowed by an instance attribute for the duration (module hooks still run around
    it), so the same head must not be scored from two threads at once."""
    reason = head_blocker(head)
    if reason is not None:
        raise ValueError(f"The fused LM head cannot stand in for this model's head: {reason}.")
    produced: list[torch.Tensor] = []

    def forward(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        _check_positions(hidden, positions)
        produced.append(head_logps(hidden[positions], head, targets, chunk))
        return produced[-1]

    head.forward = forward
    try:
        yield produced
    finally:
        del head.forward


HEAD_MODES = ("auto", "fused", "model")
_HEAD_MODE_ALIASES = {"true": "fused", "false": "model"}  # the flag was a boolean: old commands keep working
TRANSFORMED = ("the model transforms its LM head's output before returning it (e.g. logit soft-capping, scaling or "
               "vocabulary slicing), or calls the head more than once")


def head_mode(value: str | bool) -> str:
    """``--fused_lm_head`` as one of :data:`HEAD_MODES` (``true``/``false`` are aliases of ``fused``/``model``)."""
    text = str(value).strip().lower()
    text = _HEAD_MODE_ALIASES.get(text, text)
    if text not in HEAD_MODES:
        raise ValueError(f"--fused_lm_head must be one of auto, fused, model (or true/false), got {value!r}.")
    return text


class HeadChoice(NamedTuple):
    """Which head scores the response tokens of one model, decided once before training."""

    fused: bool  # True: adpo's vocabulary-chunked head; False: the model's own head at the response positions
    reason: str  # why, for the log

    def describe(self) -> str:
        head = "adpo's fused, vocabulary-chunked LM head" if self.fused else "the model's own LM head"
        return f"{head} ({self.reason})"


def _probe_mask(response_mask: torch.Tensor, tokens: int) -> torch.Tensor:
    """``response_mask`` (R, L) keeping only its first ``tokens`` True positions (row-major): the probe's N."""
    keep = response_mask.reshape(-1).cumsum(0).reshape(response_mask.shape) <= tokens
    return response_mask & keep


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes and values, NaN equal to NaN (a NaN from the weights is the guard's business, not a transform)."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def in_model_dtype(inputs: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``inputs`` with every floating tensor of less than float32 precision in ``dtype``, the model's own.

    Processors give float32 pixels, which the models cast themselves; one gives bfloat16 (Llama 4's image
    processor), which a float32 model cannot take. Float32 inputs are left as they are."""
    if not dtype.is_floating_point:
        return inputs
    return {key: value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point()
            and value.dtype != dtype and torch.finfo(value.dtype).bits < 32 else value
            for key, value in inputs.items()}


def call_model(model: nn.Module, head: nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
    """``model(**inputs)`` without a KV cache, low-precision floating inputs in the dtype of ``head``'s weight."""
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor):
        inputs = in_model_dtype(inputs, weight.dtype)
    return model(**inputs, use_cache=False)


@torch.no_grad()
def returns_head_output(
    model: nn.Module, head: nn.Module, inputs: dict[str, torch.Tensor], response_mask: torch.Tensor,
    probe_tokens: int = 8,
) -> bool:
    """Whether ``model`` returns ``head``'s output unchanged as its ``logits`` (and calls the head once).

    One forward without gradients on ``inputs`` (R, L); the head sees only the first ``probe_tokens`` response
    positions, so the probe holds ``probe_tokens × V`` logits, never the batch's ``N × V``."""
    predictors = torch.zeros_like(response_mask)
    predictors[:, :-1] = _probe_mask(response_mask, probe_tokens)[:, 1:]
    raw: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda module, args, out: raw.append(out))
    try:
        with lm_head_only_at(head, predictors):
            logits = call_model(model, head, inputs).logits
    finally:
        handle.remove()
    return len(raw) == 1 and _same(raw[0], logits)


def choose_lm_head(
    model: nn.Module, head: nn.Module, inputs: dict[str, torch.Tensor], response_mask: torch.Tensor,
    mode: str = "auto",
) -> HeadChoice:
    """Decide, once and before training, which head scores ``model``'s response tokens (``--fused_lm_head``).

    Args:
        model: the model to call (possibly wrapped by DDP/DeepSpeed/PEFT).
        head: its output embedding (``get_output_embeddings()`` of the unwrapped model).
        inputs, response_mask: a probe batch the model accepts, e.g. one collated row; (R, L) mask.
        mode: ``auto`` (fused wherever it gives the model's own log-probs: ``head`` is a plain ``nn.Linear`` and
            the model returns its output unchanged, which one no-grad probe forward checks), ``fused`` (the same,
            but an error where the fused head cannot be used), ``model`` (the model's own head, no probe).
    """
    mode = head_mode(mode)
    if mode == "model":
        return HeadChoice(False, "--fused_lm_head model")
    reason = head_blocker(head)
    if reason is None and not returns_head_output(model, head, inputs, response_mask):
        reason = TRANSFORMED
    if reason is None:
        return HeadChoice(True, "the head is a plain Linear whose output the model returns unchanged")
    if mode == "fused":
        raise ValueError(f"--fused_lm_head fused: the fused LM head cannot stand in for this model's head: {reason} "
                         "(use --fused_lm_head auto or model).")
    return HeadChoice(False, reason)


def response_logps(
    model: nn.Module, head: nn.Module, inputs: dict[str, torch.Tensor], response_mask: torch.Tensor,
    fused: bool | None = None, vocab_chunk: int = VOCAB_CHUNK,
    sequence_ids: torch.Tensor | None = None, num_sequences: int = 0,
) -> ResponseLogps:
    """Run ``model`` once on ``inputs`` and sum the log-probs of the tokens marked by ``response_mask``.

    Args:
        model: the model to call (possibly wrapped by DDP/DeepSpeed/PEFT).
        head: the model's output embedding (``get_output_embeddings()`` of the unwrapped model).
        inputs: model inputs; ``input_ids`` (R, L) plus whatever the processor produced.
        response_mask: (R, L) bool, True at response tokens. No row's response may start at position 0.
        fused: True: adpo's vocabulary-chunked head (:func:`fused_lm_head_at`); False: the model's own head at
            the response positions. Decide it once with :func:`choose_lm_head` (the trainer does, at its start).
            None: decide for this call (``choose_lm_head`` in ``auto`` mode: one more forward, without gradients).
        vocab_chunk: vocabulary entries per block of the fused head.
        sequence_ids, num_sequences: for a packed batch (:mod:`adpo.packing`, one row (1, T)): (T,) the
            sequence of each token, and how many sequences there are; sums and counts then come per sequence.
    Returns:
        (R,) sums and token counts (per sequence for a packed batch).
    """
    if fused is None:
        fused = choose_lm_head(model, head, inputs, response_mask).fused
    # The hidden state at t predicts the token at t + 1.
    predictors = torch.zeros_like(response_mask)
    predictors[:, :-1] = response_mask[:, 1:]
    targets = inputs["input_ids"][response_mask]
    if fused:
        with fused_lm_head_at(head, predictors, targets, vocab_chunk) as produced:
            per_token = call_model(model, head, inputs).logits
        if len(produced) != 1 or per_token.shape != produced[0].shape:
            raise RuntimeError("The model called its LM head differently than when the head was chosen (the fused "
                               "head returned log-probs of shape "
                               f"{[tuple(p.shape) for p in produced]}, the model {tuple(per_token.shape)}).")
        per_token = per_token.float()
    else:
        with lm_head_only_at(head, predictors):
            logits = call_model(model, head, inputs).logits  # (N, V)
        per_token = token_logps(logits, targets)
    return _sums(per_token, response_mask, sequence_ids, num_sequences)


def _sums(per_token: torch.Tensor, response_mask: torch.Tensor, sequence_ids: torch.Tensor | None = None,
          num_sequences: int = 0) -> ResponseLogps:
    """Per-row sums and counts; for a packed (1, T) batch, per sequence of ``sequence_ids`` (T,)."""
    if sequence_ids is not None:
        rows = sequence_ids[response_mask[0]]
        sums = torch.zeros(num_sequences, dtype=torch.float32, device=per_token.device).index_add(0, rows, per_token)
        return ResponseLogps(sums=sums, counts=torch.bincount(rows, minlength=num_sequences))
    rows = response_mask.nonzero()[:, 0]
    sums = torch.zeros(response_mask.shape[0], dtype=torch.float32, device=per_token.device)
    sums = sums.index_add(0, rows, per_token)
    return ResponseLogps(sums=sums, counts=response_mask.sum(1))
