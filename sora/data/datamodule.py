"""LightningDataModule over the clip streams, with per-rank exact resume.

The train loader is a torchdata ``StatefulDataLoader``: it snapshots every worker's stream
position with each batch it hands out, and Lightning saves its ``state_dict`` in checkpoints
(``loops.fit_loop.state_dict.combined_loader``) and restores it on ``ckpt_path=...``.
:class:`RankedLoader` fixes two things on top:

* Lightning fetches one batch ahead of the training step, so the loader's own state is one
  batch past what was trained on. The loader keeps the state after each batch it yields, and
  the datamodule's ``on_before_batch_transfer`` (called for the batch about to be trained on)
  marks which one was consumed: that is the state saved.
* Lightning saves rank 0's copy only, so the state gathers the positions of all ranks and each
  rank takes its own back on load.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import lightning as L
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from sora.data.pipeline import ClipBatch, ClipStream

log = logging.getLogger(__name__)


def _dist():
    d = torch.distributed
    return (d.get_rank(), d.get_world_size()) if d.is_available() and d.is_initialized() else (0, 1)


class RankedLoader(StatefulDataLoader):
    """A StatefulDataLoader whose state is the last *consumed* batch's, for every rank."""

    history = 8  # states kept for batches yielded but not yet consumed (Lightning prefetches 1)

    def __iter__(self):
        self._states, self._consumed, step = OrderedDict(), None, 0
        for batch in super().__iter__():
            step += 1
            self._states[step] = super().state_dict()
            while len(self._states) > self.history:
                self._states.popitem(last=False)
            if isinstance(batch, ClipBatch):
                batch.loader_step = step
            yield batch

    def consumed(self, step: int) -> None:
        """The batch yielded as ``step`` is being trained on: checkpoints resume after it."""
        self._consumed = step

    def state_dict(self) -> dict:
        states = getattr(self, "_states", {})
        consumed = getattr(self, "_consumed", None)
        own = states[consumed] if consumed in states else super().state_dict()
        rank, world = _dist()
        states = [own]
        if world > 1:
            states = [None] * world
            torch.distributed.all_gather_object(states, own)
        return {"world_size": world, "ranks": states}

    def load_state_dict(self, state: dict) -> None:
        if "ranks" not in state:  # a plain StatefulDataLoader state
            return super().load_state_dict(state)
        rank, world = _dist()
        if state["world_size"] != world:
            log.warning("data: the checkpoint has stream positions for %d ranks, this run has %d: "
                        "the data streams start again from their first epoch", state["world_size"], world)
            return None
        return super().load_state_dict(state["ranks"][rank])


class AVDataModule(L.LightningDataModule):
    """Train (and optional validation) clip streams; batching happens inside the streams."""

    def __init__(self, train: ClipStream, val: ClipStream | None = None, num_workers: int = 2,
                 prefetch_factor: int = 2, pin_memory: bool = False):
        super().__init__()
        self.train_stream, self.val_stream = train, val
        self.num_workers, self.prefetch_factor, self.pin_memory = num_workers, prefetch_factor, pin_memory

    def _loader(self, stream: ClipStream) -> RankedLoader:
        if self.trainer is not None:
            stream.rank, stream.world_size = self.trainer.global_rank, self.trainer.world_size
        workers = self.num_workers
        return RankedLoader(stream, batch_size=None, num_workers=workers, pin_memory=self.pin_memory,
                            prefetch_factor=self.prefetch_factor if workers > 0 else None,
                            persistent_workers=False)

    def train_dataloader(self) -> RankedLoader:
        self._train_loader = self._loader(self.train_stream)
        return self._train_loader

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        return batch.normalize() if isinstance(batch, ClipBatch) else batch

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        loader = getattr(self, "_train_loader", None)
        if loader is not None and self.trainer is not None and self.trainer.training and isinstance(batch, ClipBatch):
            loader.consumed(batch.loader_step)
        return batch

    def val_dataloader(self):
        return self._loader(self.val_stream) if self.val_stream is not None else []
