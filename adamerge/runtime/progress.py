"""Progress bars with an ETA for the phases that take more than a few seconds.

World builds, fine-tuning, Fisher passes, large evaluations and searches otherwise run silently for
minutes. Every bar comes from :func:`progress`, so all follow the same rules: they write to stderr
(stdout stays for results), only rank 0 of a distributed job draws one, ``ADAMERGE_PROGRESS=0``
turns them all off, and off a terminal (a log file, a CI job) a bar redraws at most every
:data:`LOG_INTERVAL_S` seconds, in ASCII, so logs are not flooded. While a bar is open, console log
lines are printed above it instead of through it.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Iterable

from tqdm import tqdm  # a dependency of Lightning's
from tqdm.contrib.logging import logging_redirect_tqdm

ENV = "ADAMERGE_PROGRESS"
LOG_INTERVAL_S = 5.0  # the least time between two redraws of a bar that is not on a terminal
BAR_FORMAT = "{l_bar}{bar}| {unit} {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
_CONSOLE_LOGGERS = ("", "lightning.pytorch")  # root (Hydra's console handler) and Lightning's own


def progress_enabled() -> bool:
    """False under ``ADAMERGE_PROGRESS=0`` (or false/no/off) and on any distributed rank but 0."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return all(os.environ.get(var, "0").strip() in ("", "0") for var in ("RANK", "LOCAL_RANK"))


def progress(iterable: Iterable | None = None, *, total: int | None, desc: str, unit: str = "step",
             leave: bool = True, disable: bool = False, **kwargs) -> tqdm:
    """A tqdm bar ``desc: 40%|████    | step 4/10 [00:02<00:03, 2.0step/s]`` on stderr (see the module's rules).

    Use it as tqdm: wrap an iterable, or ``update()`` / ``set_postfix()`` it and ``close()`` it (or ``with``).
    """
    stream = sys.stderr  # looked up now, so a redirected or captured stderr is honoured
    terminal = bool(getattr(stream, "isatty", lambda: False)())
    options = dict(total=total, desc=desc, unit=unit, leave=leave, file=stream, bar_format=BAR_FORMAT,
                   disable=disable or not progress_enabled(), dynamic_ncols=terminal, smoothing=0.1,
                   mininterval=0.1 if terminal else LOG_INTERVAL_S, ascii=None if terminal else True)
    options.update(kwargs)
    if not terminal:
        options["position"] = 0  # nested bars move the cursor with escape codes: garbage in a log file
    return _Bar(iterable, **options)


class _Bar(tqdm):
    """A tqdm bar that, while open, sends console log lines through ``tqdm.write`` (above the bar, which is
    redrawn) rather than into the middle of its line: tqdm's own ``logging_redirect_tqdm``, entered for the
    loggers that have a console handler of their own (one added to a logger without would print twice)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._redirect = None
        if not self.disable:
            loggers = [logger for logger in map(logging.getLogger, _CONSOLE_LOGGERS)
                       if any(type(h) is logging.StreamHandler and h.stream in (sys.stdout, sys.stderr)
                              for h in logger.handlers)]
            if loggers:
                self._redirect = logging_redirect_tqdm(loggers=loggers, tqdm_class=tqdm)
                self._redirect.__enter__()

    def close(self):
        try:
            super().close()
        finally:
            redirect, self._redirect = getattr(self, "_redirect", None), None
            if redirect is not None:
                redirect.__exit__(None, None, None)
