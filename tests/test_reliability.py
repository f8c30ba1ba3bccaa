"""Every bad input gets a clear answer (ADPODataError naming row and field), nothing is cut, nothing is lost.

Covers: one test per bad row kind, skip-mode counting, image modes / EXIF / decompression bombs / tiny images,
exact length limits (image tokens included), response ids that a merging tokenizer cannot change, a fuzz test
over generated rows, the non-finite guard and the output-folder guard.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from datasets import Dataset
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from tokenizers import Tokenizer, models
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedTokenizerFast,
    TrainerCallback,
)

from adpo.collator import RESPONSE_MASK, ROW_IDS, ADPOCollator
from adpo.config import ADPOConfig
from adpo.data import ROW_ID, ADPODataError, load_adpo_dataset
from adpo.images import ImageLoadError, grow_to_min_side, load_image, min_image_side
from adpo.logprobs import response_logps
from adpo.output_dir import check_output_dir
from adpo.synthetic import draw_shape
from adpo.trainer import ADPOTrainer
from adpo.validate import check_row, reason, validate_dataset

MISSING = object()  # a field left out of the row


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def processor(tiny_idefics3: Path) -> Any:
    return AutoProcessor.from_pretrained(tiny_idefics3)


@pytest.fixture(scope="module")
def vl_model(tiny_idefics3: Path) -> Any:
    return AutoModelForImageTextToText.from_pretrained(tiny_idefics3).eval()


@pytest.fixture(scope="module")
def vl_collator(processor: Any) -> ADPOCollator:
    return ADPOCollator(processor, multimodal=True)


def png(image: Image.Image, fmt: str = "PNG", **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def vl_row(row_id: int = 7, **changes: Any) -> dict[str, Any]:
    row = {
        ROW_ID: row_id,
        "response": "A red circle.",
        "chosen": "What is shown?",
        "rejected": "What is shown?",
        "chosen_images": [draw_shape("circle", "red")],
        "rejected_images": [draw_shape("circle", "green")],
    }
    row.update(changes)
    return {k: v for k, v in row.items() if v is not MISSING}


def _file(tmp: Path, name: str, data: bytes) -> str:
    (tmp / name).write_bytes(data)
    return str(tmp / name)


def _nan_image() -> Image.Image:
    return Image.fromarray(np.array([[np.nan, 1.0], [2.0, 3.0]], dtype=np.float32))


# ---------------------------------------------------------------------------------------------------- bad rows
# (id, changes to a good row (given a tmp folder), field named, words in the message)
BAD_ROWS = [
    ("missing-response", lambda t: {"response": MISSING}, "response", "missing"),
    ("blank-response", lambda t: {"response": " \n"}, "response", "is empty"),
    ("missing-prompt", lambda t: {"chosen": MISSING}, "chosen", "missing"),
    ("non-string-prompt", lambda t: {"rejected": ["What?"]}, "rejected", "must be a string, got list"),
    ("images-a-dict", lambda t: {"chosen_images": {"path": "a.png"}}, "chosen_images", "must be a list"),
    ("images-an-int", lambda t: {"rejected_images": 3}, "rejected_images", "must be a list"),
    ("missing-file", lambda t: {"chosen_images": [str(t / "gone.png")]}, "chosen_images", "image file not found"),
    ("garbage-file", lambda t: {"rejected_images": [_file(t, "x.png", b"no picture")]}, "rejected_images",
     "unreadable image"),
    ("truncated-file", lambda t: {"chosen_images": [_file(t, "t.png", png(draw_shape("circle", "red", 64))[:300])]},
     "chosen_images", "unreadable image"),
    ("zero-images", lambda t: {"chosen_images": []}, "chosen_images", "has no image"),
    ("more-placeholders", lambda t: {"chosen": "<image> or <image>?"}, "chosen",
     "places 2 <image> placeholder(s) but the side has 1 image(s)"),
    ("fewer-placeholders", lambda t: {"rejected": "<image> this?", "rejected_images": [Image.new("RGB", (9, 9))] * 2},
     "rejected", "places 1 <image> placeholder(s) but the side has 2 image(s)"),
    ("empty-image", lambda t: {"chosen_images": [Image.new("RGB", (0, 4))]}, "chosen_images", "empty image"),
    ("absurd-aspect", lambda t: {"chosen_images": [Image.new("RGB", (1, 300))]}, "chosen_images",
     "absurd aspect ratio"),
    ("non-finite-pixels", lambda t: {"rejected_images": [_nan_image()]}, "rejected_images", "non-finite pixel values"),
    ("image-token-in-response", lambda t: {"response": "It is <image>."}, "response", "image placeholder"),
]


@pytest.mark.parametrize(("changes", "field", "words"), [c[1:] for c in BAD_ROWS], ids=[c[0] for c in BAD_ROWS])
def test_bad_row_is_refused_naming_row_and_field(changes, field, words, vl_collator, tmp_path):
    row = vl_row(7, **changes(tmp_path))
    with pytest.raises(ADPODataError) as validated:
        check_row(row, vl_collator)
    assert (validated.value.row, validated.value.field) == (7, field)
    assert str(validated.value).startswith(f"row 7, field '{field}': ")
    assert words in str(validated.value)
    with pytest.raises(ADPODataError) as collated:  # the training path says the same
        vl_collator([row])
    assert str(collated.value) == str(validated.value)


def test_image_placeholder_in_text_only_mode_is_refused(processor):
    """Images withheld (--multimodal_mode false) but the text still names one: the model would crash."""
    collator = ADPOCollator(processor, multimodal=False)
    with pytest.raises(ADPODataError, match=r"^row 3, field 'chosen': places 1 <image> placeholder\(s\) but the "
                       r"side has 0 image\(s\)"):
        check_row({ROW_ID: 3, "response": "Red.", "chosen": "<image> colour?", "rejected": "Colour?"}, collator)


def _jsonl(tmp: Path, rows: list[dict[str, Any]]) -> Dataset:
    draw_shape("circle", "red").save(tmp / "a.png")
    draw_shape("circle", "green").save(tmp / "b.png")
    path = tmp / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_adpo_dataset(str(path))


GOOD = {"response": "A red circle.", "chosen": "What?", "rejected": "What?",
        "chosen_images": ["a.png"], "rejected_images": ["b.png"]}


def test_skip_mode_counts_rows_by_reason(vl_collator, tmp_path):
    rows = [GOOD, {**GOOD, "chosen_images": ["gone1.png"]}, {**GOOD, "response": ""}, GOOD,
            {**GOOD, "chosen_images": ["gone2.png"]}, GOOD]
    dataset = _jsonl(tmp_path, rows)
    with pytest.raises(ADPODataError, match=r"^row 1, field 'chosen_images': image file not found: .*gone1.png"):
        validate_dataset(dataset, vl_collator)  # default: error at the first bad row

    kept, report = validate_dataset(dataset, vl_collator, on_bad_rows="skip")
    assert kept[ROW_ID] == [0, 3, 5]
    assert (report.total, report.kept, report.n_skipped) == (6, 3, 3)
    assert report.skipped == {"chosen_images: image file not found": [1, 4], "response: is empty": [2]}
    assert report.summary().splitlines() == [
        "train: skipped 3 of 6 rows (--on_bad_rows skip), kept 3",
        "  2 x chosen_images: image file not found (rows 1, 4)",
        "  1 x response: is empty (rows 2)",
    ]
    batch = vl_collator([kept[0], kept[1]])  # what is left trains
    assert batch[ROW_IDS].tolist() == [0, 3]


def test_every_row_bad_fails_the_run(vl_collator, tmp_path):
    dataset = _jsonl(tmp_path, [{**GOOD, "response": ""}, {**GOOD, "chosen_images": ["gone.png"]}])
    with pytest.raises(ADPODataError, match=r"every one of the 2 train rows is bad") as info:
        validate_dataset(dataset, vl_collator, on_bad_rows="skip")
    assert "1 x response: is empty (rows 0)" in str(info.value)


def test_streamed_rows_are_checked_as_they_stream(vl_collator, tmp_path):
    dataset = _jsonl(tmp_path, [GOOD, {**GOOD, "response": ""}, GOOD]).to_iterable_dataset()
    kept, report = validate_dataset(dataset, vl_collator, on_bad_rows="skip")
    assert [row[ROW_ID] for row in kept] == [0, 2]
    assert (report.total, report.kept, report.skipped) == (3, 2, {"response: is empty": [1]})
    failing, _ = validate_dataset(dataset, vl_collator)
    with pytest.raises(ADPODataError, match=r"^row 1, field 'response': is empty"):
        list(failing)


# ---------------------------------------------------------------------------------------------------- images
def _pixels(mode: str) -> Image.Image:
    """A 2x1 image: left pixel 'dark/transparent', right pixel 'bright/opaque' in ``mode``."""
    values = {
        "RGBA": [(0, 0, 0, 0), (10, 20, 30, 255)], "LA": [(0, 0), (200, 255)], "L": [0, 200], "1": [0, 1],
        "CMYK": [(0, 0, 0, 0), (0, 0, 0, 255)], "I;16": [0, 65535], "I": [-5, 5], "F": [0.0, 0.5],
    }[mode]
    image = Image.new(mode, (2, 1))
    image.putdata(values)
    return image


# (mode, expected RGB of the two pixels): transparency over white, CMYK inverted, 16/32-bit/float stretched to 0..255
MODES = [
    ("RGBA", [(255, 255, 255), (10, 20, 30)]), ("LA", [(255, 255, 255), (200, 200, 200)]),
    ("L", [(0, 0, 0), (200, 200, 200)]), ("1", [(0, 0, 0), (255, 255, 255)]),
    ("CMYK", [(255, 255, 255), (0, 0, 0)]), ("I;16", [(0, 0, 0), (255, 255, 255)]),
    ("I", [(0, 0, 0), (255, 255, 255)]), ("F", [(0, 0, 0), (255, 255, 255)]),
]


@pytest.mark.parametrize(("mode", "expected"), MODES, ids=[m for m, _ in MODES])
def test_image_modes_become_rgb(mode, expected):
    image = load_image(_pixels(mode))
    assert image.mode == "RGB"
    assert list(image.getdata()) == expected


def test_palette_with_transparency_and_16bit_file_become_rgb():
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255])
    palette.putdata([0, 1])
    palette.info["transparency"] = 0  # index 0 (red) is transparent → white
    assert list(load_image(png(palette)).getdata()) == [(255, 255, 255), (0, 0, 255)]
    sixteen = Image.fromarray(np.array([[0, 1000, 2000]], dtype=np.uint16))  # read back from a real PNG file
    assert list(load_image(png(sixteen)).getdata()) == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_exif_orientation_is_applied():
    """Orientation 6 = 'rotate 90° clockwise to display': a 4x2 image (left half red, right half blue) is shown
    2 wide and 4 tall with red on top."""
    image = Image.new("RGB", (4, 2), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 2, 2))
    exif = Image.Exif()
    exif[0x0112] = 6
    shown = load_image(png(image, exif=exif))
    assert shown.size == (2, 4)
    assert shown.getpixel((0, 0)) == shown.getpixel((1, 1)) == (255, 0, 0)
    assert shown.getpixel((0, 3)) == shown.getpixel((1, 2)) == (0, 0, 255)


def test_decompression_bomb_refused_unless_shrunk(monkeypatch, processor):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    huge = png(Image.new("RGB", (60, 50), (0, 128, 0)))  # 3000 px > 2x limit: PIL itself raises on open
    mid = png(Image.new("RGB", (40, 30), (0, 128, 0)))  # 1200 px: PIL only warns; we refuse all the same
    for data in (huge, mid, Image.new("RGB", (40, 30))):
        with pytest.raises(ImageLoadError, match=r"^image too large: .*--max_image_size"):
            load_image(data)
    assert load_image(huge, max_size=16).size == (16, 13)
    assert load_image(mid, max_size=16).size == (16, 12)
    jpeg = png(Image.new("RGB", (400, 200), (0, 128, 0)), "JPEG")
    assert load_image(jpeg, max_size=50).size == (50, 25)  # decoded in draft mode, then resized
    assert Image.MAX_IMAGE_PIXELS == 1000  # PIL's limit is put back

    row = vl_row(5, chosen_images=[huge])
    with pytest.raises(ADPODataError, match=r"^row 5, field 'chosen_images': image too large"):
        check_row(row, ADPOCollator(processor, multimodal=True))
    check_row(row, ADPOCollator(processor, multimodal=True, max_image_size=32))


def test_image_feature_datasets_reach_our_loader_undecoded(monkeypatch, processor):
    """datasets would decode a stored image with PIL's own bomb check (and no shrinking); after validation the
    collator gets the stored bytes and applies --max_image_size."""
    big = Image.new("RGB", (60, 50), (0, 128, 0))  # over 2x the limit below: PIL refuses it
    dataset = Dataset.from_list([vl_row(0, chosen_images=[big])])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(Image.DecompressionBombError):
        dataset[0]
    collator = ADPOCollator(processor, multimodal=True, max_image_size=32)
    kept, _ = validate_dataset(dataset, collator)
    assert set(kept[0]["chosen_images"][0]) == {"bytes", "path"}
    assert collator([kept[0]])[ROW_IDS].tolist() == [0]


@pytest.mark.parametrize("size", [(1, 1), (3, 2), (1, 40)])
def test_image_smaller_than_a_patch_trains(size, vl_collator, vl_model):
    """The tiny Idefics3 uses 8-pixel patches; its processor resizes every image to 32 pixels first."""
    row = vl_row(0, chosen_images=[Image.new("RGB", size, (255, 0, 0))])
    check_row(row, vl_collator, max_length=512)
    batch = vl_collator([row])
    inputs = {k: v for k, v in batch.items() if k not in (RESPONSE_MASK, ROW_IDS)}
    with torch.no_grad():
        logps = response_logps(vl_model, vl_model.get_output_embeddings(), inputs, batch[RESPONSE_MASK])
    assert torch.isfinite(logps.sums).all()


def test_image_below_the_processor_patch_is_upscaled():
    class Qwen2VLLike:  # patch 14, 2x2 merge: sides below 28 px are refused by such processors
        image_processor = type("IP", (), {"patch_size": 14, "merge_size": 2})()

    side = min_image_side(Qwen2VLLike())
    assert side == 28
    assert grow_to_min_side(Image.new("RGB", (7, 14)), side).size == (28, 56)
    assert grow_to_min_side(Image.new("RGB", (30, 28)), side).size == (30, 28)


# ---------------------------------------------------------------------------------------------------- lengths
def test_max_length_counts_image_tokens_and_refuses_the_whole_row(vl_collator, processor):
    """The tiny Idefics3 expands one <image> in the prompt into <fake_token_around_image><global-img>, 4 x
    <image> (image_seq_len = (32/8)^2 / 2^2) and <fake_token_around_image>: 7 tokens for 1, so +6."""
    row = vl_row(1, chosen="What is shown in this picture? Describe it.")
    chosen = vl_collator.encode_side(row, "chosen")
    n_chosen_text = len(processor.tokenizer(chosen.prompt, add_special_tokens=False)["input_ids"])
    n_response = len(chosen.response_ids)
    n_chosen = n_chosen_text + 6 + n_response
    lengths = vl_collator([row])["attention_mask"].sum(1).tolist()
    assert lengths[0] == n_chosen and lengths[1] < n_chosen

    check_row(row, vl_collator, max_length=n_chosen)
    with pytest.raises(ADPODataError) as info:
        check_row(row, vl_collator, max_length=n_chosen - 1)
    assert str(info.value) == (f"row 1, field 'chosen': too long: prompt + response is {n_chosen} tokens (image "
                               f"tokens included), over --max_length {n_chosen - 1} (rows are never truncated)")

    dataset = Dataset.from_list([row, vl_row(2)])
    kept, report = validate_dataset(dataset, vl_collator, on_bad_rows="skip", max_length=n_chosen - 1)
    assert kept[ROW_ID] == [2] and report.skipped == {"chosen: too long": [1]}


def test_max_response_length(vl_collator):
    row = vl_row(4)
    n = len(vl_collator.encode_side(row, "chosen").response_ids)
    check_row(row, vl_collator, max_response_length=n)
    with pytest.raises(ADPODataError, match=rf"^row 4, field 'response': too long: {n} tokens, over "
                       rf"--max_response_length {n - 1}"):
        check_row(row, vl_collator, max_response_length=n - 1)


def test_response_ids_identical_with_a_tokenizer_that_merges_across_the_boundary():
    """BPE with the merge a+b→'ab' and no pre-tokenizer: 'xa'+'b' tokenised together becomes [x, ab] while
    'xc'+'b' becomes [x, c, b]. Tokenising the response on its own gives [b, eos] after both prompts."""
    vocab = {"<pad>": 0, "<eos>": 1, "x": 2, "a": 3, "b": 4, "c": 5, "ab": 6}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")])), pad_token="<pad>",
        eos_token="<eos>",
    )
    assert tokenizer("xab")["input_ids"] == [2, 6] and tokenizer("xcb")["input_ids"] == [2, 5, 4]
    collator = ADPOCollator(tokenizer, multimodal=False)
    row = {ROW_ID: 0, "response": "b", "chosen": "xa", "rejected": "xc"}
    check_row(row, collator)
    batch = collator([row])
    assert batch["input_ids"].tolist() == [[2, 3, 4, 1], [2, 5, 4, 1]]
    assert batch[RESPONSE_MASK].tolist() == [[False, False, True, True]] * 2


# ---------------------------------------------------------------------------------------------------- fuzz
def _encoded(image: Image.Image) -> bytes:
    """The image as a file's bytes: TIFF keeps most modes; otherwise PNG of its RGB version."""
    try:
        return png(image, "TIFF")
    except OSError:
        return png(image.convert("RGB"))


