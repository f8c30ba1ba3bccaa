"""The seed's command lines, run as written (plus a tiny local model and dataset), and the CLI's contract."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file

from adpo.cli import main, parse_args
from adpo.synthetic import counterfactual_rows, write_jsonl

SCRIPT = str(REPO / "train_adpo_multimodal.py")


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.fixture(scope="module")
def four_rows(tmp_path_factory):
    return write_jsonl(counterfactual_rows(4, seed=3), tmp_path_factory.mktemp("four"))


@pytest.mark.slow
def test_seed_basic_training_command(tiny_idefics3, four_rows, tmp_path):
    out = tmp_path / "adpo-multimodal-model"
    proc = _run([
        "--model_name_or_path", str(tiny_idefics3), "--dataset_name", str(four_rows), "--output_dir", str(out),
        "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "8", "--learning_rate", "5e-7",
        "--num_train_epochs", "3", "--multimodal_mode", "--separate_images", "--bf16", "--gradient_checkpointing",
    ])
    assert "saved model and processor" in proc.stdout
    from transformers import AutoModelForImageTextToText, AutoProcessor

    AutoModelForImageTextToText.from_pretrained(out)
    AutoProcessor.from_pretrained(out)
    changed = _changed(load_file(tiny_idefics3 / "model.safetensors"), load_file(out / "model.safetensors"))
    assert any("vision_model" in k for k in changed) and any("text_model" in k for k in changed)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3


@pytest.mark.slow
def test_seed_debug_mode_command(tiny_idefics3, image_jsonl, tmp_path):
    out = tmp_path / "debug"
    _run(["--model_name_or_path", str(tiny_idefics3), "--dataset_name", str(image_jsonl), "--output_dir", str(out),
          "--max_train_samples", "10", "--max_steps", "5", "--logging_steps", "1", "--save_steps", "1000000",
          "--learning_rate", "1e-3"])
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [h for h in state["log_history"] if "loss" in h]
    assert [h["step"] for h in logged] == [1, 2, 3, 4, 5]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected", "logps/accuracies"):
        assert all(key in h for h in logged), key
    # Step 0: policy == reference, so the reward margin is exactly zero and the loss is log 2.
    assert logged[0]["rewards/margins"] == 0 and abs(logged[0]["loss"] - 0.6931) < 1e-4
    assert not (out / "checkpoint-1").exists()  # --save_steps 1000000 saves only at the end


def test_training_changes_the_policy_and_not_the_reference(tiny_idefics3, image_jsonl, tmp_path):
    from adpo.pipeline import build_trainer

    model_args, data_args, training_args = parse_args([
        "--model_name_or_path", str(tiny_idefics3), "--dataset_name", str(image_jsonl), "--output_dir",
        str(tmp_path), "--max_steps", "2", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
        "--report_to", "none", "--save_strategy", "no",
    ])
    trainer, _ = build_trainer(model_args, data_args, training_args)
    ref_before = {k: v.clone() for k, v in trainer.ref_model.state_dict().items()}
    policy_before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    assert not _changed(ref_before, trainer.ref_model.state_dict())
    assert len(_changed(policy_before, trainer.model.state_dict())) > 10
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())


def test_peft_reference_is_the_policy_with_adapters_off(tiny_idefics3, image_jsonl, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from adpo.pipeline import build_trainer

    out = tmp_path / "lora"
    argv = ["--model_name_or_path", str(tiny_idefics3), "--dataset_name", str(image_jsonl), "--output_dir", str(out),
            "--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--max_steps", "2", "--learning_rate", "1e-2",
            "--report_to", "none", "--save_strategy", "no"]
    trainer, _ = build_trainer(*parse_args(argv))
    assert trainer.ref_model is None and isinstance(trainer.model, PeftModel)  # no second copy in memory
    assert main(argv) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and any("text_model" in m for m in config["target_modules"])
    assert not any("vision_model" in m for m in config["target_modules"])  # default: the language model only
    PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_idefics3), out)


def test_text_only_training_and_eval_split(tiny_llama, text_jsonl, tmp_path):
    out = tmp_path / "text"
    assert main([
        "--model_name_or_path", str(tiny_llama), "--dataset_name", str(text_jsonl), "--output_dir", str(out),
        "--eval_dataset_name", str(text_jsonl), "--eval_strategy", "steps", "--eval_steps", "2",
        "--max_steps", "4", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
        "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no",
    ]) == 0
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    evals = [h for h in history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [2, 4]
    assert all("eval_rewards/accuracies" in h and "eval_logps/accuracies" in h for h in evals)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).chat_template


def test_config_file_and_command_line_precedence(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model_name_or_path: some/model\nbeta: 0.3\nlearning_rate: 1.0e-4\nseparate_images: false\n"
                      "output_dir: from-yaml\n")
    model_args, data_args, training_args = parse_args(["--config", str(config), "--beta", "0.5"])
    assert model_args.model_name_or_path == "some/model"
    assert training_args.beta == 0.5 and training_args.learning_rate == 1e-4
    assert data_args.separate_images is False and training_args.output_dir == "from-yaml"
    bad = tmp_path / "bad.yaml"
    bad.write_text("betta: 0.3\n")
    with pytest.raises(SystemExit, match="unknown keys \\['betta'\\]"):
        parse_args(["--config", str(bad)])


def test_boolean_flags_as_the_seed_writes_them():
    _, data, _ = parse_args(["--multimodal_mode", "--separate_images"])
    assert data.multimodal_mode is True and data.separate_images is True
    _, data, _ = parse_args([])
    assert data.multimodal_mode is None and data.separate_images is True  # auto, and the seed's default
    _, data, _ = parse_args(["--multimodal_mode", "false", "--separate_images", "false"])
    assert data.multimodal_mode is False and data.separate_images is False


@pytest.mark.parametrize("argv, message", [
    (["--image_processor_kwargs", "{size: 3}"], "not valid JSON"),
    (["--beta", "0"], "--beta must be positive"),
    (["--max_image_size", "0"], "--max_image_size must be a positive"),
])
def test_bad_flags_fail_fast(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_args(argv)


def test_readme_cli_reference_lists_every_adpo_flag():
    """Every flag adpo adds to the Trainer's (model, data and ADPOConfig's own fields) has a README row."""
    import dataclasses

    from transformers import TrainingArguments

    from adpo.config import ADPOConfig, DataArguments, ModelArguments

    readme = (REPO / "README.md").read_text()
    reference = readme[readme.index("### CLI reference"):readme.index("## Supported models")]
    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    flags = [f.name for cls in (ModelArguments, DataArguments) for f in dataclasses.fields(cls)]
    flags += [f.name for f in dataclasses.fields(ADPOConfig) if f.name not in inherited]
    assert "fused_lm_head" in flags
    assert [name for name in flags if f"`--{name}`" not in reference] == []


def test_length_grouped_batching_and_pad_to_multiple_of(tiny_llama, text_jsonl, tmp_path):
    from adpo.pipeline import build_trainer

    trainer, _ = build_trainer(*parse_args([
        "--model_name_or_path", str(tiny_llama), "--dataset_name", str(text_jsonl), "--output_dir", str(tmp_path),
        "--train_sampling_strategy", "group_by_length", "--pad_to_multiple_of", "16", "--max_steps", "2",
        "--per_device_train_batch_size", "2", "--report_to", "none", "--save_strategy", "no",
    ]))
    lengths = trainer.train_dataset["length"]
    assert len(lengths) == 8 and min(lengths) > 0
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[1] % 16 == 0
    trainer.train()


def test_python_m_entry_points_execute_their_module_once():
    """``python -m adpo.evaluate`` (and adpo.synthetic, adpo.datasets_tools) hands the CLI the running module
    instead of executing a second copy of it (two copies: two sets of classes, isinstance across them fails)."""
    script = """if True:
        import json, os, runpy, sys
        runs = {}

        def count(event, args):
            if event == "exec" and getattr(args[0], "co_name", None) == "<module>":
                runs[args[0].co_filename] = runs.get(args[0].co_filename, 0) + 1

        sys.addaudithook(count)
        for name in ("adpo.evaluate", "adpo.synthetic", "adpo.datasets_tools"):
            sys.argv = [name, "--help"]
            try:
                runpy.run_module(name, run_name="__main__", alter_sys=True)
            except SystemExit:
                pass
        marker = os.sep + "adpo" + os.sep
        print(json.dumps({f.split(marker)[-1]: n for f, n in runs.items() if marker in f}))
    """
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {name: runs.get(name) for name in ("evaluate.py", "synthetic.py", "datasets_tools.py")} == {
        "evaluate.py": 1, "synthetic.py": 1, "datasets_tools.py": 1}
