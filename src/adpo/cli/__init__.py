"""``adpo-train`` / ``python train_adpo_multimodal.py``: parse, build, train, save."""

from __future__ import annotations

import argparse
import dataclasses
import json
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
    """Read a YAML config whose keys are flag names (``learning_rate``, ``--learning-rate`` also works).

    Values are taken as YAML writes them naturally: a list for a flag that takes a comma-separated string
    (``lora_target_modules: [q_proj, v_proj]``), a mapping for a flag that takes JSON (``image_processor_kwargs:
    {size: {longest_edge: 384}}``), a number for a flag that takes a name.
    """
    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise SystemExit(f"--config {path}: cannot read it: {err}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise SystemExit(f"--config {path}: expected a mapping of flag names to values, got {type(values).__name__}.")
    actions = {action.dest: action for action in parser._actions}
    flags = {str(key).lstrip("-").replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(flags) - set(actions))
    if unknown:
        raise SystemExit(f"--config {path}: unknown keys {unknown}; keys are flag names such as learning_rate.")
    return {key: _yaml_value(key, value, actions[key], parser) for key, value in flags.items()}


def _yaml_value(key: str, value: Any, action: argparse.Action, parser: Any) -> Any:
    """A YAML value as the flag takes it (lists and mappings kept where the field accepts them)."""
    if action.nargs not in (None, "?") or action.type is not str or _accepts_containers(parser, key):
        return value
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        if key == "optim_args":  # "k1=v1,k2=v2"
            return ",".join(f"{k}={v}" for k, v in value.items())
        return json.dumps(value)
    if isinstance(value, (bool, int, float)):
        return str(value).lower() if isinstance(value, bool) else str(value)
    return value


def _accepts_containers(parser: Any, key: str) -> bool:
    """Whether the dataclass field behind ``key`` takes a dict or list itself (report_to, deepspeed, fsdp_config)."""
    for dtype in parser.dataclass_types:
        for f in dataclasses.fields(dtype):
            if f.name == key:
                return any(word in str(f.type) for word in ("dict", "list", "Dict", "List"))
    return False


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
        code = train_and_save(model_args, data_args, training_args)
    except KeyboardInterrupt:
        compute_cleanup(launch, synchronize=False)
        print(f"\nadpo: stopped at once. {_last_checkpoint_note(namespace.output_dir)}", file=sys.stderr)
        return 130
    except BaseException:
        compute_cleanup(launch, synchronize=False)
        raise
    compute_cleanup(launch)  # the trainer, whose DDP wrapper held the group, went with train_and_save's frame
    return code


def _last_checkpoint_note(output_dir: str | None) -> str:
    from ..checkpoints import latest_complete

    last = latest_complete(output_dir) if output_dir else None
    if last is None:
        return "No checkpoint was written."
    return f"The last complete checkpoint is {last}; continue with --resume_from_checkpoint last."


def train_and_save(model_args: ModelArguments, data_args: DataArguments, training_args: ADPOConfig) -> int:
    """Build the trainer, train, save the model (or adapter), its processor and the trainer state.

    Returns the exit code: 0, or 130 when Ctrl-C stopped training (after saving a checkpoint; no final model).
    """
    from ..modelcard import use_adpo_model_card
    from ..pipeline import build_trainer  # heavy imports after argument errors are reported
    from .interrupt import StopOnInterrupt, graceful_interrupt

    set_seed(training_args.seed)
    trainer, processor = build_trainer(model_args, data_args, training_args)
    for report in getattr(trainer, "validation_reports", {}).values():
        if report.n_skipped and trainer.is_world_process_zero():
            print(f"adpo: {report.summary()}")
    stop = StopOnInterrupt()
    trainer.add_callback(stop)
    with graceful_interrupt(stop, announce=trainer.is_world_process_zero()):
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if stop.stopped_at is not None:
        if trainer.is_world_process_zero():
            print(f"adpo: interrupted after step {stop.stopped_at}: checkpoint saved to "
                  f"{Path(training_args.output_dir) / f'checkpoint-{stop.stopped_at}'}; continue with "
                  "--resume_from_checkpoint last (no final model was written)", file=sys.stderr)
        return 130
    use_adpo_model_card(trainer, model_args, data_args, training_args)  # what push_to_hub publishes, too
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    if trainer.is_world_process_zero():
        processor.save_pretrained(training_args.output_dir)
        trainer.create_model_card()  # README.md, after the save (an adapter's save writes a card of its own)
        print(f"adpo: trained {result.global_step} steps, final train loss {result.training_loss:.4f}")
        print(f"adpo: saved {'adapter' if model_args.use_peft else 'model'} and processor to "
              f"{training_args.output_dir}")
    return 0


def run_entry_point(entry: Callable[[], int], prog: str) -> None:
    """Run a console script's ``entry``; bad input ends in one ``PROG: error: ...`` line and exit code 2."""
    from datasets.exceptions import DatasetGenerationError

    from ..data import ADPODataError
    from ..guard import NonFiniteTrainingError

    hint = "\n(set ADPO_TRACEBACK=1 to see where it was raised)"
    try:
        sys.exit(entry())
    except (ADPODataError, ValueError, FileNotFoundError, DatasetGenerationError) as err:
        if os.environ.get("ADPO_TRACEBACK"):
            raise
        cause = f": {err.__cause__}" if isinstance(err, DatasetGenerationError) and err.__cause__ else ""
        print(f"{prog}: error: {err}{cause}{hint}", file=sys.stderr)
        sys.exit(2)
    except (NonFiniteTrainingError, OSError) as err:  # the run failed (or the disk did), not the input
        if os.environ.get("ADPO_TRACEBACK"):
            raise
        print(f"{prog}: error: {err}{hint}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        sys.exit(130)


def run() -> None:
    """Console-script entry point (``adpo-train``): clear one-line errors for bad input instead of tracebacks."""
    run_entry_point(main, "adpo")


if __name__ == "__main__":
    run()
