"""GPU benchmark: ADPO training throughput of the SmolVLM-Instruct and LLaVA-1.6-Mistral-7B architectures.

Each model is built from its real architecture config (``bench/configs/*.json``, no download) with RANDOM weights,
directly on the device in bf16, with a processor built locally like the real one (local byte-level BPE tokenizer with
the family's special tokens and chat template, the family's image processor with the real settings). The model keeps
its real vocabulary size; the tokenizer's ids are a subset of it, and the config's image-token id is pointed at the
local tokenizer's ``<image>`` id. Training goes through adpo's real path: ``ADPOCollator`` → ``ADPOTrainer``
(``ADPOConfig``), the reference from ``adpo.modeling.load_reference``, LoRA from ``adpo.modeling.apply_lora``. The
rows are a plain Python list of dicts, so ``datasets`` is not needed here.

Runs (``--model all``):
  smolvlm      SmolVLM-Instruct, full fine-tune, frozen-copy reference, bs 4; one run per ``--smolvlm_split``:
               ``on`` = the real processor (do_image_splitting, longest edge 1536 = 4 x 384: a 384 x 384 image becomes
               4 x 4 tiles + 1 global = 17 tiles of 81 tokens), ``off`` = one 384 x 384 tile (81 tokens).
  llava        LLaVA-1.6-Mistral-7B, LoRA with --use_peft defaults (r 16, alpha 32, the language model's Linear layers),
               reference = adapters disabled, bs 4, 672 x 672 images (anyres: 2 x 2 tiles + 1 base = 5 tiles of 336,
               2928 image tokens).
Both use the seed's flags: --bf16 --gradient_checkpointing --learning_rate 5e-7 --multimodal_mode --separate_images
(gradient accumulation 1 instead of 8 so that each timed step is one micro-batch; the optimizer step is < 1% here).

Measured per run: ``--warmup`` steps, then ``--steps`` timed optimizer steps (torch.cuda.synchronize at each step
end; the time includes data loading, the reference forward, the policy forward/backward and the optimizer step).
Reported: pairs/s (= samples/s, a sample being one ADPO row = 2 sequences), tokens/s (non-pad tokens of the 2B
policy sequences, image tokens included), peak GPU memory (torch.cuda.max_memory_allocated over the run), MFU.

MFU, HFU and the FLOP count: ``bench/flops.py``.

Run on one H200 (about 3 to 4 minutes for ``--model all``, model builds included):
    PYTHONPATH=src PYTHONUNBUFFERED=1 python3 bench/bench_gpu.py --model all --json bench_gpu.json
Check the whole code path on a CPU in under two minutes (scaled-down configs, same processors and vocabularies):
    PYTHONPATH=src python bench/bench_gpu.py --tiny

Architectures, processors and rows: ``bench/archs.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

# Run as a script, bench/ is on sys.path: its sibling modules import by name.
from archs import (  # noqa: E402
    build_model,
    llava_processor,
    llava_tokenizer,
    load_config,
    point_config_at_tokenizer,
    smolvlm_processor,
    smolvlm_tokenizer,
    synthetic_rows,
)
from flops import FAMILIES, Arch, Family, Work, forward_flops, measure_arch, measure_work, step_flops  # noqa: E402
from torch import nn

H100_H200_BF16_PEAK = 989e12  # dense bf16 FLOP/s, H100 SXM / H200 datasheet
SEED_TABLE = {"smolvlm": 3.2, "llava": 2.4}  # samples/s on H100 at bs 4, from the seed README

def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)



# ---------------------------------------------------------------------------------------------------- timing
def make_timer_callback(sync: Callable[[], None], warmup: int, max_run_s: float) -> Any:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time at the end of every optimizer step (after a device sync); stops a run that runs long."""

        def __init__(self) -> None:
            self.ends: list[float] = []
            self.start = 0.0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            sync()
            self.start = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            sync()
            self.ends.append(time.perf_counter())
            timed = len(self.ends) - warmup
            if timed >= 2 and self.ends[-1] - self.start > max_run_s:
                log(f"run time cap {max_run_s:.0f}s reached after {timed} timed steps; stopping this run")
                control.should_training_stop = True

    return StepTimer()


