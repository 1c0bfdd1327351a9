"""The paper's coefficient figure: λ per task (rows) and per merged tensor (columns)."""

from __future__ import annotations

from pathlib import Path

import torch


def short_layer_name(key: str) -> str:
    """``transformer.resblocks.3.attn.in_proj_weight`` → ``3.attn.in_proj_weight``: columns stay legible."""
    return key.replace("transformer.resblocks.", "")


def coefficient_heatmap(lam: torch.Tensor, tasks: list[str], layers: list[str], path: str | Path,
                        title: str = "merge coefficients λ", clamp: tuple[float, float] | None = (0.0, 1.0)) -> Path:
    """Write a tasks × tensors heatmap of ``lam`` [K, L] as PNG; return its path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    lam = lam.detach().float().cpu()
    if tuple(lam.shape) != (len(tasks), len(layers)):
        raise ValueError(f"λ of shape {tuple(lam.shape)} does not match {len(tasks)} tasks × {len(layers)} tensors")
    width = min(24.0, 3.0 + 0.09 * len(layers))
    fig, ax = plt.subplots(figsize=(width, 1.2 + 0.4 * len(tasks)), dpi=100)
    lo, hi = clamp if clamp is not None else (float(lam.min()), float(lam.max()))
    image = ax.imshow(lam.numpy(), aspect="auto", cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest")
    ax.set_yticks(range(len(tasks)), tasks)
    step = max(1, len(layers) // 40)
    ticks = list(range(0, len(layers), step))
    ax.set_xticks(ticks, [short_layer_name(layers[i]) for i in ticks], rotation=90, fontsize=6)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.02, pad=0.01)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
