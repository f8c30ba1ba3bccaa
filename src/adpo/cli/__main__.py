"""``python -m adpo.cli``: the training command (same as ``adpo-train``)."""

from . import run

run()
