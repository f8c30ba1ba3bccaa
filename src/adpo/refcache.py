"""Precomputed reference log-probs (``--precompute_ref_log_probs``), cached on disk.

The reference is frozen, so ``log π_ref(y|x)`` of every side of every row is fixed: one pass over the dataset
before training replaces one reference forward per step for the whole run. The result is a table of
``(sums, counts)``, each ``(N, S)`` in dataset order (``S`` sides per row: 2, or 4 with the multitask DPO pair),
saved with a checksum as ``<cache_dir>/<key>.pt`` and joined to the dataset as columns (:mod:`adpo.reference`).
Storing token counts as well as sums lets the same table serve the summed
(sigmoid, hinge) and the per-token averaged (ipo) losses, so ``--loss_type`` is not part of the key.

The key is a hash of three fingerprints, so a stale table is never used:

- the reference model: every weight's bytes, dtype and shape (PEFT adapters excluded: the reference is the base),
  the model class and config, the attention kernel;
- the data: every row's content, image bytes included (image paths are read);
- every setting that changes the encoded sequences or the forward's numerics: the collator's settings
  (multimodal, separate_images, max_image_size, image_processor_kwargs, pad_to_multiple_of, multitask), the chat
  template, the tokenizer and processor configuration, mixed precision, and the torch/transformers versions.

Multi-process runs: every rank computes an equal shard (so collective ops inside the model stay in step), the
shards are gathered to every rank, and each node's local main process writes the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sized
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from torch.utils.data import DataLoader, Subset

from .collator import ROW_IDS
from .data import ALL_IMAGE_FIELDS, iter_rows
from .logprobs import ResponseLogps
from .rng import preserved_rng

logger = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when the table layout or the log-prob computation changes (2: dataset order, checksum)


def default_cache_dir() -> Path:
    """``$ADPO_CACHE_DIR``, else ``$XDG_CACHE_HOME/adpo/ref_logps``, else ``~/.cache/adpo/ref_logps``."""
    if os.environ.get("ADPO_CACHE_DIR"):
        return Path(os.environ["ADPO_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "adpo" / "ref_logps"


# ---------------------------------------------------------------------------------------------- fingerprints
def _digest(data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _tensor_digest(tensor: torch.Tensor) -> bytes:
    if hasattr(tensor, "ds_id"):  # a ZeRO-3 partition: hash the whole tensor (a collective: every rank calls it)
        import deepspeed

        with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
            return _tensor_digest(tensor.data)
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return _digest(memoryview(flat.view(torch.uint8).numpy()))


def reference_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters and buffers the reference computes with, under names that do not depend on PEFT wrapping.

    For a PEFT model the reference is the base model (adapters disabled), so adapter tensors are left out and
    ``base_model.model.`` / ``.base_layer`` are stripped: the key then equals that of the plain initial model.
    """
    out = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if "lora_" in name:
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        out[name] = tensor
    return out


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the reference's weights (bytes, dtypes, shapes), class and config. Reads every weight once."""
    weights = reference_weights(model)
    sharded = {name for name, tensor in weights.items() if hasattr(tensor, "ds_id")}
    # ZeRO-3 partitions are gathered one at a time, in the same order on every rank; hashlib releases the GIL on
    # large buffers, so the other tensors are hashed by threads in parallel.
    digests = {name: _tensor_digest(weights[name]) for name in weights if name in sharded}
    local = [name for name in weights if name not in sharded]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests.update(zip(local, pool.map(_tensor_digest, [weights[n] for n in local]), strict=True))
    h = hashlib.sha256()
    for name, tensor in weights.items():
        shape = tuple(getattr(tensor, "ds_shape", tensor.shape))
        h.update(f"{name}|{tensor.dtype}|{shape}|".encode())
        h.update(digests[name])
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is not None:
        config_dict = json.loads(config.to_json_string(use_diff=False))
        # Where the weights came from does not matter (their bytes do), nor the generation cache (off in our
        # forwards; the Trainer switches it off for PEFT models).
        for key in ("_name_or_path", "use_cache", "transformers_version"):
            config_dict.pop(key, None)
        h.update(json.dumps(config_dict, sort_keys=True).encode())
        h.update(str(getattr(config, "_attn_implementation", None)).encode())
    h.update(type(base).__qualname__.encode())
    return h.hexdigest()


def _feed(h: Any, value: Any, image: bool = False) -> None:
    """Hash one row value with type tags; strings inside image fields that name files contribute the file bytes."""
    if isinstance(value, dict):
        h.update(b"{")
        for key in sorted(value):
            h.update(f"{key}:".encode())
            _feed(h, value[key], image or key in ALL_IMAGE_FIELDS)
        h.update(b"}")
    elif isinstance(value, (list, tuple)):
        h.update(f"[{len(value)}".encode())
        for item in value:
            _feed(h, item, image)
        h.update(b"]")
    elif isinstance(value, (bytes, bytearray)):
        h.update(b"b%d:" % len(value))
        h.update(_digest(bytes(value)))
    elif isinstance(value, str):
        h.update(f"s{len(value)}:".encode())
        h.update(value.encode())
        if image and os.path.isfile(value):
            h.update(_digest(Path(value).read_bytes()))
    elif hasattr(value, "tobytes") and hasattr(value, "mode"):  # a PIL image
        h.update(f"img{value.mode}{value.size}".encode())
        h.update(_digest(value.tobytes()))
    else:
        h.update(f"{type(value).__name__}:{value!r}".encode())


