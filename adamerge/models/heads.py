"""Zero-shot classification heads built from class names and prompt templates."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adamerge.models.backbone import Backbone


@torch.no_grad()
def zero_shot_head(backbone: Backbone, classnames: list[str], templates: list[str]) -> torch.Tensor:
    """Head W [C, D] with logits = logit_scale · normalise(f(x)) · wᶜ, as in CLIP and task vectors.

    wᶜ is the renormalised mean of the normalised text embeddings of every template filled with
    class c; the logit scale is folded into W so that heads are plain matrices. The backbone's own tokenizer
    and text tower are used (open_clip's, or a transformers CLIP's with its vocabulary).
    """
    rows = []
    for name in classnames:
        tokens = backbone.tokenizer([t.format(name) for t in templates])
        emb = F.normalize(backbone.encode_text(tokens), dim=-1).mean(0)
        rows.append(F.normalize(emb, dim=-1))
    return torch.stack(rows) * backbone.logit_scale.exp()


def logits(features: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """Classification logits of image features under a zero-shot head."""
    return F.normalize(features, dim=-1) @ head.T
