"""The benchmarked architectures, built locally: configs from ``bench/configs``, processors like the real ones
with a local tokenizer, and synthetic rows (no download).

Config sources (values checked against public copies of the hub files; no download at run time):
  * SmolVLM-Instruct (HuggingFaceTB/SmolVLM-Instruct config.json): Idefics3, scale_factor 3, image_token_id 49153,
    SmolLM2-1.7B text (hidden 2048, 24 layers, 32 heads, 32 kv heads, head_dim 64, intermediate 8192, rope_theta
    273768, vocab 49155, untied head), SigLIP vision (hidden 1152, 27 layers, 16 heads, intermediate 4304, patch 14,
    image 384) -- as mirrored in a public Rust test ("Config shape mirrors the released
    HuggingFaceTB/SmolVLM-Instruct config.json"). Processor: image_seq_len 81, size longest_edge 1536 (4 x 384),
    max_image_size longest_edge 384, do_image_splitting true, mean/std 0.5 (preprocessor_config.json).
  * llava-hf/llava-v1.6-mistral-7b-hf config.json: LlavaNext, image_grid_pinpoints [[336,672],[672,336],[672,672],
    [1008,336],[336,1008]], image_token_index 32000, gelu projector, vision_feature_layer -2, select "default",
    Mistral-7B-Instruct-v0.2 text (hidden 4096, 32 layers, 32 heads, 8 kv heads, intermediate 14336, rope_theta 1e6,
    vocab 32064), CLIP ViT-L/14-336 vision (hidden 1024, 24 layers, 16 heads, intermediate 4096) -- as copied in
    TensorRT-LLM's LLaVA-NeXT modeling test (LLAVA_NEXT_7B_CONFIG, whose comment gives 24 vision layers for the full
    model) and transformers' LlavaNextConfig defaults. Processor: patch_size 14, num_additional_image_tokens 1,
    CLIP mean/std, shortest_edge 336, chat template from the hub's chat_template.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# SmolVLM-Instruct's chat template (Idefics3): "<|im_start|>User:<image>text<end_of_utterance>\nAssistant:".
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# llava-hf/llava-v1.6-mistral-7b-hf chat_template.json.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s> '}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# ~30-token questions (chosen and rejected differ in one word) and ~40-token responses, as words the local BPE
# learns whole.
_QUESTION = ("Look closely at the {colour} {shape} near the {place} of this picture and tell me what kind of "
             "object it is, how large it looks and where exactly it sits in the scene?")
_RESPONSE = ("The object is a small round {fruit} with smooth shiny skin resting on a wooden table near the "
             "{place} edge of the frame, and it looks fresh, ripe and ready to be eaten today by someone who "
             "is hungry.")
_WORDS = {
    "colour": ["red", "green", "blue", "yellow"],
    "shape": ["circle", "square", "star", "triangle"],
    "place": ["left", "right", "top", "bottom"],
    "fruit": ["apple", "orange", "plum", "pear"],
}


# ---------------------------------------------------------------------------------------------------- configs
def load_config(name: str, tiny: bool) -> Any:
    """The architecture config from ``bench/configs/<name>.json`` (scaled down with ``tiny``)."""
    from transformers import AutoConfig

    raw = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    if tiny:
        _shrink(raw)
    return AutoConfig.for_model(raw.pop("model_type"), **raw)


def _shrink(raw: dict[str, Any]) -> None:
    """Few layers and narrow widths; image sizes, patch sizes and vocabularies stay real."""
    raw["text_config"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16)
    raw["vision_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


# ---------------------------------------------------------------------------------------------------- processors
def corpus() -> list[str]:
    """Every question and response the rows use, so the local BPE learns their words whole."""
    rows = synthetic_rows(16, image_size=8)
    return [r[k] for r in rows for k in ("chosen", "rejected", "response")]


def local_tokenizer(specials: list[str], **tokens: Any) -> Any:
    from transformers import PreTrainedTokenizerFast

    from adpo.testing.tiny import train_tokenizer

    return PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(specials, corpus(), vocab_size=1000), **tokens)


def _pick(family: str, fast: str, pil: str, prefer_fast: bool) -> type:
    """The torchvision-backed image processor where torchvision is installed (what AutoProcessor picks), else PIL.

    The PIL class is imported from its module: transformers 5.17's lazy top-level name wrongly demands torchvision.
    """
    import importlib

    import transformers
    from transformers.utils import is_torchvision_available

    if prefer_fast and is_torchvision_available():
        return getattr(transformers, fast)
    return getattr(importlib.import_module(f"transformers.models.{family}.image_processing_pil_{family}"), pil)


def smolvlm_tokenizer() -> Any:
    """A local BPE with SmolVLM-Instruct's special tokens."""
    # The processor looks up these tokens when it is built; the real tokenizer spells <global-img> and the
    # <row_i_col_j> tags in ordinary text tokens (a few more tokens per tile than here).
    specials = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                "<global-img>"] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    return local_tokenizer(specials, bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                           pad_token="<|endoftext|>", unk_token="<|endoftext|>", extra_special_tokens=specials[3:])


