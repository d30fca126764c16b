"""ResumableSampler and ResumableDataLoader: data-parallel shares, seeded order, exact resume through Lightning."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lightning_bridge.sampling import ResumableDataLoader, ResumableSampler


def test_data_parallel_ranks_see_disjoint_shares_in_a_seeded_order():
    data = list(range(21))
    shares = [list(ResumableSampler(data, num_replicas=2, rank=r, seed=7)) for r in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 10  # drop_last: equal shares, nothing repeated
    assert not set(shares[0]) & set(shares[1])
    assert shares[0] == list(ResumableSampler(data, num_replicas=2, rank=0, seed=7))  # deterministic
    assert shares[0] != list(ResumableSampler(data, num_replicas=2, rank=0, seed=8))
    sampler = ResumableSampler(data, num_replicas=2, rank=0, seed=7)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != shares[0] and len(epoch1) == 10  # a new permutation each epoch
    sampler.start = 3
    assert list(sampler) == epoch1[3:]


class _Recorder(pl.LightningModule):
    """Records the samples of every training batch; learns nothing that matters."""

    def __init__(self, loader: ResumableDataLoader) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.loader, self.seen = loader, []

    def train_dataloader(self):
        return self.loader

    def training_step(self, batch, batch_idx):
        self.seen.append(batch.tolist())
        return (self.weight * batch.float()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(tmp_path, max_steps, ckpt_path=None, checkpoint_every=None):
    loader = ResumableDataLoader(list(range(12)), ResumableSampler(list(range(12)), seed=3), batch_size=2)
    callbacks = ([pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=checkpoint_every,
                                               save_top_k=-1, filename="{step}")] if checkpoint_every else [])
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, callbacks=callbacks,
                         enable_checkpointing=bool(checkpoint_every), enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    module = _Recorder(loader)
    trainer.fit(module, ckpt_path=ckpt_path)
    return module.seen


def test_a_resumed_run_continues_with_the_next_unseen_batch(tmp_path):
    """6 batches an epoch; checkpoints mid-epoch (step 3) and at the epoch's end (step 6); 9 steps in all."""
    reference = _fit(tmp_path / "reference", max_steps=9)
    assert sorted(sum(reference[:6], [])) == list(range(12)) and reference[6:] != reference[:3]  # epoch 1 reshuffled
    saved = _fit(tmp_path / "run", max_steps=9, checkpoint_every=3)
    assert saved == reference
    for step in (3, 6):
        resumed = _fit(tmp_path / f"resumed{step}", max_steps=9, ckpt_path=tmp_path / "run" / f"step={step}.ckpt")
        assert resumed == reference[step:], step


def test_a_checkpoint_of_other_data_or_an_uneven_split_is_refused():
    loader = ResumableDataLoader(list(range(12)), ResumableSampler(list(range(12)), seed=3), batch_size=2)
    state = loader.state_dict()
    assert state == {"epoch": 0, "samples_seen": 0, "seed": 3, "shuffle": True, "dataset_size": 12}
    with pytest.raises(ValueError, match=r"training data differs \(seed 4 -> 3, dataset_size 10 -> 12\)"):
        loader.load_state_dict({**state, "seed": 4, "dataset_size": 10})
    three = ResumableDataLoader(list(range(12)), ResumableSampler(list(range(12)), num_replicas=3, rank=0, seed=3),
                                batch_size=2)
    with pytest.raises(ValueError, match="saved after 4 samples of epoch 0, which 3 data-parallel replicas cannot"):
        three.load_state_dict({**state, "samples_seen": 4})


def test_resuming_with_another_data_parallel_size_continues_the_same_global_order():
    """Saved by one replica after 4 samples, resumed by two: together they see the rest of that epoch."""
    data = list(range(16))
    one = ResumableDataLoader(data, ResumableSampler(data, seed=1), batch_size=2)
    batches = iter(one)
    [next(batches) for _ in range(2)]
    state = one.state_dict()
    assert state["samples_seen"] == 4
    rest = sum((b.tolist() for b in batches), [])
    shares = []
    for rank in (0, 1):
        loader = ResumableDataLoader(data, ResumableSampler(data, num_replicas=2, rank=rank, seed=1), batch_size=1)
        loader.load_state_dict(state)
        shares.append([b.item() for b in loader])
    assert len(shares[0]) == len(shares[1]) == 6 and sorted(shares[0] + shares[1]) == sorted(rest)
