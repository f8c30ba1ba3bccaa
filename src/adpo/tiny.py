"""Tiny, randomly initialised models built offline, for tests, the demo and benchmarks.

Every builder writes a folder that loads with ``from_pretrained`` (model and processor/tokenizer), so code that
uses these models goes through exactly the loading path a user's checkpoint goes through. Nothing here touches a
model hub: the tokenizer is a byte-level BPE trained on a few sentences with the ``tokenizers`` library.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

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
    chat_template: bool = True,
    seed: int = 0,
    extra_text: Iterable[str] = (),
) -> Path:
    """Write a tiny random Llama-architecture causal LM and its tokenizer to ``path``."""
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
        vocab_size=len(tokenizer),
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
    # The processor looks these up when it is constructed (design.md §4).
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
        text_config={
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
        },
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
