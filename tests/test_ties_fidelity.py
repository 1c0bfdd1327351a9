"""TIES and AdaMerging++ trim exactly as the official AdaMerging code and FusionBench do.

The reference below is written from the official definitions (EnnengYang/AdaMerging
``src/ties_merging_utils.py``: ``state_dict_to_vector`` sorts the keys and flattens; ``topk_values_mask``
keeps ``|M| ≥ kthvalue(|M|, d − int(d·K))``; ``resolve_sign`` gives exact zeros the sign of the summed
signs; ``disjoint_merge`` keeps entries whose sign agrees, a 0 sign keeping the negative ones; and
``src/main_ties_merging.py`` / ``main_*_adamergingpp.py`` flatten the whole ``ImageEncoder``: open_clip's
CLIP without ``transformer``). FusionBench (``fusion_bench/method/ties_merging``) applies the same rule to
the state dict of the tower it merges. Nothing here calls adamerge's TIES helpers to build a reference.
"""

from collections import OrderedDict

import pytest
import torch

from adamerge.data.task import Task
from adamerge.merging import StackedTaskVectors, task_vector, ties_merge, ties_task_vectors
from adamerge.methods import Ties
from adamerge.methods.base import MergeContext


# ---- the reference, from the official definitions ----------------------------------------------------------

def ref_flatten(state):
    return torch.cat([v.reshape(-1) for _, v in OrderedDict(sorted(state.items())).items()])


def ref_unflatten(vector, like):
    out, offset = {}, 0
    for key, value in OrderedDict(sorted(like.items())).items():
        out[key] = vector[offset:offset + value.numel()].view(value.shape)
        offset += value.numel()
    return out


def ref_trim(matrix, percent):
    d = matrix.shape[1]
    kth = matrix.abs().kthvalue(d - int(d * percent / 100), dim=1, keepdim=True).values
    return matrix * (matrix.abs() >= kth)


def ref_signs(trimmed):
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    return sign


def ref_selected(trimmed, sign):
    return trimmed * torch.where(sign[None] > 0, trimmed > 0, trimmed < 0)


def ref_ties(pretrained, finetuned, percent=20, merge="sum", lam=0.3):
    """θ₀ + λ · disjoint_merge over the flattened state dicts; returns (merged state, selected rows)."""
    flat0 = ref_flatten(pretrained)
    tv = torch.stack([ref_flatten(ft) for ft in finetuned]) - flat0
    trimmed = ref_trim(tv, percent)
    selected = ref_selected(trimmed, ref_signs(trimmed))
    if merge == "sum":
        merged_tv = selected.sum(0)
    else:
        merged_tv = selected.sum(0) / torch.clamp((selected != 0).sum(0).float(), min=1)
    return ref_unflatten(flat0 + lam * merged_tv, pretrained), [ref_unflatten(r, pretrained) for r in selected]


# ---- models -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def image_encoders(tiny_backbone):
    """θ₀ and three fine-tuned versions of the official ImageEncoder's state dict (CLIP without its text
    transformer): only the vision tower moves, as in task_vectors' fine-tuning; the text-side leftovers keep τ = 0."""
    full = {k: v.clone() for k, v in tiny_backbone.clip.state_dict().items() if not k.startswith("transformer.")}
    gen = torch.Generator().manual_seed(4)
    finetuned = []
    for _ in range(3):
        finetuned.append({k: (v + 0.05 * torch.randn(v.shape, generator=gen) if k.startswith("visual.") else v.clone())
                          for k, v in full.items()})
    return full, finetuned


def tower(state):
    return {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}


def make_ctx(backbone, theta0, finetuned, **extra):
    names = [f"t{i}" for i in range(len(finetuned))]
    return MergeContext(backbone=backbone, tasks=[Task(n, [], []) for n in names], pretrained=theta0,
                        finetuned=dict(zip(names, finetuned)), heads={}, run_dir=None,
                        image_encoder_extra=backbone.image_encoder_extra(), **extra)


# ---- tests --------------------------------------------------------------------------------------------------

def test_official_count_includes_the_image_encoders_text_side(tiny_backbone, image_encoders):
    """protocol=official (trim_count=image_encoder) gives the official code's merged tower, bit for bit."""
    full0, full_ft = image_encoders
    expected, _ = ref_ties(full0, full_ft, percent=20, merge="sum", lam=0.3)
    ctx = make_ctx(tiny_backbone, tower(full0), [tower(f) for f in full_ft])
    got = Ties(keep=0.2, merge="sum", lam=0.3, trim_count="image_encoder").run(ctx).params
    want = tower(expected)
    assert got.keys() == want.keys()
    for key in got:
        assert torch.equal(got[key], want[key]), key
    extra = tiny_backbone.image_encoder_extra()
    leftovers = {k: v for k, v in full0.items() if not k.startswith("visual.")}
    assert extra == sum(v.numel() for v in leftovers.values()) > 0
    assert sorted(leftovers) == ["ln_final.bias", "ln_final.weight", "logit_scale", "positional_embedding",
                                 "text_projection", "token_embedding.weight"]


def test_fusionbench_count_is_the_tower_alone(tiny_backbone, image_encoders):
    """trim_count=tower: the same rule over the tower's own state dict (FusionBench's flattening)."""
    full0, full_ft = image_encoders
    theta0, finetuned = tower(full0), [tower(f) for f in full_ft]
    for merge, lam in (("sum", 0.3), ("mean", 1.0)):
        expected, _ = ref_ties(theta0, finetuned, percent=20, merge=merge, lam=lam)
        got = Ties(keep=0.2, merge=merge, lam=lam, trim_count="tower").run(make_ctx(tiny_backbone, theta0, finetuned)).params
        for key in got:
            assert torch.equal(got[key], expected[key]), (merge, key)