def component_ranges(model: nn.Module) -> list[Any]:
    """Forward pre/post hooks that open a profiler range per component (``fwd.vision_tower`` ...); returns handles.

    Forwards only: under gradient checkpointing the decoder layers' recomputation happens inside backward."""
    from adpo.modeling import component_path

    handles, open_ranges = [], []
    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: the wrapped model
    parts = {name: model.get_submodule(path) for name in ("vision_tower", "mm_projector", "language_model")
             if (path := component_path(model, name))}
    parts["lm_head"] = model.get_output_embeddings()
    for name, module in parts.items():
        def enter(_module: nn.Module, _args: Any, name: str = name) -> None:
            rf = torch.profiler.record_function(f"fwd.{name}")
            rf.__enter__()
            open_ranges.append(rf)

        def leave(_module: nn.Module, _args: Any, _out: Any) -> None:
            open_ranges.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    return handles


def make_profiler_callback(first_step: int, steps: int, out_dir: Path, name: str, cuda: bool) -> Any:
    """torch.profiler over optimizer steps [first_step, first_step + steps): writes ``<name>.txt`` (top ops by
    device time, then by CPU time, and adpo's named ranges) and logs the ranges' share of the profiled time."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

    class StepProfiler(TrainerCallback):
        def __init__(self) -> None:
            self.prof: Any = None
            self.t0 = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == first_step and self.prof is None:
                self.prof = profile(activities=activities)
                self.prof.__enter__()
                self.t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.prof is None or state.global_step != first_step + steps:
                return
            if cuda:
                torch.cuda.synchronize()
            self.finish(steps)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.prof is not None:  # training stopped early (run time cap): report the steps profiled
                self.finish(state.global_step - first_step)

        def finish(self, done: int) -> None:
            wall = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)
            self.write(wall, max(done, 1))
            self.prof = None

        def write(self, wall: float, steps: int) -> None:
            events = self.prof.key_averages()
            device_key = "self_device_time_total" if cuda else "self_cpu_time_total"
            lines = [f"{name}: {steps} profiled steps, {wall:.3f} s wall under the profiler", "",
                     "adpo ranges and component forwards, per step (host time: from entering to leaving the range"
                     + ("; device time: its kernels" if cuda else "") + "):"]
            top_level = 0.0
            for e in sorted(events, key=lambda e: -e.cpu_time_total):
                if e.key.startswith(("adpo.", "fwd.", "Optimizer.step")):
                    host = e.cpu_time_total / 1e6 / steps
                    top_level += host if not e.key.startswith("fwd.") else 0.0
                    dev = f"  device {e.device_time_total / 1e6 / steps:8.3f} s" if cuda else ""
                    lines.append(f"  {e.key:<32} host {host:8.3f} s ({100 * host * steps / wall:5.1f}%){dev}"
                                 f"  {e.count // steps} calls")
            rest = wall / steps - top_level
            share = 100 * rest * steps / wall
            lines.append(f"  {'rest: backward, data, logging':<32} host {rest:8.3f} s ({share:5.1f}%)")
            lines.append("  (fwd.* are the policy's forwards, and the reference's where it is the policy with "
                         "adapters off; a frozen-copy reference runs inside adpo.reference_logps)")
            lines += ["", "top ops by self device time:" if cuda else "top ops by self CPU time:",
                      events.table(sort_by=device_key, row_limit=30)]
            out_dir.mkdir(parents=True, exist_ok=True)
            path = out_dir / f"{name.replace(' ', '_').replace('=', '-')}.txt"
            path.write_text("\n".join(lines))
            log("\n".join(lines[:12]) + f"\n  (full table: {path})")

    return StepProfiler()


@dataclass
class RunResult:
    name: str
    status: str = "ok"
    error: str = ""
    batch_size: int = 0
    steps_timed: int = 0
    s_per_step: float = float("nan")
    pairs_per_s: float = float("nan")
    tokens_per_s: float = float("nan")
    tokens_per_seq: float = 0.0
    image_tokens_per_seq: float = 0.0
    response_tokens_per_seq: float = 0.0
    tiles_per_step: int = 0
    padded_len: int = 0
    model_tflop_per_step: float = 0.0
    hw_tflop_per_step: float = 0.0
    mfu: float = float("nan")
    hfu: float = float("nan")
    peak_mem_gb: float = float("nan")
    weights_mem_gb: float = float("nan")
    params: int = 0
    trainable_params: int = 0
    collate_s: float = float("nan")
    build_s: float = float("nan")
    train_loss: float = float("nan")
    flops_by_part: dict[str, float] = field(default_factory=dict)
    seed_samples_per_s: float = float("nan")


# ---------------------------------------------------------------------------------------------------- device
class Device:
    def __init__(self, plan: bool, peak_tflops: float | None) -> None:
        self.cuda = torch.cuda.is_available() and not plan
        self.type = "meta" if plan else "cuda" if self.cuda else "cpu"
        self.name = torch.cuda.get_device_name(0) if self.cuda else platform.processor() or "cpu"
        self.peak = peak_tflops * 1e12 if peak_tflops else self._datasheet_peak()

    def _datasheet_peak(self) -> float | None:
        if self.cuda and any(k in self.name for k in ("H100", "H200")) and "PCIe" not in self.name:
            return H100_H200_BF16_PEAK
        return None

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def allocated_gb(self) -> float:
        return torch.cuda.memory_allocated() / 2**30 if self.cuda else float("nan")

    def peak_gb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # CPU: process max RSS, for information

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def matmul_tflops(self) -> float | None:
        """bf16 8192³ matmul rate, the achievable ceiling to read MFU against."""
        if not self.cuda:
            return None
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        self.sync()
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        self.sync()
        rate = 10 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12
        del a, b
        self.free()
        return rate


# ---------------------------------------------------------------------------------------------------- one run
@dataclass
class RunSpec:
    name: str
    family: Family
    lora: bool
    processor: Any
    image_size: int


def train_args(args: argparse.Namespace, out_dir: str, total_steps: int, device: Device) -> Any:
    from adpo import ADPOConfig

    return ADPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=5e-7,
        max_steps=total_steps,
        bf16=args.bf16,
        gradient_checkpointing=not args.no_gradient_checkpointing,
        logging_steps=total_steps,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=args.workers,
        seed=0,
        use_cpu=not device.cuda,
    )


def plan_one(spec: RunSpec, model: nn.Module, arch: Arch, args: argparse.Namespace,
             result: RunResult) -> tuple[list[dict[str, Any]], Any, Work, float, float]:
    """Rows, collator and one collated batch's work and FLOPs; fills the work fields of ``result``."""
    from adpo import ADPOCollator

    rows = synthetic_rows(args.batch_size * (args.warmup + args.steps), spec.image_size)
    collator = ADPOCollator(spec.processor, multimodal=True, separate_images=True)
    work, batch, result.collate_s = measure_work(collator, rows[: args.batch_size], spec.family, model.config)
    _describe_work(result, work, batch, model.config, args.batch_size)
    model_flops, hw_flops = step_flops(arch, work, spec.lora, not args.no_gradient_checkpointing)
    result.model_tflop_per_step, result.hw_tflop_per_step = model_flops / 1e12, hw_flops / 1e12
    result.flops_by_part = {k: v / 1e12 for k, v in forward_flops(arch, work).items()}
    result.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return rows, collator, work, model_flops, hw_flops


