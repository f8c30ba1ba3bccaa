"""The GPU benchmark's shipped architecture configs parse and build (on the meta device) at their real sizes.

bench/bench_gpu.py builds SmolVLM-Instruct and LLaVA-1.6-Mistral-7B from these files with random weights; a wrong
value would silently benchmark another model, so the parameter counts are pinned to the published sizes
(SmolVLM-Instruct 2.25B, llava-v1.6-mistral-7b-hf 7.57B) and the main shapes to the hub configs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

CONFIGS = Path(__file__).resolve().parents[1] / "bench" / "configs"

EXPECTED = {
    # file: (model class, parameter range, (text hidden, text layers, heads, kv heads, vocab),
    #        (vision hidden, vision layers, patch, image size))
    "smolvlm_instruct": ("Idefics3ForConditionalGeneration", (2.20e9, 2.30e9), (2048, 24, 32, 32, 49155),
                         (1152, 27, 14, 384)),
    "llava_v1.6_mistral_7b": ("LlavaNextForConditionalGeneration", (7.50e9, 7.60e9), (4096, 32, 32, 8, 32064),
                              (1024, 24, 14, 336)),
}


def load(name: str):
    raw = json.loads((CONFIGS / f"{name}.json").read_text())
    return AutoConfig.for_model(raw.pop("model_type"), **raw)


def test_every_shipped_config_is_covered():
    assert sorted(p.stem for p in CONFIGS.glob("*.json")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_shapes_match_the_hub_config(name):
    _, _, text, vision = EXPECTED[name]
    cfg = load(name)
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.vocab_size) == text
    assert (v.hidden_size, v.num_hidden_layers, v.patch_size, v.image_size) == vision
    assert cfg.tie_word_embeddings is False


def test_smolvlm_image_sequence_length_is_81():
    """81 tokens per 384 x 384 tile: (384 // 14)² patches, pixel-shuffled by scale_factor 3 in each direction."""
    cfg = load("smolvlm_instruct")
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    assert side * side // cfg.scale_factor**2 == 81


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_builds_on_meta_at_the_published_size(name):
    cls, (low, high), (hidden, _, _, _, vocab), _ = EXPECTED[name]
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(load(name), dtype=torch.bfloat16)
    assert type(model).__name__ == cls
    n = sum(p.numel() for p in model.parameters())
    assert low < n < high, f"{name}: {n / 1e9:.3f}B parameters"
    assert tuple(model.get_output_embeddings().weight.shape) == (vocab, hidden)


@pytest.mark.slow
def test_adpo_trains_without_the_datasets_package():
    """The GPU machine has no `datasets`: the collator, trainer and LoRA helpers must import without it."""
    code = ("import sys; sys.modules['datasets'] = None\n"  # `import datasets` now raises ImportError
            "import adpo\n"
            "from adpo import ADPOCollator, ADPOConfig, ADPOTrainer, ModelArguments\n"
            "from adpo.modeling import apply_lora, load_reference\n"
            "assert sys.modules['datasets'] is None\n")
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
