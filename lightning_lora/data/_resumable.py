"""ResumableDataLoader: a DataLoader that a mid-epoch checkpoint can resume exactly.

Lightning 2.6 saves ``state_dict()`` of every train loader that has ``state_dict`` / ``load_state_dict``
(``fit_loop.on_save_checkpoint`` -> ``CombinedLoader._state_dicts``) and hands it back through
``load_state_dict`` before the first ``iter()`` after a resume. A sized loader is not prefetched
(``_PrefetchDataFetcher.__iter__`` skips prefetching when the length is known), so the number of
batches handed out equals the number of training steps taken in the epoch.

Lightning applies the saved state only when its fit loop sets the loader up after the checkpoint was
restored. Anything that makes the trainer build the train loader earlier — reading
``trainer.estimated_stepping_batches`` in ``configure_optimizers`` is the usual case — sets it up with
nothing to restore, the fit loop keeps that loader, and the epoch restarts at batch 0. The tasks' LR
schedules therefore read the step count lazily (``lightning_lora.tasks._common.configure_adamw``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler


class _EpochSeededSampler(Sampler[int]):
    """A permutation of ``range(n)`` drawn from ``seed + epoch``: the same order in every run and process."""

    def __init__(self, data_source: Sized, seed: int) -> None:
        self.data_source = data_source
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.data_source)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(len(self.data_source), generator=generator).tolist())


class ResumableDataLoader(DataLoader):
    """A DataLoader with a seeded per-epoch shuffle that counts the batches it hands out and skips them on resume.

    Example::

        loader = ResumableDataLoader(dataset, batch_size=8, shuffle=True, seed=42)
        state = loader.state_dict()  # {"epoch": 0, "batches": 0}
        loader.load_state_dict({"epoch": 0, "batches": 3})  # the next iter() starts at batch 3 of epoch 0
    """

    def __init__(self, dataset: Any, batch_size: int | None = 1, shuffle: bool = False, seed: int = 0, sampler: Any = None, **kwargs: Any) -> None:
        if sampler is None and shuffle:
            sampler = _EpochSeededSampler(dataset, seed)
        # A private generator: iter() draws the workers' base seed from it, not from the global RNG, so a resumed
        # run's dropout masks match an uninterrupted run's. It is reseeded from seed + epoch at every iter().
        kwargs.setdefault("generator", torch.Generator())
        # A sampler passed in (e.g. Lightning's DistributedSampler) already decides the order.
        super().__init__(dataset, batch_size=batch_size, shuffle=False if sampler is not None else shuffle, sampler=sampler, **kwargs)
        self.seed = seed
        self._next_epoch = 0
        self._epoch = 0
        self._batches = 0
        self._skip = 0

    def __iter__(self) -> Iterator[Any]:
        self._epoch, self._next_epoch = self._next_epoch, self._next_epoch + 1
        if isinstance(self.sampler, _EpochSeededSampler):
            self.sampler.epoch = self._epoch
        self.generator.manual_seed(self.seed + self._epoch)
        skip, self._skip = self._skip, 0
        self._batches = 0
        return self._counting(super().__iter__(), skip)

    def _counting(self, iterator: Iterator[Any], skip: int) -> Iterator[Any]:
        for index, batch in enumerate(iterator):
            if index < skip:
                continue  # handed out before the checkpoint
            self._batches = index + 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        epoch, batches = int(state_dict["epoch"]), int(state_dict["batches"])
        if batches >= len(self):  # the checkpoint closed its epoch: start the next one
            epoch, batches = epoch + 1, 0
        self._epoch, self._next_epoch, self._skip, self._batches = epoch, epoch, batches, batches
