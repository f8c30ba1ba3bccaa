"""Loading ADPO rows from every supported source, and every supported image value."""

from __future__ import annotations

import io
import json

import pytest
from datasets import Dataset, DatasetDict, Features, Image, List, Value
from PIL import Image as PILImage

from adpo.collator import ADPOCollator
from adpo.data import ROW_ID, ADPODataError, load_adpo_dataset
from adpo.images import load_image
from adpo.synthetic import draw_shape


def _pixels(image) -> bytes:
    return load_image(image).tobytes()


@pytest.fixture
def png_folder(tmp_path):
    draw_shape("circle", "red").save(tmp_path / "red.png")
    draw_shape("circle", "green").save(tmp_path / "green.png")
    return tmp_path


ROW = {"response": "A red circle.", "chosen": "What is it?", "rejected": "What is it?"}


def test_jsonl_paths_are_relative_to_the_file(png_folder, monkeypatch, tmp_path_factory):
    path = png_folder / "rows.jsonl"
    path.write_text(json.dumps({**ROW, "chosen_images": ["red.png"], "rejected_images": ["green.png"]}) + "\n")
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))  # relative to the file, not the working directory
    ds = load_adpo_dataset(str(path))
    row = ds[0]
    assert row[ROW_ID] == 0
    assert _pixels(row["chosen_images"][0]) == _pixels(png_folder / "red.png")


@pytest.mark.parametrize("fmt", ["json", "csv", "parquet"])
def test_other_local_formats(png_folder, fmt):
    rows = [{**ROW, "chosen_images": ["red.png"], "rejected_images": ["green.png"]}] * 3
    path = png_folder / f"rows.{fmt}"
    ds = Dataset.from_list(rows)
    if fmt == "csv":  # CSV cells hold lists as JSON text
        ds = ds.map(lambda r: {k: json.dumps(r[k]) for k in ("chosen_images", "rejected_images")})
        ds.to_csv(str(path), index=False)
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    else:
        ds.to_parquet(str(path))
    loaded = load_adpo_dataset(str(path), max_samples=2)
    assert len(loaded) == 2 and loaded[1][ROW_ID] == 1
    assert loaded[0]["rejected_images"] == [str(png_folder / "green.png")]


def test_save_to_disk_folder_with_image_features(tmp_path):
    features = Features({
        "response": Value("string"), "chosen": Value("string"), "rejected": Value("string"),
        "chosen_images": List(Image()), "rejected_images": List(Image()),
    })
    ds = Dataset.from_list([{**ROW, "chosen_images": [draw_shape("circle", "red")],
                             "rejected_images": [draw_shape("circle", "green")]}], features=features)
    DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    loaded = load_adpo_dataset(str(tmp_path / "dd"), split="test")
    assert _pixels(loaded[0]["chosen_images"][0]) == _pixels(draw_shape("circle", "red"))
    with pytest.raises(ValueError, match="splits \\['test', 'train'\\], not 'validation'"):
        load_adpo_dataset(str(tmp_path / "dd"), split="validation")


def test_every_image_value_kind_gives_the_same_rgb_pixels(png_folder):
    path = png_folder / "red.png"
    raw = path.read_bytes()
    reference = _pixels(draw_shape("circle", "red"))
    for value in (str(path), path, raw, {"bytes": raw, "path": None}, {"bytes": None, "path": str(path)},
                  PILImage.open(io.BytesIO(raw))):
        image = load_image(value)
        assert image.mode == "RGB" and image.tobytes() == reference
    rgba = draw_shape("circle", "red").convert("RGBA")
    assert load_image(rgba).mode == "RGB"
    assert load_image(draw_shape("circle", "red").convert("L")).mode == "RGB"


def test_missing_column_and_bad_file_type(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"response": "x", "chosen": "y"}) + "\n")
    with pytest.raises(ADPODataError, match="field 'rejected'.*no column 'rejected'"):
        load_adpo_dataset(str(path))
    bad = tmp_path / "rows.txt"
    bad.write_text("x")
    with pytest.raises(ValueError, match="unsupported file type '.txt'"):
        load_adpo_dataset(str(bad))


def test_row_level_text_errors_name_row_and_field(tiny_llama):
    from transformers import AutoTokenizer

    collator = ADPOCollator(AutoTokenizer.from_pretrained(tiny_llama), multimodal=False)
    with pytest.raises(ADPODataError, match="row 4, field 'response': is empty"):
        collator([{"response": "  ", "chosen": "a", "rejected": "b", ROW_ID: 4}])
    with pytest.raises(ADPODataError, match="row 2, field 'rejected': must be a string, got int"):
        collator([{"response": "r", "chosen": "a", "rejected": 3, ROW_ID: 2}])


def test_every_image_column_reaches_our_loader_undecoded(monkeypatch, tiny_idefics3):
    """prompt_images (the multitask pair's) go through adpo's loader like chosen/rejected_images: a decompression
    bomb there is a counted, named skip, and --max_image_size shrinks it (datasets would decode it with PIL's own
    check, which raises a bare DecompressionBombError, or only warns below twice the limit)."""
    from transformers import AutoProcessor

    from adpo.validate import validate_dataset

    big = PILImage.new("RGB", (100, 50), (0, 128, 0))  # 5000 px: over twice the limit set below
    rows = [{**ROW, "chosen_images": [draw_shape("circle", "red")], "rejected_images": [draw_shape("circle", "green")],
             "prompt": "What is it?", "prompt_images": [image], "chosen_response": "A circle.",
             "rejected_response": "A square."} for image in (big, draw_shape("circle", "red"))]
    dataset = Dataset.from_list(rows)
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 2000)  # draw_shape: 32 x 32
    processor = AutoProcessor.from_pretrained(tiny_idefics3)
    strict = ADPOCollator(processor, multimodal=True, multitask=True)
    kept, report = validate_dataset(dataset, strict, on_bad_rows="skip")
    assert report.skipped == {"prompt_images: image too large": [0]} and len(kept) == 1
    shrinking = ADPOCollator(processor, multimodal=True, multitask=True, max_image_size=32)
    kept, report = validate_dataset(dataset, shrinking)
    assert report.kept == 2 and set(kept[0]["prompt_images"][0]) == {"bytes", "path"}
    assert shrinking([kept[0], kept[1]])["input_ids"].shape[0] == 8  # 4 sides per row
