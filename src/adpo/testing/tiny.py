"""Tiny, randomly initialised models built offline, for tests, the demo and benchmarks.

Every builder writes a folder that loads with ``from_pretrained`` (model and processor/tokenizer), so code that
uses these models goes through exactly the loading path a user's checkpoint goes through. Nothing here touches a
model hub: the tokenizer is a byte-level BPE trained on a few sentences with the ``tokenizers`` library.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

_CORPUS = [
    "What fruit is shown in this image?",
    "This is a red apple.",
    "This is a green apple.",
    "What colour is the shape in the picture?",
    "The shape is a red circle on a white background.",
    "The shape is a blue square.",
    "There are two green triangles and one yellow star.",
    "Describe the image in one sentence.",
    "Question: how many shapes are there? Answer: three.",
    "The quick brown fox jumps over the lazy dog.",
    "left right top bottom centre small large purple orange black white",
    "0 1 2 3 4 5 6 7 8 9 zero one two three four five six seven eight nine",
]

# SmolVLM-Instruct's chat template (Idefics3 family): "User:<image>text<end_of_utterance>\nAssistant: ...".
IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# Llama-3-style text chat template.
LLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def train_tokenizer(
    special_tokens: list[str], extra_text: Iterable[str] = (), vocab_size: int = 400
) -> Tokenizer:
    """A byte-level BPE tokenizer trained on a small built-in corpus (plus ``extra_text``)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([*_CORPUS, *extra_text], trainer=trainer)
    return tok


