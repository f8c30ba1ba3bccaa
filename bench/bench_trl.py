"""Benchmark: adpo's ADPOTrainer vs TRL's DPOTrainer on equal work, and step memory vs vocabulary size.

Equal work: the same model, the same number of sequences per step and the same sequence lengths. TRL scores two
responses (R tokens each) under one prompt (P tokens); adpo scores one response (R tokens) under two prompts
(P tokens each): both run 2·B sequences of P + R tokens per step. The measured token counts are printed.

Each configuration runs in its own subprocess (clean peak memory), in alternating order, and the ratios are
computed from numbers measured in this one run. Memory on CPU is the resident set size (RSS), sampled every
millisecond; a step's memory is its peak minus the RSS when the first step starts (weights, reference and data
resident), which is what training needs on top of them, and "step memory" is the largest over EVERY step, the
first one included (a first step that held more, e.g. full logits before a head is chosen, must show). The first
step's and the later steps' figures are also reported. On CUDA, torch's allocator statistics are used instead.
Speed is timed over the steps after the warm-up.

    python bench/bench_trl.py                      # both models, live + precomputed reference (CPU)
    python bench/bench_trl.py --models tiny --steps 3
    python bench/bench_trl.py --vocab              # step memory: 2k-token prompt, 131k vs 8k vocabulary,
                                                   # adpo's fused LM head and the model's own head

Needs `pip install trl` (not a dependency of adpo).
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

# Run as a script, bench/ is on sys.path: its sibling modules import by name.
from common import WORDS, PeakRSS  # noqa: E402

MODELS = {
    # hidden size, layers, model vocabulary (the tokenizer is the same small BPE for all, so tokenisation is equal)
    "big": dict(hidden_size=512, num_layers=4, model_vocab_size=32000),
    "tiny": dict(hidden_size=64, num_layers=2, model_vocab_size=400),
}
OVERRIDES: dict[str, int | None] = {}


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def build_rows(n: int, prompt_words: int, response_words: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(TRL rows, adpo rows) with matching text lengths: TRL's prompt/responses are adpo's prompts/response."""
    rng = random.Random(seed)
    trl_rows, adpo_rows = [], []
    for i in range(n):
        p1, p2 = words(rng, prompt_words), words(rng, prompt_words)
        r1, r2 = words(rng, response_words), words(rng, response_words)
        trl_rows.append({"prompt": p1, "chosen": " " + r1, "rejected": " " + r2})
        adpo_rows.append({"response": " " + r1, "chosen": p1, "rejected": p2, "_adpo_row": i})
    return trl_rows, adpo_rows