def dataset_fingerprint(dataset: Any) -> str:
    """A hash of every row's content, in order, image bytes included."""
    h = hashlib.sha256()
    for row in iter_rows(dataset, batch_size=512, decode=False):  # images as stored: bytes or paths
        _feed(h, row)
    return h.hexdigest()


def _text_digest(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode()).hexdigest()


def log_prob_settings(collator: Any, mixed_precision: str) -> dict[str, Any]:
    """Everything besides the weights and rows that changes the reference's log-probs (JSON-serialisable)."""
    tokenizer = collator.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    processor = collator.processor
    return {
        "version": CACHE_VERSION,
        "collator": type(collator).__qualname__,
        **{name: getattr(collator, name, None) for name in (
            "multimodal", "separate_images", "max_image_size", "image_processor_kwargs", "pad_to_multiple_of",
            "multitask",
        )},
        "chat_template": _text_digest(getattr(collator, "chat_template", None)),
        "tokenizer": _text_digest(vocab),
        "special_tokens": str(getattr(tokenizer, "special_tokens_map", None)),
        "processor": _text_digest(processor.to_json_string()) if processor is not tokenizer else None,
        "mixed_precision": mixed_precision,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def cache_key(model_fp: str, data_fp: str, settings: dict[str, Any]) -> str:
    """The cache file's name: a hash of the three fingerprints."""
    blob = json.dumps({"model": model_fp, "data": data_fp, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


# ---------------------------------------------------------------------------------------------- the table
class ReferenceCacheError(ValueError):
    """The reference cache cannot be written (full disk, no permission ...)."""


@dataclass
class RefLogpsTable:
    """Reference log-probs of a dataset's rows, in dataset order: side ``s`` of row ``i`` at ``[i, s]``."""

    sums: torch.Tensor  # (N, S) fp32
    counts: torch.Tensor  # (N, S) long

    def checksum(self, meta: str) -> str:
        """sha256 of the table's bytes, shapes and meta data: a damaged (e.g. bit-flipped) file fails it."""
        h = hashlib.sha256(f"{tuple(self.sums.shape)}|{tuple(self.counts.shape)}|{meta}|".encode())
        for tensor in (self.sums, self.counts):
            h.update(memoryview(tensor.contiguous().view(torch.uint8).reshape(-1).numpy()))
        return h.hexdigest()

    def save(self, path: Path, meta: dict[str, Any]) -> None:
        """Write atomically (a temporary file renamed into place), so a killed run never leaves half a file; a
        failed write (e.g. a full disk) removes its temporary file and raises :class:`ReferenceCacheError`."""
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        meta_text = json.dumps(meta, sort_keys=True, default=str)
        payload = {"sums": self.sums, "counts": self.counts, "meta": meta_text, "checksum": self.checksum(meta_text)}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(payload, tmp)
            os.replace(tmp, path)
        except (OSError, RuntimeError) as err:  # torch.save reports a failed write as a RuntimeError
            tmp.unlink(missing_ok=True)
            raise ReferenceCacheError(
                f"--precompute_ref_log_probs: cannot write the reference cache {path}: {err}. Free disk space or "
                "point --ref_cache_dir (or $ADPO_CACHE_DIR) at another folder."
            ) from None

    @classmethod
    def load(cls, path: Path) -> RefLogpsTable:
        """Read a table; ``ValueError`` if its checksum does not match (the file is damaged)."""
        payload = torch.load(path, map_location="cpu", weights_only=True)
        table = cls(payload["sums"], payload["counts"])
        if payload.get("checksum") != table.checksum(payload.get("meta", "")):
            raise ValueError("its checksum does not match its contents")
        return table


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """Rank ``rank``'s contiguous share of ``range(n)``, wrapped so every rank gets the same count."""
    per_rank = math.ceil(n / world)
    return [i % n for i in range(rank * per_rank, (rank + 1) * per_rank)]


def compute_table(
    dataset: Sized,
    collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    batch_logps: Callable[[dict[str, torch.Tensor]], ResponseLogps],
    accelerator: Any,
    batch_size: int,
    num_workers: int = 0,
    show_progress: bool = True,
) -> RefLogpsTable:
    """One pass over ``dataset`` (this rank's shard), gathered to every rank, in dataset order.

    Consumes no random numbers (the global RNG states are restored afterwards), so a seeded run trains the same
    whether its table was computed or loaded.

    Args:
        batch_logps: collated batch → reference log-probs (S·B,), side-major.
        accelerator: an ``accelerate.Accelerator`` (process index/count, gather, device).
        show_progress: a progress bar on each node's local main process.
    """
    with preserved_rng():
        return _compute_table(dataset, collator, batch_logps, accelerator, batch_size, num_workers, show_progress)


def _compute_table(
    dataset: Sized, collator: Callable, batch_logps: Callable, accelerator: Any, batch_size: int, num_workers: int,
    show_progress: bool,
) -> RefLogpsTable:
    from tqdm.auto import tqdm

    indices = shard_indices(len(dataset), accelerator.process_index, accelerator.num_processes)
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, collate_fn=collator,
                        num_workers=num_workers, shuffle=False)
    sums, counts = [], []
    quiet = not (show_progress and accelerator.is_local_main_process)
    for batch in tqdm(loader, desc="reference log-probs", disable=quiet):
        rows = batch[ROW_IDS].shape[0]
        logps = batch_logps(batch)
        n_sides = logps.sums.shape[0] // rows
        sums.append(logps.sums.detach().float().cpu().view(n_sides, -1).T)
        counts.append(logps.counts.cpu().view(n_sides, -1).T)
    local = [torch.tensor(indices, dtype=torch.long), torch.cat(sums), torch.cat(counts)]
    if accelerator.num_processes > 1:
        local = [accelerator.gather(t.to(accelerator.device)).cpu() for t in local]
    positions, all_sums, all_counts = local
    first = _first_occurrences(positions)  # the wrapped shards repeat a few rows
    order = positions[first].argsort()
    return RefLogpsTable(all_sums[first][order], all_counts[first][order])


def _first_occurrences(values: torch.Tensor) -> torch.Tensor:
    seen: set[int] = set()
    keep = []
    for i, v in enumerate(values.tolist()):
        if v not in seen:
            seen.add(v)
            keep.append(i)
    return torch.tensor(keep, dtype=torch.long)


def load_or_compute(
    path: Path, accelerator: Any, compute: Callable[[], RefLogpsTable], meta: dict[str, Any]
) -> tuple[RefLogpsTable, bool]:
    """The table at ``path`` if every rank can read it and it passes its checksum, else ``compute()`` on all ranks
    and write it.

    Returns (table, whether it was loaded). Ranks decide together, so all of them run the computing pass (and its
    collectives) or none does, even when nodes do not share a disk.
    """
    table = None
    if path.exists():
        try:
            table = RefLogpsTable.load(path)
            if table.sums.shape[0] != meta.get("rows", table.sums.shape[0]):
                raise ValueError(f"it holds {table.sums.shape[0]} rows, not {meta['rows']}")
        except Exception as err:  # a damaged file is rebuilt, never trusted
            logger.warning("reference cache %s is damaged (%s): not using it; recomputing the reference "
                           "log-probs", path, err)
            table = None
    loaded = table is not None
    if accelerator.num_processes > 1:
        flags = accelerator.gather(torch.tensor([int(loaded)], device=accelerator.device))
        loaded = bool(flags.min().item())
    if loaded:
        logger.info("reference log-probs: loaded %d rows from %s", table.sums.shape[0], path)
        return table, True
    table = compute()
    if accelerator.is_local_main_process:
        table.save(path, meta)
        logger.info("reference log-probs: wrote %d rows to %s", table.sums.shape[0], path)
    accelerator.wait_for_everyone()
    return table, False


class ReferenceCache:
    """The disk cache of one reference: where its tables live and the key parts that do not depend on the data.

    Args:
        model: the reference's weights (a PEFT model: its base, adapters excluded); fingerprinted once here.
        collator, mixed_precision: the log-prob settings (see :func:`log_prob_settings`).
        cache_dir: the folder (default :func:`default_cache_dir`).
    """

    def __init__(
        self, model: nn.Module, collator: Any, mixed_precision: str, accelerator: Any, cache_dir: str | None = None
    ) -> None:
        self.model_fp = model_fingerprint(model)
        self.settings = log_prob_settings(collator, mixed_precision)
        self.dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.accelerator = accelerator

    def path(self, dataset: Any) -> Path:
        return self.dir / f"{cache_key(self.model_fp, dataset_fingerprint(dataset), self.settings)}.pt"

    def load_or_compute(
        self, dataset: Any, compute: Callable[[Any], RefLogpsTable] | None
    ) -> tuple[RefLogpsTable, bool]:
        """(``dataset``'s table, whether it came from disk); ``compute`` None: the reference model is gone."""
        path = self.path(dataset)
        if compute is None and not path.exists():
            raise ValueError("--precompute_ref_log_probs: this dataset's reference log-probs are not cached and the "
                             "reference model was freed; pass every evaluation dataset to the trainer up front.")
        meta = {"rows": len(dataset), "settings": self.settings, "model": self.model_fp}
        return load_or_compute(path, self.accelerator, lambda: compute(dataset), meta)
