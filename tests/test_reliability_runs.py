"""Runs that must not end badly: flag values that cannot train, YAML values as YAML writes them, non-finite
weights and all-skipped runs, half-written checkpoints and resume, Ctrl-C, and decompression bombs.

In-process and tiny (a 2-layer Llama, 8 text rows, 1-3 steps).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image, ImageFile
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from adpo.checkpoints import checkpoint_problem
from adpo.cli import main, parse_args
from adpo.collator import ADPOCollator
from adpo.config import ADPOConfig
from adpo.data import load_adpo_dataset
from adpo.guard import NonFiniteTrainingError
from adpo.images import DECODE_BUDGET_FACTOR, ImageLoadError, load_image
from adpo.preflight import check_no_foreign_checkpoints, resolve_resume
from adpo.trainer import ADPOTrainer


def _argv(tmp_path: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", "m", "--dataset_name", "d.jsonl", "--output_dir", str(tmp_path / "o"),
            "--report_to", "none", *extra]


# ------------------------------------------------------------------------------ class: silent no-ops (flags)
REFUSED = [
    ("--beta", "nan", "--beta must be a finite number"), ("--beta", "inf", "--beta must be a finite number"),
    ("--beta", "0", "--beta must be positive, got 0.0"), ("--beta", "-1", "--beta must be positive, got -1.0"),
    ("--learning_rate", "inf", "--learning_rate must be a finite number"),
    ("--learning_rate", "nan", "--learning_rate must be a finite number"),
    ("--learning_rate", "0", "--learning_rate must be positive, got 0.0: 0 trains nothing"),
    ("--learning_rate", "-1e-5", "--learning_rate must be positive, got -1e-05"),
    ("--adam_epsilon", "0", "--adam_epsilon must be positive, got 0.0: Adam divides"),
    ("--adam_epsilon", "-1e-8", "--adam_epsilon must be positive"),
    ("--adam_beta2", "1", "--adam_beta2 must be in [0, 1), got 1.0"),
    ("--weight_decay", "-0.1", "--weight_decay must be >= 0, got -0.1"),
    ("--max_grad_norm", "nan", "--max_grad_norm must be a finite number"),
    ("--dpop_lambda", "nan", "must be a finite number"), ("--label_smoothing", "nan", "must be a finite number"),
    ("--multitask_weight", "nan", "must be a finite number"), ("--num_train_epochs", "inf", "must be a finite"),
    ("--lora_alpha", "0", "--lora_alpha must be positive"), ("--lora_alpha", "-16", "--lora_alpha must be positive"),
    ("--lora_dropout", "nan", "--lora_dropout must be in [0, 1)"),
    ("--pad_to_multiple_of", "-8", "--pad_to_multiple_of must be a positive number"),
    ("--pad_to_multiple_of", "0", "--pad_to_multiple_of must be a positive number"),
    ("--num_train_epochs", "0", "--num_train_epochs 0.0 (and no --max_steps) trains nothing"),
    ("--per_device_train_batch_size", "0", "--per_device_train_batch_size must be at least 1, got 0"),
    ("--gradient_accumulation_steps", "0", "--gradient_accumulation_steps must be at least 1, got 0"),
]


@pytest.mark.parametrize(("flag", "value", "words"), REFUSED, ids=[f"{f}={v}" for f, v, _ in REFUSED])
def test_flag_values_that_cannot_train_are_refused(flag, value, words, tmp_path):
    with pytest.raises(ValueError) as info:
        parse_args(_argv(tmp_path, f"{flag}={value}"))  # the = form, as for any negative number
    assert words in str(info.value)


def test_sane_edge_values_are_accepted(tmp_path):
    _, data, args = parse_args(_argv(tmp_path, "--weight_decay", "0", "--max_grad_norm", "0", "--adam_beta1", "0",
                                     "--pad_to_multiple_of", "1", "--beta", "1e-4"))
    assert (args.weight_decay, args.max_grad_norm, data.pad_to_multiple_of) == (0.0, 0.0, 1)


def test_use_cpu_with_deepspeed_under_a_launcher_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"--use_cpu with --deepspeed under a multi-process launcher"):
        ADPOConfig(output_dir=str(tmp_path), use_cpu=True, deepspeed={"zero_optimization": {"stage": 2}})


# ------------------------------------------------------------------------------ class: YAML as YAML writes it
def test_yaml_lists_mappings_and_numbers_where_a_flag_takes_a_string(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("""\ufeff
model_name_or_path: m
dataset_name: d.jsonl
output-dir: from-yaml
lora_target_modules: [q_proj, v_proj]
image_processor_kwargs: {size: {longest_edge: 64}}
dataset_config: 2020
lr_scheduler_kwargs: {min_lr: 1.0e-6}
optim_args: {foo: 1}
report_to: [none]
resume_from_checkpoint: false
beta: 0.5
learning_rate: 5e-7
""", encoding="utf-8")
    model, data, args = parse_args(["--config", str(config)])
    assert model.lora_target_modules == "q_proj,v_proj"
    assert data.image_processor_kwargs_dict() == {"size": {"longest_edge": 64}}
    assert data.dataset_config == "2020" and args.output_dir == "from-yaml"
    assert args.lr_scheduler_kwargs == {"min_lr": 1e-6} and args.optim_args == "foo=1"
    assert args.report_to == [] or args.report_to == ["none"] or args.report_to == "none"
    assert (args.beta, args.learning_rate, args.resume_from_checkpoint) == (0.5, 5e-7, "false")
    _, _, args = parse_args(["--config", str(config), "--beta", "0.25"])  # the command line wins
    assert args.beta == 0.25
    (tmp_path / "empty.yaml").write_text("")
    assert parse_args(["--config", str(tmp_path / "empty.yaml"), *_argv(tmp_path)])[0].model_name_or_path == "m"
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(SystemExit, match=r"expected a mapping of flag names to values, got list"):
        parse_args(["--config", str(tmp_path / "list.yaml")])


# ------------------------------------------------------------------------------ training fixtures
def _trainer(tiny_llama: Path, text_jsonl: Path, out: Path, **overrides: Any) -> ADPOTrainer:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    settings = {"output_dir": str(out), "per_device_train_batch_size": 2, "max_steps": 3, "learning_rate": 1e-2,
                "logging_steps": 1, "report_to": [], "save_strategy": "steps", "save_steps": 1, "use_cpu": True,
                "disable_tqdm": True, **overrides}
    return ADPOTrainer(model=model, args=ADPOConfig(**settings), ref_model=copy.deepcopy(model),
                       train_dataset=load_adpo_dataset(str(text_jsonl)),
                       data_collator=ADPOCollator(tokenizer, multimodal=False), processing_class=tokenizer)


class _AtStep(TrainerCallback):
    """Runs ``action(model)`` just before optimizer step ``step`` (after the non-finite guard has looked)."""

    def __init__(self, step: int, action: Any) -> None:
        self.step, self.action = step, action

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            self.action(model)


# ------------------------------------------------------------------------------ class: corrupt outputs
def test_non_finite_weights_are_never_saved(tiny_llama, text_jsonl, tmp_path):
    """Step 2's update makes a weight infinite (a huge learning rate would): the run fails naming checkpoint-1,
    and no checkpoint of step 2 (or later) is written."""
    trainer = _trainer(tiny_llama, text_jsonl, tmp_path)

    def blow_up(model: torch.nn.Module) -> None:
        param = next(p for p in model.parameters() if p.requires_grad)
        param.grad = torch.full_like(param, float("inf"))  # finite loss; an update that overflows

    trainer.add_callback(_AtStep(2, blow_up))
    with pytest.raises(NonFiniteTrainingError) as info:
        trainer.train()
    assert f"optimizer step 2; nothing of this step is saved. The last good checkpoint is {tmp_path / 'checkpoint-1'}"\
        in str(info.value)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1"]
    saved = load_file(tmp_path / "checkpoint-1" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_a_run_whose_every_step_was_skipped_fails(tiny_llama, text_jsonl, tmp_path, monkeypatch, caplog):
    trainer = _trainer(tiny_llama, text_jsonl, tmp_path, max_steps=2, save_strategy="no")
    clean = trainer.loss_and_metrics
    monkeypatch.setattr(trainer, "loss_and_metrics",
                        lambda model, inputs: (lambda out: (out[0] * float("nan"), out[1]))(clean(model, inputs)))
    with caplog.at_level(logging.WARNING), pytest.raises(NonFiniteTrainingError,
                                                         match=r"every one of the 2 optimizer steps was skipped"):
        trainer.train()
    assert [step for step, _ in trainer.nonfinite_guard.skipped_steps] == [1, 2]


def test_a_run_with_some_skipped_steps_still_trains(tiny_llama, text_jsonl, tmp_path, monkeypatch):
    trainer = _trainer(tiny_llama, text_jsonl, tmp_path, max_steps=2, save_strategy="no")
    clean, calls = trainer.loss_and_metrics, []

    def first_poisoned(model, inputs):
        loss, metrics = clean(model, inputs)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 1 else loss), metrics

    monkeypatch.setattr(trainer, "loss_and_metrics", first_poisoned)
    assert trainer.train().global_step == 2


# ------------------------------------------------------------------------------ class: data loss (checkpoints)
@pytest.fixture(scope="module")
def two_checkpoints(tiny_llama, text_jsonl, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two_checkpoints")
    _trainer(tiny_llama, text_jsonl, out, max_steps=2).train()
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_checkpoint_completeness(two_checkpoints, tmp_path):
    run = _copy(two_checkpoints, tmp_path / "run")
    assert checkpoint_problem(run / "checkpoint-2") is None
    cases = {
        "trainer_state.json": (lambda p: p.unlink(), "trainer_state.json is missing"),
        "model.safetensors": (lambda p: p.write_bytes(p.read_bytes()[:-100]), "model.safetensors is truncated"),
        "optimizer.pt": (lambda p: p.write_bytes(p.read_bytes()[:1000]), "optimizer.pt is truncated or corrupt"),
    }
    for name, (damage, words) in cases.items():
        broken = _copy(run / "checkpoint-2", tmp_path / f"broken-{name}")
        damage(broken / name)
        assert words in checkpoint_problem(broken), name
    (run / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": ')
    assert "trainer_state.json does not parse" in checkpoint_problem(run / "checkpoint-2")


def test_resume_last_falls_back_to_the_last_complete_checkpoint(two_checkpoints, tmp_path, caplog):
    run = _copy(two_checkpoints, tmp_path / "run")
    assert resolve_resume("last", str(run)) == str(run / "checkpoint-2")
    weights = run / "checkpoint-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])  # a crash while writing it
    (run / "checkpoint-3").mkdir()  # a folder the crash left empty
    with caplog.at_level(logging.WARNING):
        for value in ("last", "latest", "true", "True", True):
            assert resolve_resume(value, str(run)) == str(run / "checkpoint-1")
    assert "skipping incomplete checkpoint" in caplog.text and "checkpoint-3" in caplog.text
    with pytest.raises(ValueError, match=rf"checkpoint-2: the checkpoint is incomplete \(model.safetensors is "
                       rf"truncated.*The newest complete checkpoint there is {run / 'checkpoint-1'}"):
        resolve_resume(str(run / "checkpoint-2"), str(run))
    with pytest.raises(ValueError, match=r"no such checkpoint folder"):
        resolve_resume(str(run / "checkpoint-9"), str(run))
    for value in (None, False, "false", "no", "", "None"):
        assert resolve_resume(value, str(run)) is None
    assert resolve_resume("last", str(tmp_path / "fresh")) is None  # nothing to resume yet: start afresh


def test_a_new_run_does_not_mix_with_another_runs_checkpoints(two_checkpoints, tmp_path):
    run = _copy(two_checkpoints, tmp_path / "run")
    with pytest.raises(ValueError, match=r"holds checkpoints of an earlier run \(checkpoint-1, checkpoint-2\).*"
                       r"--resume_from_checkpoint last"):
        check_no_foreign_checkpoints(str(run), overwrite=False)
    check_no_foreign_checkpoints(str(run), overwrite=True)
    assert not list(run.glob("checkpoint-*"))
    check_no_foreign_checkpoints(str(tmp_path / "does-not-exist"), overwrite=False)


# ------------------------------------------------------------------------------ class: Ctrl-C, end to end
def _train_cli(tiny_llama: Path, text_jsonl: Path, out: Path, *extra: str) -> int:
    return main(["--model_name_or_path", str(tiny_llama), "--dataset_name", str(text_jsonl), "--output_dir",
                 str(out), "--max_steps", "3", "--per_device_train_batch_size", "2", "--save_steps", "100",
                 "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true", *extra])


def test_ctrl_c_saves_a_checkpoint_and_resume_last_continues(tiny_llama, text_jsonl, tmp_path, monkeypatch,
                                                              capsys):
    out = tmp_path / "out"
    original, steps = ADPOTrainer.training_step, []

    def interrupted(self, *args, **kwargs):
        steps.append(1)
        if len(steps) == 2:  # during step 2
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ADPOTrainer, "training_step", interrupted)
    assert _train_cli(tiny_llama, text_jsonl, out) == 130
    err = capsys.readouterr().err
    assert "finishing this step and saving a checkpoint" in err
    assert f"interrupted after step 2: checkpoint saved to {out / 'checkpoint-2'}" in err
    assert checkpoint_problem(out / "checkpoint-2") is None and not (out / "config.json").exists()

    monkeypatch.setattr(ADPOTrainer, "training_step", original)
    with pytest.raises(ValueError, match="holds checkpoints of an earlier run"):  # neither resumed nor overwritten
        _train_cli(tiny_llama, text_jsonl, out)
    assert _train_cli(tiny_llama, text_jsonl, out, "--resume_from_checkpoint", "last") == 0
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 3
    assert "trained 3 steps" in capsys.readouterr().out


def test_second_ctrl_c_stops_at_once_and_names_the_last_checkpoint(tiny_llama, text_jsonl, tmp_path, monkeypatch,
                                                                    capsys):
    out = tmp_path / "out"
    original, steps = ADPOTrainer.training_step, []

    def interrupted_twice(self, *args, **kwargs):
        steps.append(1)
        if len(steps) == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ADPOTrainer, "training_step", interrupted_twice)
    assert _train_cli(tiny_llama, text_jsonl, out, "--save_steps", "1") == 130
    assert (f"stopped at once. The last complete checkpoint is {out / 'checkpoint-1'}; continue with "
            "--resume_from_checkpoint last") in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


# ------------------------------------------------------------------------------ class: memory safety
def _png_claiming(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims ``width`` x ``height`` (a decompression bomb's header, without the
    gigabytes: decoding it would allocate the full size first)."""
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


