"""adpo-data: the builders honour their definitions (checked against brute force), count every row, are
deterministic per seed, and write rows the trainer accepts; import and check."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from adpo.cli import run_entry_point
from adpo.cli.data import main
from adpo.collator import ADPOCollator
from adpo.data import ADPODataError, load_adpo_dataset
from adpo.pairs import check, from_dpo, import_rows, load_source, normalise, prompt_swap, swap
from adpo.pairs.embed import EmbeddingCache, ImageEmbedder
from adpo.processing import load_processor
from adpo.synthetic import draw_shape
from adpo.validate import validate_dataset

# (shape, colour, prompt, response): "What colour is the shape?" has 7 rows with 4 responses (red twice); the
# blue square also answers two other questions (prompt-swap's same-image pairs); "Name the odd one." is alone.
SOURCE = [
    ("circle", "red", "What colour is the shape?", "Red."),
    ("square", "red", "what colour is the shape", "red"),  # same normalised prompt and response as row 0
    ("triangle", "green", "What colour is the shape?", "Green."),
    ("circle", "blue", "What colour is the shape?", "Blue."),
    ("square", "yellow", "What colour is the shape?", "Yellow."),
    ("square", "blue", "What colour is the shape?", "Blue."),
    ("triangle", "blue", "What colour is the  shape?", "Blue."),
    ("square", "blue", "Which shape is it?", "A square."),
    ("square", "blue", "Is it round?", "No."),
    ("circle", "green", "Name the odd one.", "The circle."),
]


def write_source(folder: Path, rows=SOURCE, name: str = "vqa.jsonl") -> Path:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for k, (shape, colour, prompt, response) in enumerate(rows):
        image = f"img/{shape}_{colour}.png"
        draw_shape(shape, colour, size=48).save(folder / image)
        lines.append(json.dumps({"images": [image], "prompt": prompt, "response": response, "id": f"q{k}"}))
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return write_source(tmp_path / "src")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def pictures(row: dict, field: str, root: Path) -> tuple[str, ...]:
    return tuple(hashlib.sha256((root / p).read_bytes()).hexdigest() for p in row[field])


def valid_negatives(i: int, same_prompt: bool = False) -> list[int]:
    """Brute force: rows whose normalised response differs and whose picture differs (and, for same-prompt,
    whose normalised prompt is the same)."""
    shape, colour, prompt, response = SOURCE[i]
    return [j for j, (s, c, p, r) in enumerate(SOURCE)
            if j != i and normalise(r) != normalise(response) and (s, c) != (shape, colour)
            and (not same_prompt or normalise(p) == normalise(prompt))]


def test_normalise_ignores_case_space_punctuation_and_placeholders():
    assert normalise("<image>\nWhat colour is  the CAR?") == normalise("what colour is the car") == \
        "what colour is the car"
    assert normalise("Red.") == normalise("red") != normalise("Blue.")


@pytest.mark.parametrize("negatives", [1, 3])
def test_swap_random_rows_counts_and_definition(source: Path, tmp_path: Path, negatives: int):
    out = tmp_path / "pairs.jsonl"
    report = swap(str(source), out, strategy="random", negatives=negatives, seed=5)
    rows = read_jsonl(out)
    expected = sum(min(negatives, len(valid_negatives(i))) for i in range(len(SOURCE)))
    assert len(rows) == report.output_rows == expected
    assert report.source_rows == 10 and report.n_skipped == 0
    for row in rows:
        i, j = row["source_row"], row["negative_row"]
        assert j in valid_negatives(i)
        assert (row["response"], row["chosen"], row["rejected"]) == (SOURCE[i][3], SOURCE[i][2], SOURCE[i][2])
        assert pictures(row, "chosen_images", out.parent) != pictures(row, "rejected_images", out.parent)
        assert row["id"] == f"q{i}"  # scalar source columns are carried through
    per_row = [[r["negative_row"] for r in rows if r["source_row"] == i] for i in range(len(SOURCE))]
    assert all(len(set(negs)) == len(negs) for negs in per_row)  # distinct negatives per source row


def test_swap_same_prompt_shares_the_prompt_and_differs_in_response(source: Path, tmp_path: Path):
    out = tmp_path / "pairs.jsonl"
    report = swap(str(source), out, strategy="same-prompt", negatives=2, seed=0)
    rows = read_jsonl(out)
    assert len(rows) == sum(min(2, len(valid_negatives(i, same_prompt=True))) for i in range(10)) == 14
    for row in rows:
        i, j = row["source_row"], row["negative_row"]
        assert normalise(SOURCE[i][2]) == normalise(SOURCE[j][2])
        assert normalise(SOURCE[i][3]) != normalise(SOURCE[j][3])
        assert j in valid_negatives(i, same_prompt=True)
    # Rows 7, 8, 9 have no other row with their prompt: counted, with the reason, not lost.
    assert report.skipped == {"no other row has the same prompt, a different response and other images": [7, 8, 9]}
    assert report.output_rows == 14 and report.source_rows == 10


def test_swap_is_deterministic_per_seed(source: Path, tmp_path: Path):
    outputs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        swap(str(source), tmp_path / name / "pairs.jsonl", strategy="random", negatives=2, seed=seed)
        outputs[name] = (tmp_path / name / "pairs.jsonl").read_text()
    assert outputs["a"] == outputs["b"]
    assert outputs["a"] != outputs["c"]


def test_every_output_row_passes_the_trainers_validation(source: Path, tmp_path: Path, tiny_idefics3: Path):
    collator = ADPOCollator(load_processor(str(tiny_idefics3)), multimodal=True)
    for out in (tmp_path / "pairs.jsonl", tmp_path / "pairs_saved"):
        report = swap(str(source), out, strategy="random", negatives=2, seed=0)
        dataset = load_adpo_dataset(str(out))
        kept, validation = validate_dataset(dataset, collator, on_bad_rows="error", max_length=4096)
        assert len(kept) == validation.kept == report.output_rows == len(dataset)


def test_saved_output_embeds_the_images(source: Path, tmp_path: Path):
    swap(str(source), tmp_path / "saved", seed=0)
    swap(str(source), tmp_path / "pairs.jsonl", seed=0)
    saved, jsonl = load_source(str(tmp_path / "saved")), read_jsonl(tmp_path / "pairs.jsonl")
    assert saved.dataset.features["chosen_images"].feature.__class__.__name__ == "Image"
    for k, row in enumerate(jsonl):
        stored = saved.row(k)["rejected_images"][0]["bytes"]
        assert stored == (tmp_path / row["rejected_images"][0]).read_bytes()  # byte for byte, not re-encoded


def test_similar_picks_the_nearest_embedding_among_valid_rows(source: Path, tmp_path: Path, tiny_idefics3: Path,
                                                               monkeypatch: pytest.MonkeyPatch):
    out = tmp_path / "pairs.jsonl"
    cache = tmp_path / "cache"
    swap(str(source), out, strategy="similar", negatives=2, model_name_or_path=str(tiny_idefics3),
         cache_dir=str(cache))
    # Brute force: embed every row's image directly, cosine similarity, best valid rows (ties: lower index).
    from PIL import Image

    embedder = ImageEmbedder(str(tiny_idefics3))
    vectors = torch.stack([embedder(Image.open(source.parent / f"img/{s}_{c}.png").convert("RGB"))
                           for s, c, _, _ in SOURCE])
    vectors = torch.nn.functional.normalize(vectors, dim=1).double()
    expected = []
    for i in range(len(SOURCE)):
        candidates = valid_negatives(i)
        sims = {j: (vectors[i] @ vectors[j]).item() for j in candidates}
        expected += [(i, j) for j in sorted(candidates, key=lambda j: (-sims[j], j))[:2]]
    assert [(r["source_row"], r["negative_row"]) for r in read_jsonl(out)] == expected
    assert len({round((vectors[0] @ vectors[j]).item(), 6) for j in range(1, 10)}) > 3  # not all tied
    # Computed once: a second build reads the cache and never loads the model.
    assert len(EmbeddingCache(str(tiny_idefics3), cache).table) == len({(s, c) for s, c, _, _ in SOURCE})
    monkeypatch.setattr("adpo.pairs.embed.ImageEmbedder", lambda *a, **k: pytest.fail("model loaded again"))
    swap(str(source), tmp_path / "again.jsonl", strategy="similar", negatives=2,
         model_name_or_path=str(tiny_idefics3), cache_dir=str(cache))
    assert (tmp_path / "again.jsonl").read_text() == out.read_text().replace("pairs_images", "again_images")


def test_prompt_swap_same_image_and_templates(source: Path, tmp_path: Path):
    out = tmp_path / "ps.jsonl"
    report = prompt_swap(str(source), out, negatives=2, seed=0)
    rows = read_jsonl(out)
    # Only the blue square has several rows (5, 7, 8), each with 2 other prompts and responses.
    assert sorted((r["source_row"], r["negative_row"]) for r in rows) == [(5, 7), (5, 8), (7, 5), (7, 8), (8, 5),
                                                                           (8, 7)]
    assert report.n_skipped == 7 and report.output_rows == 6
    for row in rows:
        assert row["chosen_images"] == row["rejected_images"]
        assert row["rejected"] == SOURCE[row["negative_row"]][2] and row["chosen"] == SOURCE[row["source_row"]][2]
    report = prompt_swap(str(source), tmp_path / "t.jsonl", negatives=2, seed=0,
                         templates=["What colour is the shape?", "Describe the weather.", "Count the cats."])
    rows = read_jsonl(tmp_path / "t.jsonl")
    assert len(rows) == 20 and report.n_skipped == 0
    assert all(normalise(r["rejected"]) != normalise(r["chosen"]) for r in rows)


def test_from_dpo_rows_train_as_multitask(tmp_path: Path, tiny_idefics3: Path):
    folder = tmp_path / "dpo"
    write_source(folder)
    rows = read_jsonl(folder / "vqa.jsonl")
    for row in rows:
        row["chosen"], row["rejected"] = row.pop("response"), "I cannot tell."
    (folder / "dpo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "multi.jsonl"
    report = from_dpo(str(folder / "dpo.jsonl"), out, negatives=1, seed=0)
    built = read_jsonl(out)
    assert len(built) == report.output_rows == 10
    for row in built:
        i = row["source_row"]
        assert row["prompt"] == row["chosen"] == SOURCE[i][2]
        assert row["chosen_response"] == row["response"] == SOURCE[i][3]
        assert row["rejected_response"] == "I cannot tell." and row["prompt_images"] == row["chosen_images"]
    collator = ADPOCollator(load_processor(str(tiny_idefics3)), multimodal=True, multitask=True)
    dataset = load_adpo_dataset(str(out))
    batch = collator([dataset[i] for i in range(3)])
    assert batch["input_ids"].shape[0] == 12  # [chosen; rejected; dpo chosen; dpo rejected] x 3


def test_bad_source_rows_error_with_row_and_field_or_are_counted(tmp_path: Path):
    folder = tmp_path / "bad"
    path = write_source(folder)
    lines = path.read_text().splitlines()
    lines[3] = json.dumps({"images": ["img/missing.png"], "prompt": "What colour is the shape?", "response": "x"})
    lines[4] = json.dumps({"images": [], "prompt": "p", "response": "y"})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ADPODataError, match=r"row 3, field 'images': image file not found"):
        swap(str(path), tmp_path / "o.jsonl")
    report = swap(str(path), tmp_path / "o.jsonl", on_bad_rows="skip")
    assert report.skipped["images: image file not found"] == [3]
    assert report.skipped["images: has no image"] == [4]
    with pytest.raises(ADPODataError, match="has no column 'question'"):
        swap(str(path), tmp_path / "o2.jsonl", prompt="question")


def test_cli_prints_counts_and_one_line_errors(source: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "cli.jsonl"
    assert main(["swap", str(source), str(out), "--strategy", "same-prompt", "--negatives", "2", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "10 source rows → 14 rows" in printed and "3 rows without output" in printed
    with pytest.raises(SystemExit) as stop:  # an existing OUTPUT is not replaced without --overwrite
        run_entry_point(lambda: main(["swap", str(source), str(out)]), "adpo-data")
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("adpo-data: error: OUTPUT") and "--overwrite" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        run_entry_point(lambda: main(["swap", str(source), str(tmp_path / "x.jsonl"), "--strategy", "similar"]),
                        "adpo-data")
    assert "--model_name_or_path" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ import
def test_import_ms_swift_pairs_and_llava_conversations(tmp_path: Path):
    folder = tmp_path / "imp"
    (folder / "img").mkdir(parents=True)
    for shape, colour in (("circle", "red"), ("square", "blue")):
        draw_shape(shape, colour).save(folder / f"img/{colour}.png")
    user = {"role": "user", "content": "<image>What colour is it?"}
    swift = [
        {"messages": [user, {"role": "assistant", "content": "Red."}], "images": ["img/red.png"],
         "rejected_images": ["img/blue.png"]},
        {"messages": [{"role": "system", "content": "Be brief."}, user, {"role": "assistant", "content": "Red."}],
         "images": ["img/red.png"], "rejected_messages": [{"role": "user", "content": "<image>Is it blue?"},
                                                          {"role": "assistant", "content": "Red."}]},
        {"messages": [user, {"role": "assistant", "content": "Red."}], "images": ["img/red.png", "img/blue.png"],
         "rejected_images": ["img/blue.png"]},  # 1 placeholder, 2 images
    ]
    (folder / "swift.jsonl").write_text("".join(json.dumps(r) + "\n" for r in swift))
    with pytest.raises(ADPODataError, match=r"row 2, field 'messages': has 1 <image> placeholder\(s\) but the row "
                       r"has 2 image\(s\)"):
        import_rows(str(folder / "swift.jsonl"), tmp_path / "s.jsonl")
    kind, report = import_rows(str(folder / "swift.jsonl"), tmp_path / "s.jsonl", on_bad_rows="skip")
    rows = read_jsonl(tmp_path / "s.jsonl")
    assert kind == "pairs" and len(rows) == report.output_rows == 2 and report.n_skipped == 1
    assert rows[0] | {"chosen_images": None, "rejected_images": None} == {
        "response": "Red.", "chosen": "What colour is it?", "rejected": "What colour is it?", "source_row": 0,
        "chosen_images": None, "rejected_images": None}
    assert pictures(rows[0], "chosen_images", tmp_path) != pictures(rows[0], "rejected_images", tmp_path)
    assert rows[1]["chosen"] == "Be brief.\n\nWhat colour is it?" and rows[1]["rejected"] == "Is it blue?"
    assert rows[1]["chosen_images"] == rows[1]["rejected_images"]

    llava = [{"id": "a", "image": "red.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "What shape?"}, {"from": "gpt", "value": "A circle."}]},
        {"id": "b", "image": "blue.png", "conversations": [
            {"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "Blue."}]}]
    (folder / "llava.json").write_text(json.dumps(llava))
    kind, report = import_rows(str(folder / "llava.json"), tmp_path / "l.jsonl", image_root=str(folder / "img"))
    rows = read_jsonl(tmp_path / "l.jsonl")
    assert kind == "swap input" and report.output_rows == len(rows) == 3
    assert [(r["prompt"], r["response"], r["turn"]) for r in rows] == [
        ("What colour?", "Red.", 0), ("What shape?", "A circle.", 1), ("What colour?", "Blue.", 0)]
    swap(str(tmp_path / "l.jsonl"), tmp_path / "p.jsonl", strategy="same-prompt")  # imported rows feed swap
    assert len(read_jsonl(tmp_path / "p.jsonl")) == 2


# ------------------------------------------------------------------------------------------------ check
def test_check_reports_what_the_trainer_would_refuse(source: Path, tmp_path: Path, tiny_idefics3: Path):
    out = tmp_path / "pairs.jsonl"
    swap(str(source), out, strategy="random", seed=0)
    rows = read_jsonl(out)
    rows[2]["rejected_images"] = ["pairs_images/missing.png"]
    rows[4]["rejected_images"] = rows[4]["chosen_images"]  # identical sides
    rows.append(dict(rows[0]))  # a duplicate of row 0
    rows[6]["chosen"] = "What colour is the shape? " * 40  # too long for --max_length 120
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = check(str(out), model_name_or_path=str(tiny_idefics3), max_length=120)
    assert result.total == 11
    # The trainer refuses identical sides too (no signal): reported as refused and as identical.
    assert {r["row"]: r["field"] for r in result.refused} == {2: "rejected_images", 4: "rejected", 6: "chosen"}
    assert "image file not found" in result.rows[2]["problem"] and "over --max_length 120" in result.rows[6]["problem"]
    assert result.identical == [4] and result.duplicates == [[0, 10]]
    assert result.image_modes == {"RGB": 21} and result.image_sizes == {"48x48": 21}  # the missing one is not counted
    # Token counts are the trainer's own (validate.pair_lengths on the collator's encoding).
    from adpo.validate import pair_lengths

    collator = ADPOCollator(load_processor(str(tiny_idefics3)), multimodal=True)
    row = load_adpo_dataset(str(out))[0]
    sides = [collator.encode_side(row, "chosen"), collator.encode_side(row, "rejected")]
    expected = pair_lengths(collator, sides, ["chosen", "rejected"], 0)
    assert [result.rows[0]["tokens_chosen"], result.rows[0]["tokens_rejected"]] == expected
    # Without a model: the schema and the images only.
    plain = check(str(out))
    assert [r["row"] for r in plain.refused] == [2] and plain.identical == [4]


def test_docs_list_every_adpo_data_flag():
    from conftest import REPO

    from adpo.cli.data import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    flags = {opt for sub in subparsers.values() for a in sub._actions for opt in a.option_strings
             if opt.startswith("--") and opt != "--help"}
    reference = (REPO / "docs" / "data.md").read_text()
    assert len(flags) > 20
    assert sorted(f for f in flags if f"`{f}`" not in reference) == []
    assert {"swap", "prompt-swap", "from-dpo", "import", "check"} == set(subparsers)


def test_swap_reads_every_input_the_trainer_reads(source: Path, tmp_path: Path):
    """JSONL, CSV (images as a JSON list cell), a folder of files, and a save_to_disk folder with Image features
    give the same pairs; a malformed record is named, or counted with --on_bad_rows skip."""
    import csv

    from datasets import Dataset, Features, Image, List, Value

    rows = read_jsonl(source)
    csv_path = tmp_path / "src" / "vqa.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**r, "images": json.dumps(r["images"])} for r in rows)
    folder = tmp_path / "folder"
    write_source(folder, name="train.jsonl")
    saved = tmp_path / "saved"
    features = Features({"images": List(Image()), "prompt": Value("string"), "response": Value("string"),
                         "id": Value("string")})
    Dataset.from_dict({"images": [[str(source.parent / p) for p in r["images"]] for r in rows],
                       "prompt": [r["prompt"] for r in rows], "response": [r["response"] for r in rows],
                       "id": [r["id"] for r in rows]}, features=features).save_to_disk(str(saved))
    built = {}
    for name, data in (("jsonl", source), ("csv", csv_path), ("folder", folder), ("saved", saved)):
        out = tmp_path / name / "pairs.jsonl"
        swap(str(data), out, strategy="same-prompt", negatives=2, seed=4)
        built[name] = [(r["source_row"], r["negative_row"], pictures(r, "rejected_images", out.parent))
                       for r in read_jsonl(out)]
    assert built["csv"] == built["jsonl"] == built["folder"] == built["saved"] and len(built["jsonl"]) == 14

    broken = tmp_path / "broken.jsonl"
    lines = source.read_text().splitlines()
    lines[2] = '{"images": ["img/x.png"], "prompt": '  # truncated record
    broken.write_text("\n".join(lines).replace("img/", str(source.parent / "img") + "/") + "\n")
    with pytest.raises(ADPODataError, match="row 2"):
        swap(str(broken), tmp_path / "b.jsonl")
    report = swap(str(broken), tmp_path / "b.jsonl", on_bad_rows="skip")
    assert report.source_rows == 10 and report.n_skipped == 1
    assert [rows for why, rows in report.skipped.items()] == [[2]]
    # Rows keep their record numbers around the record left out.
    rebuilt = read_jsonl(tmp_path / "b.jsonl")
    assert sorted({r["source_row"] for r in rebuilt}) == [0, 1, 3, 4, 5, 6, 7, 8, 9]
    assert all(r["response"] == SOURCE[r["source_row"]][3] for r in rebuilt)
    assert all(SOURCE[r["negative_row"]][3] != r["response"] for r in rebuilt)
