"""Entropy and (labelled, logged-only) batch accuracy per task over adaptation steps.

Falling entropy with falling accuracy is entropy collapse; this figure makes it visible at a glance.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path


def read_metric_series(metrics_csv: str | Path, prefixes: tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), …]}`` for the columns of a Lightning CSV log that start with ``prefixes``."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with open(metrics_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            step = row.get("step")
            for key, value in row.items():
                if key and value not in (None, "") and key.startswith(prefixes) and step not in (None, ""):
                    series[key].append((int(float(step)), float(value)))
    return dict(series)


def adaptation_curves(metrics_csv: str | Path, path: str | Path, title: str = "adaptation") -> Path | None:
    """Two panels (entropy, batch accuracy), one line per task; None when the log holds no such metrics."""
    series = read_metric_series(metrics_csv, ("entropy/", "batch_acc/"))
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), dpi=100)
    for ax, prefix, label in ((axes[0], "entropy/", "entropy (loss)"), (axes[1], "batch_acc/", "batch accuracy (logged only)")):
        for key in sorted(k for k in series if k.startswith(prefix)):
            steps, values = zip(*series[key])
            ax.plot(steps, values, label=key[len(prefix):], linewidth=1)
        ax.set_xlabel("step")
        ax.set_title(label)
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
