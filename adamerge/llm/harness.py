"""lm-evaluation-harness as an adamerge evaluator: real benchmarks (GSM8K, MMLU, IFEval, …) or your own task YAMLs,
run in-process on the live model object, so a search scores every candidate without writing or re-loading it.

``pip install 'adamerge[llm]'`` installs lm-eval. ``tasks.val`` are what searches maximise, ``tasks.test`` the
table's columns (a benchmark's validation and test splits are usually separate task names, e.g. your own
``mytask_val`` / ``mytask_test`` YAMLs over local JSON files with ``include_path``).
"""

from __future__ import annotations

from typing import Mapping, Sequence


class LMEval:
    name = "lm_eval"

    def __init__(self, tasks: Mapping[str, Sequence[str]], metric: str | None = None, include_path: str | None = None,
                 num_fewshot: int | None = None, batch_size: int = 32, limit: int | float | None = None,
                 apply_chat_template: bool = False, data_dir: str | None = None):
        self.tasks = {split: list(tasks.get(split) or []) for split in ("val", "test")}
        self.metric, self.include_path, self.num_fewshot = metric, include_path, num_fewshot
        self.batch_size, self.limit, self.apply_chat_template = int(batch_size), limit, bool(apply_chat_template)
        self._manager = None
        self._lm = None

    def check(self) -> None:
        """lm-eval is installed and every task name is known to it (with ``include_path``): before loading models."""
        try:
            from lm_eval.tasks import TaskManager
        except ImportError as err:
            raise ImportError("llm.evaluator=lm_eval needs lm-evaluation-harness: pip install 'adamerge[llm]' "
                              "(or pip install lm-eval)") from err
        empty = [split for split, names in self.tasks.items() if not names]
        if empty:
            raise ValueError(f"llm.evaluator.tasks.{empty[0]} is empty: name the lm-eval tasks to score "
                             "(e.g. tasks.val=[gsm8k_val] tasks.test=[gsm8k])")
        self._manager = TaskManager(include_path=self.include_path)
        known = set(self._manager.all_tasks)
        unknown = sorted({t for names in self.tasks.values() for t in names} - known)
        if unknown:
            raise ValueError(f"lm-eval does not know task(s) {', '.join(unknown)}"
                             f"{' (searched include_path ' + str(self.include_path) + ')' if self.include_path else ''}; "
                             "`lm-eval ls tasks` lists the built-in ones")

    def task_names(self, split: str = "test") -> list[str]:
        return list(self.tasks[split])

    def _model(self, model, tokenizer):
        from lm_eval.models.huggingface import HFLM

        if self._lm is None or self._lm.model is not model:  # one wrapper per live model: its weights change in place
            self._lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size)
        return self._lm

    def _value(self, task: str, result: Mapping) -> float:
        names = [k for k in result if "," in k and "_stderr" not in k]  # "<metric>,<filter>", e.g. exact_match,none
        if self.metric is not None:
            chosen = [k for k in names if k == self.metric or k.split(",")[0] == self.metric]
            if not chosen:
                raise ValueError(f"lm-eval task {task} has no metric {self.metric!r}; it reports {', '.join(names)}")
        else:
            chosen = names
        value = float(result[chosen[0]])
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"lm-eval metric {chosen[0]} of {task} is {value}, not a fraction in [0, 1]: choose a "
                             "fraction-valued metric with llm.evaluator.metric")
        return value

    def scores(self, model, tokenizer, split: str) -> dict[str, float]:
        from lm_eval import simple_evaluate

        if self._manager is None:
            self.check()
        out = simple_evaluate(model=self._model(model, tokenizer), tasks=self.tasks[split],
                              num_fewshot=self.num_fewshot, limit=self.limit, task_manager=self._manager,
                              apply_chat_template=self.apply_chat_template, log_samples=False, bootstrap_iters=0,
                              verbosity="ERROR")
        return {task: self._value(task, out["results"][task]) for task in self.tasks[split]}
