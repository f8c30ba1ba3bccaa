"""PNG plots of training curves (from ``trainer_state.json``) and of evaluation results.

matplotlib is an optional dependency (``pip install adpo[plots]``): without it the plots are skipped with a
warning and everything else still works.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TRAINING_KEYS = ("loss", "rewards/margins", "rewards/accuracies", "logps/accuracies")


def _pyplot() -> Any | None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'adpo[plots]'): skipping plots")
        return None
    return plt


def training_curves(state_path: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """``{key: (steps, values)}`` for the logged train keys and their ``eval_`` counterparts."""
    history = json.loads(Path(state_path).read_text())["log_history"]
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for entry in history:
        for key, value in entry.items():
            base = key.removeprefix("eval_")
            if base in TRAINING_KEYS and isinstance(value, (int, float)):
                steps, values = curves.setdefault(key, ([], []))
                steps.append(entry["step"])
                values.append(float(value))
    return curves


def plot_training(states: dict[str, str | Path], path: str | Path) -> Path | None:
    """One panel per metric in :data:`TRAINING_KEYS`; one line per run (dashed: evaluation during training)."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(TRAINING_KEYS), figsize=(4.2 * len(TRAINING_KEYS), 3.4))
    for label, state in states.items():
        curves = training_curves(state)
        for ax, key in zip(axes, TRAINING_KEYS, strict=True):
            if key in curves:
                line = ax.plot(*curves[key], label=label)[0]
                if "eval_" + key in curves:
                    ax.plot(*curves["eval_" + key], "--o", markersize=3, color=line.get_color(),
                            label=f"{label} (held-out)")
    for ax, key in zip(axes, TRAINING_KEYS, strict=True):
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_evaluation(
    summaries: dict[str, dict[str, Any]],
    records: dict[str, list[dict[str, Any]]],
    path: str | Path,
    group_by: list[str] | None = None,
) -> Path | None:
    """Prompt-discrimination accuracy bars (overall and per group), per-row margins and image-ablation gaps."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    _accuracy_bars(axes[0], summaries, group_by[0] if group_by else None)
    _margin_boxes(axes[1], records)
    _gap_bars(axes[2], summaries)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _accuracy_bars(ax: Any, summaries: dict[str, dict[str, Any]], column: str | None) -> None:
    groups = ["all"]
    if column:
        groups += sorted({g for s in summaries.values() for g in s.get("groups", {}).get(column, {})})
    width = 0.8 / max(len(summaries), 1)
    for i, (label, s) in enumerate(summaries.items()):
        values = [s.get("prompt_accuracy", 0.0)] + [
            s["groups"][column].get(g, {}).get("prompt_accuracy", 0.0) for g in groups[1:]
        ]
        ax.bar([j + i * width for j in range(len(groups))], values, width, label=label)
    ax.axhline(0.5, color="grey", ls=":", lw=1)
    ax.set_xticks([j + width * (len(summaries) - 1) / 2 for j in range(len(groups))], groups, fontsize=8)
    ax.set_ylim(0, 1.3)
    ax.set_title("prompt-discrimination accuracy" + (f" by {column}" if column else ""))
    ax.legend(fontsize=7, loc="upper center", ncol=len(summaries))


def _margin_boxes(ax: Any, records: dict[str, list[dict[str, Any]]]) -> None:
    """Per-row margins on a symmetric-log axis: untrained margins are tiny, trained ones large."""
    labels = list(records)
    ax.boxplot([[r["logp_margin"] for r in records[label]] for label in labels], showfliers=True)
    ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=8)
    ax.set_yscale("symlog", linthresh=1.0)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_title("log π(y|x_w) − log π(y|x_l) per row (symlog)")


def _gap_bars(ax: Any, summaries: dict[str, dict[str, Any]]) -> None:
    labels = [label for label, s in summaries.items() if "image_ablation_gap" in s]
    for i, label in enumerate(labels):
        s = summaries[label]
        ax.bar([i - 0.2, i + 0.2], [s["image_ablation_gap"], s["image_ablation_gap_rejected"]], 0.4,
               color=["tab:green", "tab:red"])
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_title("image-ablation gap (green: chosen, red: rejected)")
