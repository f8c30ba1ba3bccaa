"""Per-row log-probabilities of the response tokens, from one forward pass.

The LM head only ever sees the hidden states that predict a response token: a forward pre-hook on the output
embedding selects them, so full-vocabulary logits are never materialised for prompt, image or pad positions.
The hook sits on the module the model itself calls, so the forward still goes through whatever wraps the model
(DDP, DeepSpeed, PEFT) and every family-specific step (e.g. Gemma's logit soft-capping) still applies.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn


class ResponseLogps(NamedTuple):
    sums: torch.Tensor  # (R,) fp32: Σ_t log π(y_t | x, y_<t) over each row's response tokens
    counts: torch.Tensor  # (R,) number of response tokens per row

    @property
    def means(self) -> torch.Tensor:
        """(R,) per-token average log-prob."""
        return self.sums / self.counts.clamp(min=1)


@contextmanager
def lm_head_only_at(head: nn.Module, positions: torch.Tensor) -> Iterator[None]:
    """Within the block, ``head`` maps hidden states (R, L, H) to logits at ``positions`` (R, L) bool only.

    The head then returns (N, V) with N = positions.sum(), rows in row-major order of ``positions``.
    """

    def select(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]
        if hidden.shape[:2] != positions.shape:
            raise RuntimeError(f"LM head got hidden states of shape {tuple(hidden.shape)}, expected "
                               f"{tuple(positions.shape)} + (hidden,): the model shortened the sequence.")
        return (hidden[positions], *args[1:])

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


def response_logps(
    model: nn.Module, head: nn.Module, inputs: dict[str, torch.Tensor], response_mask: torch.Tensor
) -> ResponseLogps:
    """Run ``model`` once on ``inputs`` and sum the log-probs of the tokens marked by ``response_mask``.

    Args:
        model: the model to call (possibly wrapped by DDP/DeepSpeed/PEFT).
        head: the model's output embedding (``get_output_embeddings()`` of the unwrapped model).
        inputs: model inputs; ``input_ids`` (R, L) plus whatever the processor produced.
        response_mask: (R, L) bool, True at response tokens. No row's response may start at position 0.
    """
    # The hidden state at t predicts the token at t + 1.
    predictors = torch.zeros_like(response_mask)
    predictors[:, :-1] = response_mask[:, 1:]
    targets = inputs["input_ids"][response_mask]
    with lm_head_only_at(head, predictors):
        logits = model(**inputs, use_cache=False).logits  # (N, V)
    per_token = token_logps(logits, targets)
    rows = response_mask.nonzero()[:, 0]
    sums = torch.zeros(response_mask.shape[0], dtype=torch.float32, device=per_token.device)
    sums = sums.index_add(0, rows, per_token)
    return ResponseLogps(sums=sums, counts=response_mask.sum(1))
