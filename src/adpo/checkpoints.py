"""Is a checkpoint (or a saved model) complete? Cheap checks that read headers, never the weights.

``transformers.Trainer`` writes a checkpoint's ``trainer_state.json`` last, so a checkpoint cut short by a crash,
a kill or a full disk lacks it or holds a truncated weight file. A ``.safetensors`` file is complete when its
header parses and its size is exactly the header's length plus the largest tensor end offset; a torch zip file
(``optimizer.pt``, ``pytorch_model.bin``) when its central directory, written last, reads back.
"""

from __future__ import annotations

import json
import logging
import re
import struct
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
                "pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_model.bin")


def find_checkpoints(folder: str | Path) -> list[Path]:
    """``checkpoint-N`` folders in ``folder``, oldest (lowest N) first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and CHECKPOINT.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT.match(p.name).group(1)))


def latest_complete(folder: str | Path) -> Path | None:
    """The newest complete checkpoint in ``folder``; incomplete newer ones are skipped with a warning."""
    for path in reversed(find_checkpoints(folder)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("skipping incomplete checkpoint %s: %s", path, problem)
    return None


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint folder cannot be resumed from (None: it looks complete)."""
    state = path / "trainer_state.json"
    if not state.is_file():
        return "trainer_state.json is missing (the checkpoint was not finished)"
    try:
        json.loads(state.read_text())
    except (OSError, ValueError) as err:
        return f"trainer_state.json does not parse ({err})"
    has_weights = any((path / name).exists() for name in WEIGHT_FILES) or any(
        p.is_dir() and p.name.startswith(("global_step", "pytorch_model_fsdp")) for p in path.iterdir())
    if not has_weights:
        return "it holds no model weights"
    for file in sorted(path.iterdir()):
        problem = weight_file_problem(file)
        if problem:
            return problem
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError) as err:
            return f"{index.name} does not parse ({err})"
        missing = sorted(s for s in shards if not (path / s).exists())
        if missing:
            return f"weight shard {missing[0]} is missing"
    return None


def weight_file_problem(file: Path) -> str | None:
    """Why a ``.safetensors`` / torch zip file is truncated or corrupt (None: its structure is intact)."""
    if file.suffix == ".safetensors":
        return _safetensors_problem(file)
    if file.suffix in (".pt", ".bin", ".pth"):
        try:
            with zipfile.ZipFile(file):
                return None
        except (OSError, zipfile.BadZipFile) as err:
            return f"{file.name} is truncated or corrupt ({err})"
    return None


def _safetensors_problem(file: Path) -> str | None:
    size = file.stat().st_size
    try:
        with file.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                return f"{file.name} is truncated ({size} bytes, shorter than its header)"
            header = json.loads(f.read(header_len))
    except (OSError, struct.error, ValueError) as err:
        return f"{file.name} is truncated or corrupt ({type(err).__name__}: {err})"
    try:
        ends = [int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"]
    except (KeyError, IndexError, TypeError, ValueError):
        return f"{file.name} is corrupt (its header lists a tensor without data offsets)"
    expected = 8 + header_len + max(ends, default=0)
    if size != expected:
        return f"{file.name} is truncated or corrupt ({size} bytes, its header says {expected})"
    return None