def smolvlm_processor(split: bool, prefer_fast: bool = True, tokenizer: Any = None) -> Any:
    """An Idefics3Processor configured like SmolVLM-Instruct's, with a local tokenizer."""
    from transformers import Idefics3Processor

    tokenizer = tokenizer or smolvlm_tokenizer()
    image_processor = _pick("idefics3", "Idefics3ImageProcessor", "Idefics3ImageProcessorPil", prefer_fast)(
        do_resize=True, size={"longest_edge": 4 * 384}, max_image_size={"longest_edge": 384},
        do_image_splitting=split, image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=Image.Resampling.LANCZOS,
    )
    return Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=81,
                             chat_template=SMOLVLM_CHAT_TEMPLATE)


def llava_tokenizer() -> Any:
    """A local BPE with llava-v1.6-mistral-7b-hf's special tokens."""
    return local_tokenizer(["<unk>", "<s>", "</s>", "<image>"], bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                           pad_token="<unk>", extra_special_tokens=["<image>"])


def llava_processor(grid_pinpoints: list[list[int]], prefer_fast: bool = True, tokenizer: Any = None) -> Any:
    """A LlavaNextProcessor configured like llava-v1.6-mistral-7b-hf's, with a local tokenizer."""
    from transformers import LlavaNextProcessor

    tokenizer = tokenizer or llava_tokenizer()
    image_processor = _pick("llava_next", "LlavaNextImageProcessor", "LlavaNextImageProcessorPil", prefer_fast)(
        do_resize=True, size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
        image_grid_pinpoints=grid_pinpoints, do_pad=True, resample=Image.Resampling.BICUBIC,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                              vision_feature_select_strategy="default", chat_template=LLAVA_CHAT_TEMPLATE,
                              image_token="<image>", num_additional_image_tokens=1)


def point_config_at_tokenizer(config: Any, tokenizer: Any) -> None:
    """Use the local tokenizer's special-token ids; the vocabulary size stays the real one."""
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    if image_id >= config.text_config.vocab_size:
        raise RuntimeError(f"<image> id {image_id} is outside the model's vocabulary ({config.text_config.vocab_size})")
    config.image_token_id = image_id  # LLaVA's attribute_map routes this to image_token_index
    for cfg in (config, config.text_config):
        cfg.pad_token_id = tokenizer.pad_token_id
        cfg.bos_token_id = tokenizer.bos_token_id
        cfg.eos_token_id = tokenizer.eos_token_id


# ---------------------------------------------------------------------------------------------------- data
def synthetic_rows(n: int, image_size: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` ADPO rows: one response, two prompts differing in one colour word, one noise image per side."""
    gen = torch.Generator().manual_seed(seed)
    images = [_noise_image(image_size, gen) for _ in range(4)]
    rows = []
    for i in range(n):
        pick = {k: v[(i + j) % len(v)] for j, (k, v) in enumerate(_WORDS.items())}
        other = _WORDS["colour"][(i + 1) % len(_WORDS["colour"])]
        rows.append({
            "response": _RESPONSE.format(**pick),
            "chosen": _QUESTION.format(**pick),
            "rejected": _QUESTION.format(**{**pick, "colour": other}),
            "chosen_images": [images[i % 4]],
            "rejected_images": [images[(i + 1) % 4]],
            "_adpo_row": i,
        })
    return rows


def _noise_image(size: int, gen: torch.Generator) -> Image.Image:
    pixels = torch.randint(0, 256, (size, size, 3), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), mode="RGB")




def build_model(config: Any, dtype: torch.dtype, device_type: str, attn: str | None) -> nn.Module:
    """Random weights, created directly on ``device_type`` (cpu, cuda or meta) in ``dtype``."""
    from transformers import AutoModelForImageTextToText

    kwargs = {"attn_implementation": attn} if attn else {}
    with torch.device(device_type):
        return AutoModelForImageTextToText.from_config(config, dtype=dtype, **kwargs)