def worker(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cuda = args.device == "cuda"
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    n_rows = args.batch_size * (args.steps + args.warmup)
    trl_rows, adpo_rows = build_rows(n_rows, args.prompt_words, args.response_words)
    ref = AutoModelForCausalLM.from_pretrained(args.model_dir)  # precomputed modes use it once, then drop it
    if args.freeze_vocab:
        # The embedding and LM-head weights and their gradients grow with the vocabulary in every trainer; frozen,
        # the step's memory is what the log-prob computation itself needs.
        model.get_input_embeddings().requires_grad_(False)
        model.get_output_embeddings().requires_grad_(False)
    common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size,
                  max_steps=args.steps + args.warmup, learning_rate=1e-6, logging_steps=10**6, report_to="none",
                  save_strategy="no", use_cpu=not cuda, bf16=cuda, dataloader_num_workers=args.workers, seed=0,
                  disable_tqdm=True, gradient_checkpointing=args.gradient_checkpointing)  # TRL defaults it to True
    if args.freeze_vocab:  # --vocab: plain SGD keeps no optimizer state, so step 1 allocates nothing later steps reuse
        common["optim"] = "sgd"

    step_times: list[float] = []
    step_peak: list[int] = []  # bytes, per step (the first included): the peak during the step
    start: dict[str, int] = {}  # memory when the first step began: weights, reference and data resident
    rss = PeakRSS()

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):  # noqa: ANN002, ANN003
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                start.setdefault("mem", torch.cuda.memory_allocated())
            else:
                rss.peak = PeakRSS.now()
                start.setdefault("mem", rss.peak)
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):  # noqa: ANN002, ANN003
            if cuda:
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - self.t)
            step_peak.append(torch.cuda.max_memory_allocated() if cuda else max(rss.peak, PeakRSS.now()))

    if args.trainer == "trl":
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer

        config = DPOConfig(**common, beta=0.1, max_length=None, precompute_ref_log_probs=args.ref == "precomputed")
        trainer = DPOTrainer(model=model, ref_model=ref, args=config, train_dataset=Dataset.from_list(trl_rows),
                             processing_class=tokenizer, callbacks=[Clock()])
        ds = trainer.train_dataset
        lengths = sum(len(p) + len(c) + len(p) + len(r) for p, c, r in
                      zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"], strict=True)) / (2 * len(ds))
    else:
        from adpo import ADPOCollator, ADPOConfig, ADPOTrainer

        extra = {"precompute_ref_log_probs": True} if args.ref == "precomputed" else {}
        config = ADPOConfig(**common, beta=0.1, fused_lm_head="model" if args.model_head else "fused", **extra)
        collator = ADPOCollator(tokenizer, multimodal=False)
        from datasets import Dataset

        trainer = ADPOTrainer(model=model, ref_model=ref, args=config, train_dataset=Dataset.from_list(adpo_rows),
                              data_collator=collator, processing_class=tokenizer, callbacks=[Clock()])
        lengths = collator(adpo_rows)["attention_mask"].sum().item() / (2 * len(adpo_rows))
    t_setup = time.perf_counter()
    ref_model = getattr(trainer, "ref_model", None)
    placement = {
        "policy_dtype": str(next(trainer.model.parameters()).dtype),
        "policy_device": str(next(trainer.model.parameters()).device),
        "ref_kept": ref_model is not None,
        "ref_device": str(next(ref_model.parameters()).device) if ref_model is not None else None,
    }
    with rss:
        trainer.train()
    timed = step_times[args.warmup:]
    gb = 2**30
    step_mem = [peak - start["mem"] for peak in step_peak]
    memory = {"first_step_mem_gb": step_mem[0] / gb, "later_step_mem_gb": max(step_mem[1:], default=0) / gb,
              "gpu_step_mem_gb" if cuda else "step_mem_gb": max(step_mem) / gb}
    if cuda:
        memory["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / gb
    return {**memory, **placement,
        "trainer": args.trainer, "ref": args.ref, "model": args.model,
        "pairs_per_s": args.batch_size * len(timed) / sum(timed),
        "step_s": sum(timed) / len(timed),
        "train_wall_s": time.perf_counter() - t_setup,
        "tokens_per_sequence": round(lengths, 1),
        "peak_rss_gb": rss.peak / 2**30,
    }


def run_worker(cli: list[str]) -> dict:
    # Large blocks straight from mmap and no trim threshold: freed tensors leave the RSS at once, so the RSS tracks
    # live memory (glibc's arenas otherwise keep freed blocks and the step memory would vary from run to run).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run([sys.executable, __file__, "--worker", *cli], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-4000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def build_model(kind: str, folder: Path, vocab: int | None = None) -> Path:
    from adpo.testing.tiny import build_tiny_llama

    spec = dict(MODELS[kind])
    if kind == "big":
        spec.update({k: v for k, v in OVERRIDES.items() if v})
    if vocab:
        spec["model_vocab_size"] = vocab
    return build_tiny_llama(folder / f"{kind}-{spec['model_vocab_size']}", chat_template=False, **spec)


def compare(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp())
    rows = []
    for kind in args.models:
        model_dir = build_model(kind, tmp)
        for ref in args.refs:
            results = {}
            for repeat in range(args.repeats):
                order = ("trl", "adpo") if repeat % 2 == 0 else ("adpo", "trl")
                for trainer in order:
                    cli = ["--trainer", trainer, "--ref", ref, "--model", kind, "--model_dir", str(model_dir),
                           "--steps", str(args.steps), "--warmup", str(args.warmup),
                           "--batch_size", str(args.batch_size), "--prompt_words", str(args.prompt_words),
                           "--response_words", str(args.response_words), "--threads", str(args.threads),
                           "--workers", str(args.workers), "--device", args.device]
                    cli += ["--gradient_checkpointing"] if args.gradient_checkpointing else []
                    r = run_worker(cli)
                    best = results.get(trainer)
                    if best is None or r["pairs_per_s"] > best["pairs_per_s"]:
                        results[trainer] = r
            t, a = results["trl"], results["adpo"]
            rows.append((kind, ref, t, a))
            print(f"[{kind}/{ref}] tokens/seq trl {t['tokens_per_sequence']} adpo {a['tokens_per_sequence']}",
                  flush=True)
            for r in (t, a):
                print(f"  {r['trainer']}: policy {r['policy_dtype']} on {r['policy_device']}, reference kept "
                      f"{r['ref_kept']} on {r['ref_device']}, step {r['step_s']:.3f}s", flush=True)
    print("\n| model | reference | TRL pairs/s | adpo pairs/s | speed ratio | TRL step mem GB | adpo step mem GB "
          "| mem ratio | TRL peak RSS GB | adpo peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    mem = "gpu_step_mem_gb" if args.device == "cuda" else "step_mem_gb"
    peak = "gpu_peak_gb" if args.device == "cuda" else "peak_rss_gb"
    for kind, ref, t, a in rows:
        print(f"| {kind} | {ref} | {t['pairs_per_s']:.3f} | {a['pairs_per_s']:.3f} | "
              f"{a['pairs_per_s'] / t['pairs_per_s']:.2f}x | {t[mem]:.3f} | {a[mem]:.3f} | "
              f"{a[mem] / max(t[mem], 1e-9):.2f}x | {t[peak]:.2f} | {a[peak]:.2f} |")
    print(f"(device {args.device}; gradient checkpointing {'on' if args.gradient_checkpointing else 'off'} for both; "
          f"memory columns: {mem}, {peak})")


def vocab_memory(args: argparse.Namespace) -> None:
    """Step memory at 8k and 131k vocabulary, with adpo's fused head (default) and with the model's own head.

    A separate frozen reference (as by default), embedding and head frozen, plain SGD: step 1 then has nothing to
    allocate that later steps keep (no optimizer state), so its memory compares with theirs directly."""
    tmp = Path(tempfile.mkdtemp())
    results = {}
    for vocab in (8192, 131072):
        model_dir = build_model("big", tmp, vocab=vocab)
        for head in ("fused", "model"):
            cli = ["--trainer", "adpo", "--ref", "live", "--model", "big", "--model_dir", str(model_dir),
                   "--steps", "2", "--warmup", "1", "--batch_size", "1", "--prompt_words", str(args.long_prompt_words),
                   "--response_words", str(args.response_words), "--threads", str(args.threads), "--freeze_vocab",
                   *(["--model_head"] if head == "model" else [])]
            r = results[vocab, head] = run_worker(cli)
            print(f"vocab {vocab}, {head} head: tokens/seq {r['tokens_per_sequence']}, step memory "
                  f"{r['step_mem_gb']:.3f} GB (step 1: {r['first_step_mem_gb']:.3f} GB, later steps: "
                  f"{r['later_step_mem_gb']:.3f} GB), {r['step_s']:.2f} s/step", flush=True)
    print()
    for head in ("fused", "model"):
        ratio = results[131072, head]["step_mem_gb"] / results[8192, head]["step_mem_gb"]
        flag = " (--fused_lm_head fused)" if head == "fused" else " (--fused_lm_head model)"
        first = results[131072, head]["first_step_mem_gb"] / max(results[131072, head]["later_step_mem_gb"], 1e-9)
        print(f"{head} head{flag}: step memory 131k / 8k vocabulary {ratio:.2f}x; at 131k, step 1 / later steps "
              f"{first:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--trainer", choices=["trl", "adpo"])
    parser.add_argument("--ref", choices=["live", "precomputed"], default="live")
    parser.add_argument("--model", default="big")
    parser.add_argument("--model_dir")
    parser.add_argument("--models", nargs="+", default=["big", "tiny"], choices=list(MODELS))
    parser.add_argument("--refs", nargs="+", default=["live", "precomputed"], choices=["live", "precomputed"])
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="runs per configuration, alternating order; best kept")
    parser.add_argument("--batch_size", type=int, default=2, help="pairs per step (2x sequences)")
    parser.add_argument("--prompt_words", type=int, default=160)
    parser.add_argument("--response_words", type=int, default=24)
    parser.add_argument("--long_prompt_words", type=int, default=860, help="for --vocab: about 2k prompt tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0,
                        help="dataloader workers, both trainers: adpo tokenises in its collator, on the step's path "
                        "without workers, where TRL tokenised in a pass before training")
    parser.add_argument("--vocab", action="store_true", help="step memory vs vocabulary size")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--freeze_vocab", action="store_true", help="freeze the embedding and LM head weights")
    parser.add_argument("--model_head", action="store_true", help="adpo with --fused_lm_head model")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="both trainers (equal work)")
    parser.add_argument("--hidden_size", type=int, help="override the 'big' model's hidden size")
    parser.add_argument("--num_layers", type=int, help="override the 'big' model's layer count")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    OVERRIDES.update(hidden_size=args.hidden_size, num_layers=args.num_layers)
    if args.worker:
        print(json.dumps(worker(args)))
    elif args.vocab:
        vocab_memory(args)
    else:
        compare(args)


if __name__ == "__main__":
    main()
