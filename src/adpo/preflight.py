"""Checks that run before anything heavy is loaded, so a run that cannot finish fails in its first second.

- ``--output_dir``: not a file, writable, and not holding another run's checkpoints (which a new run would mix
  with its own) unless resuming or ``--overwrite_output_dir``.
- ``--model_name_or_path`` / ``--ref_model_name_or_path``: an existing folder with complete weight files, or a
  hub id (offline: one in the local cache).
- ``--resume_from_checkpoint``: ``last`` (or ``true``/``latest``) means the newest *complete* checkpoint in
  ``--output_dir``; a half-written one is passed over with a warning (see :mod:`adpo.checkpoints`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .checkpoints import checkpoint_problem, find_checkpoints, latest_complete, weight_file_problem

logger = logging.getLogger(__name__)

LATEST = ("last", "latest", "true", "yes", "1", "auto")
NONE = ("", "false", "no", "0", "none")


def preflight(model_args: Any, data_args: Any, training_args: Any) -> None:
    """Run every check; raise ``ValueError`` with what to do. Sets ``training_args.resume_from_checkpoint`` to a
    checkpoint folder (or None)."""
    check_output_dir_writable(training_args.output_dir)
    if not model_args.model_name_or_path:
        raise ValueError("--model_name_or_path is required (a hub id or a folder saved with save_pretrained).")
    check_model_source(model_args.model_name_or_path, "--model_name_or_path")
    if model_args.ref_model_name_or_path:
        check_model_source(model_args.ref_model_name_or_path, "--ref_model_name_or_path")
    training_args.resume_from_checkpoint = resolve_resume(training_args.resume_from_checkpoint,
                                                          training_args.output_dir)
    if training_args.resume_from_checkpoint is None:
        check_no_foreign_checkpoints(training_args.output_dir, training_args.overwrite_output_dir,
                                     remove=training_args.process_index == 0)


def check_output_dir_writable(output_dir: str | None) -> None:
    """``--output_dir`` must be a folder (or not exist yet) that this process can write into."""
    if not output_dir:
        raise ValueError("--output_dir is required.")
    path = Path(output_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"--output_dir {output_dir} is an existing file, not a folder; choose another path.")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--output_dir {output_dir}: {existing} is a file, so the folder cannot be created.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".adpo-write-test-", dir=existing)
    except OSError as err:
        raise ValueError(f"--output_dir {output_dir} is not writable ({existing}: {err.strerror}); choose another "
                         "path or fix its permissions.") from None
    os.close(fd)
    os.unlink(probe)


def check_model_source(name: str, flag: str) -> None:
    """A local model folder must exist and hold complete weights; a hub id must be reachable or cached."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise ValueError(f"{flag} {name}: the folder holds no config.json; it is not a model saved with "
                             "save_pretrained.")
        for weights in sorted(path.glob("*.safetensors")):
            problem = weight_file_problem(weights)
            if problem:
                raise ValueError(f"{flag} {name}: {problem}")
        return
    if path.exists():
        raise ValueError(f"{flag} {name} is a file; give the model's folder (or a hub id).")
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise ValueError(f"{flag} {name}: no such folder.")
    if _offline() and not _in_hub_cache(name):
        raise ValueError(f"{flag} {name}: no such local folder, and this hub model is not in the local cache while "
                         "the hub is offline (HF_HUB_OFFLINE=1). Download it first, or give a local folder.")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an invalid repo id
        return False
    return isinstance(found, str)


def resolve_resume(value: str | bool | None, output_dir: str) -> str | None:
    """The checkpoint folder ``--resume_from_checkpoint`` means (None: start afresh).

    ``last``/``latest``/``true``: the newest complete checkpoint in ``output_dir`` (none yet: start afresh, with a
    warning). A folder: it must be complete; if it is not, the error names the newest complete one.
    """
    if value is None or value is False:
        return None
    text = str(value).strip()
    if text.lower() in NONE:
        return None
    if value is True or text.lower() in LATEST:
        found = latest_complete(output_dir)
        if found is None:
            logger.warning("--resume_from_checkpoint %s: no complete checkpoint in %s yet; starting from scratch",
                           text, output_dir)
        return None if found is None else str(found)
    path = Path(text).expanduser()
    if not path.is_dir():
        raise ValueError(f"--resume_from_checkpoint {text}: no such checkpoint folder (use 'last' for the newest "
                         f"one in --output_dir).")
    problem = checkpoint_problem(path)
    if problem:
        fallback = latest_complete(path.parent)
        hint = (f" The newest complete checkpoint there is {fallback}: pass it, or --resume_from_checkpoint last."
                if fallback else " There is no complete checkpoint beside it.")
        raise ValueError(f"--resume_from_checkpoint {text}: the checkpoint is incomplete ({problem}).{hint}")
    return str(path)


def check_no_foreign_checkpoints(output_dir: str, overwrite: bool, remove: bool = True) -> None:
    """A fresh run must not write its checkpoints between another run's (rotation and resume would mix them)."""
    found = find_checkpoints(output_dir)
    if not found:
        return
    names = ", ".join(p.name for p in found[:5]) + (", ..." if len(found) > 5 else "")
    if not overwrite:
        raise ValueError(f"--output_dir {output_dir} holds checkpoints of an earlier run ({names}); a new run would "
                         "mix its checkpoints with them. Resume it with --resume_from_checkpoint last, choose "
                         "another --output_dir, or pass --overwrite_output_dir to delete them.")
    if remove:
        logger.warning("--overwrite_output_dir: deleting the earlier run's checkpoints in %s (%s)", output_dir, names)
        for path in found:
            shutil.rmtree(path, ignore_errors=True)
