"""StepProgressBar: steps out of max_steps when steps bound the run, the epoch only when epochs do."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_bridge.progress import StepProgressBar


class _Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.weight * batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _bar_after(tmp_path, **limits):
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, callbacks=[StepProgressBar()], default_root_dir=tmp_path,
                         **limits)
    trainer.fit(_Tiny(), DataLoader(torch.ones(6), batch_size=2))  # 3 batches an epoch
    bar = trainer.progress_bar_callback.train_progress_bar
    return bar.desc.rstrip(": "), bar.n, bar.total


@pytest.mark.parametrize(("limits", "expected"), [
    ({"max_steps": 7}, ("Step", 7, 7)),                     # not "Epoch 2 ... 1/3"
    ({"max_epochs": 2}, ("Epoch 2/2", 3, 3)),               # the epoch's batches, as Lightning's bar
    ({"max_steps": 5, "max_epochs": 4}, ("Epoch 2/4", 5, 5)),  # both bound it: steps, and the epoch
])
def test_the_bar_says_where_the_run_is(tmp_path, limits, expected):
    assert _bar_after(tmp_path, **limits) == expected
