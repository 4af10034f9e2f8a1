"""ResumableDataLoader follows the trainer's epoch: resumes from end-of-epoch checkpoints are exact, dropped iter()s are harmless."""

from __future__ import annotations

import warnings

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import TensorDataset

from _lightning import LlamaLM
from _models import VOCAB
from lightning_lora import LoRACallback, adapter_state_dict
from lightning_lora.data._resumable import ResumableDataLoader

DATA = TensorDataset(torch.randint(0, VOCAB, (8, 12), generator=torch.Generator().manual_seed(0)))


def loader() -> ResumableDataLoader:
    return ResumableDataLoader(DATA, batch_size=4, shuffle=True, seed=3)


def first_ids(batches) -> list[list[int]]:
    return [batch[0][:, 0].tolist() for batch in batches]


class _Record(Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[int, list[int]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append((trainer.current_epoch, batch[0][:, 0].tolist()))


def _fit(tmp_path, epochs: int, ckpt_path=None):
    record = _Record()
    callbacks = [LoRACallback(r=4, target_modules=["q_proj"], backbone="model", dropout=0.1), record, ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)]
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks
    )
    module = LlamaLM(build_in="init")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return record.seen, adapter_state_dict(module.model)


def test_resume_from_an_end_of_epoch_checkpoint_sees_the_same_batches_and_ends_with_the_same_adapter(tmp_path) -> None:
    L.seed_everything(0)
    want_seen, want = _fit(tmp_path / "a", 3)
    L.seed_everything(0)
    first, _ = _fit(tmp_path / "b", 1)  # the checkpoint is written at the end of epoch 0: no loader state is restored
    got_seen, got = _fit(tmp_path / "b", 3, ckpt_path=tmp_path / "b" / "ck" / "last.ckpt")
    assert first + got_seen == want_seen
    assert len({tuple(ids) for _, ids in want_seen}) == 6  # three different epoch orders
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_an_iterator_dropped_before_its_first_batch_does_not_skip_an_epoch() -> None:
    plain = loader()
    epoch0, epoch1 = first_ids(plain), first_ids(plain)
    again = loader()
    iter(again)  # made and dropped (Lightning's setup_data does this before the epoch starts)
    assert first_ids(again) == epoch0 and first_ids(again) == epoch1
    assert epoch0 != epoch1


def position(loader_: ResumableDataLoader) -> dict[str, int]:
    """Where the loader stands (its state also says the batch size and processes the count was made with)."""
    state = loader_.state_dict()
    return {"epoch": state["epoch"], "batches": state["batches"]}


def test_a_restored_position_survives_a_dropped_iterator() -> None:
    full = first_ids(loader())
    resumed = loader()
    resumed.load_state_dict({"epoch": 0, "batches": 1})
    iter(resumed)
    assert first_ids(resumed) == full[1:]
    assert position(resumed) == {"epoch": 0, "batches": 2}


def test_the_epoch_set_by_the_trainer_decides_the_order() -> None:
    reference = loader()
    orders = [first_ids(reference) for _ in range(3)]
    told = loader()
    told.sampler.set_epoch(2)  # what Lightning does at the start of epoch 2
    assert first_ids(told) == orders[2]
    assert position(told) == {"epoch": 2, "batches": 2}
    restored = loader()
    restored.load_state_dict({"epoch": 0, "batches": 2})  # a finished epoch 0: the next one is 1
    assert first_ids(restored) == orders[1]