def run_one(spec: RunSpec, model: nn.Module, ref: nn.Module | None, arch: Arch, args: argparse.Namespace,
            device: Device, result: RunResult) -> None:
    """Train ``--warmup`` + ``--steps`` steps through ADPOTrainer and fill ``result``."""
    from adpo import ADPOTrainer

    rows, collator, work, model_flops, hw_flops = plan_one(spec, model, arch, args, result)
    if args.plan:
        result.status = "planned"
        return
    timed_steps = args.warmup + args.steps
    timer = make_timer_callback(device.sync, args.warmup, args.max_run_s)
    callbacks, hooks, total = [timer], [], timed_steps
    if args.profile:  # extra steps after the timed ones, so the profiler's overhead does not touch the timing
        total += args.profile_steps
        rows = rows + rows[: args.batch_size * args.profile_steps]
        callbacks.append(make_profiler_callback(timed_steps, args.profile_steps, Path(args.profile), spec.name,
                                                device.cuda))
        hooks = component_ranges(model)
    try:
        with tempfile.TemporaryDirectory() as out_dir:
            trainer = ADPOTrainer(model=model, args=train_args(args, out_dir, total, device),
                                  ref_model=ref, data_collator=collator, train_dataset=rows,
                                  processing_class=spec.processor, callbacks=callbacks)
            device.reset_peak()
            output = trainer.train()
            result.peak_mem_gb = device.peak_gb()
            result.train_loss = float(output.training_loss)
            del trainer
    finally:
        for handle in hooks:
            handle.remove()
    _timing(result, timer.ends[:timed_steps], args.warmup, work, model_flops, hw_flops, device)