FRAGMENTS = ["", "<image>", "<image><image>", "<fake_token_around_image>", "<end_of_utterance>", "<|endoftext|>",
             "Assistant:", "\n", " ", "🍎", "ß", "\u200b"]


def mostly(good: st.SearchStrategy, bad: st.SearchStrategy) -> st.SearchStrategy:
    """``good`` nine times in ten, so most rows get far enough to exercise the images and the model."""
    return st.integers(0, 9).flatmap(lambda k: bad if k == 0 else good)


texts = mostly(
    st.one_of(st.text(max_size=30), st.builds(lambda a, b: a + b, st.sampled_from(FRAGMENTS), st.text(max_size=10))),
    st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=4), st.integers(300, 3000)),  # huge
)
field_values = mostly(texts, st.one_of(st.just(MISSING), st.none(), st.integers(), st.lists(st.text(), max_size=2)))
MODES_FUZZ = ["RGB", "RGBA", "LA", "L", "P", "1", "CMYK", "I;16", "I", "F", "YCbCr"]
pil_images = st.builds(
    lambda mode, w, h: Image.new(mode, (w, h)), st.sampled_from(MODES_FUZZ), st.integers(1, 70), st.integers(1, 70)
)
bad_images = st.one_of(
    st.builds(lambda w: Image.new("RGB", (w, 0)), st.integers(0, 5)),
    st.binary(max_size=40),
    st.sampled_from(["/nonexistent/a.png", "", {"bytes": None, "path": None}, {"bytes": "text"}, {}, 3, None]),
    st.just(Image.new("RGB", (1, 500))),
    st.just(_nan_image()),
)
image_values = mostly(st.one_of(pil_images, pil_images.map(_encoded)), bad_images)
image_fields = mostly(st.lists(image_values, min_size=1, max_size=3),
                      st.one_of(st.just([]), image_values, st.just(MISSING)))


