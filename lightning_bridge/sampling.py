"""A data-parallel sampler and DataLoader that resume mid-epoch from a Lightning checkpoint.

Invariant: a run resumed from a checkpoint saved after N training batches sees, from its first
batch on, exactly the batches an uninterrupted run sees from batch N + 1 on (same seed, same
dataset, same global batch).

How: ``ResumableSampler`` is torch's ``DistributedSampler`` (a permutation from ``seed + epoch``,
this replica's share ``indices[rank::num_replicas]``) that can start part-way into an epoch.
``ResumableDataLoader`` counts the batches it hands out and has ``state_dict`` /
``load_state_dict``: Lightning 2.6 saves the state of every stateful training DataLoader in the
checkpoint (``loops.fit_loop.state_dict.combined_loader``) and loads it back before the resumed
epoch starts iterating. Lightning does not prefetch from a DataLoader with a length, so the
count is the number of batches trained on.

Because the sampler is a ``DistributedSampler``, Lightning keeps it (it injects its own only into
DataLoaders without one) and calls ``set_epoch`` on it every epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (``drop_last=True``: every replica the same count, no repeats) that
    skips the first ``start`` samples of this replica's share of the epoch."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start:])


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`ResumableSampler` whose position Lightning checkpoints and restores.

    The state is global (samples of the epoch consumed by all replicas together), so a run may
    resume with another data-parallel size as long as that size divides the samples consumed.
    """

    sampler: ResumableSampler

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, batch_size: int, **kwargs: Any) -> None:
        if not isinstance(sampler, ResumableSampler):
            raise TypeError(f"ResumableDataLoader needs a ResumableSampler, got {type(sampler).__name__}.")
        super().__init__(dataset, sampler=sampler, batch_size=batch_size, drop_last=True, **kwargs)
        self._epoch, self._skipped, self._batches = sampler.epoch, 0, 0  # where the current pass stands
        self._resume: tuple[int, int] | None = None  # (epoch, samples to skip) from a checkpoint

    def __iter__(self) -> Iterator[Any]:
        # A generator: this runs at the first batch, after Lightning's set_epoch for the epoch.
        self._epoch, self._batches = self.sampler.epoch, 0
        resume, self._resume = self._resume, None
        self._skipped = resume[1] if resume is not None and resume[0] == self._epoch else 0
        self.sampler.start = self._skipped
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        consumed = self._skipped + self._batches * self.batch_size
        sampler = self.sampler
        return {"epoch": self._epoch, "samples_seen": consumed * sampler.num_replicas, "seed": sampler.seed,
                "shuffle": sampler.shuffle, "dataset_size": len(self.dataset)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sampler = self.sampler
        changed = [f"{key} {state[key]} -> {now}" for key, now in
                   (("seed", sampler.seed), ("shuffle", sampler.shuffle), ("dataset_size", len(self.dataset)))
                   if state.get(key) != now]
        if changed:
            raise ValueError(f"Cannot resume the data order exactly: the checkpoint's training data differs "
                             f"({', '.join(changed)}). Resume with the same dataset, seed and shuffle.")
        seen, replicas = state["samples_seen"], sampler.num_replicas
        if seen % replicas:
            raise ValueError(f"The checkpoint was saved after {seen} samples of epoch {state['epoch']}, which "
                             f"{replicas} data-parallel replicas cannot split evenly. Resume with a data-parallel "
                             "size that divides it (e.g. the one that saved it).")
        self._resume = (state["epoch"], seen // replicas)