def _describe_work(result: RunResult, work: Work, batch: dict, config: Any, batch_size: int) -> None:
    rows = len(work.row_tokens)
    image_tokens = int((batch["input_ids"] == config.image_token_id).sum())
    result.batch_size = batch_size
    result.tokens_per_seq = sum(work.row_tokens) / rows
    result.image_tokens_per_seq = image_tokens / rows
    result.response_tokens_per_seq = work.response_tokens / rows
    result.tiles_per_step = work.tiles
    result.padded_len = int(batch["input_ids"].shape[1])
    log(f"{result.name}: batch of {rows} sequences, {result.tokens_per_seq:.0f} tokens/seq "
        f"({result.image_tokens_per_seq:.0f} image, {result.response_tokens_per_seq:.0f} response), "
        f"padded to {result.padded_len}, {work.tiles} vision tiles, collate {result.collate_s:.3f}s/batch")


def _timing(result: RunResult, ends: list[float], warmup: int, work: Work, model_flops: float, hw_flops: float,
            device: Device) -> None:
    timed = len(ends) - warmup
    if timed < 1:
        raise RuntimeError(f"only {len(ends)} steps ran; need more than --warmup {warmup}")
    seconds = (ends[-1] - ends[warmup - 1]) / timed  # warmup >= 1
    result.steps_timed = timed
    result.s_per_step = seconds
    result.pairs_per_s = result.batch_size / seconds
    result.tokens_per_s = sum(work.row_tokens) / seconds
    if device.peak:
        result.mfu = model_flops / seconds / device.peak
        result.hfu = hw_flops / seconds / device.peak


# ---------------------------------------------------------------------------------------------------- families
@dataclass
class Built:
    """One family's model (built once, shared by its runs), reference, FLOP-count shapes and run specs."""

    model: nn.Module
    ref: nn.Module | None
    arch: Arch
    specs: list[RunSpec]
    build_s: float
    params: int


def build_family(key: str, args: argparse.Namespace, device: Device) -> Built:
    family = FAMILIES[key]
    config = load_config(family.config_file, args.tiny)
    tokenizer = smolvlm_tokenizer() if key == "smolvlm" else llava_tokenizer()  # shared by the family's runs
    specs = [_checked_spec(key, variant, config, tokenizer, args) for variant in _variants(key, args)]
    point_config_at_tokenizer(config, tokenizer)
    start = time.perf_counter()
    dtype = torch.bfloat16 if args.weights == "bf16" else torch.float32
    model, ref, arch = _build(config, family, specs[0].lora, dtype, device, args)
    device.sync()
    built = Built(model, ref, arch, specs, time.perf_counter() - start, sum(p.numel() for p in model.parameters()))
    log(f"{key}: built {built.params / 1e9:.3f}B parameters on {device.type} ({args.weights}) in "
        f"{built.build_s:.1f}s; {device.allocated_gb():.1f} GiB allocated")
    return built


def _variants(key: str, args: argparse.Namespace) -> list[bool]:
    """SmolVLM: image splitting on and/or off; LLaVA: one run."""
    if key == "smolvlm":
        return {"on": [True], "off": [False], "both": [True, False]}[args.smolvlm_split]
    return [True]


def _checked_spec(key: str, variant: bool, config: Any, tokenizer: Any, args: argparse.Namespace) -> RunSpec:
    """The run's spec, its processor checked on one row; a failing torchvision processor falls back to PIL."""
    from adpo import ADPOCollator

    family = FAMILIES[key]
    for prefer_fast in ([True, False] if args.image_processor == "auto" else [False]):
        try:
            if key == "smolvlm":
                spec = RunSpec(f"smolvlm split={'on' if variant else 'off'} full-FT", family, False,
                               smolvlm_processor(variant, prefer_fast, tokenizer), 384)
            else:
                spec = RunSpec("llava-next-7b LoRA", family, True,
                               llava_processor(config.image_grid_pinpoints, prefer_fast, tokenizer),
                               args.llava_image_size)
            ADPOCollator(spec.processor, multimodal=True)(synthetic_rows(1, spec.image_size))
        except Exception:  # noqa: BLE001 - fall back to the PIL processor, and say so
            if not prefer_fast:
                raise
            log(f"{key}: the torchvision image processor failed, using the PIL one:\n{traceback.format_exc()}")
            continue
        log(f"{spec.name}: {type(spec.processor.image_processor).__name__}")
        return spec
    raise AssertionError("unreachable")