@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_fuzzed_rows_train_or_raise_our_error(data, processor, vl_model):
    multimodal = data.draw(st.booleans(), "multimodal")
    row = {ROW_ID: 0}
    for name in ("response", "chosen", "rejected"):
        row[name] = data.draw(field_values, name)
    for name in ("chosen_images", "rejected_images"):
        row[name] = data.draw(image_fields, name)
    row = {k: v for k, v in row.items() if v is not MISSING}
    collator = _FUZZ_COLLATORS.setdefault(multimodal, ADPOCollator(processor, multimodal=multimodal))
    try:
        check_row(row, collator, max_length=256, max_response_length=64)
    except ADPODataError as err:
        event(f"refused: {reason(err)}")  # shown by pytest --hypothesis-show-statistics
        return
    event("trained")
    batch = collator([row])
    inputs = {k: v for k, v in batch.items() if k not in (RESPONSE_MASK, ROW_IDS)}
    with torch.no_grad():
        logps = response_logps(vl_model, vl_model.get_output_embeddings(), inputs, batch[RESPONSE_MASK])
    assert torch.isfinite(logps.sums).all()


_FUZZ_COLLATORS: dict[bool, ADPOCollator] = {}


# ---------------------------------------------------------------------------------------------------- NaN guard
class _Snapshots(TrainerCallback):
    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def _take(self, model: torch.nn.Module) -> None:
        self.weights.append({n: p.detach().clone() for n, p in model.named_parameters()})

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._take(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._take(model)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize(("poison", "accumulation"), [("loss", 1), ("gradients", 1), ("loss", 2)])
def test_non_finite_step_never_reaches_the_weights(
    poison, accumulation, tiny_llama, text_jsonl, tmp_path, monkeypatch, caplog
):
    """Step 2 is poisoned (with accumulation 2: its first micro-batch); its weights must equal step 1's."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    args = ADPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3, learning_rate=1e-2,
                      gradient_accumulation_steps=accumulation, logging_steps=1, report_to=[], save_strategy="no",
                      use_cpu=True, disable_tqdm=True)
    trainer = ADPOTrainer(model=model, args=args, ref_model=copy.deepcopy(model), train_dataset=load_adpo_dataset(
        str(text_jsonl)), data_collator=ADPOCollator(tokenizer, multimodal=False), processing_class=tokenizer)
    snapshots = _Snapshots()
    trainer.add_callback(snapshots)
    micro: list[list[int]] = []  # row ids of each micro-batch, in order
    clean = trainer.loss_and_metrics

    def poisoned(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        loss, metrics = clean(model, inputs)
        micro.append(inputs[ROW_IDS].tolist())
        if len(micro) == accumulation + 1 and poison == "loss":
            loss = loss * float("nan")
        elif len(micro) == accumulation + 1:  # finite loss, infinite gradients
            loss.register_hook(lambda grad: grad * float("inf"))
        return loss, metrics

    monkeypatch.setattr(trainer, "loss_and_metrics", poisoned)
    with caplog.at_level(logging.WARNING, logger="adpo.guard"):
        trainer.train()
    before, after_1, after_2, after_3 = snapshots.weights
    assert not _same(before, after_1)  # a normal step moves the weights
    assert _same(after_1, after_2)  # the poisoned step does not
    assert not _same(after_2, after_3)  # and training goes on
    assert all(torch.isfinite(w).all() for w in after_3.values())
    step_2_rows = sum(micro[accumulation : 2 * accumulation], [])
    assert len(step_2_rows) == 2 * accumulation
    assert trainer.nonfinite_guard.skipped_steps == [(2, step_2_rows)]
    assert f"optimizer step 2 skipped: non-finite {poison}; weights unchanged. Rows: {step_2_rows}" in caplog.text


# ---------------------------------------------------------------------------------------------------- output dir
@pytest.mark.parametrize("name", ["config.json", "adapter_config.json", "model.safetensors"])
def test_finished_model_is_not_overwritten(name, tmp_path):
    (tmp_path / "checkpoint-5").mkdir()
    check_output_dir(str(tmp_path), overwrite=False)  # checkpoints alone: fine (resume)
    (tmp_path / name).write_text("{}")
    with pytest.raises(ValueError, match=rf"already holds a trained model \({name}\).*--overwrite_output_dir"):
        check_output_dir(str(tmp_path), overwrite=False)
    check_output_dir(str(tmp_path), overwrite=True)


def _cli(monkeypatch, capsys, argv: list[str]) -> tuple[int, str, str]:
    from adpo.cli import run

    monkeypatch.setattr(sys, "argv", ["adpo-train", *argv, "--report_to", "none", "--use_cpu", "true"])
    with pytest.raises(SystemExit) as info:
        run()
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    # stderr also carries progress bars; the answer is the one line starting with "adpo: error:".
    return info.value.code, out, "\n".join(line for line in err.splitlines() if line.startswith("adpo: error:"))


def test_cli_answers_bad_input_in_one_line(monkeypatch, capsys, tiny_llama, text_jsonl, tmp_path):
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "model.safetensors").write_text("")
    code, _, err = _cli(monkeypatch, capsys, ["--model_name_or_path", str(tiny_llama), "--dataset_name",
                                              str(text_jsonl), "--output_dir", str(tmp_path / "done")])
    assert code == 2
    assert err.startswith(f"adpo: error: --output_dir {tmp_path / 'done'} already holds a trained model")

    bad = tmp_path / "bad.jsonl"
    bad.write_text(text_jsonl.read_text().replace('"response": "Three."', '"response": ""'))
    code, _, err = _cli(monkeypatch, capsys, ["--model_name_or_path", str(tiny_llama), "--dataset_name", str(bad),
                                              "--output_dir", str(tmp_path / "out")])
    assert (code, err) == (2, "adpo: error: row 2, field 'response': is empty")

    broken = tmp_path / "broken.jsonl"
    broken.write_text(text_jsonl.read_text()[:-20])
    code, _, err = _cli(monkeypatch, capsys, ["--model_name_or_path", str(tiny_llama), "--dataset_name",
                                              str(broken), "--output_dir", str(tmp_path / "out")])
    assert code == 2 and err.startswith(f"adpo: error: row 7: not valid JSON: line 8 of {broken}: ")


@pytest.mark.slow
def test_cli_skip_mode_prints_summary_and_trains(monkeypatch, capsys, tiny_llama, text_jsonl, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(text_jsonl.read_text().replace('"response": "Three."', '"response": ""'))
    code, out, _ = _cli(monkeypatch, capsys, [
        "--model_name_or_path", str(tiny_llama), "--dataset_name", str(bad), "--output_dir", str(tmp_path / "out"),
        "--on_bad_rows", "skip", "--max_steps", "1", "--per_device_train_batch_size", "2", "--save_strategy", "no",
    ])
    assert code == 0
    assert "adpo: train: skipped 2 of 8 rows (--on_bad_rows skip), kept 6\n  2 x response: is empty (rows 2, 6)" in out
    assert (tmp_path / "out" / "config.json").exists()
