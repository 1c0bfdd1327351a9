"""protocol=fusionbench with model=hf_clip is FusionBench's optimisation problem, pinned against FusionBench's
loop written out here (fusion_bench/method/adamerging: layer-wise weights of shape [K, #parameters of the
CLIPVisionModel], init 0.3, no clamp; per step the functional merge θ₀ + Σₖ λₖ τₖ, then for each task its
batch of 16, logits = logit_scale·(text embeddings)·normalised(visual_projection(pooler_output)), entropy
−Σ p log(p + 1e-8) averaged over the batch, ``backward(retain_graph=True)`` task by task (gradients summed),
then Adam(lr 1e-3)). Heads as FusionBench's CLIP classification mixin builds them: processor(text, padding),
get_text_features, normalise, mean over templates, normalise.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.func import functional_call

from adamerge.data.task import Task, TensorImages
from adamerge.methods import AdaMerging
from adamerge.methods.base import MergeContext
from adamerge.models.heads import zero_shot_head
from adamerge.models.hf_clip import hf_checkpoint_pool
from adamerge.models.hf_native import load_hf_clip_native
from tests.hf_fixtures import save_finetuned_towers, save_pretrained_clip

TASKS = ["alpha", "beta", "gamma"]
CLASSES = {"alpha": ["cat", "dog", "bird"], "beta": ["red", "green"], "gamma": ["one", "two", "three", "four"]}
TEMPLATES = ["a photo of a {}.", "a picture of the {}"]


@pytest.fixture(scope="module")
def hf_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fusionbench")
    clip = save_pretrained_clip(root / "clip-vit-tiny", seed=0)
    towers = save_finetuned_towers(clip, root / "finetuned", TASKS, seed=1, scale=0.05)
    gen = torch.Generator().manual_seed(7)
    batches = {t: torch.randn(16, 3, 16, 16, generator=gen) for t in TASKS}
    return root, clip, towers, batches


def reference_heads(folder: Path, clip):
    from transformers import CLIPProcessor

    processor = CLIPProcessor.from_pretrained(str(folder))
    heads = {}
    with torch.no_grad():
        for task in TASKS:
            rows = []
            for name in CLASSES[task]:
                inputs = processor(text=[t.format(name) for t in TEMPLATES], return_tensors="pt", padding=True)
                emb = clip.get_text_features(**inputs)
                emb = emb / emb.norm(p=2, dim=-1, keepdim=True)
                emb = emb.mean(dim=0)
                rows.append(emb / emb.norm(p=2, dim=-1, keepdim=True))
            heads[task] = torch.stack(rows)
    return heads


def fusionbench_loop(clip, towers, batches, heads, steps=5, granularity="layer"):
    """FusionBench's layer-/task-wise AdaMerging loop on fixed batches (see the module docstring)."""
    vision = clip.vision_model
    names = [n for n, _ in vision.named_parameters()]
    theta0 = {n: p.detach() for n, p in vision.named_parameters()}
    vectors = [{n: towers[t].vision_model.state_dict()[n] - theta0[n] for n in names} for t in TASKS]
    shape = (len(TASKS), len(names)) if granularity == "layer" else (len(TASKS),)
    weights = torch.nn.Parameter(torch.full(shape, 0.3))
    optimizer = torch.optim.Adam([weights], lr=1e-3)
    scale = clip.logit_scale.exp().detach()
    for _ in range(steps):
        merged = {}
        for j, n in enumerate(names):
            w = weights[:, j] if granularity == "layer" else weights
            merged[n] = theta0[n] + sum(w[k] * vectors[k][n] for k in range(len(TASKS)))
        optimizer.zero_grad()
        for task in TASKS:
            pooled = functional_call(vision, merged, (), {"pixel_values": batches[task]}).pooler_output
            image = clip.visual_projection(pooled)
            image = image / image.norm(p=2, dim=-1, keepdim=True)
            logits = (torch.matmul(heads[task], image.t()) * scale).t()
            p = torch.softmax(logits, dim=-1)
            loss = -(p * torch.log(p + 1e-8)).sum(dim=-1).mean()
            loss.backward(retain_graph=True)
        optimizer.step()
    return weights.detach(), names


