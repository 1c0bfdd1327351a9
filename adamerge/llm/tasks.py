"""Seven synthetic instruction tasks for the offline LLM world, each needing another skill.

A prompt is ``"<instruction> <symbols> ->"`` and the answer the symbols after it, space-separated, so a
whitespace tokenizer gives one token per symbol (the tasks are about symbols, not sub-words):

=========  =============================  ==========
task       prompt                         answer
=========  =============================  ==========
add        ``add 4 7 + 1 8 ->``           ``6 5``
reverse    ``reverse c a f e ->``         ``e f a c``
sort       ``sort 5 2 9 1 ->``            ``1 2 5 9``
copy       ``copy g h a ->``              ``g h a``
count      ``count b in a b b c b ->``    ``3``
compare    ``larger 4 2 | 3 9 ->``        ``4 2``
next       ``next 1 3 5 7 ->``            ``9``  (or ``next a d g ->`` → ``j``)
=========  =============================  ==========

Train, validation and test prompts are disjoint (each distinct prompt lands in exactly one split).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

DIGITS = [str(d) for d in range(10)]
LETTERS = list("abcdefghij")
TASKS = ("add", "reverse", "sort", "copy", "count", "compare", "next")
SPLITS = ("train", "val", "test")
KEYWORDS = ["add", "+", "reverse", "sort", "copy", "count", "in", "larger", "|", "next", "->"]


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"add {' '.join(str(a))} + {' '.join(str(b))} ->", " ".join(str(a + b))


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = rng.choices(LETTERS, k=rng.randint(3, 6))
    return f"reverse {' '.join(word)} ->", " ".join(reversed(word))


def _sort(rng: random.Random) -> tuple[str, str]:
    digits = rng.choices(DIGITS, k=rng.randint(3, 6))
    return f"sort {' '.join(digits)} ->", " ".join(sorted(digits))


def _copy(rng: random.Random) -> tuple[str, str]:
    word = rng.choices(LETTERS, k=rng.randint(3, 6))
    return f"copy {' '.join(word)} ->", " ".join(word)


def _count(rng: random.Random) -> tuple[str, str]:
    target = rng.choice(LETTERS[:4])
    word = rng.choices(LETTERS[:4], k=rng.randint(4, 7))
    return f"count {target} in {' '.join(word)} ->", str(word.count(target))


def _compare(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(10, 100), 2)
    return f"larger {' '.join(str(a))} | {' '.join(str(b))} ->", " ".join(str(max(a, b)))


def _next(rng: random.Random) -> tuple[str, str]:
    """An arithmetic progression mod 10 over digits or over the letters a–j (720 distinct prompts)."""
    symbols = rng.choice([DIGITS, LETTERS])
    start, step, length = rng.randint(0, 9), rng.randint(1, 9), rng.randint(3, 6)
    seq = [symbols[(start + i * step) % 10] for i in range(length + 1)]
    return f"next {' '.join(seq[:-1])} ->", seq[-1]


GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add, "reverse": _reverse, "sort": _sort, "copy": _copy, "count": _count, "compare": _compare,
    "next": _next}


def make_splits(task: str, sizes: dict[str, int], seed: int = 0) -> dict[str, list[dict[str, str]]]:
    """``{split: [{"prompt", "answer"}]}`` with distinct prompts in distinct splits (val and test first)."""
    if task not in GENERATORS:
        raise ValueError(f"unknown LLM world task {task!r}; valid: {', '.join(TASKS)}")
    rng = random.Random(f"{seed}/{task}")
    seen: dict[str, str] = {}
    wanted = sum(sizes.values())
    tries = 0
    while len(seen) < wanted and tries < 50 * wanted:
        prompt, answer = GENERATORS[task](rng)
        seen.setdefault(prompt, answer)
        tries += 1
    items = [{"prompt": p, "answer": a} for p, a in seen.items()]
    out, start = {}, 0
    for split in ("val", "test", "train"):  # evaluation splits are always full; train takes what is left
        size = min(sizes.get(split, 0), len(items) - start)
        out[split] = items[start:start + size]
        start += size
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def read_jsonl(path: Path) -> list[dict]:
    try:
        rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read task file {path}: {err}") from err
    bad = [i for i, r in enumerate(rows) if not isinstance(r, dict) or not {"prompt", "answer"} <= set(r)]
    if bad:
        raise ValueError(f"{path}: line {bad[0] + 1} lacks 'prompt'/'answer' (each line: "
                         '{"prompt": "...", "answer": "..."})')
    return rows


def pretraining_text(rng: random.Random) -> str:
    """One line of the pre-training corpus: the symbols in plain sequences, no instructions and no '->'."""
    kind = rng.randrange(5)
    if kind == 0:
        return " ".join(rng.choices(LETTERS, k=rng.randint(4, 12)))
    if kind == 1:
        return " ".join(rng.choices(DIGITS, k=rng.randint(4, 12)))
    if kind == 2:
        start, step = rng.randint(0, 9), rng.randint(1, 4)
        return " ".join(str((start + i * step) % 10) for i in range(rng.randint(4, 10)))
    if kind == 3:
        word = rng.choices(LETTERS, k=rng.randint(3, 6))
        return " ".join(word + word)
    return " ".join(rng.choice(KEYWORDS[:-1] + LETTERS + DIGITS) for _ in range(rng.randint(4, 12)))
