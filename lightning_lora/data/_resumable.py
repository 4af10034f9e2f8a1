"""ResumableDataLoader: a DataLoader that a mid-epoch checkpoint can resume exactly.

Lightning 2.6 saves ``state_dict()`` of every train loader that has ``state_dict`` / ``load_state_dict``
(``fit_loop.on_save_checkpoint`` -> ``CombinedLoader._state_dicts``) and, on a mid-epoch resume, hands it
back through ``load_state_dict`` before the first ``iter()``. From an end-of-epoch checkpoint it restores
no loader state; the epoch then comes from the sampler's ``set_epoch``, which Lightning calls every epoch. A sized loader is not prefetched
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
    """A permutation of ``range(n)`` drawn from ``seed + epoch``: the same order in every run and process.

    Lightning calls ``set_epoch`` at the start of every training epoch (``_set_sampler_epoch``), so the epoch is
    Lightning's own, also in a run resumed from an end-of-epoch checkpoint (where no loader state is restored).
    """

    def __init__(self, data_source: Sized, seed: int) -> None:
        self.data_source = data_source
        self.seed = seed
        self.epoch = 0
        self.epoch_was_set = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.epoch_was_set = True

    def __len__(self) -> int:
        return len(self.data_source)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(len(self.data_source), generator=generator).tolist())


class ResumableDataLoader(DataLoader):
    """A DataLoader with a seeded per-epoch shuffle that counts the batches it hands out and skips them on resume.

    The epoch of an iteration is decided when its first batch is fetched (``iter()`` itself does nothing), from,
    in this order: a state restored with ``load_state_dict``; the epoch the trainer gave the sampler through
    ``set_epoch`` (Lightning does at every epoch start, after it has already called ``iter()``); else one more
    than the previous iteration's. So an ``iter()`` that is dropped unused (Lightning makes one in ``setup_data``
    and, on some resumes, another) neither skips an epoch nor loses the batches to skip.

    Example::

        loader = ResumableDataLoader(dataset, batch_size=8, shuffle=True, seed=42)
        state = loader.state_dict()  # {"epoch": 0, "batches": 0, "batch_size": 8, "processes": 1, "epoch_batches": ...}
        loader.load_state_dict({"epoch": 0, "batches": 3})  # the next iteration starts at batch 3 of epoch 0
    """

    def __init__(self, dataset: Any, batch_size: int | None = 1, shuffle: bool = False, seed: int = 0, sampler: Any = None, **kwargs: Any) -> None:
        if sampler is None and shuffle:
            sampler = _EpochSeededSampler(dataset, seed)
        # A private generator: iter() draws the workers' base seed from it, not from the global RNG, so a resumed
        # run's dropout masks match an uninterrupted run's. It is reseeded from seed + epoch at every iteration.
        kwargs.setdefault("generator", torch.Generator())
        # A sampler passed in (e.g. Lightning's DistributedSampler) already decides the order.
        super().__init__(dataset, batch_size=batch_size, shuffle=False if sampler is not None else shuffle, sampler=sampler, **kwargs)
        self.seed = seed
        self._epoch = 0  # epoch of the current (or, before any batch, the next) iteration
        self._batches = 0  # batches of that epoch handed out, including those skipped on resume
        self._restored: tuple[int, int] | None = None  # (epoch, batches) from load_state_dict, for the next iteration
        self._started = False  # whether any iteration handed out a batch yet

    def __iter__(self) -> Iterator[Any]:
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        # A generator: nothing below runs until the first batch is asked for, after Lightning's set_epoch.
        epoch, skip = self._next_start()
        if isinstance(self.sampler, _EpochSeededSampler):
            self.sampler.epoch = epoch  # not set_epoch: that is how the trainer, not this loader, says the epoch
        elif hasattr(self.sampler, "set_epoch") and getattr(self.sampler, "epoch", epoch) != epoch:
            self.sampler.set_epoch(epoch)
        self.generator.manual_seed(self.seed + epoch)
        self._epoch, self._batches, self._started = epoch, skip, True
        for index, batch in enumerate(super().__iter__()):
            if index < skip:
                continue  # handed out before the checkpoint
            self._batches = index + 1
            yield batch

    def _next_start(self) -> tuple[int, int]:
        if self._restored is not None:
            restored, self._restored = self._restored, None
            return restored
        if getattr(self.sampler, "epoch_was_set", False) or (
            not isinstance(self.sampler, _EpochSeededSampler) and isinstance(getattr(self.sampler, "epoch", None), int)
        ):
            return int(self.sampler.epoch), 0  # the trainer's epoch (a DistributedSampler's is always set by Lightning)
        return (self._epoch + 1 if self._started else self._epoch), 0

    def _processes(self) -> int:
        """Processes that share each global batch: a DistributedSampler's replicas, else 1."""
        return int(getattr(self.sampler, "num_replicas", 1))

    def state_dict(self) -> dict[str, int]:
        # batch_size, processes and the epoch's length say what the count means, for a resume with other settings.
        return {
            "epoch": self._epoch,
            "batches": self._batches,
            "batch_size": self.batch_size or 0,
            "processes": self._processes(),
            "epoch_batches": len(self),
        }

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        epoch, batches = int(state_dict["epoch"]), int(state_dict["batches"])
        closed = batches >= int(state_dict.get("epoch_batches", len(self)))  # at the saved batch size
        if not closed and batches > 0 and "batch_size" in state_dict:
            self._check_global_batch(batches, int(state_dict["batch_size"]), int(state_dict.get("processes", 1)))
        if closed or batches >= len(self):  # the checkpoint closed its epoch: start the next one
            epoch, batches = epoch + 1, 0
        self._restored = (epoch, batches)
        self._epoch, self._batches = epoch, batches

    def _check_global_batch(self, batches: int, saved_batch_size: int, saved_processes: int) -> None:
        # The count is of global batches; another global batch size would skip other samples than the ones seen.
        saved, now = saved_batch_size * saved_processes, (self.batch_size or 0) * self._processes()
        if saved == now:
            return
        raise ValueError(
            f"the checkpoint stopped mid-epoch after {batches} batches of batch_size={saved_batch_size} x "
            f"{saved_processes} process(es) = {saved} samples each, but this run has batch_size={self.batch_size} x "
            f"{self._processes()} process(es) = {now}: skipping {batches} of its batches would skip other samples "
            f"than the {batches * saved} already trained on. Keep batch_size x processes at {saved} "
            f"(e.g. batch_size={saved_batch_size} on {saved_processes} process(es)), or resume from an end-of-epoch checkpoint."
        )