def build_tiny_llama(
    path: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    vocab_size: int = 400,
    model_vocab_size: int | None = None,
    chat_template: bool = True,
    seed: int = 0,
    extra_text: Iterable[str] = (),
) -> Path:
    """Write a tiny random Llama-architecture causal LM and its tokenizer to ``path``.

    ``vocab_size`` sizes the BPE training (a few hundred tokens saturate the small corpus); ``model_vocab_size``
    gives the model a larger vocabulary than the tokenizer uses (embedding and LM head of that many rows), for
    memory and speed measurements at realistic vocabulary sizes with identical tokenisation.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(specials, extra_text, vocab_size),
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>" if chat_template else "<|end_of_text|>",
        pad_token="<|end_of_text|>",
    )
    if chat_template:
        tokenizer.chat_template = LLAMA_CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=max(len(tokenizer), model_vocab_size or 0),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    logger.info("wrote a tiny Llama (%d parameters) to %s", model.num_parameters(), path)
    return path


def build_tiny_idefics3(
    path: str | Path,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 64,
    num_layers: int = 2,
    vocab_size: int = 400,
    do_image_splitting: bool = False,
    seed: int = 0,
    extra_text: Iterable[str] = (),
) -> Path:
    """Write a tiny random SmolVLM / Idefics3 model and its processor to ``path``.

    Images are resized to ``image_size`` pixels on the longest edge; each becomes
    ``(image_size // patch_size) ** 2 / scale_factor**2`` image tokens (4 by default).
    """
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
    )

    path = Path(path)
    # Idefics3's processor looks these tokens up when it is constructed: they must exist first.
    specials = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                "<global-img>"] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(specials, extra_text, vocab_size),
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        extra_special_tokens=specials[3:],
    )
    scale_factor = 2
    image_seq_len = (image_size // patch_size) ** 2 // scale_factor**2
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": image_size * (2 if do_image_splitting else 1)},
        max_image_size={"longest_edge": image_size},
        do_image_splitting=do_image_splitting,
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=image_seq_len,
        chat_template=IDEFICS3_CHAT_TEMPLATE,
    )
    torch.manual_seed(seed)
    config = Idefics3Config(
        vision_config={
            "hidden_size": hidden_size // 2,
            "intermediate_size": hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": patch_size,
        },
        text_config=_text_config(tokenizer, hidden_size, num_layers),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=scale_factor,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = Idefics3ForConditionalGeneration(config)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    logger.info("wrote a tiny Idefics3 (%d parameters) to %s", model.num_parameters(), path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# One builder per model family. Each mirrors the real checkpoint's tokenizer special tokens, chat template and
# processor class (with the torchvision-free *Pil image processor), scaled down so a training step takes well
# under a second on one CPU core: text hidden size 64, 2 layers (1 in vision towers), images of 16-32 pixels.
# ---------------------------------------------------------------------------------------------------------------


def _text_config(tokenizer: PreTrainedTokenizerFast, hidden_size: int, num_layers: int, **extra: Any) -> dict:
    """A small Llama-like text config (``extra`` adds or overrides fields, e.g. ``model_type``)."""
    return {
        "model_type": "llama",
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        **extra,
    }


def _clip_vision(hidden_size: int, image_size: int, patch_size: int) -> dict:
    return {
        "model_type": "clip_vision_model",
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": patch_size,
        "projection_dim": hidden_size,
    }


def _siglip_vision(hidden_size: int, image_size: int, patch_size: int) -> dict:
    # No pooling head, as in the real Gemma 3 and PaliGemma towers (they read every patch's hidden state).
    return {**_clip_vision(hidden_size, image_size, patch_size), "model_type": "siglip_vision_model",
            "vision_use_head": False}


def _save(model: Any, processor: Any, path: Path, family: str) -> Path:
    model.save_pretrained(path)
    processor.save_pretrained(path)
    logger.info("wrote a tiny %s (%d parameters) to %s", family, model.num_parameters(), path)
    return path


def _tokenizer(
    specials: list[str], extra_text: Iterable[str], vocab_size: int, **kwargs: Any
) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(specials, extra_text, vocab_size), **kwargs)


# llava-hf/llava-1.5-7b-hf: "USER: <image>\n<text> ASSISTANT:" (images first, then the text).
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# llava-hf/llava-v1.6-mistral-7b-hf: "[INST] <image>\n<text> [/INST] <answer></s>".
LLAVA_NEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ ' ' + content['text'] }}"
    "{% endfor %}{{ eos_token }}{% endif %}{% endfor %}"
)

# meta-llama/Llama-3.2-11B-Vision-Instruct (system prompt left out): images as <|image|> in content order.
MLLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<|image|>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{{ '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Qwen/Qwen2-VL-2B-Instruct and Qwen2.5-VL: ChatML with <|vision_start|><|image_pad|><|vision_end|> per image.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# google/gemma-3-4b-it: <start_of_turn>user / model, each image as <start_of_image>.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] | trim }}{% endif %}{% endfor %}"
    "{{ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def build_tiny_llava(
    path: str | Path, *, image_size: int = 16, patch_size: int = 8, hidden_size: int = 64, num_layers: int = 2,
    vocab_size: int = 400, seed: int = 0, extra_text: Iterable[str] = (),
) -> Path:
    """Write a tiny random LLaVA 1.5 (CLIP tower, MLP projector, Llama) and its processor to ``path``.

    Each image is resized and centre-cropped to ``image_size`` pixels: ``(image_size // patch_size) ** 2`` tokens.
    """
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    path = Path(path)
    specials = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]
    tokenizer = _tokenizer(specials, extra_text, vocab_size, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                           pad_token="<pad>", extra_special_tokens=["<image>"])
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_CHAT_TEMPLATE)
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=_clip_vision(hidden_size // 2, image_size, patch_size),
        text_config=_text_config(tokenizer, hidden_size, num_layers),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_layer=-1,
        pad_token_id=tokenizer.pad_token_id,
    )
    return _save(LlavaForConditionalGeneration(config), processor, path, "LLaVA 1.5")


def build_tiny_llava_next(
    path: str | Path, *, image_size: int = 16, patch_size: int = 8, hidden_size: int = 64, num_layers: int = 2,
    vocab_size: int = 400, seed: int = 0, extra_text: Iterable[str] = (),
) -> Path:
    """Write a tiny random LLaVA-NeXT (llava-v1.6-mistral layout) and its processor to ``path``.

    AnyRes: each image becomes a base view plus tiles on the best grid of ``image_size``-pixel cells from
    (1x2, 2x1, 2x2); its token count depends on its aspect ratio (the processor returns ``image_sizes``).
    """
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    path = Path(path)
    specials = ["<unk>", "<s>", "</s>", "<image>", "[INST]", "[/INST]"]
    tokenizer = _tokenizer(specials, extra_text, vocab_size, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                           pad_token="<unk>", extra_special_tokens=["<image>"])
    pinpoints = [[image_size, 2 * image_size], [2 * image_size, image_size], [2 * image_size, 2 * image_size]]
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=LLAVA_NEXT_CHAT_TEMPLATE)
    torch.manual_seed(seed)
    config = LlavaNextConfig(
        vision_config=_clip_vision(hidden_size // 2, image_size, patch_size),
        text_config=_text_config(tokenizer, hidden_size, num_layers, model_type="mistral"),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        pad_token_id=tokenizer.pad_token_id,
    )
    return _save(LlavaNextForConditionalGeneration(config), processor, path, "LLaVA-NeXT")


def build_tiny_mllama(
    path: str | Path, *, image_size: int = 16, patch_size: int = 8, hidden_size: int = 64, num_layers: int = 2,
    vocab_size: int = 400, max_image_tiles: int = 2, seed: int = 0, extra_text: Iterable[str] = (),
) -> Path:
    """Write a tiny random Llama 3.2 Vision (Mllama) and its processor to ``path``.

    Images are split into up to ``max_image_tiles`` tiles of ``image_size`` pixels; the language model reads
    them through a cross-attention layer (layer 1), so each image is a single ``<|image|>`` token in the text.
    """
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessorPil, MllamaProcessor

    path = Path(path)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|image|>", "<|finetune_right_pad_id|>", "<|python_tag|>"]
    tokenizer = _tokenizer(specials, extra_text, vocab_size, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                           pad_token="<|finetune_right_pad_id|>", extra_special_tokens=["<|image|>"])
    image_processor = MllamaImageProcessorPil(size={"height": image_size, "width": image_size},
                                              max_image_tiles=max_image_tiles)
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                chat_template=MLLAMA_CHAT_TEMPLATE)
    torch.manual_seed(seed)
    vision_hidden = hidden_size // 2
    config = MllamaConfig(
        vision_config={
            "hidden_size": vision_hidden, "intermediate_size": 2 * vision_hidden, "num_hidden_layers": 1,
            "num_global_layers": 1, "attention_heads": 2, "image_size": image_size, "patch_size": patch_size,
            "max_num_tiles": max_image_tiles, "intermediate_layers_indices": [0],
            "vision_output_dim": 2 * vision_hidden,
            "supported_aspect_ratios": [[1, 1], [1, 2], [2, 1]][: 1 + 2 * (max_image_tiles > 1)],
        },
        text_config=_text_config(tokenizer, hidden_size, num_layers, model_type="mllama_text_model",
                                 cross_attention_layers=[1]),
        image_token_index=tokenizer.convert_tokens_to_ids("<|image|>"),
    )
    model = MllamaForConditionalGeneration(config)
    with torch.no_grad():
        # Gates start at zero, which would hide the images from the text (and the vision tower from every
        # gradient); a trained checkpoint has them open.
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1].endswith("gate"):
                param.fill_(0.5)
    return _save(model, processor, path, "Mllama")


def _build_tiny_qwen_vl(
    path: str | Path, version: str, *, patch_size: int = 8, hidden_size: int = 64, num_layers: int = 2,
    vocab_size: int = 400, min_pixels: int = 16 * 16, max_pixels: int = 32 * 32, seed: int = 0,
    extra_text: Iterable[str] = (),
) -> Path:
    from transformers import Qwen2VLImageProcessorPil

    from adpo.processing import image_only_processor_class

    if version == "2":
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model
        from transformers import Qwen2VLProcessor as Processor
    else:
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model
        from transformers import Qwen2_5_VLProcessor as Processor

    path = Path(path)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    tokenizer = _tokenizer(specials, extra_text, vocab_size, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                           extra_special_tokens=specials[3:])
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels,
                                               patch_size=patch_size, merge_size=2)
    # Saved exactly as the real processor would be, minus the video processor (it needs torchvision);
    # adpo.processing.load_processor loads such a folder image-only.
    processor = image_only_processor_class(Processor)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN2_VL_CHAT_TEMPLATE
    )
    vision = {"depth": 1, "num_heads": 2, "patch_size": patch_size, "spatial_merge_size": 2,
              "temporal_patch_size": 2}
    if version == "2":
        vision |= {"embed_dim": hidden_size // 2, "hidden_size": hidden_size}
    else:
        vision |= {"hidden_size": hidden_size // 2, "intermediate_size": hidden_size, "out_hidden_size": hidden_size,
                   "window_size": 2 * patch_size * 2, "fullatt_block_indexes": [0]}
    head_dim = hidden_size // 4
    torch.manual_seed(seed)
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    text_type = "qwen2_vl_text" if version == "2" else "qwen2_5_vl_text"
    third = head_dim // 2 // 3
    config = Config(
        vision_config=vision,
        text_config=_text_config(
            tokenizer, hidden_size, num_layers, model_type=text_type,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": [head_dim // 2 - 2 * third, third, third]},
        ),
        **ids,
    )
    return _save(Model(config), processor, path, f"Qwen{version}-VL")


def build_tiny_qwen2_vl(path: str | Path, **kwargs: Any) -> Path:
    """Write a tiny random Qwen2-VL and its (image-only) processor to ``path``.

    Images keep their aspect ratio at between 16x16 and 32x32 pixels (``min_pixels``/``max_pixels``): 8-pixel
    patches merged 2x2, so 1-4 image tokens each, and ``pixel_values`` is one flat (patches, features) tensor.
    """
    return _build_tiny_qwen_vl(path, "2", **kwargs)


def build_tiny_qwen2_5_vl(path: str | Path, **kwargs: Any) -> Path:
    """Write a tiny random Qwen2.5-VL and its (image-only) processor to ``path`` (as :func:`build_tiny_qwen2_vl`)."""
    return _build_tiny_qwen_vl(path, "2.5", **kwargs)


def build_tiny_gemma3(
    path: str | Path, *, image_size: int = 32, patch_size: int = 8, hidden_size: int = 64, num_layers: int = 2,
    vocab_size: int = 400, mm_tokens_per_image: int = 4, seed: int = 0, extra_text: Iterable[str] = (),
) -> Path:
    """Write a tiny random Gemma 3 (SigLIP tower, pooled projector, Gemma 3 text) and its processor to ``path``.

    Each image is resized to ``image_size`` pixels square and pooled to ``mm_tokens_per_image`` tokens.
    """
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil, Gemma3Processor

    path = Path(path)
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                "<end_of_image>", "<image_soft_token>"]
    tokenizer = _tokenizer(
        specials, extra_text, vocab_size, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"},
    )
    image_processor = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                chat_template=GEMMA3_CHAT_TEMPLATE, image_seq_length=mm_tokens_per_image)
    torch.manual_seed(seed)
    config = Gemma3Config(
        vision_config=_siglip_vision(hidden_size // 2, image_size, patch_size),
        text_config=_text_config(tokenizer, hidden_size, num_layers, model_type="gemma3_text",
                                 head_dim=hidden_size // 4, query_pre_attn_scalar=hidden_size // 4,
                                 sliding_window=64, layer_types=["sliding_attention", "full_attention"][-num_layers:]
                                 if num_layers <= 2 else None),
        mm_tokens_per_image=mm_tokens_per_image,
        boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tokenizer.convert_tokens_to_ids("<image_soft_token>"),
    )
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():
        # The projection starts at zero, which would blank every image; a trained checkpoint's does not.
        projection = model.model.multi_modal_projector.mm_input_projection_weight
        projection.normal_(std=projection.shape[0] ** -0.5)
    return _save(model, processor, path, "Gemma 3")


def build_tiny_paligemma(
    path: str | Path, *, image_size: int = 16, patch_size: int = 8, hidden_size: int = 64, num_layers: int = 2,
    vocab_size: int = 400, seed: int = 0, extra_text: Iterable[str] = (),
) -> Path:
    """Write a tiny random PaliGemma (SigLIP tower, linear projector, Gemma) and its processor to ``path``.

    PaliGemma has no chat template: the prompt is ``<image>`` per image, BOS, the text and a newline (a prefix
    that attends bidirectionally); the response is the causal suffix, ending with EOS.
    """
    from transformers import (
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessorPil,
    )

    path = Path(path)
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"]
    tokenizer = _tokenizer(specials, extra_text, vocab_size, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                           unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    image_processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    image_processor.image_seq_length = (image_size // patch_size) ** 2
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    torch.manual_seed(seed)
    config = PaliGemmaConfig(
        vision_config=_siglip_vision(hidden_size // 2, image_size, patch_size),
        text_config=_text_config(tokenizer, hidden_size, num_layers, model_type="gemma", head_dim=hidden_size // 4),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        projection_dim=hidden_size,
        hidden_size=hidden_size,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )
    return _save(PaliGemmaForConditionalGeneration(config), processor, path, "PaliGemma")


# ---------------------------------------------------------------------------------------------------------------
# Families of 2025-2026 (transformers 5.x AutoModelForImageTextToText).
# ---------------------------------------------------------------------------------------------------------------

# Qwen/Qwen3-VL-8B-Instruct (tools and video left out): ChatML, no default system prompt.
QWEN3_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen/Qwen3.5 (thinking on by default): the generation prompt opens a thinking block; the last assistant turn is
# rendered with its (empty) thinking block closed, so the response after the generation prompt starts with
# "\n</think>\n\n".
QWEN3_5_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' }}{% else %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% endif %}{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}"
    "{% else %}{{ '<think>\n' }}{% endif %}{% endif %}"
)

_QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>", "<think>", "</think>"]


def _qwen_tokenizer(extra_text: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    return _tokenizer(_QWEN_SPECIALS, extra_text, vocab_size, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                      extra_special_tokens=_QWEN_SPECIALS[3:])


def _qwen_vision_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    return {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}


def _build_tiny_qwen3(
    path: str | Path, version: str, *, patch_size: int = 8, hidden_size: int = 64, num_layers: int = 2,
    vocab_size: int = 400, min_pixels: int = 16 * 16, max_pixels: int = 32 * 32, seed: int = 0,
    extra_text: Iterable[str] = (),
) -> Path:
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLProcessor

    from adpo.processing import image_only_processor_class

    path = Path(path)
    tokenizer = _qwen_tokenizer(extra_text, vocab_size)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch_size,
                                               merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    template = QWEN3_VL_CHAT_TEMPLATE if version == "3-VL" else QWEN3_5_CHAT_TEMPLATE
    processor = image_only_processor_class(Qwen3VLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=template
    )
    head_dim = hidden_size // 4
    vision = {"depth": 2, "hidden_size": hidden_size // 2, "intermediate_size": hidden_size, "num_heads": 2,
              "patch_size": patch_size, "spatial_merge_size": 2, "temporal_patch_size": 2,
              "out_hidden_size": hidden_size, "num_position_embeddings": 64}
    torch.manual_seed(seed)
    if version == "3-VL":
        from transformers import Qwen3VLConfig as Config
        from transformers import Qwen3VLForConditionalGeneration as Model

        vision["deepstack_visual_indexes"] = [0]  # one DeepStack merger, fed from the first block
        text = _text_config(tokenizer, hidden_size, num_layers, model_type="qwen3_vl_text", head_dim=head_dim,
                            rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                             "mrope_section": [4, 2, 2], "mrope_interleaved": True})
    else:
        from transformers import Qwen3_5Config as Config
        from transformers import Qwen3_5ForConditionalGeneration as Model

        # The real layout: linear-attention (Gated DeltaNet) layers, then a full-attention one.
        text = _text_config(tokenizer, hidden_size, num_layers, model_type="qwen3_5_text", head_dim=head_dim,
                            layer_types=["linear_attention"] * (num_layers - 1) + ["full_attention"],
                            linear_key_head_dim=head_dim, linear_value_head_dim=head_dim,
                            linear_num_key_heads=2, linear_num_value_heads=4, linear_conv_kernel_dim=4,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000000.0,
                                             "partial_rotary_factor": 0.25, "mrope_section": [1, 1, 0],
                                             "mrope_interleaved": True})
    config = Config(vision_config=vision, text_config=text, tie_word_embeddings=False, **_qwen_vision_ids(tokenizer))
    return _save(Model(config), processor, path, f"Qwen{version}")


def build_tiny_qwen3_vl(path: str | Path, **kwargs: Any) -> Path:
    """Write a tiny random Qwen3-VL (DeepStack merger, interleaved M-RoPE) and its (image-only) processor to
    ``path``: images of 16x16 to 32x32 pixels, 8-pixel patches merged 2x2 (1-4 image tokens each)."""
    return _build_tiny_qwen3(path, "3-VL", **kwargs)


def build_tiny_qwen3_5(path: str | Path, **kwargs: Any) -> Path:
    """Write a tiny random Qwen3.5 image-text model (Gated DeltaNet + full attention, Qwen3-VL processor with the
    thinking chat template) to ``path``; images as in :func:`build_tiny_qwen3_vl`."""
    return _build_tiny_qwen3(path, "3.5", **kwargs)


def build_tiny_smolvlm(
    path: str | Path, *, image_size: int = 32, patch_size: int = 8, hidden_size: int = 64, num_layers: int = 2,
    vocab_size: int = 400, seed: int = 0, extra_text: Iterable[str] = (),
) -> Path:
    """Write a tiny random SmolVLM2 (SmolVLMForConditionalGeneration, SmolVLMProcessor) to ``path``.

    As SmolVLM2's checkpoints, the folder's processor config holds video settings (frames, fps), which the
    processor reads for every chat, images only included; the video processor itself needs torchvision, so
    without it adpo.processing keeps those settings on a stand-in. Needs the ``num2words`` package, as the real
    processor does. Each image becomes ``(image_size // patch_size) ** 2 / 4`` tokens (4 by default).
    """
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil, SmolVLMProcessor
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    from adpo.processing import UnavailablePart, image_only_processor_class

    path = Path(path)
    specials = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                "<global-img>", "<video>"] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    tokenizer = _tokenizer(specials, extra_text, vocab_size, bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                           pad_token="<|endoftext|>", unk_token="<|endoftext|>", extra_special_tokens=specials[3:])
    scale_factor = 2
    image_processor = SmolVLMImageProcessorPil(size={"longest_edge": image_size},
                                               max_image_size={"longest_edge": image_size}, do_image_splitting=False)
    video_settings = {"video_processor_type": "SmolVLMVideoProcessor", "num_frames": 64, "fps": 1,
                      "size": {"longest_edge": image_size}, "max_image_size": {"longest_edge": image_size}}
    processor = image_only_processor_class(SmolVLMProcessor)(
        image_processor=image_processor, tokenizer=tokenizer,
        video_processor=UnavailablePart("video_processor", video_settings, "needs torchvision"),
        image_seq_len=(image_size // patch_size) ** 2 // scale_factor**2, chat_template=DEFAULT_CHAT_TEMPLATE,
    )
    torch.manual_seed(seed)
    config = SmolVLMConfig(
        vision_config={"hidden_size": hidden_size // 2, "intermediate_size": hidden_size, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": image_size, "patch_size": patch_size},
        text_config=_text_config(tokenizer, hidden_size, num_layers),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), scale_factor=scale_factor,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    return _save(SmolVLMForConditionalGeneration(config), processor, path, "SmolVLM2")


# llava-hf/llava-onevision-qwen2-7b-ov-hf: every turn opens with "<|im_start|>role " (a space) but the generation
# prompt is "<|im_start|>assistant\n", so the assistant turn does not continue the generation prompt.
LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_llava_onevision(
    path: str | Path, *, image_size: int = 16, patch_size: int = 8, hidden_size: int = 64, num_layers: int = 2,
    vocab_size: int = 400, seed: int = 0, extra_text: Iterable[str] = (),
) -> Path:
    """Write a tiny random LLaVA-OneVision (SigLIP tower, AnyRes tiles, Qwen2 text) and its processor to ``path``.

    Each image: a base view plus tiles on the best grid of ``image_size`` cells from (1x2, 2x1, 2x2), unpadded
    to its aspect ratio, with a newline embedding per row; the processor saves the real checkpoint's
    ``vision_aspect_ratio`` and ``num_image_tokens``.
    """
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        LlavaOnevisionProcessor,
    )

    from adpo.processing import image_only_processor_class

    path = Path(path)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
    tokenizer = _tokenizer(specials, extra_text, vocab_size, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                           extra_special_tokens=specials[3:])
    pinpoints = [[image_size, 2 * image_size], [2 * image_size, image_size], [2 * image_size, 2 * image_size]]
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": image_size, "width": image_size},
                                                      image_grid_pinpoints=pinpoints)
    processor = image_only_processor_class(LlavaOnevisionProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
        chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE,
    )
    torch.manual_seed(seed)
    config = LlavaOnevisionConfig(
        vision_config=_siglip_vision(hidden_size // 2, image_size, patch_size),
        text_config=_text_config(tokenizer, hidden_size, num_layers, model_type="qwen2"),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints, vision_feature_layer=-1, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9", tie_word_embeddings=False,
    )
    return _save(LlavaOnevisionForConditionalGeneration(config), processor, path, "LLaVA-OneVision")


# OpenGVLab/InternVL3-1B-hf: ChatML; each image is "<IMG_CONTEXT>" in the text, which the processor expands to
# <img><IMG_CONTEXT>*N</img>.
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_internvl(
    path: str | Path, *, image_size: int = 16, patch_size: int = 4, hidden_size: int = 64, num_layers: int = 2,
    vocab_size: int = 400, max_patches: int = 3, seed: int = 0, extra_text: Iterable[str] = (),
) -> Path:
    """Write a tiny random InternVL 3.x (InternViT, pixel-shuffle MLP projector, Qwen2 text; the -hf layout) and
    its processor to ``path``. Images are cut into up to ``max_patches`` tiles of ``image_size`` pixels plus a
    thumbnail (GotOcr2 image processor); each tile becomes ``(image_size // patch_size) ** 2 / 4`` tokens."""
    from transformers import (
        GotOcr2ImageProcessorPil,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
    )

    from adpo.processing import image_only_processor_class

    path = Path(path)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
    tokenizer = _tokenizer(specials, extra_text, vocab_size, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                           extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                                                 "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    image_processor = GotOcr2ImageProcessorPil(size={"height": image_size, "width": image_size}, crop_to_patches=True,
                                               min_patches=1, max_patches=max_patches)
    image_seq_length = (image_size // patch_size) ** 2 // 4
    processor = image_only_processor_class(InternVLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=image_seq_length,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )
    torch.manual_seed(seed)
    config = InternVLConfig(
        vision_config={"hidden_size": hidden_size // 2, "intermediate_size": hidden_size, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": [image_size, image_size],
                       "patch_size": [patch_size, patch_size]},
        text_config=_text_config(tokenizer, hidden_size, num_layers, model_type="qwen2"),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=image_seq_length,
        downsample_ratio=0.5, tie_word_embeddings=False,
    )
    return _save(InternVLForConditionalGeneration(config), processor, path, "InternVL")


# CohereLabs/aya-vision-8b (default system preamble left out): Cohere turn tokens, "<image>" per image.
AYA_VISION_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|START_OF_TURN_TOKEN|>' }}"
    "{{ '<|USER_TOKEN|>' if message['role'] == 'user' else '<|CHATBOT_TOKEN|>' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<image>' }}{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{ '<|END_OF_TURN_TOKEN|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{% endif %}"
)


def build_tiny_aya_vision(
    path: str | Path, *, image_size: int = 16, patch_size: int = 4, hidden_size: int = 64, num_layers: int = 2,
    vocab_size: int = 400, max_patches: int = 2, seed: int = 0, extra_text: Iterable[str] = (),
) -> Path:
    """Write a tiny random Aya Vision (SigLIP tower, pixel-shuffle SwiGLU projector, Cohere 2 text) and its
    processor to ``path``: up to ``max_patches`` tiles plus a global view per image, each
    ``(image_size // (patch_size * 2)) ** 2`` image tokens."""
    from transformers import (
        AyaVisionConfig,
        AyaVisionForConditionalGeneration,
        AyaVisionProcessor,
        GotOcr2ImageProcessorPil,
    )

    path = Path(path)
    specials = ["<PAD>", "<UNK>", "<BOS_TOKEN>", "<EOS_TOKEN>", "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>",
                "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>", "<image>", "<|START_OF_IMG|>",
                "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>", "TILE", "TILE_GLOBAL"]
    tokenizer = _tokenizer(specials, extra_text, vocab_size, pad_token="<PAD>", unk_token="<UNK>",
                           bos_token="<BOS_TOKEN>", eos_token="<|END_OF_TURN_TOKEN|>",
                           extra_special_tokens=specials[4:])
    image_processor = GotOcr2ImageProcessorPil(size={"height": image_size, "width": image_size}, crop_to_patches=True,
                                               min_patches=1, max_patches=max_patches, image_mean=[0.5] * 3,
                                               image_std=[0.5] * 3)
    processor = AyaVisionProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                                   img_size=image_size, downsample_factor=2, chat_template=AYA_VISION_CHAT_TEMPLATE)
    torch.manual_seed(seed)
    config = AyaVisionConfig(
        vision_config=_siglip_vision(hidden_size // 2, image_size, patch_size),
        text_config=_text_config(tokenizer, hidden_size, num_layers, model_type="cohere2", head_dim=hidden_size // 4,
                                 sliding_window=64, layer_types=["sliding_attention", "full_attention"][-num_layers:]
                                 if num_layers <= 2 else None),
        image_token_index=tokenizer.convert_tokens_to_ids("<|IMG_PATCH|>"), downsample_factor=2,
        vision_feature_select_strategy="full", vision_feature_layer=-1, tie_word_embeddings=False,
    )
    return _save(AyaVisionForConditionalGeneration(config), processor, path, "Aya Vision")


# zai-org/GLM-4.1V-9B-Thinking (tools left out): [gMASK]<sop>, role tokens, <|begin_of_image|><|image|><|end_of_image|>.
GLM4V_CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for message in messages %}{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<|begin_of_image|><|image|><|end_of_image|>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|user|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def build_tiny_glm4v(
    path: str | Path, *, patch_size: int = 8, hidden_size: int = 64, num_layers: int = 2, vocab_size: int = 400,
    min_pixels: int = 16 * 16, max_pixels: int = 32 * 32, seed: int = 0, extra_text: Iterable[str] = (),
) -> Path:
    """Write a tiny random GLM-4.1V (GLM-4V vision tower with merger, GLM-4 text) and its (image-only) processor to
    ``path``; images as in :func:`build_tiny_qwen3_vl`. The assistant turn ends with ``<|user|>``, as GLM's does."""
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration, Glm4vImageProcessorPil, Glm4vProcessor

    from adpo.processing import image_only_processor_class

    path = Path(path)
    specials = ["<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>",
                "<|begin_of_image|>", "<|end_of_image|>", "<|image|>", "<|begin_of_video|>", "<|end_of_video|>",
                "<|video|>"]
    tokenizer = _tokenizer(specials, extra_text, vocab_size, eos_token="<|user|>", pad_token="<|endoftext|>",
                           extra_special_tokens=specials[1:])
    image_processor = Glm4vImageProcessorPil(size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
                                             patch_size=patch_size, merge_size=2, temporal_patch_size=2)
    processor = image_only_processor_class(Glm4vProcessor)(image_processor=image_processor, tokenizer=tokenizer,
                                                           chat_template=GLM4V_CHAT_TEMPLATE)
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in [
        ("image_token_id", "<|image|>"), ("video_token_id", "<|video|>"),
        ("image_start_token_id", "<|begin_of_image|>"), ("image_end_token_id", "<|end_of_image|>"),
        ("video_start_token_id", "<|begin_of_video|>"), ("video_end_token_id", "<|end_of_video|>")]}
    head_dim = hidden_size // 4
    torch.manual_seed(seed)
    config = Glm4vConfig(
        vision_config={"depth": 1, "hidden_size": hidden_size // 2, "intermediate_size": hidden_size, "num_heads": 2,
                       "patch_size": patch_size, "spatial_merge_size": 2, "temporal_patch_size": 2,
                       "out_hidden_size": hidden_size, "image_size": 32},
        text_config=_text_config(tokenizer, hidden_size, num_layers, model_type="glm4v_text", head_dim=head_dim,
                                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "partial_rotary_factor": 0.5,
                                                  "mrope_section": [2, 1, 1]}),
        tie_word_embeddings=False, **ids,
    )
    return _save(Glm4vForConditionalGeneration(config), processor, path, "GLM-4.1V")


# google/gemma-4 instruction-tuned checkpoints: <|turn>role ... <turn|>, the assistant's role is "model", each image
# is <|image|> in the text (the processor expands it to <|image> + soft tokens + <image|>).
GEMMA4_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<|image|>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<turn|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|turn>model\n' }}{% endif %}"
)


def build_tiny_gemma4(
    path: str | Path, *, patch_size: int = 4, hidden_size: int = 64, num_layers: int = 2, vocab_size: int = 400,
    max_soft_tokens: int = 70, seed: int = 0, extra_text: Iterable[str] = (),
) -> Path:
    """Write a tiny random Gemma 4 (its own vision encoder, ``embed_vision`` projector, Gemma 4 text) and its
    processor to ``path``. Gemma4Processor's constructor takes (feature_extractor, image_processor, tokenizer,
    video_processor): the audio feature extractor is saved, the video processor (torchvision) is left out. Each image
    keeps its aspect ratio and becomes at most ``max_soft_tokens`` soft tokens (3x3-pooled ``patch_size`` patches;
    70 is the smallest budget the image processor takes).
    """
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration, Gemma4ImageProcessorPil, Gemma4Processor
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

    from adpo.processing import processor_class_without

    path = Path(path)
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>", "<|image>", "<image|>", "<|image|>",
                "<|audio>", "<audio|>", "<|audio|>", "<|video|>"]
    tokenizer = _tokenizer(
        specials, extra_text, vocab_size, pad_token="<pad>", eos_token="<turn|>", bos_token="<bos>", unk_token="<unk>",
        extra_special_tokens={"boi_token": "<|image>", "eoi_token": "<image|>", "image_token": "<|image|>",
                              "boa_token": "<|audio>", "eoa_token": "<audio|>", "audio_token": "<|audio|>"},
    )
    image_processor = Gemma4ImageProcessorPil(patch_size=patch_size, max_soft_tokens=max_soft_tokens,
                                              pooling_kernel_size=3)
    processor = processor_class_without(Gemma4Processor, ("video_processor",))(
        feature_extractor=Gemma4AudioFeatureExtractor(), image_processor=image_processor, tokenizer=tokenizer,
        chat_template=GEMMA4_CHAT_TEMPLATE, image_seq_length=max_soft_tokens,
    )
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in [
        ("boi_token_id", "<|image>"), ("eoi_token_id", "<image|>"), ("image_token_id", "<|image|>"),
        ("video_token_id", "<|video|>"), ("boa_token_id", "<|audio>"), ("eoa_token_index", "<audio|>"),
        ("audio_token_id", "<|audio|>")]}
    head_dim = hidden_size // 4
    torch.manual_seed(seed)
    config = Gemma4Config(
        text_config=_text_config(tokenizer, hidden_size, num_layers, model_type="gemma4_text", head_dim=head_dim,
                                 global_head_dim=head_dim, sliding_window=64,
                                 layer_types=["sliding_attention", "full_attention"][-num_layers:]
                                 if num_layers <= 2 else None,
                                 vocab_size_per_layer_input=len(tokenizer), hidden_size_per_layer_input=0),
        vision_config={"hidden_size": hidden_size // 2, "intermediate_size": hidden_size, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": hidden_size // 4,
                       "patch_size": patch_size, "pooling_kernel_size": 3, "position_embedding_size": 64},
        audio_config=None, tie_word_embeddings=False, **ids,
    )
    return _save(Gemma4ForConditionalGeneration(config), processor, path, "Gemma 4")


