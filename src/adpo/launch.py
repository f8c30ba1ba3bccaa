"""Launch preparation and teardown: what a training process needs before ``TrainingArguments`` sets up its
devices, and what it must undo at exit.

The configuration dataclasses (:mod:`adpo.config`) have no side effects of their own; the CLI brackets a run with
:func:`compute_init` and :func:`compute_cleanup` (the same pair in a notebook or a script)::

    launch = compute_init(deepspeed="configs/deepspeed_zero3.yaml")
    try:
        args = ADPOConfig(..., deepspeed=launch.deepspeed, accelerator_config=launch.accelerator_config)
        ...  # build the trainer, train, save
    finally:
        compute_cleanup(launch)
"""

from __future__ import annotations

import gc
import logging
import os
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)


def load_deepspeed_config(value: str | dict | None) -> str | dict | None:
    """``--deepspeed``: a ``.yaml``/``.yml`` file becomes a dict; JSON paths and dicts pass through unchanged.

    ``transformers`` reads only JSON there, while the seed's recipes pass ``configs/deepspeed_zero3.yaml``.
    Pure: reads the file, changes nothing.
    """
    if not isinstance(value, str) or Path(value).suffix.lower() not in (".yaml", ".yml"):
        return value
    try:
        config = yaml.safe_load(Path(value).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"--deepspeed {value}: cannot read it as YAML: {err}") from None
    if not isinstance(config, dict) or "zero_optimization" not in config:
        raise ValueError(f"--deepspeed {value}: expected a DeepSpeed config mapping with a zero_optimization "
                         "section (see configs/deepspeed_zero3.yaml).")
    return config


@dataclass
class Launch:
    """What :func:`compute_init` prepared, for the configuration and for :func:`compute_cleanup`.

    Attributes:
        deepspeed: the DeepSpeed config to put in ``ADPOConfig.deepspeed`` (YAML already read into a dict).
        accelerator_config: the value for ``ADPOConfig.accelerator_config`` (the user's, plus
            ``use_configured_state`` when this process's state was set up here).
        set_env: environment variables this launch set, with their previous values (None: unset), restored at
            cleanup.
    """

    deepspeed: str | dict | None = None
    accelerator_config: Any = None
    set_env: dict[str, str | None] = field(default_factory=dict)


def compute_init(
    deepspeed: str | dict | None = None,
    *,
    use_cpu: bool = False,
    ddp_timeout: int = 1800,
    accelerator_config: Any = None,
) -> Launch:
    """Prepare this process for ``--deepspeed`` however the script was started; call before ``ADPOConfig``.

    - Plain ``python train_adpo_multimodal.py --deepspeed ...`` (the seed's recipe): DeepSpeed would look for MPI
      to find its peers; a world of one process is declared instead (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
      a free MASTER_PORT; several GPUs need a launcher: torchrun, ``deepspeed`` or ``accelerate launch``).
    - Several CPU processes (tests, CPU-only machines): accelerate finds no backend for DeepSpeed there and would
      silently count each process as a world of one (every rank training alone on all the data). The process
      state is set up over gloo here and the returned ``accelerator_config`` tells ``TrainingArguments`` to use it.

    Without ``deepspeed`` nothing is changed (torchrun / accelerate launch already set the environment).
    ``use_cpu``: the run's effective ``--use_cpu``.
    """
    launch = Launch(deepspeed=load_deepspeed_config(deepspeed), accelerator_config=accelerator_config)
    if not launch.deepspeed:
        return launch
    if "WORLD_SIZE" not in os.environ:
        defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(_free_port())}
        for key, value in defaults.items():
            if key not in os.environ:
                launch.set_env[key] = None
                os.environ[key] = value
        logger.info("DeepSpeed in a single process; launch with torchrun, deepspeed or accelerate launch for more")
        return launch
    import torch

    if use_cpu or torch.cuda.is_available() or int(os.environ["WORLD_SIZE"]) < 2:
        return launch
    if accelerator_config is not None and not isinstance(accelerator_config, dict):
        return launch  # the user configured the accelerator from a file: leave it alone
    from accelerate import PartialState

    launch.set_env["ACCELERATE_USE_DEEPSPEED"] = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo", timeout=timedelta(seconds=ddp_timeout))
    launch.accelerator_config = {**(accelerator_config or {}), "use_configured_state": True}
    logger.info("DeepSpeed on CPU: %d processes over gloo", PartialState().num_processes)
    return launch


def compute_cleanup(launch: Launch | None = None, synchronize: bool = True) -> None:
    """Tear the process group down after the last collective, and restore the environment ``launch`` changed.

    Call it once the trainer is unreachable: wrappers such as DDP hold the group, and a gloo group first freed
    during interpreter shutdown can abort the process. The garbage collection here frees such holders caught in
    cycles. Safe to call when no group exists. ``synchronize=False`` (after an error): no barrier, which the
    other ranks might never reach.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()
    if launch is None:
        return
    for key, previous in launch.set_env.items():
        if previous is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous
    if launch.set_env:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)  # it described the group just destroyed


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
