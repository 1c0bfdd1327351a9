"""λ, entropy and (labelled, logged-only) batch accuracy per task over adaptation steps.

Falling entropy with falling accuracy is entropy collapse; this figure makes it visible at a glance, and the λ
panel shows which task the merge is moving towards. Drawn from the adaptation's own metric log (every run has
one, whatever loggers are configured) or a Lightning CSV log: both have a ``step`` column and one per metric.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Sequence

PREFIXES = ("lambda/", "entropy/", "batch_acc/")


def read_metric_series(metrics_csv: str | Path, prefixes: tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), …]}`` for the columns of a CSV metric log that start with ``prefixes``."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with open(metrics_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            step = row.get("step")
            for key, value in row.items():
                if key and value not in (None, "") and key.startswith(prefixes) and step not in (None, ""):
                    series[key].append((int(float(step)), float(value)))
    return dict(series)


def ema(values: Sequence[float], span: int) -> list[float]:
    """Bias-corrected exponential moving average over ``span`` points (TensorBoard's smoothing): one batch's
    accuracy is noisy, the trend is what a reader looks for."""
    alpha = 2.0 / (span + 1.0)
    out, mean, weight = [], 0.0, 0.0
    for value in values:
        mean = (1 - alpha) * mean + alpha * value
        weight = (1 - alpha) * weight + alpha
        out.append(mean / weight)
    return out


def task_lambda_key(series: dict, task: str) -> str | None:
    """A task's λ curve: its task-wise ``lambda/<task>``, else its layer-wise mean ``lambda/<task>/mean``."""
    for key in (f"lambda/{task}", f"lambda/{task}/mean"):
        if key in series:
            return key
    return None


def curves_figure(series: dict[str, list[tuple[int, float]]], title: str = "adaptation"):
    """The Figure (λ when logged, entropy, batch accuracy; one colour per task, legend right of the panels);
    None when ``series`` holds no entropy or batch accuracy."""
    tasks = list(dict.fromkeys(k.split("/", 1)[1] for k in series if k.startswith(("entropy/", "batch_acc/"))))
    if not tasks:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    lam = {t: task_lambda_key(series, t) for t in tasks}
    layerwise = any(key and key.endswith("/mean") for key in lam.values())
    panels = ([("lambda", "mean λ over tensors" if layerwise else "λ")] if any(lam.values()) else [])
    panels += [("entropy", "entropy (nats)"), ("batch_acc", "batch accuracy (%), smoothed")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1.8, 3.8), dpi=100, squeeze=False)
    colours = plt.get_cmap("tab10" if len(tasks) <= 10 else "tab20")
    handles = {}
    for ax, (panel, ylabel) in zip(axes[0], panels):
        for i, task in enumerate(tasks):
            key = lam[task] if panel == "lambda" else f"{panel}/{task}"
            if not key or key not in series:
                continue
            steps, values = zip(*series[key])
            colour = colours(i % colours.N)
            if panel == "batch_acc":
                ax.plot(steps, values, color=colour, alpha=0.2, linewidth=0.8)
                values = ema(values, span=max(2, len(values) // 10))
            (handles[task],) = ax.plot(steps, values, color=colour, linewidth=1.2)
        ax.set_xlabel("adaptation step")
        ax.set_ylabel(ylabel)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    fig.legend(list(handles.values()), list(handles), loc="center left", bbox_to_anchor=(0.85, 0.5), fontsize=8,
               title="task", frameon=False)
    return fig


def adaptation_curves(metrics_csv: str | Path, path: str | Path, title: str = "adaptation") -> Path | None:
    """Write :func:`curves_figure` of a metric log as PNG; None when the log holds no such metrics."""
    fig = curves_figure(read_metric_series(metrics_csv, PREFIXES), title)
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