# mistralai/Mistral-Small-3.1-24B-Instruct-2503 (default system prompt left out): "<s>[INST]<text/[IMG]>[/INST]"
# and the answer closed by </s>; no generation prompt (the assistant turn starts right after [/INST]).
MISTRAL3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST]' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for block in message['content'] %}"
    "{% if block['type'] == 'text' %}{{ block['text'] }}{% elif block['type'] in ['image', 'image_url'] %}"
    "{{ '[IMG]' }}{% endif %}{% endfor %}{% endif %}{{ '[/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for block in message['content'] %}{{ block['text'] }}{% endfor %}{% endif %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)


def build_tiny_mistral3(
    path: str | Path, *, image_size: int = 32, patch_size: int = 4, hidden_size: int = 64, num_layers: int = 2,
    vocab_size: int = 400, seed: int = 0, extra_text: Iterable[str] = (),
) -> Path:
    """Write a tiny random Mistral 3 (Pixtral tower, patch-merger projector, Mistral text) and its Pixtral
    processor to ``path``. Each image keeps its aspect ratio (longest edge at most ``image_size``) and becomes one
    ``[IMG]`` per ``2 * patch_size`` cell, rows closed by ``[IMG_BREAK]`` and the image by ``[IMG_END]``."""
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        PixtralImageProcessorPil,
        PixtralProcessor,
    )

    path = Path(path)
    specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]", "[SYSTEM_PROMPT]",
                "[/SYSTEM_PROMPT]", "<pad>"]
    tokenizer = _tokenizer(specials, extra_text, vocab_size, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                           pad_token="<pad>", extra_special_tokens=specials[3:10])
    merge = 2
    image_processor = PixtralImageProcessorPil(size={"longest_edge": image_size},
                                               patch_size={"height": patch_size, "width": patch_size},
                                               image_mean=[0.48145466, 0.4578275, 0.40821073],
                                               image_std=[0.26862954, 0.26130258, 0.27577711])
    processor = PixtralProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                                 spatial_merge_size=merge, chat_template=MISTRAL3_CHAT_TEMPLATE)
    torch.manual_seed(seed)
    config = Mistral3Config(
        vision_config={"model_type": "pixtral", "hidden_size": hidden_size // 2, "intermediate_size": hidden_size,
                       "num_hidden_layers": 1, "num_attention_heads": 2, "head_dim": hidden_size // 4,
                       "image_size": image_size, "patch_size": patch_size},
        text_config=_text_config(tokenizer, hidden_size, num_layers, model_type="mistral", head_dim=hidden_size // 4,
                                 sliding_window=None),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), spatial_merge_size=merge,
        vision_feature_layer=-1, tie_word_embeddings=False,
    )
    return _save(Mistral3ForConditionalGeneration(config), processor, path, "Mistral 3")