def test_kept_count_is_int_n_k_plus_one_and_the_official_share_of_vit_b32():
    """Distinct magnitudes: int(n·k) + 1 entries survive (the issue's 16,128 vs 16,129 of 80,640). The share of
    the vision tower the official code keeps follows from the exact open_clip ViT-B/32 and ViT-L/14 sizes."""
    n = 80_640
    vector = {"w": torch.randperm(n).float() + 1.0}
    kept = ties_task_vectors([vector], keep=0.2)[0]["w"]
    assert int((kept != 0).sum()) == int(n * 0.2) + 1 == 16_129
    for vision, width, share in ((87_849_216, 512, 0.2583), (303_966_208, 768, 0.2254)):
        text_side = 49408 * width + 77 * width + width * width + 2 * width + 1
        d = vision + text_side
        assert abs((int(d * 0.2) + 1) / vision - share) < 5e-4


def test_bf16_ties_keep_at_least_k_with_the_threshold_ties():
    """On bf16 task vectors many magnitudes are equal: the official rule keeps every entry tied with the
    threshold (≥ 20 %), where a strict '>' kept far fewer."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4096, generator=gen).bfloat16()
    ft = (base.float() + 1e-2 * torch.randn(4096, generator=gen)).bfloat16()
    tv = {"w": ft - base}
    kept = ties_task_vectors([tv], keep=0.2)[0]["w"]
    share = float((kept != 0).float().mean())
    magnitudes = tv["w"].float().abs()
    threshold = magnitudes.kthvalue(4096 - int(4096 * 0.2)).values
    assert share == float((magnitudes >= threshold).float().mean()) >= 0.2
    assert float((magnitudes > threshold).float().mean()) < 0.2  # the rule a strict '>' would give


def test_zero_sum_entries_and_a_zero_majority_follow_the_official_rule():
    """Entries whose trimmed values cancel take sign(Σ signs); when that majority is itself 0 the official
    code leaves the sign 0, and disjoint_merge then keeps the *negative* entries."""
    a = {"w": torch.tensor([3.0, -3.0, 2.0, 1.0])}
    b = {"w": torch.tensor([-3.0, 3.0, -1.0, -2.0])}  # sums: 0, 0, +1, −1 → Σ signs = 0
    zero = {"w": torch.zeros(4)}
    expected, rows = ref_ties(zero, [a, b], percent=100 - 1e-9, merge="sum", lam=1.0)
    got = ties_merge(zero, [a, b], keep=1.0, lam=1.0, merge="sum")
    assert torch.equal(got["w"], expected["w"])
    assert got["w"].tolist() == [-3.0, -3.0, 2.0, -2.0]
    for mine, ref in zip(ties_task_vectors([a, b], keep=1.0), rows):
        assert torch.equal(mine["w"], ref["w"])
    positive = ties_merge(zero, [a, b], keep=1.0, lam=1.0, merge="sum", zero_sign="positive")
    assert positive["w"].tolist() == [3.0, 3.0, 2.0, -2.0]  # mergekit: exact zeros get +1


def test_adamerging_plus_vectors_are_the_official_selected_entries(tiny_backbone, image_encoders):
    """AdaMerging++'s per-task vectors = the official ``ties_merging_split`` rows (K = 20, ImageEncoder count)."""
    full0, full_ft = image_encoders
    _, rows = ref_ties(full0, full_ft, percent=20)
    ctx = make_ctx(tiny_backbone, tower(full0), [tower(f) for f in full_ft])
    stacked = StackedTaskVectors.from_state_dicts(ctx.pretrained, list(ctx.finetuned.values()), ties_keep=0.2,
                                                  ties_rule=ctx.ties_rule("image_encoder"))
    for i, key in enumerate(stacked.keys):
        assert torch.equal(stacked.vector(i), torch.stack([tower(r)[key] for r in rows])), key


def test_tensors_filled_from_theta0_are_outside_the_tower_count(tiny_backbone, image_encoders):
    """A converted checkpoint whose 'proj' was filled in from θ₀ trims like the original (no 'proj')."""
    full0, full_ft = image_encoders
    theta0, finetuned = tower(full0), [tower(f) for f in full_ft]
    for ft in finetuned:
        ft["proj"] = theta0["proj"].clone()  # as hf_vision_to_open_clip fills it for a CLIPVisionModel
    without = {k: v for k, v in theta0.items() if k != "proj"}
    expected, _ = ref_ties(without, [{k: v for k, v in ft.items() if k != "proj"} for ft in finetuned])
    filled = {f"t{i}": frozenset({"proj"}) for i in range(3)}
    got = Ties(trim_count="tower").run(make_ctx(tiny_backbone, theta0, finetuned, filled=filled)).params
    assert torch.equal(got["proj"], theta0["proj"])
    for key in without:
        assert torch.equal(got[key], expected[key]), key
    counted = Ties(trim_count="tower").run(make_ctx(tiny_backbone, theta0, finetuned)).params
    assert any(not torch.equal(counted[k], expected[k]) for k in without)  # counting the zeros changes the merge


def test_ties_method_validates_its_options():
    with pytest.raises(ValueError, match="image_encoder, tower"):
        Ties(trim_count="vision")
    with pytest.raises(ValueError, match="majority, positive"):
        Ties(zero_sign="minority")
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        Ties(keep=0.0)


def test_task_vector_view_equals_reference_task_vector(image_encoders):
    full0, full_ft = image_encoders
    tv = task_vector(tower(full_ft[0]), tower(full0))
    ref = ref_unflatten(ref_flatten(tower(full_ft[0])) - ref_flatten(tower(full0)), tower(full0))
    assert all(torch.equal(tv[k], ref[k]) for k in tv)
