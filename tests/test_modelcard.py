"""The model card in the trained output folder (metadata parsed by huggingface_hub), and the whole path a
newcomer takes: build pairs → train 2 steps → evaluate with an HTML report."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from adpo.cli import main, parse_args
from adpo.config import ADPOConfig, DataArguments, ModelArguments
from adpo.modelcard import chosen_flags, model_card_text, training_command
from adpo.synthetic import draw_shape

HISTORY = [
    {"step": 1, "loss": 0.70, "rewards/accuracies": 0.25, "logps/accuracies": 0.5, "rewards/margins": 0.01},
    {"step": 2, "loss": 0.61, "rewards/accuracies": 0.75, "logps/accuracies": 0.875, "rewards/margins": 0.2},
    {"step": 2, "eval_loss": 0.65, "eval_logps/accuracies": 0.8125, "eval_rewards/accuracies": 0.625},
    {"step": 2, "train_runtime": 3.2, "train_loss": 0.655},
]


def test_card_metadata_parses_and_holds_what_a_model_page_needs(tmp_path: Path):
    model_args = ModelArguments(model_name_or_path="HuggingFaceTB/SmolVLM-Instruct", use_peft=True, lora_r=8)
    data_args = DataArguments(dataset_name="someone/adpo-pairs")
    training_args = ADPOConfig(output_dir=str(tmp_path / "out"), learning_rate=5e-7, beta=0.2, max_steps=2,
                               report_to="none")
    path = tmp_path / "README.md"
    ModelCard(model_card_text(model_args, data_args, training_args, HISTORY, 2)).save(path)
    card = ModelCard.load(path)
    assert card.data.base_model == "HuggingFaceTB/SmolVLM-Instruct"
    assert card.data.library_name == "peft" and card.data.datasets == ["someone/adpo-pairs"]
    assert {"adpo", "lora", "vision-language"} <= set(card.data.tags)
    text = card.text
    assert "| `logps/accuracies` | 0.875 |" in text and "| `loss` | 0.61 |" in text  # the final values
    assert "## Evaluation" in text and "| `logps/accuracies` | 0.8125 |" in text
    assert "| `beta` | 0.2 |" in text and "| `lora_r` | 8 |" in text
    assert "Abductive Preference Learning" in text and "arXiv:2510.09887" in text
    assert "PeftModel.from_pretrained" in text


def test_training_command_repeats_the_run():
    argv = ["--model_name_or_path", "m", "--dataset_name", "d.jsonl", "--output_dir", "o", "--beta", "0.3",
            "--use_peft", "--lora_target_modules", "q_proj,v_proj", "--learning_rate", "1e-6", "--max_steps", "7",
            "--gradient_accumulation_steps", "4", "--report_to", "none", "--multimodal_mode", "false"]
    parsed = parse_args(argv)
    command = training_command(*parsed)
    assert command.startswith("adpo-train \\\n    --model_name_or_path m")
    again = parse_args(shlex.split(command.replace("\\\n", ""))[1:])
    assert chosen_flags(*again) == chosen_flags(*parsed)
    assert {"beta": 0.3, "use_peft": True, "max_steps": 7, "multimodal_mode": False}.items() <= \
        chosen_flags(*parsed).items()
    assert "gradient_checkpointing" not in chosen_flags(*parsed)  # defaults are not mistaken for choices


def test_local_base_model_license_and_paths(tmp_path: Path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n")
    text = model_card_text(ModelArguments(model_name_or_path=str(base)), DataArguments(dataset_name=str(base)),
                           ADPOConfig(output_dir=str(tmp_path / "o"), report_to="none"), HISTORY[:1], 1)
    card = ModelCard(text)
    assert card.data.license == "apache-2.0"
    assert card.data.base_model is None and card.data.datasets is None  # local paths are not hub ids
    assert card.data.library_name == "transformers"


def test_adapter_training_writes_a_card_that_push_to_hub_keeps(tiny_idefics3: Path, image_jsonl: Path,
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from adpo import modelcard

    trainers, original = [], modelcard.use_adpo_model_card

    def keep(trainer, *args):
        trainers.append(trainer)
        return original(trainer, *args)

    monkeypatch.setattr(modelcard, "use_adpo_model_card", keep)  # train_and_save imports it when called
    out = tmp_path / "lora"
    assert main(["--model_name_or_path", str(tiny_idefics3), "--dataset_name", str(image_jsonl),
                 "--output_dir", str(out), "--use_peft", "--max_steps", "1", "--max_train_samples", "2",
                 "--per_device_train_batch_size", "2", "--report_to", "none", "--save_strategy", "no"]) == 0
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "peft" and "adpo" in card.data.tags
    assert "--use_peft true" in card.text and "logps/accuracies" in card.text
    # push_to_hub writes the card through trainer.create_model_card before uploading: it must stay ours.
    (out / "README.md").unlink()
    trainers[0].create_model_card(model_name="lora", tags=["x"])
    assert ModelCard.load(out / "README.md").text == card.text


def _cli(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_from_your_data_to_a_trained_model(tiny_idefics3: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    """The README's path: (images, question, answer) rows → adpo-data swap → check → adpo-train → adpo-eval."""
    (tmp_path / "img").mkdir()
    rows = []
    for shape in ("circle", "square", "triangle"):
        for colour in ("red", "green", "blue", "yellow"):
            draw_shape(shape, colour, size=48).save(tmp_path / f"img/{shape}_{colour}.png")
            rows.append({"images": [f"img/{shape}_{colour}.png"], "prompt": f"What colour is the {shape}?",
                         "response": f"The {shape} is {colour}."})
    (tmp_path / "vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from adpo.cli.data import main as adpo_data  # in-process: the subprocess start-up is the slow part

    pairs = str(tmp_path / "pairs.jsonl")
    assert adpo_data(["swap", str(tmp_path / "vqa.jsonl"), pairs, "--strategy", "same-prompt", "--negatives", "2",
                      "--seed", "0"]) == 0
    assert adpo_data(["check", pairs, "--model_name_or_path", str(tiny_idefics3)]) == 0
    assert "12 source rows → 24 rows" in capsys.readouterr().out
    trained = _cli("adpo.cli", "--model_name_or_path", str(tiny_idefics3), "--dataset_name", "pairs.jsonl",
                   "--output_dir", "model", "--max_steps", "2", "--per_device_train_batch_size", "2",
                   "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no", cwd=tmp_path)
    assert "trained 2 steps" in trained.stdout
    card = ModelCard.load(tmp_path / "model" / "README.md")
    assert card.data.library_name == "transformers" and "--max_steps 2" in card.text
    _cli("adpo.cli.evaluate", "--model_name_or_path", "model", "--ref_model_name_or_path", str(tiny_idefics3),
         "--dataset_name", "pairs.jsonl", "--output_dir", "eval", "--html", "eval/report.html", cwd=tmp_path)
    page = (tmp_path / "eval" / "report.html").read_text()
    assert page.count("<tr data-group") + page.count("<tr>") >= 24 and "log π_ref(y|x_w)" in page
    from test_report import browse, console_messages

    proc = browse(tmp_path / "eval" / "report.html", tmp_path, "--dump-dom")
    assert console_messages(proc.stderr) == [] and "24 of 24 rows shown" in proc.stdout
    assert 'data-images="49/49"' in proc.stdout  # 48 thumbnails + the evaluation plot
