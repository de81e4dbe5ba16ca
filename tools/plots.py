"""Plots people look at instead of reading tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np

COLOURS = {"llm": "tab:green", "tpe": "tab:blue", "random": "tab:orange"}


def best_so_far(curves: dict[str, list[list[float]]], path: Path, title: str, ylabel: str) -> Path:
    """Median best-so-far value per trial for each tuner, with the min–max band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for tuner, runs in curves.items():
        if not runs:
            continue
        data = np.array(runs)
        steps = np.arange(data.shape[1])
        colour = COLOURS.get(tuner)
        axis.plot(steps, np.median(data, axis=0), color=colour, label=f"{tuner} (median of {len(data)} seeds)")
        axis.fill_between(steps, data.min(axis=0), data.max(axis=0), color=colour, alpha=0.18)
    axis.set_xlabel("trial (0 = default configuration)")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
