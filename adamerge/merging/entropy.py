"""The AdaMerging objective: Shannon entropy of the merged model's predictions on unlabelled data."""

import torch


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """H = −Σ_c p_c log p_c with p = softmax(logits), averaged over the batch (log-softmax: no log(0))."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1).mean()
