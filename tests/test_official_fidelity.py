"""protocol=official computes what the official AdaMerging code computes (EnnengYang/AdaMerging,
``src/main_layer_wise_adamerging.py`` / ``main_task_wise_adamerging.py``), written out here: λ_raw initialised at
0.3 and clamped to [0, 1] in the forward pass, the pre-trained model's coefficient fixed at 1, the merged
tower ``Σ_j p_j λ_j`` over (θ₀, τ₁ … τ_K) per tensor; per step, for every task, two batches of 16 through
the merged encoder and the ClassificationHead (normalised features, weights = logit_scale · zero-shot
embeddings, bias 0), ``softmax_entropy(outputs).mean(0)`` *summed* over both batches and all tasks, one
backward, one optimiser step. Under SGD the sum (not the mean) of the two batch means matters: a mean over
the 32 images gives half the step.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from adamerge.data.task import Task, TensorImages
from adamerge.methods import AdaMerging
from adamerge.methods.base import MergeContext
from adamerge.models.heads import zero_shot_head

TASKS = {"a": ["cat", "dog", "bird"], "b": ["red", "green", "blue", "grey"]}
TEMPLATES = ["a photo of a {}.", "a {} in the wild"]


def official_softmax_entropy(x):
    return -(x.softmax(1) * x.log_softmax(1)).sum(1)


def official_heads(backbone):
    """task_vectors' get_zeroshot_classifier: per class, normalise each template's text embedding, mean,
    normalise, then scale the [C, D] weights by logit_scale.exp()."""
    clip, heads = backbone.clip, {}
    with torch.no_grad():
        for task, classnames in TASKS.items():
            rows = []
            for name in classnames:
                emb = clip.encode_text(backbone.tokenizer([t.format(name) for t in TEMPLATES]))
                emb = emb / emb.norm(dim=-1, keepdim=True)
                emb = emb.mean(dim=0, keepdim=True)
                emb = emb / emb.norm()
                rows.append(emb[0])
            heads[task] = torch.stack(rows) * clip.logit_scale.exp()
    return heads


def official_loop(backbone, theta0, finetuned, images, steps, lr, granularity="layer", mean_of_32=False):
    visual = backbone.visual
    names = [n for n, _ in visual.named_parameters()]
    paramslist = [tuple(theta0[n] for n in names)] + [tuple(ft[n] - theta0[n] for n in names) for ft in finetuned]
    shape = (len(names), len(finetuned)) if granularity == "layer" else (1, len(finetuned))
    lambdas_raw = torch.nn.Parameter(torch.ones(shape) * 0.3)
    optimizer = torch.optim.SGD([lambdas_raw], lr=lr)
    heads = official_heads(backbone)
    for _ in range(steps):
        task_lambdas = torch.clamp(lambdas_raw, min=0.0, max=1.0)
        alph = torch.cat((torch.ones(shape[0], 1), task_lambdas), 1)
        params = {n: sum(pi * lam for pi, lam in zip(p, alph[j if granularity == "layer" else 0]))
                  for j, (n, p) in enumerate(zip(names, zip(*paramslist)))}
        losses = 0.0
        for task in TASKS:
            batches = [images[task][:16], images[task][16:]] if not mean_of_32 else [images[task]]
            for x in batches:
                feature = functional_call(visual, params, (x,))
                out = torch.nn.functional.linear(feature / feature.norm(dim=-1, keepdim=True), heads[task])
                losses = losses + official_softmax_entropy(out).mean(0)
        optimizer.zero_grad()
        losses.backward()
        optimizer.step()
    lam = torch.clamp(lambdas_raw, 0, 1).detach()
    return lam.T if granularity == "layer" else lam[0]


@pytest.fixture()
def world(tiny_backbone, tiny_models):
    theta0, finetuned = tiny_models
    gen = torch.Generator().manual_seed(3)
    images = {t: torch.randn(32, 3, 16, 16, generator=gen) for t in TASKS}
    return theta0, finetuned[:2], images


def run_adamerging(backbone, theta0, finetuned, images, steps, lr, granularity, tmp_path):
    import lightning as L

    tasks = [Task(t, c, TEMPLATES, {"test": TensorImages(images[t], torch.zeros(32, dtype=torch.long))})
             for t, c in TASKS.items()]
    ctx = MergeContext(backbone=backbone, tasks=tasks, pretrained=theta0, finetuned=dict(zip(TASKS, finetuned)),
                       heads={t.name: zero_shot_head(backbone, t.classnames, t.templates) for t in tasks},
                       run_dir=tmp_path, image_encoder_extra=backbone.image_encoder_extra())
    ctx.make_trainer = lambda: L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    method = AdaMerging(lambda p: torch.optim.SGD(p, lr=lr), granularity=granularity, init=0.3, clamp=(0.0, 1.0),
                        batch_size=16, batches_per_task=2)
    from adamerge.models.checkpoints import load_state_dict

    lam = load_state_dict(method.run(ctx).extra["coefficients_file"])["coefficients"]
    return lam if granularity == "layer" else lam[:, 0]


@pytest.mark.parametrize("granularity", ["layer", "task"])
def test_official_protocol_gives_the_official_coefficients_under_sgd(tiny_backbone, world, tmp_path, granularity):
    theta0, finetuned, images = world
    want = official_loop(tiny_backbone, theta0, finetuned, images, steps=3, lr=0.05, granularity=granularity)
    got = run_adamerging(tiny_backbone, theta0, finetuned, images, 3, 0.05, granularity, tmp_path)
    assert float((got - want).abs().max()) <= 1e-6
    halved = official_loop(tiny_backbone, theta0, finetuned, images, steps=3, lr=0.05, granularity=granularity,
                           mean_of_32=True)
    assert float((halved - want).abs().max()) > 1e-4  # the mean over 32 images is another (half) step
    assert float((want - 0.3).abs().max()) > 1e-3


def test_official_heads_equal_adamerges(tiny_backbone):
    want = official_heads(tiny_backbone)
    for task, classnames in TASKS.items():
        torch.testing.assert_close(zero_shot_head(tiny_backbone, classnames, TEMPLATES), want[task], atol=1e-6, rtol=1e-6)
