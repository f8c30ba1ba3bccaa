"""Work that must not move a seeded run's random-number streams."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Within the block, random numbers may be drawn (a DataLoader draws its base seed, dropout draws masks); the
    global Python, NumPy, torch CPU and current-CUDA-device generators are restored afterwards, so what follows
    draws the numbers it would have drawn without the block."""
    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
