"""Shared fixtures: tiny models written to disk once per session and loaded with from_pretrained."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from adpo.synthetic import counterfactual_rows, write_jsonl  # noqa: E402
from adpo.testing.tiny import build_tiny_idefics3, build_tiny_llama  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_idefics3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SmolVLM/Idefics3 folder (model + processor)."""
    return build_tiny_idefics3(tmp_path_factory.mktemp("tiny_idefics3"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama-architecture causal LM folder with a chat template."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def image_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 image-counterfactual rows as JSONL + PNG files (paths relative to the file)."""
    return write_jsonl(counterfactual_rows(16, seed=1), tmp_path_factory.mktemp("image_rows"))


@pytest.fixture(scope="session")
def text_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Text-only ADPO rows as JSONL."""
    import json

    folder = tmp_path_factory.mktemp("text_rows")
    path = folder / "train.jsonl"
    rows = [
        {"response": "This is a red apple.", "chosen": "Describe the red fruit.",
         "rejected": "Describe the green fruit."},
        {"response": "The shape is a blue square.", "chosen": "What blue shape is it?", "rejected": "What is it?"},
        {"response": "Three.", "chosen": "Question: how many shapes are there?", "rejected": "Say a number."},
        {"response": "A green triangle.", "chosen": "Which green shape?", "rejected": "Which red shape?"},
    ] * 2
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
