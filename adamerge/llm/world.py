"""The offline LLM world: a tokenizer trained here, a tiny Llama pre-trained on a synthetic corpus, and one SFT run
on a mixture of seven instruction tasks whose checkpoints carry validation metrics — the inputs of Extrapolation
Merging, built with no download.

Everything goes through the tools an LLM researcher's own run would use: ``tokenizers`` trains the tokenizer,
``transformers``' ``LlamaForCausalLM`` is the model and its ``Trainer`` does both trainings, so the SFT folder is
what a real run leaves (``checkpoint-N/`` with ``model.safetensors``, ``config.json``, the tokenizer and
``trainer_state.json`` whose ``log_history`` holds ``eval_loss`` at every save). The base lives in
``<cache>/llm-<preset>-v<version>-<hash>/base`` and each SFT seed in ``…/sft-seed<N>``; a file lock makes
concurrent callers wait, and ``manifest.json``, written last, marks a part complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Mapping

import torch
from filelock import FileLock

from adamerge.llm.tasks import TASKS, make_splits, pretraining_text, write_jsonl
from adamerge.runtime.progress import progress

log = logging.getLogger(__name__)
VERSION = 2  # bump when the tasks, the tokenizer or the training change: cached worlds are rebuilt
MANIFEST = "manifest.json"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def _digest(spec: Mapping) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]


def world_root(cache_dir: str | Path, preset: str, spec: Mapping) -> Path:
    return Path(cache_dir).expanduser() / f"llm-{preset}-v{VERSION}-{_digest(spec)}"


def _complete(folder: Path) -> dict | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("version") == VERSION else None


def _build_once(folder: Path, build) -> dict:
    """``build(tmp)`` into a temporary folder renamed to ``folder``; other processes wait on the lock."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        manifest = _complete(folder)
        if manifest is not None:
            return manifest
        tmp = folder.with_name(folder.name + ".building")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        started = time.time()
        manifest = build(tmp)
        manifest.update(version=VERSION, seconds=round(time.time() - started, 1))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        return manifest


