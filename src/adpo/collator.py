"""Rows → one batch of ``2B`` sequences, ``[chosen; rejected]`` along dim 0.

Each side becomes ``prompt ids + response ids``: the prompt is the user turn (text + images) in the model's own
chat template followed by the generation prompt, and the response is the assistant turn as the template renders
it (ending with its end-of-turn token). The response is tokenised on its own, so its ids cannot merge with the
prompt's at the boundary and are identical on both sides; the collator checks that they are.

The processor batches the prompts and images of all ``2B`` sides in one call, so every family-specific image
tensor (``pixel_values``, ``pixel_attention_mask``, ``image_sizes``, ...) comes out in the layout the model
expects. Tensors laid out along the token sequence are then cut to each prompt and extended over its response
(see :data:`SEQUENCE_KEYS`).
"""

from __future__ import annotations

import inspect
import logging
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase, ProcessorMixin

from .data import ROW_ID, ADPODataError, row_images, row_text
from .images import ImageLoadError, load_image, min_image_side

if TYPE_CHECKING:
    from .config import RowArguments

logger = logging.getLogger(__name__)

# Model-family quirks, all keyed on what the processor returns, never on a model's name. Every other processor output
# (pixel_values, pixel_attention_mask, image_sizes, image_grid_thw, aspect_ratio_ids/mask, ...) is laid out per
# image or per row and reaches the model unchanged, for all 2B rows at once.
#
# Processor outputs laid out along the token sequence as (rows, seq, ...). The processor pads them to the
# longest prompt; we keep each row's prompt positions, repeat the last prompt position over the response (what
# the response tokens would get had the processor seen them) and pad with zeros. A processor that takes the
# response itself as a `suffix` (PaliGemma) lays them out over the response too, and we keep its values there.
SEQUENCE_KEYS = {
    "attention_mask": "every model",
    "token_type_ids": "Gemma 3: 1 marks image tokens; PaliGemma: 0 = bidirectional prefix, 1 = causal suffix",
    "mm_token_type_ids": "processors that mark multimodal tokens (Idefics3 on request, Qwen2-VL, Qwen2.5-VL)",
    "cross_attention_mask": "Mllama / Llama 3.2 Vision: (rows, seq, images, tiles), the images each token sees",
}
# Processor outputs that must not reach the model.
DROPPED_KEYS = {
    "labels": "PaliGemma: LM labels for its own loss; the trainer computes response log-probs itself",
}

# Stands in for the answer to find where a chat template puts it (no template trims, escapes or splits it).
_RESPONSE_SENTINEL = "ADPO0RESPONSE0SENTINEL"

# Keys the collator adds for the trainer; they never reach the model.
RESPONSE_MASK = "response_mask"
ROW_IDS = "row_ids"
# Precomputed reference log-probs (adpo.reference): dataset columns, one value per side, and the batch keys they
# become, (R,) side-major like the batch.
REF_LOGPS_COLUMN, REF_COUNTS_COLUMN = "_adpo_ref_logps", "_adpo_ref_counts"
REF_LOGPS, REF_COUNTS = "ref_logps", "ref_counts"


@dataclass
class EncodedSide:
    prompt: str  # the rendered prompt text (image placeholders not yet expanded)
    images: list[Any]  # RGB PIL images
    response_ids: list[int]
    response: str = ""  # the response text, for processors that take it as a suffix


