"""The training output folder: what a finished model leaves in it, and the guard against training over one."""

from __future__ import annotations

from pathlib import Path

FINISHED_MODEL_FILES = (
    "config.json", "adapter_config.json", "model.safetensors", "model.safetensors.index.json",
    "adapter_model.safetensors", "pytorch_model.bin",
)


def check_output_dir(output_dir: str | None, overwrite: bool) -> None:
    """Refuse to train into a folder that already holds a finished model, unless overwriting was asked for."""
    if not output_dir or overwrite:
        return
    found = [name for name in FINISHED_MODEL_FILES if (Path(output_dir) / name).exists()]
    if found:
        raise ValueError(f"--output_dir {output_dir} already holds a trained model ({', '.join(found)}); training "
                         "would overwrite it. Choose another --output_dir, or pass --overwrite_output_dir.")