def train_tokenizer(lines: list[str], vocab_size: int):
    """A BPE tokenizer trained on ``lines`` (whitespace-split symbols, so every symbol is one token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                             show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", padding_side="left")


class _Examples(torch.utils.data.Dataset):
    """Token ids with labels: the whole line (pre-training) or the answer and EOS only (SFT)."""

    def __init__(self, tokenizer, rows: list[tuple[str, str | None]]):
        self.items = []
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        for prompt, answer in rows:
            ids = [bos] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
            if answer is None:
                ids.append(eos)
                labels = list(ids)
            else:
                target = tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos]
                labels = [-100] * len(ids) + target
                ids = ids + target
            self.items.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def _steps_bar(desc: str):
    """A Trainer callback drawing one :func:`~adamerge.runtime.progress.progress` bar over the training steps.

    Used instead of transformers' own tqdm (``disable_tqdm=True``), which redraws every step even in a log
    file; this one follows adamerge's bar rules (stderr, rank 0, ``ADAMERGE_PROGRESS=0``, calm off a terminal).
    """
    from transformers import TrainerCallback

    class StepsBar(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = progress(total=state.max_steps, desc=desc, unit="step", initial=state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar is not None and logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{logs['loss']:.3f}", refresh=False)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return StepsBar()


def _trainer(model, tokenizer, train, val, out: Path, train_cfg: Mapping, seed: int, save: bool, desc: str):
    from transformers import DataCollatorForSeq2Seq, PrinterCallback, Trainer, TrainingArguments

    every = int(train_cfg.get("eval_steps", 0)) or None
    args = TrainingArguments(
        output_dir=str(out), max_steps=int(train_cfg["steps"]), per_device_train_batch_size=int(train_cfg["batch_size"]),
        per_device_eval_batch_size=256, learning_rate=float(train_cfg["lr"]), lr_scheduler_type=train_cfg.get(
            "schedule", "cosine"), warmup_ratio=float(train_cfg.get("warmup_ratio", 0.05)), weight_decay=0.0,
        eval_strategy="steps" if (val is not None and every) else "no", eval_steps=every,
        save_strategy="steps" if save else "no", save_steps=every, save_only_model=True, save_safetensors=True,
        logging_steps=every or 50, report_to=[], log_level="error", use_cpu=not torch.cuda.is_available(), seed=seed, data_seed=seed,
        dataloader_num_workers=0, disable_tqdm=True, prediction_loss_only=True)  # our bar instead: _steps_bar
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val, data_collator=collator,
                      processing_class=tokenizer, callbacks=[_steps_bar(desc)])
    trainer.remove_callback(PrinterCallback)  # the losses go to trainer_state.json, not to stdout
    return trainer


def build_base(folder: Path, spec: Mapping) -> dict:
    """Data files, tokenizer and the pre-trained base (``folder/base``, ``folder/data``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def build(tmp: Path) -> dict:
        seed = int(spec.get("seed", 0))
        splits = {task: make_splits(task, dict(spec["sizes"]), seed) for task in spec["tasks"]}
        for task, parts in splits.items():
            for split, rows in parts.items():
                write_jsonl(tmp / "data" / f"{task}.{split}.jsonl", rows)
        rng = random.Random(seed)
        corpus = [pretraining_text(rng) for _ in range(int(spec["pretrain"]["lines"]))]
        task_text = [f"{r['prompt']} {r['answer']}" for parts in splits.values() for r in parts["train"]]
        tokenizer = train_tokenizer(corpus + task_text, int(spec["vocab_size"]))
        model_cfg = spec["model"]
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=int(model_cfg["hidden"]),
                             intermediate_size=int(model_cfg["intermediate"]), num_hidden_layers=int(model_cfg["layers"]),
                             num_attention_heads=int(model_cfg["heads"]), num_key_value_heads=int(model_cfg["kv_heads"]),
                             max_position_embeddings=int(model_cfg.get("max_positions", 64)), tie_word_embeddings=False,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        trainer = _trainer(model, tokenizer, _Examples(tokenizer, [(line, None) for line in corpus]), None,
                           tmp / "pretraining", spec["pretrain"], seed, save=False, desc="LLM world: pre-training")
        trainer.train()
        model.save_pretrained(tmp / "base", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "base")
        shutil.rmtree(tmp / "pretraining", ignore_errors=True)
        return {"kind": "llm_world_base", "spec": dict(spec), "parameters": sum(p.numel() for p in model.parameters()),
                "pretraining_loss": trainer.state.log_history[-1].get("train_loss")}

    return _build_once(folder, build)


def build_sft(folder: Path, base: Path, data: Path, spec: Mapping, seed: int) -> dict:
    """One SFT run of ``base`` on the mixture of the tasks' train splits (``folder/checkpoint-N``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adamerge.llm.tasks import read_jsonl

    def build(tmp: Path) -> dict:
        tokenizer = AutoTokenizer.from_pretrained(base)
        rows = {split: [(r["prompt"], r["answer"]) for task in spec["tasks"]
                        for r in read_jsonl(data / f"{task}.{split}.jsonl")] for split in ("train", "val")}
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(base)
        trainer = _trainer(model, tokenizer, _Examples(tokenizer, rows["train"]), _Examples(tokenizer, rows["val"]),
                           tmp, spec["sft"], seed, save=True, desc=f"LLM world: SFT seed {seed}")
        trainer.train()
        checkpoints = sorted(p.name for p in tmp.glob("checkpoint-*"))
        return {"kind": "llm_world_sft", "seed": seed, "checkpoints": checkpoints,
                "train_examples": len(rows["train"]), "val_examples": len(rows["val"])}

    return _build_once(folder, build)


def build_world(cache_dir: str | Path, preset: str, spec: Mapping, sft_seed: int) -> dict[str, Path]:
    """Build (or reuse) the base and the SFT run of seed ``sft_seed``; their folders."""
    spec = json.loads(json.dumps(dict(spec)))  # plain, for hashing and the manifest
    unknown = set(spec["tasks"]) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown LLM world task(s) {sorted(unknown)}; valid: {', '.join(TASKS)}")
    root = world_root(cache_dir, preset, spec)
    started = time.time()
    base_manifest = build_base(root, spec)
    sft_dir = root / f"sft-seed{int(sft_seed)}"
    build_sft(sft_dir, root / "base", root / "data", spec, int(sft_seed))
    log.info("LLM world %s ready in %.0f s (%d parameters)", root, time.time() - started, base_manifest["parameters"])
    return {"root": root, "base": root / "base", "data": root / "data", "sft": sft_dir}