class ADPOCollator:
    """Collate ADPO rows into one ``[chosen; rejected]`` batch.

    Output (``R = 2B`` rows, chosen rows first, ``L`` = longest prompt + response; with ``multitask`` ``R = 4B``:
    ``[chosen; rejected; dpo chosen; dpo rejected]``, the last two the row's standard pair ``prompt`` →
    ``chosen_response`` / ``rejected_response``):
        input_ids (R, L), attention_mask (R, L), response_mask (R, L) bool: True at response tokens,
        row_ids (B,): the dataset's row index of each pair, and every other tensor the processor returns;
        ref_logps (R,) fp32, ref_counts (R,): the rows' precomputed reference log-probs, when they carry them.
    """

    def __init__(
        self,
        processor: ProcessorMixin | PreTrainedTokenizerBase,
        *,
        multimodal: bool,
        separate_images: bool = True,
        max_image_size: int | None = None,
        image_processor_kwargs: dict[str, Any] | None = None,
        pad_to_multiple_of: int | None = None,
        multitask: bool = False,
    ) -> None:
        self.processor = processor
        self.tokenizer: PreTrainedTokenizerBase = getattr(processor, "tokenizer", processor)
        self.is_processor = isinstance(processor, ProcessorMixin)
        self.multimodal = multimodal
        self.separate_images = separate_images
        self.max_image_size = max_image_size
        self.pad_to_multiple_of = pad_to_multiple_of
        self.multitask = multitask
        self.chat_template = getattr(processor, "chat_template", None) or self.tokenizer.chat_template
        self.image_token = getattr(processor, "image_token", None)
        self.image_token_id = _token_id(self.tokenizer, self.image_token)
        self._mismatch_logged = False
        self.min_image_side = min_image_side(processor) if multimodal else 1
        # The processor's own convention for the target text (PaliGemma): it marks the suffix's token types.
        call = inspect.signature(type(processor).__call__).parameters
        self.response_as_suffix = self.is_processor and "suffix" in call
        if multimodal:
            if not self.is_processor or getattr(processor, "image_processor", None) is None:
                raise ValueError("--multimodal_mode needs a model whose processor takes images; "
                                 f"{type(processor).__name__} does not.")
            if self.chat_template is None and self.image_token is None:
                raise ValueError("The processor has neither a chat template nor an image token, so prompts cannot "
                                 "place their images.")
        self.image_processor_kwargs = check_image_processor_kwargs(processor, image_processor_kwargs or {})
        # Special tokens typed into a row's text: refused in responses (they would put turn structure into the
        # scored tokens) and in prompts, except the ones that mark images.
        specials = _special_tokens(self.tokenizer)
        self._response_specials = _token_pattern(specials)
        self._prompt_specials = _token_pattern(specials - self._image_markers())
        if self.chat_template is not None:
            # A template whose assistant turn cannot be located fails here, naming the template, not at row 0.
            self._render("Describe the image.", int(multimodal), "An answer.", None, "chosen")
        if self.tokenizer.pad_token_id is None:
            raise ValueError("The tokenizer has no pad token; set one (e.g. tokenizer.pad_token = eos_token).")

    # ------------------------------------------------------------------ one side
    def encode_side(self, row: dict[str, Any], side: str) -> EncodedSide:
        """One ADPO side: the ``side`` prompt (``chosen``/``rejected``) with its images, then the response."""
        field = f"{side}_images" if self.separate_images else "chosen_images"
        return self._encode(row, side, field, "response", images_required=True)

    def encode_dpo_side(self, row: dict[str, Any], side: str) -> EncodedSide:
        """One side of the row's standard DPO pair: ``prompt`` (+ ``prompt_images``), then ``{side}_response``.

        ``side`` is ``chosen`` or ``rejected``; both sides share the prompt, so images are optional here.
        """
        return self._encode(row, "prompt", "prompt_images", f"{side}_response", images_required=False)

    def _encode(
        self, row: dict[str, Any], text_field: str, images_field: str, response_field: str, images_required: bool
    ) -> EncodedSide:
        row_id = row.get(ROW_ID)
        text = row_text(row, text_field, row_id)
        response = row_text(row, response_field, row_id)
        if not response.strip():
            raise ADPODataError(row_id, response_field, "is empty")
        images: list[Any] = []
        if self.multimodal:
            images = [self._load(value, row_id, images_field) for value in row_images(row, images_field, row_id)]
            if not images and images_required:
                raise ADPODataError(row_id, images_field, "has no image (multimodal mode needs at least one per side)")
        self._refuse_special_tokens(text, text_field, self._prompt_specials, row_id)
        self._refuse_special_tokens(response, response_field, self._response_specials, row_id)
        prompt, response_text = self._render(text, len(images), response, row_id, text_field)
        if self.chat_template is not None:
            response_ids = self.tokenizer(response_text, add_special_tokens=False)["input_ids"]
        else:
            # No template: the response as given, then EOS.
            response_ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
            response_ids = [*response_ids, self.tokenizer.eos_token_id]
        if self.image_token_id is not None and self.image_token_id in response_ids:
            # The model would look for image features there ("image features and image tokens do not match").
            raise ADPODataError(row_id, response_field, f"contains the image placeholder {self.image_token}")
        return EncodedSide(prompt, images, response_ids, response)

    def _refuse_special_tokens(
        self, text: str, field: str, pattern: re.Pattern[str] | None, row_id: int | None
    ) -> None:
        found = pattern.search(text) if pattern is not None else None
        if found is None:
            return
        if found.group(0) == self.image_token:
            # The model would look for image features there ("image features and image tokens do not match").
            raise ADPODataError(row_id, field, f"contains the image placeholder {self.image_token} (images belong "
                                "in the prompt)")
        role = ("the scored response: it would put turn structure (or an image slot) into the tokens that are "
                "scored; the chat template adds the end-of-turn token itself" if "response" in field else
                "the prompt: it would change the prompt's turn or image structure")
        raise ADPODataError(row_id, field, f"contains the special token {found.group(0)!r}, which is not text but "
                            f"a control token of the model, in {role}")

    def _image_markers(self) -> set[str]:
        """Special tokens that may appear in a prompt: the image placeholder and what the chat template writes
        for an image part (e.g. Qwen2-VL's <|vision_start|><|image_pad|><|vision_end|>)."""
        markers = {self.image_token} if self.image_token else set()
        if not (self.is_processor and self.chat_template):
            return markers

        def render(content: list[dict[str, str]]) -> str:
            return self.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False)
        try:
            with_image = render([{"type": "image"}, {"type": "text", "text": "x"}])
            without = render([{"type": "text", "text": "x"}])
        except Exception:  # a template without image parts: only the placeholder
            return markers
        return markers | {t for t in _special_tokens(self.tokenizer) if with_image.count(t) > without.count(t)}

    def _load(self, value: Any, row_id: int | None, field: str) -> Any:
        try:
            return load_image(value, self.max_image_size, self.min_image_side)
        except ImageLoadError as err:
            raise ADPODataError(row_id, field, str(err)) from None

    def _render(self, text: str, n_images: int, response: str, row_id: int | None, side: str) -> tuple[str, str]:
        """(prompt text, response text as the template renders the assistant turn)."""
        placed = self.is_processor and self.image_token is not None and self.image_token in text
        if placed and text.count(self.image_token) != n_images:
            raise ADPODataError(row_id, side, f"places {text.count(self.image_token)} {self.image_token} "
                                f"placeholder(s) but the side has {n_images} image(s)")
        if self.chat_template is None:
            if n_images and not placed:
                # No template (PaliGemma): the images' placeholders lead the prompt, the processor's convention.
                text = self.image_token * n_images + text
            return text, response
        if self.is_processor:
            parts = [] if placed else [{"type": "image"}] * n_images
            user = {"role": "user", "content": [*parts, {"type": "text", "text": text}]}
        else:
            user = {"role": "user", "content": text}
        prompt = self.processor.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
        full = self._render_turns(user, response)
        if full.startswith(prompt):
            return prompt, full[len(prompt):]
        return prompt, self._response_after_mismatched_prompt(user, prompt, full)

    def _render_turns(self, user: dict[str, Any], response: str) -> str:
        """The conversation ``user`` → assistant ``response`` as the chat template renders it."""
        content: Any = [{"type": "text", "text": response}] if self.is_processor else response
        return self.processor.apply_chat_template([user, {"role": "assistant", "content": content}], tokenize=False)

    def _response_after_mismatched_prompt(self, user: dict[str, Any], prompt: str, full: str) -> str:
        """The response for templates whose assistant turn does not continue their generation prompt.

        (LLaVA-OneVision renders ``<|im_start|>assistant \n`` before an answer but ``<|im_start|>assistant\n`` as
        the generation prompt.) The answer rendered with a sentinel in its place splits the assistant turn into
        its header, the answer and what closes the turn; the response is the answer as rendered plus that close,
        following the generation prompt, which is what the model sees before it answers.
        """
        sentinel = _RESPONSE_SENTINEL
        marked = self._render_turns(user, sentinel)
        where = marked.find(sentinel)
        name = type(self.processor).__name__
        if where < 0 or marked.count(sentinel) != 1:
            raise ValueError(f"The chat template of {name} does not render the assistant's text as given (a "
                             "placeholder answer does not appear in it once), so the response tokens cannot be "
                             "located. Fix the template, or pass one that renders the assistant turn.")
        header, close = marked[:where], marked[where + len(sentinel):]
        if not (full.startswith(header) and full.endswith(close) and len(full) >= len(header) + len(close)):
            raise ValueError(f"The chat template of {name} renders the assistant turn differently depending on "
                             "the answer, so the response tokens cannot be located.")
        if not self._mismatch_logged:
            self._mismatch_logged = True
            turn = header[len(os.path.commonprefix([header, prompt])):]
            generation = prompt[len(os.path.commonprefix([header, prompt])):]
            logger.info("%s's chat template renders the assistant turn with %r but its generation prompt as %r; "
                        "the response is the answer and what closes its turn, after the generation prompt.",
                        name, turn, generation)
        return full[len(header):]

    # ------------------------------------------------------------------ the batch
    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        chosen = [self.encode_side(row, "chosen") for row in rows]
        rejected = [self.encode_side(row, "rejected") for row in rows]
        for row, c, r in zip(rows, chosen, rejected, strict=True):
            if c.response_ids != r.response_ids:
                raise ADPODataError(row.get(ROW_ID), "response", "tokenises differently after the chosen and the "
                                    "rejected prompt, so their log-probs would not compare the same tokens")
        sides = chosen + rejected
        if self.multitask:  # the standard DPO pair: one prompt, two different responses (no identity check)
            sides += [self.encode_dpo_side(row, "chosen") for row in rows]
            sides += [self.encode_dpo_side(row, "rejected") for row in rows]
        batch = self.collate_sides(sides)
        batch[ROW_IDS] = torch.tensor([row.get(ROW_ID, -1) for row in rows], dtype=torch.long)
        if rows and REF_LOGPS_COLUMN in rows[0]:  # (B, S) per row → (S·B,) side-major, like the batch's rows
            batch[REF_LOGPS] = torch.tensor([row[REF_LOGPS_COLUMN] for row in rows], dtype=torch.float32).T.reshape(-1)
            batch[REF_COUNTS] = torch.tensor([row[REF_COUNTS_COLUMN] for row in rows], dtype=torch.long).T.reshape(-1)
        return batch

    def collate_sides(self, sides: list[EncodedSide]) -> dict[str, torch.Tensor]:
        """Process the prompts of ``sides`` in one processor call and append each side's response."""
        prompts = [s.prompt for s in sides]
        common = {"return_tensors": "pt", "padding": True, "add_special_tokens": self.chat_template is None}
        suffix = self.multimodal and self.response_as_suffix
        if self.multimodal:
            if suffix:
                common["suffix"] = [s.response for s in sides]
            encoded = self.processor(
                text=prompts, images=[s.images for s in sides], **common, **self.image_processor_kwargs
            )
        else:
            encoded = self.tokenizer(prompts, **common)
        encoded = {k: v for k, v in encoded.items() if k not in DROPPED_KEYS}
        keep = encoded.pop("attention_mask").bool()
        prompt_ids = encoded.pop("input_ids")
        response_lens = torch.tensor([len(s.response_ids) for s in sides])
        # Tokens the processor laid out per row: the prompt, plus the response when it took it as a suffix.
        covered = keep.sum(1)
        prompt_lens = covered - response_lens if suffix else covered
        length = int((prompt_lens + response_lens).max())
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of

        n = len(sides)
        input_ids = torch.full((n, length), self.tokenizer.pad_token_id, dtype=torch.long)
        response_mask = torch.zeros((n, length), dtype=torch.bool)
        seq = {"attention_mask": keep.long()} | {k: encoded.pop(k) for k in SEQUENCE_KEYS if k in encoded}
        out_seq = {k: v.new_zeros((n, length, *v.shape[2:])) for k, v in seq.items()}
        for i, side in enumerate(sides):
            p, r, c = int(prompt_lens[i]), int(response_lens[i]), int(covered[i])
            input_ids[i, :c] = prompt_ids[i][keep[i]]
            if suffix and input_ids[i, p : p + r].tolist() != side.response_ids:
                raise ValueError(f"{type(self.processor).__name__} tokenises the response (its suffix) differently "
                                 "from the tokenizer, so the response tokens cannot be located.")
            input_ids[i, p : p + r] = torch.tensor(side.response_ids, dtype=torch.long)
            response_mask[i, p : p + r] = True
            for key, value in seq.items():
                row = value[i][keep[i]]
                out_seq[key][i, :c] = row
                if not suffix:
                    out_seq[key][i, p : p + r] = row[-1:]
        return {"input_ids": input_ids, **out_seq, **encoded, RESPONSE_MASK: response_mask}


