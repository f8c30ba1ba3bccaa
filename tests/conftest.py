"""Shared fixtures: tiny models written to disk once per session and loaded with from_pretrained."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

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


# ------------------------------------------------------------------------------------------------------ tiers
# Every test gets one tier marker, assigned here (not in the test files) so the tiers stay in one place:
#   unit         no model: pure functions, losses, metrics, configs, row checks with a hand-made tokenizer
#   integration  tiny models built locally and loaded with from_pretrained (collator, trainer, CLI, families)
#   equivalence  two ways of computing the same thing agree: distributed vs one process, resume vs no crash,
#                reference modes, packed vs padded batches, each image encoded once vs every time
#   regression   end-to-end behaviour pinned: ADPO learns, the demo's story, the shipped benchmark configs
# `make test` runs every tier; `make test-fast` (marker `fast`) runs the unit tier and the tiny-model tests of one
# batch's core path (collator -> log-probs -> evaluation), about a minute on 2 cores.
MODULE_TIERS = {
    "test_bench_configs": "regression",
    "test_bench_flops": "integration",
    "test_cli": "integration",
    "test_contract": "integration",
    "test_distributed": "equivalence",
    "test_families": "integration",
    "test_image_dedup": "equivalence",
    "test_learning": "regression",
    "test_logprobs": "integration",
    "test_packing": "equivalence",
    "test_reference": "equivalence",
}
MODEL_FIXTURES = {"tiny_idefics3", "tiny_llama", "tiny"}  # a test that uses one is at least integration
TIERS = ("unit", "integration", "equivalence", "regression")
FAST_INTEGRATION = {"test_collator", "test_logprobs", "test_evaluate"}


def tier_of(module: str, name: str, fixtures: list[str]) -> str:
    """A test's tier: its module's, else integration when it loads a tiny model, else unit."""
    if "resume" in name:
        return "equivalence"
    if module in MODULE_TIERS:
        return MODULE_TIERS[module]
    return "integration" if MODEL_FIXTURES & set(fixtures) else "unit"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        tier = tier_of(module, item.name, getattr(item, "fixturenames", []))
        item.add_marker(tier)
        if tier == "unit" or (tier == "integration" and module in FAST_INTEGRATION):
            item.add_marker("fast")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``tiny(family)``: the folder of that family's tiny model (adpo.testing.tiny.build_tiny), built on first use
    and shared by every test of the session."""
    from adpo.testing.tiny import build_tiny

    root = tmp_path_factory.mktemp("tiny_families")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny(family, root / family)
        return built[family]

    return get