def _build(config: Any, family: Family, lora: bool, dtype: torch.dtype, device: Device,
           args: argparse.Namespace) -> tuple[nn.Module, nn.Module | None, Arch]:
    """The policy (LoRA-wrapped for LoRA runs), its reference (None for LoRA) and the FLOP-count shapes."""
    from adpo import ModelArguments
    from adpo.modeling import apply_lora, load_reference

    model = build_model(config, dtype, device.type, args.attn)
    arch = measure_arch(model, family)
    model_args = ModelArguments(use_peft=lora)
    ref = load_reference(model_args, model)  # a frozen deep copy; None with LoRA (adapters off = reference)
    checkpointing = not args.no_gradient_checkpointing
    if lora:
        if checkpointing and args.input_grads == "all":
            model.enable_input_require_grads()  # as adpo.pipeline.build_trainer does
        elif checkpointing:
            # Only the text embeddings: transformers' enable_input_require_grads also hooks the vision tower's patch
            # embedding, which makes the frozen tower run a backward pass (and recompute under checkpointing).
            model.get_input_embeddings().register_forward_hook(lambda module, inputs, out: out.requires_grad_(True))
        model = apply_lora(model, model_args)
        arch.lora_w = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    if checkpointing:
        model.config.use_cache = False
    return model, ref, arch


def run_family(key: str, args: argparse.Namespace, device: Device, results: list[RunResult], start: float) -> None:
    """Build one family and run its runs; an error (OOM included) is recorded and the next run still goes."""
    if time.perf_counter() - start > args.time_budget_s:
        results.append(RunResult(key, status="skipped", error=f"time budget {args.time_budget_s:.0f}s spent"))
        return
    try:
        built = build_family(key, args, device)
    except Exception as err:  # noqa: BLE001 - one family's failure must not lose the other's numbers
        results.append(_failed(RunResult(f"{key} (build)"), err))
        device.free()
        return
    for spec in built.specs:
        result = RunResult(spec.name, build_s=built.build_s, seed_samples_per_s=SEED_TABLE[key],
                           weights_mem_gb=device.allocated_gb(), params=built.params)
        results.append(result)
        if time.perf_counter() - start > args.time_budget_s:
            result.status, result.error = "skipped", f"time budget {args.time_budget_s:.0f}s spent"
            continue
        log(f"--- {spec.name}")
        try:
            run_one(spec, built.model, built.ref, built.arch, args, device, result)
            if result.status == "planned":
                at_half = result.model_tflop_per_step / (0.5 * H100_H200_BF16_PEAK / 1e12)
                log(f"{result.name}: {result.model_tflop_per_step:.1f} model TFLOP/step "
                    f"({result.hw_tflop_per_step:.1f} with recomputation); at 50% MFU on an H100/H200: "
                    f"{at_half:.3f} s/step = {result.batch_size / at_half:.2f} pairs/s")
                continue
            log(f"{result.name}: {result.s_per_step:.3f} s/step, {result.pairs_per_s:.2f} pairs/s, "
                f"{result.tokens_per_s:.0f} tokens/s, MFU {_pct(result.mfu)}, peak {result.peak_mem_gb:.1f} GiB")
        except Exception as err:  # noqa: BLE001
            _failed(result, err)
        built.model.zero_grad(set_to_none=True)  # an OOM mid-backward leaves gradients behind
        device.free()
    del built
    device.free()
    log(f"{key}: done; {device.allocated_gb():.2f} GiB still allocated")


def _failed(result: RunResult, err: Exception) -> RunResult:
    result.status = "OOM" if isinstance(err, torch.cuda.OutOfMemoryError) else "error"
    result.error = f"{type(err).__name__}: {str(err)[:300]}"
    log(f"{result.name} failed:\n{traceback.format_exc()}")
    return result


# ---------------------------------------------------------------------------------------------------- main
def run_all(args: argparse.Namespace) -> list[RunResult]:
    device = Device(args.plan, args.peak_tflops)
    env = environment(device)
    log("environment: " + json.dumps(env))
    if device.cuda:
        env["matmul_tflops"] = device.matmul_tflops()
        log(f"bf16 8192^3 matmul: {env['matmul_tflops']:.0f} TFLOP/s")
    keys = ["smolvlm", "llava"] if args.model == "all" else [args.model]
    results: list[RunResult] = []
    start = time.perf_counter()
    for key in keys:
        run_family(key, args, device, results, start)
        report(results, env, args)
    log(f"total {time.perf_counter() - start:.0f}s")
    return results


def environment(device: Device) -> dict[str, Any]:
    import accelerate
    import transformers

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    return {
        "device": device.name, "peak_tflops": device.peak / 1e12 if device.peak else None, "torch": torch.__version__,
        "cuda": torch.version.cuda, "transformers": transformers.__version__, "accelerate": accelerate.__version__,
        "peft": peft_version, "python": platform.python_version(), "datasets_imported": "datasets" in sys.modules,
    }


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.1f}%"


