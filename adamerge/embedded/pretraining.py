"""Contrastive (CLIP InfoNCE) pre-training of a small open_clip model on captioned images.

Two things keep it fast on a CPU: captions are tokenised once each (cached), and only the rows of
the 49,408-word token embedding that captions use are trained (``CompactEmbedding``); the others
keep their initial values, as words never seen in pre-training would in a real CLIP.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from adamerge.finetuning.schedule import decay_groups, warmup_cosine
from adamerge.runtime.progress import progress

log = logging.getLogger(__name__)
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the learnt temperature at 100


@dataclass(frozen=True)
class PretrainConfig:
    steps: int
    batch_size: int
    lr: float = 5e-4  # from-scratch two-tower training collapses at 2e-3 here
    weight_decay: float = 0.1
    warmup_steps: int = 50
    seed: int = 0
    # Opt-in temperature control (None: CLIP's learnt logit scale, as in the ``demo`` world). The short
    # pre-training leaves the learnt scale near 16, not real CLIP's 100, so predictions stay soft:
    # ``logit_scale`` starts the scale there, ``learn_logit_scale=False`` holds it fixed throughout, and
    # ``final_logit_scale`` sets it once training ends (zero-shot argmax unchanged, predictions sharper).
    logit_scale: float | None = None
    learn_logit_scale: bool = True
    final_logit_scale: float | None = None


class CompactEmbedding(torch.nn.Module):
    """Token embedding restricted to a known set of token ids; ``write_back`` returns the rows."""

    def __init__(self, full: torch.nn.Embedding, token_ids: torch.Tensor):
        super().__init__()
        ids = torch.unique(token_ids)
        lookup = torch.full((full.num_embeddings,), -1, dtype=torch.long)
        lookup[ids] = torch.arange(len(ids))
        self.register_buffer("ids", ids)
        self.register_buffer("lookup", lookup)
        self.weight = torch.nn.Parameter(full.weight.detach()[ids].clone())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        index = self.lookup[tokens]
        if (index < 0).any():
            raise ValueError("a caption uses a token outside the pre-training vocabulary; add it to caption_corpus()")
        return F.embedding(index, self.weight)

    @torch.no_grad()
    def write_back(self, full: torch.nn.Embedding) -> None:
        full.weight[self.ids] = self.weight.detach()


class TokenCache:
    """Tokenise each distinct caption once; batches of captions come back as one ``[n, ctx]`` tensor."""

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor]):
        self.tokenizer, self.rows = tokenizer, {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        new = [c for c in dict.fromkeys(captions) if c not in self.rows]
        if new:
            self.rows.update(zip(new, self.tokenizer(new)))
        return torch.stack([self.rows[c] for c in captions])


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, positives: torch.Tensor,
                     logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP) over images ``[B, D]`` and distinct captions ``[U, D]``.

    ``positives[i, u]`` is True where caption u is a right description of image i (its own caption,
    or one saying the same in other words): the target of each row and column is uniform over its
    positives, instead of pushing equivalent captions apart as false negatives. With one positive
    per row and column this is exactly CLIP's loss.
    """
    logits = logit_scale.exp() * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T  # [B, U]
    target = positives.float()
    image_to_text = -(target / target.sum(1, keepdim=True) * F.log_softmax(logits, dim=1)).sum(1).mean()
    text_to_image = -(target.T / target.T.sum(1, keepdim=True) * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return (image_to_text + text_to_image) / 2


def positive_pairs(captions: list[str], meanings: list) -> tuple[list[str], torch.Tensor]:
    """Distinct captions of a batch and the ``[B, U]`` mask of (image, caption) pairs that mean the same."""
    distinct = list(dict.fromkeys(captions))
    caption_meaning = dict(zip(captions, meanings))
    ids = {m: i for i, m in enumerate(dict.fromkeys(meanings))}
    image_ids = torch.tensor([ids[m] for m in meanings])
    caption_ids = torch.tensor([ids[caption_meaning[c]] for c in distinct])
    return distinct, image_ids[:, None] == caption_ids[None, :]


def pretrain_clip(clip: torch.nn.Module, tokenizer: Callable, vocabulary: list[str],
                  batches: Callable[[int], tuple[torch.Tensor, list[str], list]], config: PretrainConfig) -> dict:
    """Train ``clip`` in place on ``batches(n) -> (normalised images, captions, meanings)``.

    A meaning is any hashable; captions with equal meanings count as positives for each other.
    Returns loss statistics.

    ``vocabulary``: strings covering every word captions (and later, prompt templates) use.
    """
    torch.manual_seed(config.seed)
    clip.train().requires_grad_(True)
    for field_name in ("logit_scale", "final_logit_scale"):
        value = getattr(config, field_name)
        if value is not None and not 0 < value <= math.exp(MAX_LOGIT_SCALE):
            raise ValueError(f"PretrainConfig.{field_name}={value} must lie in (0, 100], CLIP's clamp")
    if config.logit_scale is not None:
        with torch.no_grad():
            clip.logit_scale.fill_(math.log(config.logit_scale))
    clip.logit_scale.requires_grad_(config.learn_logit_scale)
    full_embedding = clip.token_embedding
    compact = CompactEmbedding(full_embedding, tokenizer(vocabulary).flatten())
    clip.token_embedding = compact
    tokens = TokenCache(tokenizer)
    optimizer = torch.optim.AdamW(decay_groups(clip, config.weight_decay), lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
    schedule = warmup_cosine(optimizer, config.steps, config.warmup_steps)
    losses, start = [], time.perf_counter()
    bar = progress(total=config.steps, desc="pre-training CLIP", unit="step")
    try:
        for step in range(config.steps):
            images, captions, meanings = batches(config.batch_size)
            distinct, positives = positive_pairs(captions, meanings)
            loss = contrastive_loss(clip.encode_image(images), clip.encode_text(tokens(distinct)), positives, clip.logit_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}", refresh=False)
            bar.update(1)
            if (step + 1) % max(1, config.steps // 5) == 0:
                log.info("pre-training step %d/%d  loss %.3f  logit scale %.1f  (%.1f s)", step + 1, config.steps,
                         sum(losses[-20:]) / len(losses[-20:]), clip.logit_scale.exp().item(), time.perf_counter() - start)
    finally:
        bar.close()
        compact.write_back(full_embedding)
        clip.token_embedding = full_embedding
        clip.eval().requires_grad_(False)
    if config.final_logit_scale is not None:
        log.info("logit scale %.1f learnt, set to %.1f", clip.logit_scale.exp().item(), config.final_logit_scale)
        with torch.no_grad():
            clip.logit_scale.fill_(math.log(config.final_logit_scale))
    tail = losses[-max(1, len(losses) // 10):]
    return {"steps": config.steps, "batch_size": config.batch_size, "first_loss": losses[0] if losses else None,
            "final_loss": sum(tail) / len(tail) if tail else None, "distinct_captions": len(tokens.rows),
            "logit_scale": clip.logit_scale.exp().item(), "seconds": time.perf_counter() - start}
