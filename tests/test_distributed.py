"""Scale-out: DDP, DeepSpeed ZeRO-2/3, resume after SIGKILL, and the shipped launch configs.

Every multi-process run is a subprocess with a timeout: a hang fails the test instead of blocking CI. Runs use
two CPU processes over gloo. The weight comparisons use SGD with momentum, not Adam: Adam's first step moves
every weight by about ±lr whatever the gradient's size, so gradients that differ by float rounding (1e-9 where
the true gradient is ~0) would give weights that differ by ~lr, which says nothing about the parallelism.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from adpo.synthetic import draw_shape, write_jsonl

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "dist_worker.py"
TIMEOUT_S = 240  # a hung collective never finishes; a healthy run here takes well under a minute

# SGD + momentum (optimizer state that a resume must restore), a decaying LR (scheduler state), logged every step.
COMMON = [
    "--report_to", "none", "--logging_steps", "1", "--save_strategy", "no", "--seed", "0",
    "--optim", "sgd", "--optim_args", "momentum=0.9", "--learning_rate", "0.5", "--lr_scheduler_type", "linear",
]

# (chosen images, rejected images) per row. With 2 ranks, batch 1 and sequential sampling, rank 0 gets the even
# rows and rank 1 the odd ones, so in every step the two ranks hold different numbers of images (2 | 4, 3 | 3
# split differently, 4 | 2, 2 | 3): ZeRO-3 must not hang on it. (Image-less sides in a multimodal run are refused
# by the collator: every rank's forward calls the vision tower.)
MIXED_COUNTS = [(1, 1), (2, 2), (2, 1), (1, 2), (2, 2), (1, 1), (1, 1), (2, 1)]


# ---------------------------------------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    out = dict(os.environ)
    out.update({
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), out.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    })
    out.update(extra)
    return out


def launch(cmd: list[str], output_dir: Path, expect_rc: int = 0, **extra_env: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` (its own process group, killed whole on timeout) and check its exit code."""
    proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=env(**extra_env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"hung for {TIMEOUT_S}s (a collective never completed): {' '.join(map(str, cmd))}\n{out[-4000:]}")
    (output_dir.parent / f"{output_dir.name}.log").write_text(out)
    assert proc.returncode == expect_rc, f"exit code {proc.returncode}\n{out[-6000:]}"
    if str(WORKER) in map(str, cmd) and expect_rc == 0:  # every rank tore its process group down
        processes = 2 if "torch.distributed.run" in cmd else 1
        assert out.count("process group left initialized: False") == processes, out[-3000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


def single(args: list[str]) -> list[str]:
    return [sys.executable, WORKER, *args]


def torchrun(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(free_port()), WORKER, *args]


def accelerate_multi_gpu(args: list[str]) -> list[str]:
    """The seed's ``accelerate launch --config_file multi_gpu_config.yaml train_adpo_multimodal.py [args]``."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", REPO / "multi_gpu_config.yaml",
            "--main_process_port", str(free_port()), REPO / "train_adpo_multimodal.py", *args, "--use_cpu"]


def step_losses(output_dir: Path) -> dict[int, float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "model.safetensors")


def assert_same_run(a: Path, b: Path, atol: float = 1e-5) -> None:
    la, lb = step_losses(a), step_losses(b)
    assert la.keys() == lb.keys() and len(la) >= 3, (la, lb)
    for step in la:
        assert la[step] == pytest.approx(lb[step], abs=atol), (step, la, lb)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= atol, f"weights differ by {worst}"


def reference_placements(log: str) -> list[str]:
    """What dist_worker.py printed about the reference model, one line per rank."""
    return sorted(line.split(" reference ", 1)[1] for line in log.splitlines() if "adpo-test: rank" in line)


def assert_learned(output_dir: Path, initial: Path) -> None:
    """Step 1 loss is exactly log 2 (policy == reference), later ones move, and the weights changed."""
    losses = step_losses(output_dir)
    assert losses[1] == pytest.approx(0.693147, abs=1e-5)
    assert any(abs(v - 0.693147) > 1e-4 for v in losses.values()), losses
    trained, start = weights(output_dir), load_file(next(initial.glob("*.safetensors")))
    assert max((trained[k] - start[k]).abs().max().item() for k in trained) > 1e-4


@pytest.fixture(scope="module")
def mixed_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Image rows with 1 or 2 images per side, the two sides' counts differing in some rows."""
    colours = ["red", "green", "blue", "yellow"]
    rows = []
    for i, (n_chosen, n_rejected) in enumerate(MIXED_COUNTS):
        colour, other = colours[i % 4], colours[(i + 1) % 4]
        rows.append({
            "response": f"A {colour} circle.",
            "chosen": "What is shown?",
            "rejected": "What is shown?",
            "chosen_images": [draw_shape("circle", colour) for _ in range(n_chosen)],
            "rejected_images": [draw_shape("square", other) for _ in range(n_rejected)],
        })
    return write_jsonl(rows, tmp_path_factory.mktemp("mixed_rows"))


def text_args(tiny_llama: Path, text_jsonl: Path, output_dir: Path, batch: int, accumulation: int) -> list[str]:
    return ["--model_name_or_path", tiny_llama, "--dataset_name", text_jsonl, "--output_dir", output_dir,
            "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", str(accumulation),
            "--max_steps", "4", *COMMON]


def mixed_args(model: Path, data: Path, output_dir: Path, accumulation: int = 1) -> list[str]:
    return ["--model_name_or_path", model, "--dataset_name", data, "--output_dir", output_dir,
            "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", str(accumulation),
            "--max_steps", "4", "--train_sampling_strategy", "sequential", *COMMON]


@pytest.fixture(scope="module")
def text_accumulated(tiny_llama: Path, text_jsonl: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, batch 1 × accumulation 2, checkpoints every 2 steps: the reference run for DDP and resume."""
    out = tmp_path_factory.mktemp("runs") / "ga"
    launch(single([*text_args(tiny_llama, text_jsonl, out, 1, 2), "--save_strategy", "steps", "--save_steps", "2"]),
           out)
    return out


@pytest.fixture(scope="module")
def text_batch2(tiny_llama: Path, text_jsonl: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, batch 2."""
    out = tmp_path_factory.mktemp("runs") / "batch2"
    launch(single(text_args(tiny_llama, text_jsonl, out, 2, 1)), out)
    return out


@pytest.fixture(scope="module")
def mixed_accumulated(tiny_idefics3: Path, mixed_jsonl: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, accumulation 2, over the mixed rows: the reference for the multimodal DDP and ZeRO runs."""
    out = tmp_path_factory.mktemp("runs") / "mixed_ga"
    launch(single(mixed_args(tiny_idefics3, mixed_jsonl, out, accumulation=2)), out)
    return out


# ---------------------------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_and_accumulation(
    tiny_llama: Path, text_jsonl: Path, text_batch2: Path, text_accumulated: Path, tmp_path: Path
) -> None:
    """2 processes × batch 1 (accelerate + multi_gpu_config.yaml) == 1 × batch 2 == 1 × batch 1 × accumulation 2.

    Same random row order in all three (the sampler is seeded, and DDP deals each global batch out by rank).
    """
    ddp = tmp_path / "ddp"
    launch(accelerate_multi_gpu(text_args(tiny_llama, text_jsonl, ddp, 1, 1)), ddp)
    assert_same_run(ddp, text_batch2)
    assert_same_run(ddp, text_accumulated)
    assert_learned(ddp, tiny_llama)


@pytest.mark.slow
def test_deepspeed_in_a_plain_python_process_as_the_seed_writes_it(
    tiny_llama: Path, text_jsonl: Path, text_batch2: Path, tmp_path: Path
) -> None:
    """``python train_adpo_multimodal.py --deepspeed configs/deepspeed_zero2.yaml [args]`` with no launcher: one
    DeepSpeed process (no MPI lookup), equal to the same run without DeepSpeed."""
    out = tmp_path / "zero2_single"
    launch(single([*text_args(tiny_llama, text_jsonl, out, 2, 1), "--deepspeed", "configs/deepspeed_zero2.yaml"]),
           out)
    assert_same_run(out, text_batch2)


@pytest.mark.slow
def test_ddp_multimodal_rows_with_different_image_counts(
    tiny_idefics3: Path, mixed_jsonl: Path, mixed_accumulated: Path, tmp_path: Path
) -> None:
    """Idefics3 under DDP without unused-parameter detection, the ranks holding different numbers of images: the
    gradient all-reduce completes and the run equals one process with accumulation 2."""
    ddp = tmp_path / "ddp"
    log = launch(torchrun([*mixed_args(tiny_idefics3, mixed_jsonl, ddp), "--use_cpu",
                           "--ddp_find_unused_parameters", "false"]), ddp).stdout
    # The frozen reference is on each rank whole, unwrapped (no DDP: nothing to all-reduce), in eval mode.
    placements = reference_placements(log)
    assert len(placements) == 2
    for placement in placements:
        name, training, grads, elements = placement.split()
        assert name == "Idefics3ForConditionalGeneration" and training == "training=False"
        assert grads == "requires_grad=False" and elements.split("=")[1].split("/")[0] == elements.split("/")[1]
    assert_same_run(ddp, mixed_accumulated)
    assert_learned(ddp, tiny_idefics3)


# ---------------------------------------------------------------------------------------------- DeepSpeed
@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_multimodal_mixed_images_match_single_process(
    stage: int, tiny_idefics3: Path, mixed_jsonl: Path, mixed_accumulated: Path, tmp_path: Path
) -> None:
    """ZeRO-2 / ZeRO-3 (the seed's YAML configs) with the frozen reference, over rows whose image counts differ
    between ranks and steps: no hang, the same losses and weights as one process.

    ZeRO-3's output was saved consolidated (stage3_gather_16bit_weights_on_model_save) and loads with
    from_pretrained.
    """
    out = tmp_path / f"zero{stage}"
    log = launch(torchrun([*mixed_args(tiny_idefics3, mixed_jsonl, out), "--deepspeed",
                           f"configs/deepspeed_zero{stage}.yaml"]), out).stdout
    # The reference is a DeepSpeed engine in eval mode; ZeRO-3 shards it (each rank holds about half).
    for placement in reference_placements(log):
        name, training, grads, elements = placement.split()
        assert (name, training, grads) == ("DeepSpeedEngine", "training=False", "requires_grad=False")
        local, total = map(int, elements.split("=")[1].split("/"))
        assert local < 0.6 * total if stage == 3 else local == total, placement
    assert len(reference_placements(log)) == 2
    assert_same_run(out, mixed_accumulated)
    if stage == 3:
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(out)
        trained = weights(out)
        assert set(model.state_dict()) == set(trained)  # consolidated: every weight, none left in shards
        for name, param in model.state_dict().items():
            assert torch.equal(param, trained[name]), name


@pytest.mark.slow
def test_peft_reference_is_adapters_off_under_ddp_and_zero3(tiny_llama: Path, text_jsonl: Path, tmp_path: Path) -> None:
    """LoRA, reference = the policy with adapters disabled: under DDP (through the DDP wrapper) and under ZeRO-3
    (sharded). Step 1 has loss log 2 (adapters start at zero), the runs learn, and agree with each other."""
    ddp, zero3 = tmp_path / "ddp_lora", tmp_path / "zero3_lora"
    lora = ["--use_peft", "--lora_dropout", "0"]
    launch(accelerate_multi_gpu([*text_args(tiny_llama, text_jsonl, ddp, 1, 1), *lora]), ddp)
    launch(torchrun([*text_args(tiny_llama, text_jsonl, zero3, 1, 1), *lora, "--deepspeed",
                     "configs/deepspeed_zero3.yaml"]), zero3)
    for out in (ddp, zero3):
        losses = step_losses(out)
        assert losses[1] == pytest.approx(0.693147, abs=1e-6)
        assert any(abs(v - 0.693147) > 1e-4 for v in losses.values()), losses
    assert step_losses(ddp) == pytest.approx(step_losses(zero3), abs=1e-5)
    a, b = (load_file(out / "adapter_model.safetensors") for out in (ddp, zero3))
    assert a.keys() == b.keys() and len(a) > 0
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


# ---------------------------------------------------------------------------------------------- resume
@pytest.mark.slow
def test_sigkill_after_checkpoint_then_resume_equals_uninterrupted(
    tiny_llama: Path, text_jsonl: Path, text_accumulated: Path, tmp_path: Path
) -> None:
    """Killed with SIGKILL right after checkpoint-2 is written, then restarted with --resume_from_checkpoint: the
    per-step losses of steps 3-4 and the final weights equal the run that was never interrupted (momentum,
    LR schedule, RNG and the data order are all restored)."""
    out = tmp_path / "resumed"
    args = [*text_args(tiny_llama, text_jsonl, out, 1, 2), "--save_strategy", "steps", "--save_steps", "2"]
    launch(single(args), out, expect_rc=-signal.SIGKILL, ADPO_TEST_KILL_AFTER_SAVE="2")
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-4").exists()
    launch(single([*args, "--resume_from_checkpoint", out / "checkpoint-2"]), out)
    resumed, uninterrupted = step_losses(out), step_losses(text_accumulated)
    assert sorted(resumed) == [1, 2, 3, 4]  # steps 1-2 come from the checkpoint's log history
    for step in (3, 4):
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-6), (resumed, uninterrupted)
    assert_same_run(out, text_accumulated, atol=1e-6)


# ---------------------------------------------------------------------------------------------- shipped configs
DEEPSPEED_CONFIGS = sorted(REPO.glob("configs/deepspeed_*.yaml"))


@pytest.mark.parametrize("path", DEEPSPEED_CONFIGS, ids=lambda p: p.name)
def test_deepspeed_yaml_configs_load_and_equal_their_json_twins(path: Path) -> None:
    """``--deepspeed x.yaml`` loads into the dict transformers takes; the JSON twin holds the same config."""
    from adpo.launch import load_deepspeed_config

    config = load_deepspeed_config(str(path))
    assert config == json.loads(path.with_suffix(".json").read_text())
    assert config["zero_optimization"]["stage"] == int(path.stem[-1])
    assert config["train_micro_batch_size_per_gpu"] == "auto" and "optimizer" not in config
    if config["zero_optimization"]["stage"] == 3:
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_deepspeed_yaml_reaches_training_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In this process: building the config changes no environment variable and creates no process group; the
    launch pair declares a one-process DeepSpeed world (free MASTER_PORT), then restores the environment."""
    import torch.distributed as dist

    from adpo.cli import parse_args, parse_namespace
    from adpo.launch import compute_cleanup, compute_init

    launch_keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_DEEPSPEED")
    for key in launch_keys:
        monkeypatch.delenv(key, raising=False)
    try:  # DeepSpeed's CPU shared-memory kernel would be JIT-compiled (minutes); plain gloo does here
        monkeypatch.setattr(importlib.import_module("deepspeed.comm.torch"), "build_shm_op", lambda: None)
    except ImportError:
        pytest.skip("deepspeed is not installed")

    def launch_env() -> dict[str, str | None]:
        return {key: os.environ.get(key) for key in launch_keys}

    before = launch_env()
    argv = ["--output_dir", str(tmp_path), "--deepspeed", "configs/deepspeed_zero2.yaml",
            "--per_device_train_batch_size", "3", "--gradient_accumulation_steps", "2"]
    *_, plain = parse_args(["--output_dir", str(tmp_path)])  # no --deepspeed: nothing to prepare
    assert launch_env() == before and not dist.is_initialized()
    *_, unlaunched = parse_args(argv)  # the config alone, DeepSpeed YAML read: still no side effect
    assert unlaunched.hf_deepspeed_config.config["zero_optimization"]["stage"] == 2
    assert launch_env() == before and not dist.is_initialized()

    _, namespace = parse_namespace(argv)
    launch = compute_init(namespace.deepspeed)
    try:
        assert os.environ["WORLD_SIZE"] == "1" and int(os.environ["MASTER_PORT"]) > 0
        *_, args = parse_args(argv)
        config = args.hf_deepspeed_config.config
        assert [config["train_micro_batch_size_per_gpu"], config["train_batch_size"],
                config["zero_optimization"]["stage"]] == [3, 6, 2]
    finally:
        compute_cleanup(launch)
    assert launch_env() == before and not dist.is_initialized()


def test_bad_deepspeed_yaml_is_a_clear_error(tmp_path: Path) -> None:
    from adpo.launch import load_deepspeed_config

    bad = tmp_path / "ds.yaml"
    bad.write_text("zero_optimization: [unclosed\n")
    with pytest.raises(ValueError, match="cannot read it as YAML"):
        load_deepspeed_config(str(bad))
    bad.write_text("train_batch_size: 8\n")
    with pytest.raises(ValueError, match="zero_optimization"):
        load_deepspeed_config(str(bad))
    assert load_deepspeed_config("ds.json") == "ds.json"  # JSON goes to transformers unchanged


def accelerate_launch_env(config_file: Path) -> dict[str, Any]:
    """The environment ``accelerate launch --config_file config_file`` gives each training process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "train_adpo_multimodal.py"])
    args, *_ = _validate_launch_command(args)
    return {"args": args, "env": prepare_multi_gpu_env(args)}


def test_multi_gpu_config_is_ddp() -> None:
    """multi_gpu_config.yaml launches plain DDP (it is also what the DDP tests above launch with)."""
    launched = accelerate_launch_env(REPO / "multi_gpu_config.yaml")
    assert launched["args"].multi_gpu and launched["args"].num_processes == 2
    assert launched["env"].get("ACCELERATE_USE_FSDP", "false") == "false"
    assert launched["env"].get("ACCELERATE_USE_DEEPSPEED", "false") == "false"


def test_fsdp_config_launches_fsdp2_with_consolidated_save() -> None:
    """configs/fsdp.yaml (GPUs only: accelerate does not shard on CPU) turns into FSDP2 launch settings."""
    raw = yaml.safe_load((REPO / "configs/fsdp.yaml").read_text())
    assert raw["distributed_type"] == "FSDP"
    launched = accelerate_launch_env(REPO / "configs/fsdp.yaml")
    env_vars = launched["env"]
    assert env_vars["ACCELERATE_USE_FSDP"] == "true"
    assert env_vars["FSDP_VERSION"] == "2"
    assert env_vars["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
    assert env_vars["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"


def test_every_shipped_config_is_tested() -> None:
    """New launch configs must be added to a test above."""
    tested = {*(p.name for p in DEEPSPEED_CONFIGS), *(p.with_suffix(".json").name for p in DEEPSPEED_CONFIGS),
              "fsdp.yaml"}
    assert {p.name for p in (REPO / "configs").iterdir()} == tested
    assert (REPO / "multi_gpu_config.yaml").exists()


# ---------------------------------------------------------------------------------------------- units
def test_reference_deepspeed_config_replicates_below_stage3_and_shards_at_stage3() -> None:
    from adpo.launch import load_deepspeed_config
    from adpo.reference import reference_deepspeed_config

    zero2 = load_deepspeed_config("configs/deepspeed_zero2.yaml") | {"optimizer": {"type": "AdamW"}}
    ref = reference_deepspeed_config(zero2, hidden_size=64)
    assert ref["zero_optimization"]["stage"] == 0 and "optimizer" not in ref
    assert ref["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    assert zero2["zero_optimization"]["stage"] == 2  # the training config is left alone
    ref = reference_deepspeed_config(load_deepspeed_config("configs/deepspeed_zero3.yaml"), hidden_size=64)
    zero = ref["zero_optimization"]
    assert zero["stage"] == 3
    assert (zero["stage3_prefetch_bucket_size"], zero["stage3_param_persistence_threshold"]) == (3686, 640)


@pytest.mark.slow
def test_fsdp2_sharded_fused_head_equals_unsharded(tiny_llama: Path, tmp_path: Path) -> None:
    """FSDP2 (fully_shard per decoder layer and root, 2 processes, gloo): with the LM head's weight sharded, the
    fused head (several vocabulary blocks) gives the unsharded model's log-probs and every parameter's gradient, as
    the model's own head does."""
    from adpo.collator import RESPONSE_MASK, ROW_IDS, ADPOCollator
    from adpo.logprobs import response_logps

    out = tmp_path / "fsdp.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           REPO / "tests" / "fsdp_worker.py", tiny_llama, out]
    launch(cmd, tmp_path / "fsdp")
    sharded = torch.load(out)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(REPO / "tests"))
    from fsdp_worker import ROWS

    batch = ADPOCollator(AutoTokenizer.from_pretrained(tiny_llama), multimodal=False)(ROWS)
    mask = batch.pop(RESPONSE_MASK)
    batch.pop(ROW_IDS)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    assert model.config.vocab_size > 256  # several blocks of the fused head
    sums = response_logps(model, model.get_output_embeddings(), batch, mask, fused=False).sums
    sums.sum().backward()
    for fused in (True, False):
        got_sums, got_grads = sharded[fused]
        torch.testing.assert_close(got_sums, sums.detach(), rtol=1e-6, atol=1e-5)
        assert set(got_grads) == {n for n, _ in model.named_parameters()}
        for name, param in model.named_parameters():
            torch.testing.assert_close(got_grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)
