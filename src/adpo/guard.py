"""Keep a non-finite loss or gradient away from the weights.

:class:`NonFiniteGuard` is a ``TrainerCallback``. The trainer tells it each micro-batch's loss and row ids
(:meth:`NonFiniteGuard.record`); just before the optimizer step it checks those losses and the accumulated
gradients. If anything is NaN or infinite, every gradient is dropped (``grad = None``), so ``optimizer.step()``
leaves every parameter and its optimizer state untouched (torch optimizers skip parameters without a gradient,
weight decay and momentum included), and the step is logged with the rows that made it. The learning-rate
schedule still advances, as it does when the fp16 grad scaler skips a step.

Not under DeepSpeed: its engine steps inside ``backward``, before this hook runs.

Two failures end the run (:class:`NonFiniteTrainingError`) instead of saving something broken:

- the weights themselves become NaN/inf after an optimizer step (a learning rate that overflows them, a broken
  optimizer state): checked after every step by :class:`NonFiniteWeightsCheck`, before any checkpoint of that
  step is written, so the last checkpoint on disk stays the last good one;
- every optimizer step of the run was skipped: the "trained" model would be the initial one.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

logger = logging.getLogger(__name__)


class NonFiniteTrainingError(RuntimeError):
    """Training cannot produce a usable model (non-finite weights, or every step skipped)."""


class NonFiniteGuard(TrainerCallback):
    """Skip optimizer steps whose loss or gradients are not finite.

    Args:
        model_getter: returns the model whose parameters' gradients are checked (the trainer's current model, so
            wrapping done after construction is seen).
    """

    def __init__(self, model_getter: Any) -> None:
        self.model_getter = model_getter
        # Kept as tensors until the optimizer step so recording a micro-batch never waits for the device.
        self.window_rows: list[torch.Tensor] = []
        self.window_losses: list[torch.Tensor] = []
        self.skipped_steps: list[tuple[int, list[int]]] = []  # (optimizer step, row ids) of every skipped step
        self.first_step = 0  # global step the current train() call started from (a resume starts later)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.first_step = state.global_step

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Fail a run in which no optimizer step reached the weights."""
        steps = state.global_step - self.first_step
        skipped = sum(1 for step, _ in self.skipped_steps if step > self.first_step)
        if steps > 0 and skipped >= steps:
            raise NonFiniteTrainingError(
                f"every one of the {steps} optimizer steps was skipped because its loss or gradients were NaN/inf, "
                "so nothing was trained (the weights are the initial ones). Look at the first skipped step's rows "
                f"({self.skipped_steps[0][1]}), lower --learning_rate, or try --bf16 instead of --fp16.")
        if skipped * 2 > steps:
            logger.warning("%d of %d optimizer steps were skipped (non-finite loss or gradients)", skipped, steps)

    def record(self, loss: torch.Tensor, row_ids: torch.Tensor | None) -> None:
        """Note one micro-batch: its loss (any shape) and its rows' ids (B,)."""
        if row_ids is not None:
            self.window_rows.append(row_ids.detach().reshape(-1))
        self.window_losses.append(loss.detach().reshape(-1))

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model = self.model_getter()
        params = [p for p in model.parameters() if p.grad is not None]
        loss_finite = _all_finite(self.window_losses)
        grads_finite = _all_finite([p.grad for p in params])
        bad = _any_process(not (grads_finite and loss_finite), args.device)
        if bad:
            for p in params:
                p.grad = None  # the optimizer then leaves these weights and their state alone
            rows = torch.cat(self.window_rows).tolist() if self.window_rows else []
            what = ("loss" if not loss_finite else "gradients" if not grads_finite
                    else "loss or gradients on another process")
            step = state.global_step + 1
            # fp16 loss scaling overflows now and then by design (the scaler then lowers its scale): not a warning.
            level = logging.INFO if args.fp16 and loss_finite else logging.WARNING
            logger.log(level, "optimizer step %d skipped: non-finite %s; weights unchanged. Rows: %s",
                       step, what, rows)
            self.skipped_steps.append((step, rows))
        self.window_rows, self.window_losses = [], []


def _all_finite(grads: list[torch.Tensor]) -> bool:
    grads = [g for g in grads if g.numel()]  # ZeRO-3 leaves empty placeholders; an empty max has no identity
    if not grads:
        return True
    # The max-abs norm is non-finite exactly when some entry is (an L2 norm could overflow on finite values).
    norm = torch.nn.utils.get_total_norm([g.detach() for g in grads], norm_type=float("inf"))
    return bool(torch.isfinite(norm))


def _any_process(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on any process, so every rank skips the same steps and the weights stay equal."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    value = torch.tensor(float(flag), device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


class NonFiniteWeightsCheck(TrainerCallback):
    """After each optimizer step, fail if any weight is NaN/inf, before that step can be saved.

    Args:
        model_getter: returns the model whose parameters are checked.
    """

    def __init__(self, model_getter: Any) -> None:
        self.model_getter = model_getter

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        params = [p.detach() for p in self.model_getter().parameters() if p.requires_grad]
        if not _any_process(not _all_finite(params), args.device):
            return
        from .checkpoints import latest_complete

        last = latest_complete(args.output_dir) if args.output_dir else None
        kept = (f"The last good checkpoint is {last} (resume with --resume_from_checkpoint {last})." if last
                else "No checkpoint had been written yet.")
        raise NonFiniteTrainingError(
            f"the weights became NaN/inf in optimizer step {state.global_step + 1}; nothing of this step is saved. "
            f"{kept} Lower --learning_rate, check --max_grad_norm, or use --bf16 rather than --fp16.")
