"""``adpo-train`` / ``python train_adpo_multimodal.py``: parse, build, train, save."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser, set_seed

from ..config import ADPOConfig, DataArguments, ModelArguments, runs_on_cpu
from ..launch import compute_cleanup, compute_init

logger = logging.getLogger("adpo")

DESCRIPTION = """Train a model with Abductive DPO: for one response, make the chosen prompt (text + images) more
likely than the rejected one, relative to a frozen reference. Rows: {response, chosen, chosen_images, rejected,
rejected_images}. Every transformers TrainingArguments flag works too."""


def build_parser() -> HfArgumentParser:
    parser = HfArgumentParser((ModelArguments, DataArguments, ADPOConfig), description=DESCRIPTION)
    parser.add_argument("--config", default=None, help="YAML file of arguments; flags on the command line win.")
    for action in parser._actions:
        # A bare --multimodal_mode means true; leaving it out means "auto" (None).
        if action.dest == "multimodal_mode":
            action.nargs, action.const = "?", True
        if action.dest == "fused_lm_head":  # a bare --fused_lm_head (once a boolean flag) means fused
            action.nargs, action.const = "?", "fused"
    return parser


def parse_namespace(argv: list[str] | None = None) -> tuple[HfArgumentParser, argparse.Namespace]:
    """Every flag's value (``--config`` file applied, command line winning) before any dataclass is built."""
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**load_config_file(known.config, parser))
    namespace, extra = parser.parse_known_args(args=argv)
    if extra:
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    return parser, namespace


def dataclasses_from(
    parser: HfArgumentParser, namespace: argparse.Namespace
) -> tuple[ModelArguments, DataArguments, ADPOConfig]:
    """Build the three argument dataclasses from ``namespace`` (their checks run here)."""
    values = vars(namespace)
    built = []
    for dtype in parser.dataclass_types:
        names = {f.name for f in dataclasses.fields(dtype) if f.init}
        built.append(dtype(**{k: v for k, v in values.items() if k in names}))
    model_args, data_args, training_args = built
    return model_args, data_args, training_args


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, ADPOConfig]:
    """The three argument dataclasses of ``argv``. Prepares no launch: see :func:`main`."""
    return dataclasses_from(*parse_namespace(argv))


def load_config_file(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Read a YAML config whose keys are flag names (without dashes)."""
    try:
        values = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise SystemExit(f"--config {path}: cannot read it: {err}") from None
    if not isinstance(values, dict):
        raise SystemExit(f"--config {path}: expected a mapping of flag names to values.")
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SystemExit(f"--config {path}: unknown keys {unknown}; keys are flag names such as learning_rate.")
    return values


def main(argv: list[str] | None = None) -> int:
    parser, namespace = parse_namespace(argv)
    # Before the configuration is built: TrainingArguments sets up the devices (and any process group) from the
    # environment that compute_init prepares.
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if os.environ.get("LOCAL_RANK", "0") == "0" else logging.WARNING)
    launch = compute_init(
        namespace.deepspeed,
        use_cpu=runs_on_cpu(namespace.use_cpu, namespace.bf16, namespace.fp16),
        ddp_timeout=namespace.ddp_timeout,
        accelerator_config=namespace.accelerator_config,
    )
    try:
        namespace.deepspeed, namespace.accelerator_config = launch.deepspeed, launch.accelerator_config
        model_args, data_args, training_args = dataclasses_from(parser, namespace)
        if not training_args.should_log:
            logging.getLogger().setLevel(logging.WARNING)
        train_and_save(model_args, data_args, training_args)
    except BaseException:
        compute_cleanup(launch, synchronize=False)
        raise
    compute_cleanup(launch)  # the trainer, whose DDP wrapper held the group, went with train_and_save's frame
    return 0


def train_and_save(model_args: ModelArguments, data_args: DataArguments, training_args: ADPOConfig) -> None:
    """Build the trainer, train, save the model (or adapter), its processor and the trainer state."""
    from ..pipeline import build_trainer  # heavy imports after argument errors are reported

    set_seed(training_args.seed)
    trainer, processor = build_trainer(model_args, data_args, training_args)
    for report in getattr(trainer, "validation_reports", {}).values():
        if report.n_skipped and trainer.is_world_process_zero():
            print(f"adpo: {report.summary()}")
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    if trainer.is_world_process_zero():
        processor.save_pretrained(training_args.output_dir)
        print(f"adpo: trained {result.global_step} steps, final train loss {result.training_loss:.4f}")
        print(f"adpo: saved {'adapter' if model_args.use_peft else 'model'} and processor to "
              f"{training_args.output_dir}")


def run_entry_point(entry: Callable[[], int], prog: str) -> None:
    """Run a console script's ``entry``; bad input ends in one ``PROG: error: ...`` line and exit code 2."""
    from datasets.exceptions import DatasetGenerationError

    from ..data import ADPODataError

    try:
        sys.exit(entry())
    except (ADPODataError, ValueError, FileNotFoundError, DatasetGenerationError) as err:
        if os.environ.get("ADPO_TRACEBACK"):
            raise
        cause = f": {err.__cause__}" if isinstance(err, DatasetGenerationError) and err.__cause__ else ""
        print(f"{prog}: error: {err}{cause}\n(set ADPO_TRACEBACK=1 to see where it was raised)", file=sys.stderr)
        sys.exit(2)


def run() -> None:
    """Console-script entry point (``adpo-train``): clear one-line errors for bad input instead of tracebacks."""
    run_entry_point(main, "adpo")


if __name__ == "__main__":
    run()
