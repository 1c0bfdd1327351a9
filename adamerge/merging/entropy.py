"""The AdaMerging objective: Shannon entropy of the merged model's predictions on unlabelled data.

Two spellings of it are in use: the official AdaMerging code's ``softmax_entropy``,
−Σ softmax(x)·log_softmax(x) (``kind='exact'``), and FusionBench's ``entropy_loss``,
−Σ p·log(p + 1e-8) with p = softmax(x) (``kind='fusionbench'``). They differ by at most C·1e-8 per image.
"""

import torch

ENTROPY_KINDS = ("exact", "fusionbench")


def check_entropy_kind(kind: str) -> str:
    if kind not in ENTROPY_KINDS:
        raise ValueError(f"unknown entropy {kind!r}; valid: {', '.join(ENTROPY_KINDS)} "
                         f"(exact: the official AdaMerging code; fusionbench: −Σ p log(p + 1e-8))")
    return kind


def entropy_loss(logits: torch.Tensor, kind: str = "exact") -> torch.Tensor:
    """H = −Σ_c p_c log p_c with p = softmax(logits), averaged over the batch (computed in float32)."""
    if check_entropy_kind(kind) == "fusionbench":
        p = torch.softmax(logits.float(), dim=-1)
        return -(p * torch.log(p + 1e-8)).sum(-1).mean()
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1).mean()
