"""Evaluate a merged model that was saved, not merged here: a run's ``merged/`` or an adamerge-merge-models output.

Why a method: the evaluation, the rows, the run record and the tables are then exactly a normal run's
(``adamerge method=evaluate_saved method.path=DIR tasks=…``), and nothing but the backbone is read — no pool.
"""

from __future__ import annotations

from pathlib import Path

from adamerge.methods.base import MergeContext, MergeResult, Method
from adamerge.models.export import WHAT_TO_GIVE, SavedModelError, load_saved_tower, locate


class EvaluateSaved(Method):
    """θ = the tensors saved at ``path``, checked against the backbone (keys, shapes, finite) before evaluation.

    A per-task ``merged/`` (individual, expo_per_task) evaluates each task with its own model; every task run
    must then have one. ``label`` null: the saved run's row label with " (saved)" (or the folder's name)."""

    needs_checkpoints = False

    def __init__(self, path: str | None = None, label: str | None = None):
        if path in (None, ""):
            raise SavedModelError(f"method=evaluate_saved needs method.path: {WHAT_TO_GIVE}")
        self.path = Path(str(path)).expanduser()
        self.description, self.files = locate(self.path)  # a missing or empty folder fails before anything loads
        saved = self.description.get("label") or self.description.get("title")
        if saved and self.description.get("task"):  # one task's model of a per-task method, on any tasks
            saved = f"{saved}: {self.description['task']}"
        self.label = label or (f"{saved} (saved)" if saved else f"Saved model ({self.path.name})")

    def run(self, ctx: MergeContext) -> MergeResult:
        reference = {k: v.detach() for k, v in ctx.backbone.visual.state_dict().items()}
        projection = getattr(ctx.backbone.visual, "projection", None)
        load = lambda file: load_saved_tower(file, reference, projection, self.description)  # noqa: E731
        extra = {"evaluated_from": str(self.path), "saved_method": self.description.get("method"),
                 "saved_label": self.description.get("label") or self.description.get("title"),
                 "saved_tasks": self.description.get("tasks")}
        if None in self.files:
            return MergeResult(params=load(self.files[None]), extra=extra)
        lacking = [t for t in ctx.task_names if t not in self.files]
        if lacking:
            raise SavedModelError(
                f"{self.path} keeps one model per task ({', '.join(self.files)}) but not for {', '.join(lacking)}: "
                f"evaluate those tasks only (tasks.names=[{','.join(t for t in ctx.task_names if t in self.files)}]), "
                f"or one task's model on every task (method.path={self.path}/<task>).")
        return MergeResult(per_task={t: load(self.files[t]) for t in ctx.task_names}, extra=extra)