def test_decompression_bomb_png_is_refused_from_its_header(monkeypatch):
    def no_decoding(self, *args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    for size in ((30000, 30000), (20000, 20000)):
        bomb = _png_claiming(*size)
        with pytest.raises(ImageLoadError, match=rf"^image too large to decode safely: .* would be decoded at "
                           rf"{size[0]}x{size[1]} pixels .*PNG cannot be decoded at reduced scale"):
            load_image(bomb, max_size=512)
        with pytest.raises(ImageLoadError, match=r"^image too large: .*--max_image_size"):
            load_image(bomb)


def test_images_within_the_decode_budget_are_shrunk(monkeypatch):
    import io

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    within = Image.new("RGB", (60, 60), (0, 128, 0))  # 3600 px <= 4 x 1000: decoded, then shrunk
    over = Image.new("RGB", (80, 60), (0, 128, 0))  # 4800 px: refused before decoding
    as_png, as_jpeg = io.BytesIO(), io.BytesIO()
    within.save(as_png, "PNG")
    assert DECODE_BUDGET_FACTOR == 4 and load_image(as_png.getvalue(), max_size=20).size == (20, 20)
    over.save(as_png := io.BytesIO(), "PNG")
    with pytest.raises(ImageLoadError, match=r"too large to decode safely"):
        load_image(as_png.getvalue(), max_size=20)
    Image.new("RGB", (400, 200)).save(as_jpeg, "JPEG")  # 80000 px, but JPEG decodes at 1/8 scale: 1250 px
    assert load_image(as_jpeg.getvalue(), max_size=50).size == (50, 25)


# ------------------------------------------------------------------------------ class: one line, not a traceback
def _entry(monkeypatch, capsys, argv: list[str]) -> tuple[int, str]:
    from adpo.cli import run

    monkeypatch.setattr("sys.argv", ["adpo-train", *argv])
    with pytest.raises(SystemExit) as info:
        run()
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return info.value.code, "\n".join(line for line in err.splitlines() if line.startswith("adpo:"))


def test_cli_checks_the_output_dir_and_model_before_loading_anything(tiny_llama, text_jsonl, tmp_path, monkeypatch,
                                                                       capsys):
    def never(*args, **kwargs):
        raise AssertionError("loaded something before the checks")

    monkeypatch.setattr("adpo.pipeline.load_adpo_rows", never)
    monkeypatch.setattr("adpo.pipeline.load_processor_for", never)
    (tmp_path / "a-file").write_text("x")
    base = ["--model_name_or_path", str(tiny_llama), "--dataset_name", str(text_jsonl), "--report_to", "none"]
    cases = [
        (["--output_dir", str(tmp_path / "a-file")], "is an existing file, not a folder"),
        (["--output_dir", str(tmp_path / "a-file" / "out")], "is a file, so the folder cannot be created"),
        (["--output_dir", str(tmp_path / "o"), "--model_name_or_path", str(tmp_path / "no-model")], "no such folder"),
        (["--output_dir", str(tmp_path / "o"), "--beta", "nan"], "--beta must be a finite number, got nan"),
        (["--output_dir", str(tmp_path / "o"), "--resume_from_checkpoint", str(tmp_path)],
         "the checkpoint is incomplete (trainer_state.json is missing"),
    ]
    for extra, words in cases:
        code, err = _entry(monkeypatch, capsys, [*base, *extra])
        assert code == 2 and err.startswith("adpo: error: ") and words in err, (extra, err)


@pytest.mark.parametrize(("raised", "code", "words"), [
    (OSError(28, "No space left on device"), 1, "adpo: error: [Errno 28] No space left on device"),
    (NonFiniteTrainingError("every one of the 3 optimizer steps was skipped"), 1, "adpo: error: every one of"),
    (KeyboardInterrupt(), 130, "adpo: interrupted"),
    (ValueError("--x must be positive"), 2, "adpo: error: --x must be positive"),
])
def test_failures_end_in_one_line_and_an_exit_status(raised, code, words, capsys):
    from adpo.cli import run_entry_point

    def entry() -> int:
        raise raised

    with pytest.raises(SystemExit) as info:
        run_entry_point(entry, "adpo")
    err = capsys.readouterr().err
    assert info.value.code == code and words in err and "Traceback" not in err


def test_weights_check_ignores_empty_parameter_shards():
    """Under ZeRO-3 each process holds empty placeholders for parameters it does not own."""
    from adpo.guard import _all_finite

    assert _all_finite([torch.empty(0), torch.ones(2)]) and _all_finite([torch.empty(0)])
    assert not _all_finite([torch.empty(0), torch.tensor([1.0, float("nan")])])
