"""Scoring a causal LM on instruction tasks: the built-in exact-match evaluator.

Every evaluator scores the model object it is given, as it is at that moment: a search sets the weights of one
model in place and scores it again, with no reload from disk. ``scores(model, tokenizer, split)`` returns
``{task: fraction correct}``; splits are ``val`` (the search's) and ``test`` (the table's). The lm-evaluation-harness
evaluator (:mod:`adamerge.llm.harness`) has the same interface.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch

from adamerge.llm.tasks import read_jsonl


def answer_of(text: str) -> str:
    """What a generation answers: its text up to the first newline, whitespace-normalised."""
    return " ".join(text.split("\n", 1)[0].split())


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 256) -> list[str]:
    """Greedy continuations of ``prompts`` (BOS + prompt, left-padded), cut at EOS."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    answers: list[str] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            encoded = [bos + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[start:start + batch_size]]
            width = max(map(len, encoded))
            ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
            mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
            for row in out[:, width:].tolist():
                if tokenizer.eos_token_id in row:
                    row = row[:row.index(tokenizer.eos_token_id)]
                answers.append(answer_of(tokenizer.decode(row, skip_special_tokens=True)))
    finally:
        model.train(was_training)
    return answers


class ExactMatch:
    """Greedy generation, exact match with the reference answer, per task.

    Task files: ``<data_dir>/<task>.<split>.jsonl``, one ``{"prompt": ..., "answer": ...}`` per line (the offline
    world writes them; any instruction data in this form works). ``limit``: the first N examples of each file.
    """

    name = "exact_match"

    def __init__(self, data_dir: str | Path, tasks: Sequence[str], batch_size: int = 256, limit: int | None = None):
        self.data_dir, self.tasks = Path(data_dir), list(tasks)
        self.batch_size, self.limit = int(batch_size), limit
        self._data: dict[tuple[str, str], list[dict]] = {}

    def check(self) -> None:
        """Every task file exists and parses: before any model is loaded."""
        missing = [str(self._path(t, s)) for t in self.tasks for s in ("val", "test") if not self._path(t, s).is_file()]
        if missing:
            raise FileNotFoundError(f"evaluation data not found: {', '.join(missing[:4])}"
                                    f"{' …' if len(missing) > 4 else ''} (expected <data_dir>/<task>.<split>.jsonl)")
        for task in self.tasks:
            for split in ("val", "test"):
                self.examples(task, split)

    def _path(self, task: str, split: str) -> Path:
        return self.data_dir / f"{task}.{split}.jsonl"

    def examples(self, task: str, split: str) -> list[dict]:
        if (task, split) not in self._data:
            rows = read_jsonl(self._path(task, split))
            self._data[task, split] = rows[:self.limit] if self.limit else rows
            if not self._data[task, split]:
                raise ValueError(f"{self._path(task, split)} has no examples")
        return self._data[task, split]

    def task_names(self, split: str = "test") -> list[str]:
        return list(self.tasks)

    def scores(self, model, tokenizer, split: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for task in self.tasks:
            rows = self.examples(task, split)
            longest = max(len(tokenizer(r["answer"], add_special_tokens=False)["input_ids"]) for r in rows)
            got = generate_answers(model, tokenizer, [r["prompt"] for r in rows], longest + 1, self.batch_size)
            out[task] = sum(g == answer_of(r["answer"]) for g, r in zip(got, rows)) / len(rows)
        return out


def mean(scores: Mapping[str, float]) -> float:
    return sum(scores.values()) / len(scores)
