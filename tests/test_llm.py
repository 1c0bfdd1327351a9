"""The LLM setting of Extrapolation Merging: the offline world (tasks, tokenizer, Trainer checkpoints), checkpoint
ranking, candidates set in place equal to the written merge, the exact-match and lm-eval evaluators, and the whole
pipeline through the command line, on the CI-sized world (conf/llm_world/smoke.yaml)."""

import json
import re
from pathlib import Path

import adamerge  # noqa: F401  (before transformers imports torchvision)
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from adamerge.llm.checkpoints import CheckpointRunError, discover, rank, read_metrics
from adamerge.llm.evaluation import ExactMatch, answer_of
from adamerge.llm.tasks import SPLITS, TASKS, make_splits
from adamerge.runtime.config import CONF_DIR
from tests.cli_runner import adamerge as run_adamerge, records

SMOKE = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "llm_world" / "smoke.yaml").spec)


def reference_answer(prompt: str) -> str:
    """Each task's answer computed from its prompt, independently of the generators."""
    words = prompt.removesuffix(" ->").split()
    kind, rest = words[0], words[1:]
    if kind == "add":
        plus = rest.index("+")
        return " ".join(str(int("".join(rest[:plus])) + int("".join(rest[plus + 1:]))))
    if kind == "reverse":
        return " ".join(reversed(rest))
    if kind == "sort":
        return " ".join(sorted(rest))
    if kind == "copy":
        return " ".join(rest)
    if kind == "count":
        target, letters = rest[0], rest[2:]
        return str(letters.count(target))
    if kind == "larger":
        bar = rest.index("|")
        a, b = int("".join(rest[:bar])), int("".join(rest[bar + 1:]))
        return " ".join(str(max(a, b)))
    if kind == "next":
        symbols = "0123456789" if rest[0].isdigit() else "abcdefghij"
        seq = [symbols.index(x) for x in rest]
        return symbols[(seq[-1] + (seq[1] - seq[0])) % 10]
    raise AssertionError(prompt)


@pytest.mark.parametrize("task", TASKS)
def test_task_splits_are_disjoint_and_answers_right(task):
    splits = make_splits(task, {"train": 300, "val": 40, "test": 60}, seed=3)
    assert len(splits["val"]) == 40 and len(splits["test"]) == 60 and len(splits["train"]) > 50
    prompts = {s: {r["prompt"] for r in splits[s]} for s in SPLITS}
    assert not (prompts["train"] & prompts["val"]) and not (prompts["train"] & prompts["test"])
    assert not (prompts["val"] & prompts["test"])
    for rows in splits.values():
        for row in rows:
            assert row["answer"] == reference_answer(row["prompt"]), row
    assert make_splits(task, {"train": 300, "val": 40, "test": 60}, seed=3) == splits


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from adamerge.llm.world import build_world

    cache = tmp_path_factory.mktemp("llm_cache")
    return cache, build_world(cache, "smoke", SMOKE, sft_seed=0)


def test_world_is_what_a_trainer_run_leaves(world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adamerge.llm.world import build_world

    cache, paths = world
    found = discover(paths["sft"])
    steps = SMOKE["sft"]["steps"] // SMOKE["sft"]["eval_steps"]
    assert [c.step for c in found] == [SMOKE["sft"]["eval_steps"] * (i + 1) for i in range(steps)]
    read_metrics(found, "eval_loss")
    assert all(c.metrics["eval_loss"] > 0 for c in found)
    tokenizer = AutoTokenizer.from_pretrained(found[-1].path)
    assert tokenizer("sort 5 2 9 ->", add_special_tokens=False)["input_ids"].__len__() == 5  # one token per symbol
    model = AutoModelForCausalLM.from_pretrained(paths["base"])
    assert type(model).__name__ == "LlamaForCausalLM"
    stamp = (paths["sft"] / "manifest.json").stat().st_mtime
    again = build_world(cache, "smoke", SMOKE, sft_seed=0)  # cached: nothing rebuilt
    assert again["sft"] == paths["sft"] and (paths["sft"] / "manifest.json").stat().st_mtime == stamp


def fake_run(root: Path, losses: dict[int, float]) -> Path:
    from safetensors.torch import save_file

    for step in losses:
        folder = root / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
    history = [{"step": s, "eval_loss": v, "epoch": 0.1} for s, v in losses.items()] + [{"step": 1, "loss": 3.0}]
    (root / f"checkpoint-{max(losses)}" / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    return root


def test_checkpoints_are_ranked_by_the_trainer_state(tmp_path):
    run = fake_run(tmp_path / "run", {100: 0.9, 200: 0.5, 300: 0.7, 1000: 0.5})
    found = discover(run)
    assert [c.step for c in found] == [100, 200, 300, 1000]  # by step, not by name
    read_metrics(found, "eval_loss")
    ranked = rank(found, {c.name: c.metrics["eval_loss"] for c in found}, greater_is_better=False)
    assert [c.step for c in ranked] == [1000, 200, 300, 100]  # equal loss: the later step first
    with pytest.raises(CheckpointRunError, match=r"no 'eval_accuracy'.*llm.rank_by=evaluate"):
        read_metrics(found, "eval_accuracy")
    with pytest.raises(CheckpointRunError, match="no checkpoint-N/ folders"):
        discover(tmp_path)
    with pytest.raises(CheckpointRunError, match="not found"):
        discover(tmp_path / "nowhere")


def test_candidates_set_in_place_are_the_written_merge(world, tmp_path):
    """The live model at a search point holds exactly the tensors adamerge-merge-models writes for that point."""
    from transformers import AutoModelForCausalLM

    from adamerge.llm.candidates import Candidates
    from adamerge.model_dirs import merge_model_dirs
    from adamerge.model_dirs.registry import compose_method

    _, paths = world
    found = discover(paths["sft"])
    model = AutoModelForCausalLM.from_pretrained(paths["base"])
    candidates = Candidates(model, paths["base"], [c.path for c in found[-2:]])
    em, _, _, _ = compose_method("extrapolation_merging", {"alpha": 0.4, "beta": 0.3})
    live = {k: v.clone() for k, v in candidates.set_merge(em, [1, 2]).state_dict().items()}
    out = merge_model_dirs(paths["base"], [c.path for c in found[-2:]], "extrapolation_merging",
                           {"alpha": 0.4, "beta": 0.3}, tmp_path / "em")
    written = load_file(out / "model.safetensors")
    assert written.keys() <= live.keys() and all(torch.equal(written[k], live[k]) for k in written)
    last = load_file(found[-1].path / "model.safetensors")
    state = candidates.set_model(2).state_dict()
    assert all(torch.equal(state[k], v) for k, v in last.items())


class OracleModel(torch.nn.Module):
    """Answers every prompt it knows correctly, others with 'z': checks the evaluator's decoding and comparison."""

    def __init__(self, tokenizer, answers: dict[str, str]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.answers = tokenizer, answers

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            prompt = self.tokenizer.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=True)
            answer = self.answers.get(" ".join(prompt.split()), "z")
            new = self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            rows.append(ids + (new + [self.tokenizer.pad_token_id] * max_new_tokens)[:max_new_tokens])
        return torch.tensor(rows)


def test_exact_match_counts_right_answers(world):
    from transformers import AutoTokenizer

    _, paths = world
    evaluator = ExactMatch(paths["data"], ["add", "sort"])
    evaluator.check()
    tokenizer = AutoTokenizer.from_pretrained(paths["base"])
    known = {r["prompt"]: r["answer"] for r in evaluator.examples("add", "test")}
    half = dict(list({r["prompt"]: r["answer"] for r in evaluator.examples("sort", "test")}.items())[::2])
    scores = evaluator.scores(OracleModel(tokenizer, {**known, **half}), tokenizer, "test")
    n_sort = len(evaluator.examples("sort", "test"))
    assert scores == {"add": 1.0, "sort": len(half) / n_sort}
    assert answer_of(" 1  2 3\nmore") == "1 2 3"
    with pytest.raises(FileNotFoundError, match="nope.val.jsonl"):
        ExactMatch(paths["data"], ["nope"]).check()


def lm_eval_tasks(data: Path, folder: Path) -> Path:
    """lm-eval task YAMLs world_val / world_test over local JSON files (two of the world's tasks)."""
    folder.mkdir()
    for split in ("val", "test"):
        rows = [json.loads(line) for t in ("count", "next") for line in (data / f"{t}.{split}.jsonl").read_text().splitlines()]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / f"world_{split}.yaml").write_text(f"""task: world_{split}
dataset_path: json
dataset_kwargs:
  data_files: {{test: {folder / f'{split}.jsonl'}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: " {{{{answer}}}}"
generation_kwargs: {{until: ["</s>"], max_gen_toks: 4, do_sample: false}}
metric_list:
  - metric: exact_match
    ignore_case: true
    ignore_punctuation: false
""")
    return folder


def test_lm_eval_scores_the_live_model_as_loaded_from_disk(world, tmp_path):
    """A custom lm-eval task on local JSON files, run in-process on the live model: after the weights are set
    in place to another checkpoint, it scores what lm-eval scores on that checkpoint loaded from its folder."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adamerge.llm.candidates import Candidates
    from adamerge.llm.harness import LMEval

    _, paths = world
    tasks = lm_eval_tasks(paths["data"], tmp_path / "tasks")
    evaluator = LMEval(tasks={"val": ["world_val"], "test": ["world_test"]}, include_path=str(tasks), batch_size=16)
    evaluator.check()
    found = discover(paths["sft"])
    tokenizer = AutoTokenizer.from_pretrained(found[-1].path)
    model = AutoModelForCausalLM.from_pretrained(paths["base"])
    candidates = Candidates(model, paths["base"], [found[-1].path])

    def from_disk(folder):
        lm = HFLM(pretrained=AutoModelForCausalLM.from_pretrained(folder), tokenizer=tokenizer, batch_size=16)
        out = simple_evaluate(model=lm, tasks=["world_test"], task_manager=TaskManager(include_path=str(tasks)),
                              bootstrap_iters=0, verbosity="ERROR")
        return out["results"]["world_test"]["exact_match,none"]

    tuned = evaluator.scores(candidates.set_model(1), tokenizer, "test")["world_test"]
    base = evaluator.scores(candidates.set_model(0), tokenizer, "test")["world_test"]
    assert tuned == from_disk(found[-1].path) and base == from_disk(paths["base"])
    with pytest.raises(ValueError, match="does not know task"):
        LMEval(tasks={"val": ["world_val"], "test": ["no_such_task"]}, include_path=str(tasks)).check()


@pytest.mark.slow
def test_llm_demo_pipeline_end_to_end(world, tmp_path):
    """`adamerge experiment=llm_demo` on the smoke world: five rows on test, the searches within their budgets, a
    merged directory that loads with AutoModelForCausalLM and scores, re-evaluated here, what its row says."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache, paths = world
    done = run_adamerge(["experiment=llm_demo", "llm_world@llm.world=smoke", "threads=1"], cwd=tmp_path,
                        cache_dir=cache)
    rows = records(tmp_path, "llm_demo")
    assert [r["method"] for r in rows] == ["base", "sft_final", "sft_best", "expo", "extrapolation_merging"]
    assert all(r["tasks"] == SMOKE["tasks"] and r["seed"] == 0 for r in rows)
    table = (tmp_path / "results" / "tables" / "llm_demo.md").read_text()
    assert all(f"| {r['label']}" in table for r in rows)
    em = rows[-1]
    assert em["extra"]["search"]["evaluations"] <= 12 and len(em["extra"]["search"]["trace"]) == em["extra"]["search"]["evaluations"]
    merged = Path(em["extra"]["written_to"])
    config = json.loads((merged / "merge_config.json").read_text())
    assert config["alpha"] == em["extra"]["search"]["best"]["alpha"] and config["method"] == "extrapolation_merging"
    assert config["checkpoints"]["first"].endswith(em["extra"]["checkpoints"][0])
    model = AutoModelForCausalLM.from_pretrained(merged)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    again = ExactMatch(paths["data"], SMOKE["tasks"]).scores(model, tokenizer, "test")
    assert again == em["accuracy"]
    best = [c for c in em["extra"]["checkpoint_ranking"]][0]["name"]
    assert rows[2]["extra"]["checkpoint"] == best and re.match(r"checkpoint-\d+", best)
    assert "Extrapolation Merging" in done.stdout + done.stderr


@pytest.mark.slow
def test_your_own_checkpoints_with_lm_eval(world, tmp_path, monkeypatch):
    """The user's path: a base folder and a Trainer output_dir (here the world's, as plain folders), lm-eval on a
    local custom task as the evaluator, through the Python API."""
    import adamerge as api

    _, paths = world
    tasks = lm_eval_tasks(paths["data"], tmp_path / "tasks")
    monkeypatch.chdir(tmp_path)
    cfg = api.compose(["experiment=llm_demo", "llm.world=null", f"llm.base={paths['base']}", f"llm.sft_run={paths['sft']}",
                       "llm_eval@llm.evaluator=lm_eval", "llm.evaluator.tasks.val=[world_val]",
                       "llm.evaluator.tasks.test=[world_test]", f"llm.evaluator.include_path={tasks}",
                       "llm.expo.budget=2", "llm.extrapolation.budget=3", "name=own_sft", "threads=1"])
    score = api.run(cfg)
    rows = records(tmp_path, "own_sft")
    assert [r["label"] for r in rows][:3] == ["Base", "SFT (final checkpoint)", "SFT (best checkpoint on val)"]
    assert all(r["tasks"] == ["world_test"] and r["model"] == "base" for r in rows)
    assert score == rows[-1]["avg"] and rows[-1]["extra"]["search"]["evaluations"] <= 3
    assert rows[-1]["extra"]["evaluator"] == "LMEval"
