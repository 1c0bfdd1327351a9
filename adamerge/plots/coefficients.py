"""The paper's coefficient figure: λ per task (rows) and per merged tensor (columns, in depth order).

A λ that is constant along every row (task-wise AdaMerging, any per-task λ) is drawn as bars with the values
written on them instead: a heatmap of constant rows shows colours where a reader wants numbers.
"""

from __future__ import annotations

from pathlib import Path

import torch

from adamerge.plots.layers import depth_order, short_layer_name

__all__ = ["coefficient_figure", "coefficient_heatmap", "short_layer_name"]


def is_per_task(lam: torch.Tensor) -> bool:
    """One value per task: [K] or [K, L] with every row constant."""
    return lam.dim() == 1 or bool((lam == lam[:, :1]).all())


def coefficient_figure(lam: torch.Tensor, tasks: list[str], layers: list[str], title: str = "merge coefficients λ",
                       clamp: tuple[float, float] | None = (0.0, 1.0)):
    """The matplotlib Figure of ``lam`` [K, L] (or [K]): a heatmap with columns in network depth order, or bars."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    lam = lam.detach().float().cpu()
    if lam.dim() == 2 and tuple(lam.shape) != (len(tasks), len(layers)):
        raise ValueError(f"λ of shape {tuple(lam.shape)} does not match {len(tasks)} tasks × {len(layers)} tensors")
    if lam.dim() == 1 and len(lam) != len(tasks):
        raise ValueError(f"{len(lam)} per-task λ for {len(tasks)} tasks")
    if is_per_task(lam):
        values = (lam if lam.dim() == 1 else lam[:, 0]).tolist()
        fig, ax = plt.subplots(figsize=(1.6 + 0.7 * len(tasks), 3.6), dpi=100)
        bars = ax.bar(range(len(tasks)), values, color="tab:blue")
        ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], padding=2, fontsize=8)
        ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
        ax.set_xlabel("task")
        ax.set_ylabel("λ")
        top = max([*values, clamp[1] if clamp is not None else 0.0])
        ax.set_ylim(min(0.0, *values), 1.12 * top if top > 0 else 1.0)  # room for the labels above the bars
        ax.set_title(title)
        fig.tight_layout()
        return fig
    order = depth_order(layers)
    lam, layers = lam[:, order], [layers[i] for i in order]
    width = min(24.0, 3.0 + 0.09 * len(layers))
    fig, ax = plt.subplots(figsize=(width, 1.8 + 0.4 * len(tasks)), dpi=100)
    lo, hi = clamp if clamp is not None else (float(lam.min()), float(lam.max()))
    image = ax.imshow(lam.numpy(), aspect="auto", cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest")
    ax.set_yticks(range(len(tasks)), tasks)
    step = max(1, len(layers) // 40)
    ticks = list(range(0, len(layers), step))
    ax.set_xticks(ticks, [short_layer_name(layers[i]) for i in ticks], rotation=90, fontsize=6)
    ax.set_xlabel("merged tensor (input → output)")
    ax.set_ylabel("task")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.02, pad=0.01).set_label("λ")
    fig.tight_layout()
    return fig


def coefficient_heatmap(lam: torch.Tensor, tasks: list[str], layers: list[str], path: str | Path,
                        title: str = "merge coefficients λ", clamp: tuple[float, float] | None = (0.0, 1.0)) -> Path:
    """Write :func:`coefficient_figure` as PNG; return its path."""
    fig = coefficient_figure(lam, tasks, layers, title, clamp)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
