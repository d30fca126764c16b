"""A training progress bar that says where a step-bounded run is.

Lightning's bar counts the batches of the current epoch (``Epoch 5 ... 5/5`` on a 40-step run of
8-batch epochs). ``StepProgressBar`` counts optimizer steps out of ``max_steps`` when steps bound
the run (``Step ... 25/40``), and names the epoch out of ``max_epochs`` only when epochs bound it
(``Epoch 2/3 ... 5/8``, or ``Epoch 2/3 ... 25/40`` when both do). ``lightning-bridge fit`` and the
examples use it.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from typing_extensions import override


class StepProgressBar(TQDMProgressBar):
    """TQDMProgressBar over optimizer steps when ``max_steps`` bounds the run; the epoch only when epochs do."""

    @staticmethod
    def bounded_by(trainer: pl.Trainer) -> tuple[bool, bool]:
        """(steps bound the run, epochs bound the run)."""
        return (trainer.max_steps is not None and trainer.max_steps > 0,
                trainer.max_epochs is not None and trainer.max_epochs > 0)

    def description(self, trainer: pl.Trainer) -> str:
        _, epochs = self.bounded_by(trainer)
        return f"Epoch {trainer.current_epoch + 1}/{trainer.max_epochs}" if epochs else "Step"

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        steps, _ = self.bounded_by(trainer)
        if not steps:
            super().on_train_epoch_start(trainer, *args)
            self.train_progress_bar.set_description(self.description(trainer))
            return
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        bar = self.train_progress_bar
        if bar.total != trainer.max_steps:  # the first epoch of this run (maybe resumed): the bar spans all steps
            bar.reset(total=trainer.max_steps)
            bar.initial = 0
            bar.n = trainer.global_step
        bar.set_description(self.description(trainer))
        bar.refresh()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        steps, _ = self.bounded_by(trainer)
        if not steps:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        bar, n = self.train_progress_bar, trainer.global_step
        if bar is not None and not bar.disable and self._should_update(n, bar.total):
            bar.n = n
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes
