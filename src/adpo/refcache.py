"""Precomputed reference log-probs (``--precompute_ref_log_probs``), cached on disk.

The reference is frozen, so ``log π_ref(y|x)`` of every side of every row is fixed: one pass over the dataset
before training replaces one reference forward per step for the whole run. The result is a table
``row id → (sums, counts)`` of shape ``(N, S)`` (``S`` sides per row: 2, or 4 with the multitask DPO pair),
saved as ``<cache_dir>/<key>.pt``. Storing token counts as well as sums lets the same table serve the summed
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from torch.utils.data import DataLoader, Subset

from .data import ALL_IMAGE_FIELDS, ROW_ID, iter_rows
from .logprobs import ResponseLogps

logger = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the table layout or the log-prob computation changes


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
@dataclass
class RefLogpsTable:
    """Reference log-probs per row: ``sums``/``counts`` (N, S), side ``s`` of row ``row_ids[i]`` at ``[i, s]``."""

    row_ids: torch.Tensor  # (N,) long
    sums: torch.Tensor  # (N, S) fp32
    counts: torch.Tensor  # (N, S) long
    _index: dict[int, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._index = {int(r): i for i, r in enumerate(self.row_ids.tolist())}
        if len(self._index) != len(self.row_ids):
            raise ValueError("reference log-prob table: row ids are not unique.")

    def lookup(self, row_ids: torch.Tensor, counts: torch.Tensor | None = None) -> ResponseLogps:
        """The rows' log-probs laid out like the batch, side-major: ``(S·B,)`` = [side 0 of all rows; side 1; ...].

        ``counts`` (S·B,), the batch's response token counts, is checked against the table's: a mismatch means
        the table belongs to other data or settings.
        """
        missing = [int(r) for r in row_ids.tolist() if int(r) not in self._index]
        if missing:
            raise KeyError(f"reference log-prob cache has no row(s) {missing[:5]}: it was computed for other data.")
        idx = torch.tensor([self._index[int(r)] for r in row_ids.tolist()], dtype=torch.long)
        out = ResponseLogps(sums=self.sums[idx].T.reshape(-1), counts=self.counts[idx].T.reshape(-1))
        if counts is not None and not torch.equal(out.counts, counts.to("cpu")):
            raise RuntimeError(f"reference log-prob cache does not match rows {row_ids.tolist()}: their response "
                               "token counts differ, so the table was computed with other data or settings.")
        return out

    def save(self, path: Path, meta: dict[str, Any]) -> None:
        """Write atomically (a temporary file renamed into place), so a killed run never leaves half a file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        payload = {"row_ids": self.row_ids, "sums": self.sums, "counts": self.counts, "meta": json.dumps(meta)}
        torch.save(payload, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> RefLogpsTable:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        return cls(payload["row_ids"], payload["sums"], payload["counts"])


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """Rank ``rank``'s contiguous share of ``range(n)``, wrapped so every rank gets the same count."""
    per_rank = math.ceil(n / world)
    return [i % n for i in range(rank * per_rank, (rank + 1) * per_rank)]


def compute_table(
    dataset: Sized,
    collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    batch_logps: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, ResponseLogps]],
    accelerator: Any,
    batch_size: int,
    num_workers: int = 0,
    show_progress: bool = True,
) -> RefLogpsTable:
    """One pass over ``dataset`` (this rank's shard), gathered to every rank.

    Args:
        batch_logps: collated batch → (row ids (B,), reference log-probs (S·B,) side-major).
        accelerator: an ``accelerate.Accelerator`` (process index/count, gather, device).
        show_progress: a progress bar on each node's local main process.
    """
    from tqdm.auto import tqdm

    indices = shard_indices(len(dataset), accelerator.process_index, accelerator.num_processes)
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, collate_fn=collator,
                        num_workers=num_workers, shuffle=False)
    ids, sums, counts = [], [], []
    quiet = not (show_progress and accelerator.is_local_main_process)
    for batch in tqdm(loader, desc="reference log-probs", disable=quiet):
        row_ids, logps = batch_logps(batch)
        n_sides = logps.sums.shape[0] // row_ids.shape[0]
        ids.append(row_ids.cpu())
        sums.append(logps.sums.detach().float().cpu().view(n_sides, -1).T)
        counts.append(logps.counts.cpu().view(n_sides, -1).T)
    local = [torch.cat(ids), torch.cat(sums), torch.cat(counts)]
    if accelerator.num_processes > 1:
        local = [accelerator.gather(t.to(accelerator.device)).cpu() for t in local]
    row_ids, all_sums, all_counts = local
    first = _first_occurrences(row_ids)  # the wrapped shards repeat a few rows
    return RefLogpsTable(row_ids[first], all_sums[first], all_counts[first])


def _first_occurrences(values: torch.Tensor) -> torch.Tensor:
    seen: set[int] = set()
    keep = []
    for i, v in enumerate(values.tolist()):
        if v not in seen:
            seen.add(v)
            keep.append(i)
    return torch.tensor(keep, dtype=torch.long)


def check_row_ids(dataset: Any) -> None:
    """The cache looks rows up by ``_adpo_row``: it must exist and be unique."""
    if ROW_ID not in getattr(dataset, "column_names", ()):
        raise ValueError(f"--precompute_ref_log_probs needs a {ROW_ID!r} column of row ids "
                         "(adpo.data.load_adpo_dataset adds it).")
    ids = dataset[ROW_ID]
    if len(set(ids)) != len(ids):
        raise ValueError(f"--precompute_ref_log_probs: the {ROW_ID!r} column has repeated ids; make them unique.")


def load_or_compute(
    path: Path, accelerator: Any, compute: Callable[[], RefLogpsTable], meta: dict[str, Any]
) -> tuple[RefLogpsTable, bool]:
    """The table at ``path`` if every rank can read it, else ``compute()`` on all ranks and write it.

    Returns (table, whether it was loaded). Ranks decide together, so all of them run the computing pass (and its
    collectives) or none does, even when nodes do not share a disk.
    """
    table = None
    if path.exists():
        try:
            table = RefLogpsTable.load(path)
        except Exception as err:  # a damaged file is rebuilt, never trusted
            logger.warning("reference cache %s is unreadable (%s); recomputing it", path, err)
    loaded = table is not None
    if accelerator.num_processes > 1:
        flags = accelerator.gather(torch.tensor([int(loaded)], device=accelerator.device))
        loaded = bool(flags.min().item())
    if loaded:
        logger.info("reference log-probs: loaded %d rows from %s", len(table.row_ids), path)
        return table, True
    table = compute()
    if accelerator.is_local_main_process:
        table.save(path, meta)
        logger.info("reference log-probs: wrote %d rows to %s", len(table.row_ids), path)
    accelerator.wait_for_everyone()
    return table, False
