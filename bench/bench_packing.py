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

Reported per configuration: pairs/s over the timed steps (step time from one step end to the next: collation,
reference forward, policy forward + backward, optimizer), step memory (peak RSS during the timed steps minus RSS
when they start, glibc malloc set to return memory so RSS follows live memory), and for packing the padding share
of the padded batches' tokens. Run:

    PYTHONPATH=src python bench/bench_packing.py [--threads 2] [--only packing dedup compile] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

WORDS = ("what fruit is shown in this image the shape red green blue yellow circle square triangle star left "
         "right top bottom small large apple one two three four five describe picture question answer").split()

CONFIGS: dict[str, dict[str, Any]] = {
    "llava_next padded": {"model": "llava_next", "rows": "mixed", "padding_free": False},
    "llava_next packed": {"model": "llava_next", "rows": "mixed", "padding_free": None},
    "qwen2_vl padded": {"model": "qwen2_vl", "rows": "mixed", "padding_free": False},
    "qwen2_vl packed": {"model": "qwen2_vl", "rows": "mixed", "padding_free": None},
    "vision-heavy, every occurrence": {"model": "llava_next_vision", "rows": "shared", "dedup": False},
    "vision-heavy, each image once": {"model": "llava_next_vision", "rows": "shared", "dedup": True},
    "llama eager": {"model": "llama", "rows": "text", "compile": False},
    "llama torch_compile": {"model": "llama", "rows": "text", "compile": True},
}
GROUPS = {
    "packing": [("llava_next padded", "llava_next packed"), ("qwen2_vl padded", "qwen2_vl packed")],
    "dedup": [("vision-heavy, every occurrence", "vision-heavy, each image once")],
    "compile": [("llama eager", "llama torch_compile")],
}


class PeakRSS:
    """This process's peak resident set size, sampled every millisecond in a background thread."""

    def __init__(self) -> None:
        self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.001)

    def start(self) -> None:
        self.start_value = self.peak = self.now()
        self._thread.start()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


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


# ------------------------------------------------------------------------------------------------ one configuration
def run_one(name: str, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import TrainerCallback

    from adpo import ADPOCollator, ADPOConfig, ADPOTrainer
    from adpo.config import ModelArguments
    from adpo.modeling import load_model_and_processor, load_reference

    torch.set_num_threads(args.threads)
    spec = CONFIGS[name]
    path = build_model(spec["model"], folder)
    model, processor = load_model_and_processor(ModelArguments(model_name_or_path=str(path)))
    ref = load_reference(ModelArguments(model_name_or_path=str(path)), model)
    multimodal = spec["rows"] != "text"
    collator = ADPOCollator(processor, multimodal=multimodal)
    warmup = args.compile_warmup if spec.get("compile") else args.warmup
    total = warmup + args.steps
    rows = make_rows(spec["rows"], args.batch_size * total)
    pad = [1 - float(collator(rows[i: i + args.batch_size])["attention_mask"].float().mean())
           for i in range(0, len(rows), args.batch_size)] if multimodal else []
    rss = PeakRSS()

    class StepTimer(TrainerCallback):
        ends: list[float] = []

        def on_step_end(self, *a: Any, **k: Any) -> None:
            self.ends.append(time.perf_counter())
            if len(self.ends) == warmup:
                rss.start()

    timer = StepTimer()
    config = ADPOConfig(
        output_dir=str(folder / "out" / name.replace(" ", "_")), per_device_train_batch_size=args.batch_size,
        max_steps=total, learning_rate=1e-6, logging_steps=total, save_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0, use_cpu=True, seed=0,
        padding_free=spec.get("padding_free"), deduplicate_images=spec.get("dedup", True),
        torch_compile=bool(spec.get("compile")),
    )
    trainer = ADPOTrainer(model=model, args=config, ref_model=ref, data_collator=collator, train_dataset=rows,
                          processing_class=processor, callbacks=[timer])
    trainer.train()
    peak = rss.stop()
    timed = timer.ends[warmup - 1:]
    seconds = (timed[-1] - timed[0]) / (len(timed) - 1)
    return {"name": name, "pairs_per_s": args.batch_size / seconds, "s_per_step": seconds,
            "step_mem_gb": (peak - rss.start_value) / 1e9, "pad_frac": sum(pad) / len(pad) if pad else None,
            "steps": len(timed) - 1}


# ------------------------------------------------------------------------------------------------ driver
def run_child(name: str, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One configuration in a fresh process (allocator and compile caches of one run do not help another)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0",
           "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, __file__, "--child", name, "--folder", str(folder), "--threads", str(args.threads),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--compile_warmup", str(args.compile_warmup),
           "--batch_size", str(args.batch_size)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"{name}: the run failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(GROUPS), default=list(GROUPS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=4, help="pairs per step")
    parser.add_argument("--steps", type=int, default=4, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--compile_warmup", type=int, default=3, help="warm-up steps with --torch_compile")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_one(args.child, args.folder, args)), flush=True)
        return
    results: dict[str, dict[str, Any]] = {}
    print("| comparison | baseline pairs/s | pairs/s | speed ratio | baseline step mem GB | step mem GB | mem ratio "
          "| padding in padded batches |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for group in args.only:
            for base, new in GROUPS[group]:
                for name in (base, new):
                    results[name] = run_child(name, Path(tmp), args)
                b, n = results[base], results[new]
                pad = f"{b['pad_frac']:.1%}" if b["pad_frac"] is not None else "—"
                print(f"| {new} vs {base} | {b['pairs_per_s']:.3f} | {n['pairs_per_s']:.3f} | "
                      f"**{n['pairs_per_s'] / b['pairs_per_s']:.2f}x** | {b['step_mem_gb']:.3f} | "
                      f"{n['step_mem_gb']:.3f} | {n['step_mem_gb'] / max(b['step_mem_gb'], 1e-9):.2f}x | {pad} |",
                      flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