# LiquidAI/LFM2-VL-450M: ChatML after <|startoftext|>, "<image>" per image in content order.
LFM2_VL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<image>' }}{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_lfm2_vl(
    path: str | Path, *, patch_size: int = 4, hidden_size: int = 64, num_layers: int = 2, vocab_size: int = 400,
    max_image_tokens: int = 4, seed: int = 0, extra_text: Iterable[str] = (),
) -> Path:
    """Write a tiny random LFM2-VL (SigLIP 2 NaFlex tower, pixel-unshuffle MLP projector, LFM2 text with a short
    convolution layer then an attention layer) and its processor to ``path``. Each image keeps its aspect ratio and
    becomes 1 to ``max_image_tokens`` image tokens (no tiling, as the real processor for small images). Needs
    torchvision (the image processor)."""
    from transformers import Lfm2VlConfig, Lfm2VlForConditionalGeneration, Lfm2VlImageProcessor, Lfm2VlProcessor

    path = Path(path)
    specials = ["<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>",
                "<|image_start|>", "<|image_end|>", "<|img_thumbnail|>"]
    tokenizer = _tokenizer(specials, extra_text, vocab_size, pad_token="<|pad|>", bos_token="<|startoftext|>",
                           eos_token="<|im_end|>", extra_special_tokens=specials[5:])
    downsample = 2
    image_processor = Lfm2VlImageProcessor(
        do_image_splitting=False, min_image_tokens=1, max_image_tokens=max_image_tokens,
        encoder_patch_size=patch_size, downsample_factor=downsample, tile_size=4 * patch_size,
        size={"height": 4 * patch_size, "width": 4 * patch_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )
    processor = Lfm2VlProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                chat_template=LFM2_VL_CHAT_TEMPLATE)
    torch.manual_seed(seed)
    config = Lfm2VlConfig(
        vision_config={"model_type": "siglip2_vision_model", "hidden_size": hidden_size // 2,
                       "intermediate_size": hidden_size, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "patch_size": patch_size, "num_patches": max_image_tokens * downsample**2,
                       "vision_use_head": False},  # as the real tower: every patch feeds the projector
        text_config=_text_config(tokenizer, hidden_size, num_layers, model_type="lfm2",
                                 layer_types=["conv", "full_attention"][-num_layers:] if num_layers <= 2 else None,
                                 block_auto_adjust_ff_dim=False, block_multiple_of=16, conv_L_cache=3),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), projector_hidden_size=hidden_size,
        downsample_factor=downsample, tie_word_embeddings=False,
    )
    return _save(Lfm2VlForConditionalGeneration(config), processor, path, "LFM2-VL")