def report(results: list[RunResult], env: dict[str, Any], args: argparse.Namespace) -> None:
    """Print the table (and write the JSON) of everything measured so far."""
    header = (f"{'run':<28} {'status':<7} {'bs':>3} {'tok/seq':>8} {'img/seq':>8} {'s/step':>7} {'pairs/s':>8} "
              f"{'seed':>5} {'tokens/s':>9} {'TFLOP/st':>9} {'MFU':>6} {'HFU':>6} {'peak GiB':>9}")
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(f"{r.name:<28} {r.status:<7} {r.batch_size:>3} {r.tokens_per_seq:>8.0f} "
                     f"{r.image_tokens_per_seq:>8.0f} {r.s_per_step:>7.3f} {r.pairs_per_s:>8.2f} "
                     f"{r.seed_samples_per_s:>5.1f} {r.tokens_per_s:>9.0f} {r.model_tflop_per_step:>9.2f} "
                     f"{_pct(r.mfu):>6} {_pct(r.hfu):>6} {r.peak_mem_gb:>9.2f}")
        if r.error:
            lines.append(f"    {r.error}")
    peak = env.get("peak_tflops")
    lines.append(f"device: {env['device']}; MFU/HFU against {peak} TFLOP/s bf16 dense" if peak else
                 f"device: {env['device']}; no peak known (pass --peak_tflops) so MFU is n/a")
    if env.get("matmul_tflops"):
        lines.append(f"measured bf16 matmul ceiling: {env['matmul_tflops']:.0f} TFLOP/s")
    print("\n".join(lines), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "args": vars(args),
                                               "results": [asdict(r) for r in results]}, indent=1, default=str))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["smolvlm", "llava", "all"], default="all")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default 8; 1 with --tiny)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; 1 with --tiny)")
    p.add_argument("--batch_size", type=int, default=None, help="pairs per step (default 4; 1 with --tiny)")
    p.add_argument("--smolvlm_split", choices=["on", "off", "both"], default="both",
                   help="SmolVLM image splitting: on = the real processor (17 tiles for 384x384), off = 1 tile")
    p.add_argument("--llava_image_size", type=int, default=672, help="square image side for LLaVA-NeXT rows")
    p.add_argument("--weights", choices=["bf16", "fp32"], default="bf16", help="dtype the random weights are built in")
    p.add_argument("--no_bf16", dest="bf16", action="store_false", help="no bf16 autocast (the seed passes --bf16)")
    p.add_argument("--no_gradient_checkpointing", action="store_true", help="the seed passes --gradient_checkpointing")
    p.add_argument("--attn", default=None, help="attn_implementation (default: the model's, sdpa)")
    p.add_argument("--image_processor", choices=["auto", "pil"], default="auto",
                   help="auto: the torchvision-backed processor where torchvision is installed, else PIL")
    p.add_argument("--input_grads", choices=["all", "text"], default="all",
                   help="LoRA + checkpointing: all = model.enable_input_require_grads() as adpo's pipeline does "
                   "(also hooks the vision tower, which then runs backward); text = the text embeddings only")
    p.add_argument("--workers", type=int, default=None, help="dataloader workers (default 8 on GPU, 0 on CPU)")
    p.add_argument("--peak_tflops", type=float, default=None, help="peak bf16 TFLOP/s for MFU (default: H100/H200 989)")
    p.add_argument("--max_run_s", type=float, default=75.0, help="stop a run's timed steps after this long")
    p.add_argument("--time_budget_s", type=float, default=240.0,
                   help="runs not started this many seconds after the start are skipped")
    p.add_argument("--tiny", action="store_true", help="scaled-down configs, for a CPU check of the code path")
    p.add_argument("--plan", action="store_true",
                   help="no training: build on the meta device, collate one batch, print tokens and FLOPs per step")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="after the timed steps, run --profile_steps more under torch.profiler and write a table per "
                   "run to DIR (adpo's ranges, component forwards, top ops); the timing excludes them")
    p.add_argument("--profile_steps", type=int, default=2)
    args = p.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (1 if args.tiny else 8)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.batch_size = args.batch_size or (1 if args.tiny else 4)
    args.workers = args.workers if args.workers is not None else (8 if torch.cuda.is_available() else 0)
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.tiny:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    results = run_all(args)
    return 0 if results and all(r.status in ("ok", "planned") for r in results) else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
