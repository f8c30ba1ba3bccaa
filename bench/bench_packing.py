"""Throughput of padding-free batches, image de-duplication and --torch_compile on a CPU (ratios in one run).

Each configuration trains in its own process (``ADPOTrainer.train``, policy + frozen reference, fp32,
per-device batch 4 pairs = 8 sequences, dataloader in the main process) on rows built here:

- ``packing``: LLaVA-NeXT-style and Qwen2-VL-style models (random weights, tiny vocabulary, hidden 192, 4 decoder
  layers) on rows whose images have mixed sizes and aspect ratios (1-3 images per side, 24-160 px per edge), so
  LLaVA-NeXT's any-resolution tiles and Qwen2-VL's dynamic resolution give every side a different token count:
  ``--padding_free false`` (padded batches) vs the default (packed).
- ``dedup``: a vision-heavy LLaVA-NeXT (8-layer vision tower, 64-pixel tiles) on text-counterfactual rows whose two
  sides show the same image: ``--deduplicate_images false`` vs the default.
- ``compile``: a Llama-architecture text model: eager vs ``--torch_compile`` (inductor), after warm-up steps that
  include the compilation.

Each comparison runs in its own process: one trainer (policy + frozen reference, fp32, 4 pairs = 8 sequences per
step), a few collated batches, and the baseline and the new setting stepped on the same batches in turn (A B A B
...) after warm-up, so load from other processes on the machine hits both alike. A step is
``ADPOTrainer.training_step``: the reference's forward, the policy's forward and backward (collation and the
optimizer are the same in both and left out). Reported: pairs/s (wall time), the same ratio on the process's CPU
time (less sensitive to other load on a shared machine), step memory (peak RSS during a step minus RSS
before it, the largest over the steps; glibc malloc set to return memory so RSS follows live memory), and the
padding share of the padded batches' tokens. Run:

    PYTHONPATH=src python bench/bench_packing.py [--threads 1] [--only packing dedup compile] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run as a script, bench/ is on sys.path: its sibling modules import by name.
from common import WORDS, PeakRSS  # noqa: E402

# comparison → (model, rows, the ADPOConfig field toggled, baseline value, new value)
COMPARISONS: dict[str, tuple[str, str, str, Any, Any]] = {
    "packing, LLaVA-NeXT-style": ("llava_next", "mixed", "padding_free", False, None),
    "packing, Qwen2-VL-style": ("qwen2_vl", "mixed", "padding_free", False, None),
    "image de-duplication, vision-heavy LLaVA-NeXT, shared-image rows": (
        "llava_next_vision", "shared", "deduplicate_images", False, True),
    "torch_compile, Llama-style text model": ("llama", "text", "torch_compile", False, True),
}
GROUPS = {"packing": list(COMPARISONS)[:2], "dedup": [list(COMPARISONS)[2]], "compile": [list(COMPARISONS)[3]]}


# ------------------------------------------------------------------------------------------------ models and rows
def build_model(name: str, folder: Path) -> Path:
    from adpo.testing.tiny import build_tiny_llama, build_tiny_llava_next, build_tiny_qwen2_vl

    path = folder / name
    if (path / "config.json").exists():
        return path
    if name == "llava_next":
        return build_tiny_llava_next(path, image_size=32, hidden_size=192, num_layers=4)
    if name == "qwen2_vl":
        return build_tiny_qwen2_vl(path, hidden_size=192, num_layers=4, max_pixels=160 * 160)
    if name == "llama":
        return build_tiny_llama(path, hidden_size=192, num_layers=4)
    if name == "llava_next_vision":  # the tower dominates: 8 layers of width 256 on 64-pixel tiles (64 patches)
        import torch
        from transformers import AutoConfig, LlavaNextForConditionalGeneration

        build_tiny_llava_next(path, image_size=64, hidden_size=128, num_layers=2)
        config = AutoConfig.from_pretrained(path)
        config.vision_config.num_hidden_layers = 8
        config.vision_config.hidden_size = 256
        config.vision_config.intermediate_size = 1024
        config.vision_config.num_attention_heads = 4
        torch.manual_seed(0)
        LlavaNextForConditionalGeneration(config).save_pretrained(path)
        return path
    raise ValueError(name)


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def make_rows(kind: str, count: int, seed: int = 0) -> list[dict[str, Any]]:
    from PIL import Image

    rng = random.Random(seed)

    def image() -> Image.Image:
        if kind == "shared":
            width = height = 64
        else:
            width, height = rng.randint(24, 160), rng.randint(24, 160)
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        img = Image.new("RGB", (width, height), colour)
        img.putpixel((rng.randrange(width), rng.randrange(height)), (0, 0, 0))
        return img

    rows = []
    for i in range(count):
        row: dict[str, Any] = {"row_id": i, "response": _sentence(rng, 8, 12), "chosen": _sentence(rng, 4, 12),
                               "rejected": _sentence(rng, 4, 12)}
        if kind == "mixed":
            row["chosen_images"] = [image() for _ in range(rng.randint(1, 3))]
            row["rejected_images"] = [image() for _ in range(rng.randint(1, 3))]
        elif kind == "shared":  # a text counterfactual: both prompts about the same picture
            row["chosen_images"] = row["rejected_images"] = [image()]
        else:
            row["chosen"] = _sentence(rng, 20, 60)
            row["rejected"] = _sentence(rng, 20, 60)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ one comparison
def run_comparison(name: str, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Baseline and new setting on the same batches in one process, steps interleaved (A B A B ...), so load from
    other processes hits both alike. A step: the reference's forward, the policy's forward and backward."""
    import torch

    from adpo import ADPOCollator, ADPOConfig, ADPOTrainer
    from adpo.config import ModelArguments
    from adpo.modeling import load_model_and_processor, load_reference

    torch.set_num_threads(args.threads)
    model_name, row_kind, flag, base, new = COMPARISONS[name]
    path = build_model(model_name, folder)
    model, processor = load_model_and_processor(ModelArguments(model_name_or_path=str(path)))
    ref = load_reference(ModelArguments(model_name_or_path=str(path)), model)
    collator = ADPOCollator(processor, multimodal=row_kind != "text")
    rows = make_rows(row_kind, args.batch_size * args.batches)
    batches = [collator(rows[i: i + args.batch_size]) for i in range(0, len(rows), args.batch_size)]
    pad = [1 - float(b["attention_mask"].float().mean()) for b in batches]
    config = ADPOConfig(output_dir=str(folder / "out"), per_device_train_batch_size=args.batch_size,
                        report_to="none", disable_tqdm=True, use_cpu=True, seed=0)
    trainer = ADPOTrainer(model=model, args=config, ref_model=ref, data_collator=collator,
                          processing_class=processor)
    trainer.current_gradient_accumulation_steps = 1  # what Trainer.train sets before its steps
    model.train()
    compiled = torch.compile(model) if flag == "torch_compile" else None

    def step(setting: Any, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        run_model = model
        if flag == "torch_compile":
            run_model = compiled if setting else model
        else:
            setattr(trainer.args, flag, setting)
        with PeakRSS() as rss:
            start, cpu = time.perf_counter(), time.process_time()
            trainer.training_step(run_model, dict(batch))
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        model.zero_grad(set_to_none=True)
        return seconds, cpu, rss.peak - rss.start_value

    for setting in (base, new):  # warm-up (compilation, the fused head's first-call check, allocator)
        for _ in range(args.compile_warmup if flag == "torch_compile" and setting else 1):
            for batch in batches:
                step(setting, batch)
    times: dict[str, list[float]] = {"base": [], "new": []}
    cpus: dict[str, list[float]] = {"base": [], "new": []}
    mems: dict[str, list[int]] = {"base": [], "new": []}
    for _ in range(args.rounds):
        for batch in batches:
            for key, setting in (("base", base), ("new", new)):
                seconds, cpu, mem = step(setting, batch)
                times[key].append(seconds)
                cpus[key].append(cpu)
                mems[key].append(mem)
    out: dict[str, Any] = {"comparison": name, "flag": flag, "baseline": base, "new": new,
                           "pad_frac": sum(pad) / len(pad), "steps_each": len(times["base"])}
    for key in ("base", "new"):
        out[f"{key}_pairs_per_s"] = args.batch_size * len(times[key]) / sum(times[key])
        out[f"{key}_pairs_per_cpu_s"] = args.batch_size * len(cpus[key]) / sum(cpus[key])
        out[f"{key}_step_mem_gb"] = max(mems[key]) / 1e9
    return out


# ------------------------------------------------------------------------------------------------ driver
def run_child(name: str, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One comparison in a fresh process (allocator and compile caches of one do not help another)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0",
           "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, __file__, "--child", name, "--folder", str(folder), "--threads", str(args.threads),
           "--rounds", str(args.rounds), "--batches", str(args.batches), "--compile_warmup",
           str(args.compile_warmup), "--batch_size", str(args.batch_size)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"{name}: the run failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(GROUPS), default=list(GROUPS))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared machine more threads than free cores stall each other)")
    parser.add_argument("--batch_size", type=int, default=4, help="pairs per step")
    parser.add_argument("--batches", type=int, default=3, help="different batches, each timed once per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--compile_warmup", type=int, default=2, help="warm-up passes over the batches, compiled")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_comparison(args.child, args.folder, args)), flush=True)
        return
    results = []
    print("| comparison | flag: baseline → new | baseline pairs/s | new pairs/s | speed ratio | ratio on CPU time "
          "| baseline step mem GB | new step mem GB | mem ratio | padding in the padded batches |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for group in args.only:
            for name in GROUPS[group]:
                r = run_child(name, Path(tmp), args)
                results.append(r)
                shown = {None: "auto", True: "true", False: "false"}
                print(f"| {name} | `--{r['flag']}` {shown[r['baseline']]} → {shown[r['new']]} | "
                      f"{r['base_pairs_per_s']:.3f} | "
                      f"{r['new_pairs_per_s']:.3f} | **{r['new_pairs_per_s'] / r['base_pairs_per_s']:.2f}x** | "
                      f"{r['new_pairs_per_cpu_s'] / r['base_pairs_per_cpu_s']:.2f}x | "
                      f"{r['base_step_mem_gb']:.3f} | {r['new_step_mem_gb']:.3f} | "
                      f"{r['new_step_mem_gb'] / max(r['base_step_mem_gb'], 1e-9):.2f}x | {r['pad_frac']:.1%} |",
                      flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