# meta-llama/Llama-4-Scout-17B-16E-Instruct (system prompt and tools left out): header tokens, <|eot|> closes a
# turn, "<|image|>" per image in content order (the processor expands it to tiles of <|patch|> tokens).
LLAMA4_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|header_start|>' + message['role'] + '<|header_end|>\n\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<|image|>' }}{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{ '<|eot|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|header_start|>assistant<|header_end|>\n\n' }}{% endif %}"
)


def build_tiny_llama4(
    path: str | Path, *, image_size: int = 16, patch_size: int = 4, hidden_size: int = 64, num_layers: int = 2,
    vocab_size: int = 400, max_patches: int = 2, seed: int = 0, extra_text: Iterable[str] = (),
) -> Path:
    """Write a tiny random Llama 4 (its vision encoder with pixel-shuffle adapter, Linear projector, Llama 4 text
    with a dense then a mixture-of-experts layer) and its processor to ``path``. Images are cut into up to
    ``max_patches`` tiles of ``image_size`` pixels plus a global view, each ``(image_size // patch_size) ** 2 / 4``
    ``<|patch|>`` tokens. Needs torchvision (the image processor)."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration, Llama4ImageProcessor, Llama4Processor

    path = Path(path)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|header_start|>", "<|header_end|>", "<|eot|>", "<|eom|>",
                "<|finetune_right_pad|>", "<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>",
                "<|tile_x_separator|>", "<|tile_y_separator|>"]
    tokenizer = _tokenizer(specials, extra_text, vocab_size, bos_token="<|begin_of_text|>", eos_token="<|eot|>",
                           pad_token="<|finetune_right_pad|>", extra_special_tokens=specials[7:])
    image_processor = Llama4ImageProcessor(size={"height": image_size, "width": image_size}, max_patches=max_patches)
    processor = Llama4Processor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                                pixel_shuffle_ratio=0.5, chat_template=LLAMA4_CHAT_TEMPLATE)
    vision_hidden = hidden_size // 2
    torch.manual_seed(seed)
    config = Llama4Config(
        vision_config={"hidden_size": vision_hidden, "intermediate_size": 4 * vision_hidden,  # the adapter's input
                       "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": image_size,
                       "patch_size": patch_size, "vision_output_dim": hidden_size, "projector_input_dim": hidden_size,
                       "projector_output_dim": hidden_size, "pixel_shuffle_ratio": 0.5},
        text_config=_text_config(tokenizer, hidden_size, num_layers, model_type="llama4_text",
                                 head_dim=hidden_size // 4, intermediate_size_mlp=2 * hidden_size,
                                 num_local_experts=2, num_experts_per_tok=1, interleave_moe_layer_step=2),
        boi_token_index=tokenizer.convert_tokens_to_ids("<|image_start|>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<|image_end|>"),
        image_token_index=tokenizer.convert_tokens_to_ids("<|patch|>"), tie_word_embeddings=False,
    )
    return _save(Llama4ForConditionalGeneration(config), processor, path, "Llama 4")


# google/gemma-3n-E4B-it: as Gemma 3, each image as <image_soft_token> (the processor expands it to
# "\n\n<start_of_image>" + soft tokens + "<end_of_image>\n\n").
GEMMA3N_CHAT_TEMPLATE = GEMMA3_CHAT_TEMPLATE.replace("'<start_of_image>'", "'<image_soft_token>'")


def build_tiny_gemma3n(
    path: str | Path, *, image_size: int = 64, hidden_size: int = 64, num_layers: int = 2, vocab_size: int = 400,
    soft_tokens_side: int = 4, channel_multiplier: float = 0.0625, seed: int = 0, extra_text: Iterable[str] = (),
) -> Path:
    """Write a tiny random Gemma 3n (timm MobileNetV5 tower with its multi-scale fusion adapter, the vision and
    audio embedders, Gemma 3n text with AltUp, LAuReL and per-layer inputs, a small audio conformer) and its
    processor to ``path``. As in the real checkpoint, the tokenizer ends with the vision tokens (``<end_of_image>``,
    ``<image_soft_token>``) and then the audio tokens, which the model embeds with their own embedders. Each image
    is resized to ``image_size`` pixels square and fused to ``soft_tokens_side ** 2`` soft tokens. The tower keeps
    the real block layout at ``channel_multiplier`` of its channels (7.3M parameters). Needs timm (and so
    torchvision)."""
    from transformers import (
        Gemma3nAudioFeatureExtractor,
        Gemma3nConfig,
        Gemma3nForConditionalGeneration,
        Gemma3nProcessor,
        SiglipImageProcessorPil,
    )
    from transformers.image_utils import PILImageResampling

    path = Path(path)
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                "<start_of_audio>"]
    # The tokens after the text vocabulary, in the order the model's embedders expect them.
    vision_tokens, audio_tokens = ["<end_of_image>", "<image_soft_token>"], ["<end_of_audio>", "<audio_soft_token>"]
    tokenizer = _tokenizer(
        specials, extra_text, vocab_size, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": vision_tokens[0],
                              "image_token": vision_tokens[1], "boa_token": "<start_of_audio>",
                              "eoa_token": audio_tokens[0], "audio_token": audio_tokens[1]},
    )
    text_vocab = tokenizer.convert_tokens_to_ids(vision_tokens[0])
    ids = tokenizer.convert_tokens_to_ids(vision_tokens + audio_tokens)
    if ids != list(range(text_vocab, text_vocab + 4)) or len(tokenizer) != text_vocab + 4:
        raise RuntimeError(f"Gemma 3n's vision and audio tokens must close the vocabulary, got ids {ids}")
    image_processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size}, do_normalize=False,
                                              resample=PILImageResampling.BILINEAR)  # as the real checkpoint
    soft_tokens = soft_tokens_side ** 2
    processor = Gemma3nProcessor(feature_extractor=Gemma3nAudioFeatureExtractor(), image_processor=image_processor,
                                 tokenizer=tokenizer, chat_template=GEMMA3N_CHAT_TEMPLATE, image_seq_length=soft_tokens,
                                 audio_seq_length=4)
    torch.manual_seed(seed)
    config = Gemma3nConfig(
        vision_config={"architecture": "mobilenetv5_300m_enc", "vocab_size": 2, "vocab_offset": text_vocab,
                       "model_args": {"channel_multiplier": channel_multiplier,
                                      "msfa_output_resolution": soft_tokens_side}},
        audio_config={"vocab_size": 2, "vocab_offset": text_vocab + 2, "hidden_size": 32,
                      "conf_num_attention_heads": 2, "conf_num_hidden_layers": 1, "sscp_conv_channel_size": [8, 4]},
        text_config=_text_config(
            tokenizer, hidden_size, num_layers, model_type="gemma3n_text", vocab_size=text_vocab + 4,
            vocab_size_per_layer_input=text_vocab, hidden_size_per_layer_input=8, head_dim=hidden_size // 4,
            altup_num_inputs=2, laurel_rank=4, num_kv_shared_layers=0, sliding_window=64,
            layer_types=["sliding_attention", "full_attention"][-num_layers:] if num_layers <= 2 else None,
            activation_sparsity_pattern=[0.95] + [0.0] * (num_layers - 1),
        ),
        vision_soft_tokens_per_image=soft_tokens, audio_soft_tokens_per_image=4,
        boi_token_id=tokenizer.convert_tokens_to_ids("<start_of_image>"), eoi_token_id=ids[0], image_token_id=ids[1],
        boa_token_id=tokenizer.convert_tokens_to_ids("<start_of_audio>"), eoa_token_id=ids[2], audio_token_id=ids[3],
    )
    return _save(Gemma3nForConditionalGeneration(config), processor, path, "Gemma 3n")


# Family name → builder. Names are what tests and the demo pass to build_tiny.
BUILDERS: dict[str, Callable[..., Path]] = {
    "idefics3": build_tiny_idefics3,
    "llava": build_tiny_llava,
    "llava_next": build_tiny_llava_next,
    "mllama": build_tiny_mllama,
    "qwen2_vl": build_tiny_qwen2_vl,
    "qwen2_5_vl": build_tiny_qwen2_5_vl,
    "gemma3": build_tiny_gemma3,
    "paligemma": build_tiny_paligemma,
    "qwen3_vl": build_tiny_qwen3_vl,
    "qwen3_5": build_tiny_qwen3_5,
    "smolvlm": build_tiny_smolvlm,
    "llava_onevision": build_tiny_llava_onevision,
    "internvl": build_tiny_internvl,
    "aya_vision": build_tiny_aya_vision,
    "glm4v": build_tiny_glm4v,
    "gemma4": build_tiny_gemma4,
    "mistral3": build_tiny_mistral3,
    "lfm2_vl": build_tiny_lfm2_vl,
    "llama4": build_tiny_llama4,
    "gemma3n": build_tiny_gemma3n,
}
# Families whose processor only exists with torchvision installed (transformers imports it in their processing or
# image-processing module), or whose vision tower needs timm: built and tested only where those import.
TORCHVISION_FAMILIES: tuple[str, ...] = ("mistral3", "lfm2_vl", "llama4", "gemma3n")
FAMILIES: tuple[str, ...] = tuple(name for name in BUILDERS if name not in TORCHVISION_FAMILIES)


def build_tiny(family: str, path: str | Path, **kwargs: Any) -> Path:
    """Write the tiny random model of ``family`` (one of :data:`FAMILIES` or, with torchvision,
    :data:`TORCHVISION_FAMILIES`) and its processor to ``path``."""
    if family not in BUILDERS:
        raise ValueError(f"unknown model family {family!r}; choose one of {', '.join(BUILDERS)}.")
    return BUILDERS[family](path, **kwargs)