def _special_tokens(tokenizer: PreTrainedTokenizerBase) -> set[str]:
    """Every special token's text (bos/eos/pad/unk, chat-turn and image tokens), empty strings left out."""
    tokens = set(getattr(tokenizer, "all_special_tokens", []))
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens |= {str(t) for t in decoder.values() if getattr(t, "special", False)}
    return {t for t in tokens if t and t.strip()}


def _token_pattern(tokens: set[str]) -> re.Pattern[str] | None:
    # Longest first, so a token that contains another is the one reported.
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))) if tokens else None


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str | None) -> int | None:
    """The id of a special token, or None when the tokenizer does not know it (it would map to unk)."""
    if token is None:
        return None
    token_id = tokenizer.convert_tokens_to_ids(token)
    return None if token_id is None or token_id == tokenizer.unk_token_id else token_id


def check_image_processor_kwargs(processor: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Reject ``--image_processor_kwargs`` keys the model's image processor does not take."""
    if not kwargs:
        return {}
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        raise ValueError("--image_processor_kwargs was given but the model has no image processor.")
    valid = set(getattr(getattr(image_processor, "valid_kwargs", None), "__annotations__", {}))
    valid |= {k for k in vars(image_processor) if not k.startswith("_")}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise ValueError(f"--image_processor_kwargs: {type(image_processor).__name__} does not take "
                         f"{unknown}; valid keys: {sorted(valid)}.")
    # Known keys can still carry values the processor rejects (Qwen's size takes pixel counts, not height and
    # width): try them on a blank image now rather than fail at the first batch.
    try:
        image_processor(images=[Image.new("RGB", (32, 32))], **kwargs)
    except Exception as err:  # processors raise ValueError, TypeError, KeyError... for bad values
        raise ValueError(f"--image_processor_kwargs {kwargs}: {type(image_processor).__name__} rejects them: "
                         f"{err}") from None
    return kwargs


def collator_from_args(
    processor: Any, rows: RowArguments, *, multimodal: bool, multitask: bool = False
) -> ADPOCollator:
    """The collator for ``--multimodal_mode``, ``--separate_images``, ``--max_image_size``,
    ``--image_processor_kwargs`` and ``--pad_to_multiple_of``: the one factory of both ``adpo-train`` and
    ``adpo-eval``, so evaluation scores exactly the sequences training optimises."""
    return ADPOCollator(
        processor,
        multimodal=multimodal,
        separate_images=rows.separate_images,
        max_image_size=rows.max_image_size,
        image_processor_kwargs=rows.image_processor_kwargs_dict(),
        pad_to_multiple_of=rows.pad_to_multiple_of,
        multitask=multitask,
    )
