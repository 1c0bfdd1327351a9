"""Faults injected through the config tree (``+callbacks.fail._target_=tests.faults.FailOnRank``)."""

import time

import lightning as L


class InjectedFailure(RuntimeError):
    pass


class FailOnRank(L.Callback):
    """Raise on one rank at one step, as a crashing GPU or a bad batch on one node would."""

    def __init__(self, rank: int = 1, step: int = 2, hang: bool = False):
        self.rank, self.step, self.hang = rank, step, hang

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            if self.hang:  # a rank stuck outside any collective (a dead GPU, a stalled file system)
                time.sleep(3600)
            raise InjectedFailure(f"injected failure on rank {self.rank} at step {self.step}")


class InterruptAt(L.Callback):
    """Raise KeyboardInterrupt at one step, as Ctrl-C in a terminal does."""

    def __init__(self, step: int = 3):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


class SigtermAt(L.Callback):
    """Send this process SIGTERM at one step, as a cluster's pre-emption does."""

    def __init__(self, step: int = 3):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGTERM)