def adamerge_context(root, batches, tmp_path):
    backbone = load_hf_clip_native(str(root / "clip-vit-tiny"))
    pool = hf_checkpoint_pool(finetuned_dir=str(root / "finetuned"), pattern="{task}", cache_dir=str(tmp_path / "hf"))
    theta0, finetuned = pool.load(TASKS, backbone.visual)
    tasks = [Task(t, CLASSES[t], TEMPLATES, {"test": TensorImages(batches[t], torch.zeros(16, dtype=torch.long))})
             for t in TASKS]
    heads = {t.name: zero_shot_head(backbone, t.classnames, t.templates) for t in tasks}
    return MergeContext(backbone=backbone, tasks=tasks, pretrained=theta0, finetuned=finetuned, heads=heads,
                        run_dir=tmp_path, image_encoder_extra=backbone.image_encoder_extra(), filled=pool.filled), backbone


def make_trainer(tmp_path, steps):
    import lightning as L

    return lambda: L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)


def test_native_tower_is_the_clip_vision_model(hf_world, tmp_path):
    """The merged tower's tensors are CLIPVisionModel's (q/k/v apart), its features CLIP's image features."""
    root, clip, towers, batches = hf_world
    backbone = load_hf_clip_native(str(root / "clip-vit-tiny"))
    assert list(backbone.visual.state_dict()) == list(towers["alpha"].state_dict())
    assert any(k.endswith("self_attn.q_proj.weight") for k in backbone.visual.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(backbone.visual(batches["alpha"]), clip.get_image_features(pixel_values=batches["alpha"]),
                                   atol=1e-6, rtol=1e-6)


def test_zero_shot_heads_use_the_models_own_tokenizer(hf_world):
    """A 514-token vocabulary (not OpenAI's): heads equal FusionBench's recipe; open_clip's tokenizer would
    index past the embedding table."""
    root, clip, _, _ = hf_world
    backbone = load_hf_clip_native(str(root / "clip-vit-tiny"))
    want = reference_heads(root / "clip-vit-tiny", clip)
    for task in TASKS:
        got = zero_shot_head(backbone, CLASSES[task], TEMPLATES)
        torch.testing.assert_close(got, want[task] * clip.logit_scale.exp(), atol=1e-5, rtol=1e-5)
    assert clip.config.text_config.vocab_size == 514


@pytest.mark.parametrize("granularity", ["layer", "task"])
def test_fusionbench_protocol_gives_fusionbenchs_coefficients(hf_world, tmp_path, granularity):
    """λ after 5 steps within 1e-5 of the loop above; 199-column analogue: one λ per CLIPVisionModel parameter."""
    root, clip, towers, batches = hf_world
    want, names = fusionbench_loop(clip, towers, batches, reference_heads(root / "clip-vit-tiny", clip),
                                   steps=5, granularity=granularity)
    ctx, backbone = adamerge_context(root, batches, tmp_path)
    ctx.make_trainer = make_trainer(tmp_path, 5)
    method = AdaMerging(lambda params: torch.optim.Adam(params, lr=1e-3), granularity=granularity, init=0.3,
                        clamp=None, batch_size=16, batches_per_task=1, entropy="fusionbench")
    result = method.run(ctx)
    from adamerge.models.checkpoints import load_state_dict

    lam = load_state_dict(result.extra["coefficients_file"])["coefficients"]
    assert lam.shape == (len(TASKS), len(names))
    if granularity == "task":
        assert float((lam[:, 0] - want).abs().max()) <= 1e-5
    else:
        # A key bias adds q·b to every key of a query: softmax ignores it, so its gradient is 0 in exact arithmetic
        # and Adam turns the float noise into steps (in FusionBench too). Every other column is pinned at 1e-5.
        noise = [j for j, n in enumerate(names) if n.endswith("self_attn.k_proj.bias")]
        pinned = [j for j in range(len(names)) if j not in noise]
        assert float((lam[:, pinned] - want[:, pinned]).abs().max()) <= 1e-5
        assert float((lam[:, noise] - want[:, noise]).abs().max()) <= 1e-4
    assert float((want - 0.3).abs().max()) > 1e-3  # it moved


def test_fusionbench_towers_load_natively_without_filling_anything(hf_world, tmp_path):
    root, _, towers, batches = hf_world
    ctx, backbone = adamerge_context(root, batches, tmp_path)
    for task in TASKS:
        want = towers[task].state_dict()
        assert ctx.finetuned[task].keys() == want.keys()
        assert all(torch.equal(ctx.finetuned[task][k], want[k]) for k in want)
    assert ctx.filled == {t: frozenset() for t in TASKS}
