"""Image embeddings from the user's own model, for ``swap --strategy similar``: computed once, cached on disk.

An image's embedding is the mean over all its positions of the features the model's ``get_image_features``
returns (its vision tower's output as the language model receives it, after the projector), in fp32. A row with
several images gets the mean of theirs. Embeddings are cached per model and per image content (sha256 of the
bytes), so a second build, another seed or another strategy over the same images computes nothing.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..images import load_image
from .io import Source, image_payload, row_image_list

logger = logging.getLogger(__name__)

DEFAULT_CACHE = Path(os.environ.get("ADPO_CACHE_DIR", Path.home() / ".cache" / "adpo")) / "image_embeddings"


def model_key(model_name_or_path: str) -> str:
    """A cache key for a model: its path or id, plus, for a local folder, its config and weight files' sizes and
    modification times (so retraining into the same folder invalidates the cache)."""
    parts = [model_name_or_path]
    folder = Path(model_name_or_path)
    if folder.is_dir():
        parts = [str(folder.resolve())]
        for f in sorted(folder.iterdir()):
            if f.suffix in (".json", ".safetensors", ".bin"):
                stat = f.stat()
                parts.append(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


class EmbeddingCache:
    """sha256 of an image's bytes → its embedding (D,) fp32, one ``.pt`` file per model."""

    def __init__(self, model_name_or_path: str, cache_dir: str | Path | None = None) -> None:
        self.path = Path(cache_dir or DEFAULT_CACHE) / f"{model_key(model_name_or_path)}.pt"
        self.table: dict[str, torch.Tensor] = {}
        if self.path.exists():
            try:
                self.table = torch.load(self.path, weights_only=True)
            except Exception as err:  # a truncated file from a crash: recompute rather than fail
                logger.warning("image-embedding cache %s is unreadable (%s); recomputing", self.path, err)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save(self.table, tmp)
        tmp.replace(self.path)  # atomic: a crash never leaves a half-written cache


class ImageEmbedder:
    """Embeds images with a model's ``get_image_features`` (see the module docstring)."""

    def __init__(self, model_name_or_path: str, dtype: str = "float32", device: str | None = None) -> None:
        from ..config import ModelArguments
        from ..modeling import load_model_and_processor

        model, processor = load_model_and_processor(ModelArguments(model_name_or_path=model_name_or_path,
                                                                    dtype=dtype))
        self.image_processor = getattr(processor, "image_processor", None)
        if self.image_processor is None or not hasattr(model, "get_image_features"):
            raise ValueError(f"--model_name_or_path {model_name_or_path}: --strategy similar needs an image-text "
                             "model (its vision tower embeds the images); this one takes no images.")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.takes = set(inspect.signature(model.get_image_features).parameters)

    @torch.no_grad()
    def __call__(self, image: Any) -> torch.Tensor:
        """One RGB PIL image → (D,) fp32 on the CPU: the mean of the model's image features over all positions."""
        inputs = self.image_processor(images=[image], return_tensors="pt")
        kwargs = {k: v.to(self.device) for k, v in inputs.items() if k in self.takes and torch.is_tensor(v)}
        out = self.model.get_image_features(**kwargs)
        features = getattr(out, "pooler_output", out)
        if features is None:
            features = out.last_hidden_state
        if isinstance(features, (list, tuple)):
            features = torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
        return features.reshape(-1, features.shape[-1]).float().mean(0).cpu()


def row_embeddings(
    source: Source,
    images_field: str,
    digests: dict[int, tuple[str, ...]],
    model_name_or_path: str,
    *,
    cache_dir: str | Path | None = None,
    dtype: str = "float32",
    device: str | None = None,
) -> torch.Tensor:
    """(N, D) L2-normalised row embeddings: the mean of each row's image embeddings. ``digests`` maps each row
    to embed to the sha256 of its images' bytes (in order); other rows get zeros."""
    cache = EmbeddingCache(model_name_or_path, cache_dir)
    todo: dict[str, tuple[int, int]] = {}  # digest → (row, position): read again when embedded, not kept
    for i, keys in digests.items():
        for k, digest in enumerate(keys):
            if digest not in cache.table:
                todo.setdefault(digest, (i, k))
    if todo:
        embedder = ImageEmbedder(model_name_or_path, dtype, device)
        for digest, (i, k) in tqdm(todo.items(), desc="embedding images", unit="image"):
            value = row_image_list(source.row(i), images_field, i)[k]
            data, _ = image_payload(value, source.image_root, i, images_field)
            cache.table[digest] = embedder(load_image(data))
        cache.save()
        logger.info("embedded %d images (cache: %s)", len(todo), cache.path)
    else:
        logger.info("all %d rows' image embeddings from the cache %s", len(digests), cache.path)
    if not cache.table:
        raise ValueError("no images to embed")
    dim = next(iter(cache.table.values())).shape[0]
    out = torch.zeros(len(source), dim)
    for i, keys in digests.items():
        out[i] = torch.stack([cache.table[k] for k in keys]).mean(0)
    return torch.nn.functional.normalize(out, dim=1)
