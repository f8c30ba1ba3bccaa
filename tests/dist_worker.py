"""adpo's CLI with test-only hooks; tests/test_distributed.py launches it (under torchrun or plain python).

- DeepSpeed's CPU shared-memory comm kernel is not JIT-compiled (minutes of C++ on a CI machine); DeepSpeed
  then communicates over plain gloo, as every other CPU test does.
- ADPO_TEST_KILL_AFTER_SAVE=N: SIGKILL this process right after the checkpoint of step N is written.
- It prints how the reference model was placed, and after training whether the process group was left
  initialized (cli.main must tear it down).
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from typing import Any

from transformers import TrainerCallback

from adpo import cli, pipeline


class KillAfterSave(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def describe_reference(trainer: Any) -> str:
    """How the frozen reference was placed: wrapper type, train/eval mode, and (ZeRO-3) this rank's share."""
    ref = trainer.ref_model
    if ref is None:
        return "none"
    module = getattr(ref, "module", ref)
    params = list(module.parameters())
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    total = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    grads = any(p.requires_grad for p in params)
    return f"{type(ref).__name__} training={module.training} requires_grad={grads} elements={local}/{total}"


def build_trainer(*args: Any, **kwargs: Any) -> Any:
    trainer, processor = _build_trainer(*args, **kwargs)
    print(f"adpo-test: rank {trainer.args.process_index} reference {describe_reference(trainer)}", flush=True)
    if os.environ.get("ADPO_TEST_KILL_AFTER_SAVE"):
        trainer.add_callback(KillAfterSave(int(os.environ["ADPO_TEST_KILL_AFTER_SAVE"])))
    return trainer, processor


_build_trainer = pipeline.build_trainer
pipeline.build_trainer = build_trainer

if __name__ == "__main__":
    try:
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    except ImportError:
        pass
    code = cli.main(sys.argv[1:])
    import torch.distributed as dist

    print(f"adpo-test: process group left initialized: {dist.is_initialized()}", flush=True)
    sys.exit(code)
