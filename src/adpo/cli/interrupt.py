"""Ctrl-C during ``adpo-train``: finish the current optimizer step, save a checkpoint, stop; nothing is lost.

The first SIGINT only sets a flag (and says what will happen); at the end of the step the callback asks the
Trainer to save a checkpoint and stop, so the checkpoint is written at a step boundary like any other and
``--resume_from_checkpoint last`` continues from it exactly. Under several processes the flag is shared (one
all-reduce per step), so every rank stops after the same step. A second Ctrl-C stops at once
(``KeyboardInterrupt``), and the command names the last complete checkpoint.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..guard import _any_process


class StopOnInterrupt(TrainerCallback):
    """Turns a requested stop into "save a checkpoint now and end training" at the next step end."""

    def __init__(self) -> None:
        self.requested = False  # set by the signal handler (this process)
        self.stopped_at: int | None = None  # global step of the checkpoint saved on the way out

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if _any_process(self.requested, args.device):
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True


@contextmanager
def graceful_interrupt(stop: StopOnInterrupt, announce: bool) -> Iterator[StopOnInterrupt]:
    """While inside, the first Ctrl-C requests a stop at the step end; the second raises ``KeyboardInterrupt``."""
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signal handlers can only be installed from the main thread
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True
        if announce:
            print("\nadpo: interrupted: finishing this step and saving a checkpoint (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)
