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

A checkpoint resumed at another world size (or number of workers) cannot restore each worker's
own position: the clips are split over ``ranks x workers`` global workers, so that split changes.
Then the stream is *resharded* (:func:`reshard_position`): the batches the old workers consumed in
the current epoch are divided evenly over the new workers, each of which skips its share of the
epoch's plan and goes on. The run thus continues about as far into the epoch as it was; within
that epoch some clips may come twice and others not at all (the split differs), and the
following epochs are those of a fresh run at the new size. A warning says so.
"""

from __future__ import annotations

import logging
import os
import signal
from collections import OrderedDict
from functools import partial

import lightning as L
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from torchdata.stateful_dataloader import StatefulDataLoader

from sora.data.packing import PackedBatch
from sora.data.pipeline import ClipBatch, ClipStream

log = logging.getLogger(__name__)


def _dist():
    d = torch.distributed
    return (d.get_rank(), d.get_world_size()) if d.is_available() and d.is_initialized() else (0, 1)


def worker_positions(rank_state: dict) -> list[tuple[int, int]]:
    """(epoch, batches) of each worker of one rank's StatefulDataLoader state, in worker order."""
    workers = (rank_state.get("_snapshot") or {}).get("_worker_snapshots")
    states = [workers[f"worker_{i}"]["dataset_state"] for i in range(len(workers))] if workers \
        else [rank_state["dataset_state"]]
    return [(int(s["epoch"]), int(s["batches"])) for s in states]


def reshard_position(positions: list[tuple[int, int]], workers: int) -> tuple[int, int]:
    """Where each of ``workers`` new global workers starts, from the old workers' (epoch, batches):
    the oldest epoch among them, and an even share of the batches consumed in it (a worker already
    in a later epoch counts as having consumed as many as the furthest one still in it)."""
    epoch = min(e for e, _ in positions)
    current = [b for e, b in positions if e == epoch]
    consumed = sum(current) + max(current) * (len(positions) - len(current))
    return epoch, consumed // workers


def worker_init(worker_id: int, rank: int = 0) -> None:
    """Loader workers ignore SIGTERM and SIGUSR1: the main process decides what they mean (save and stop,
    :class:`sora.training.guards.Preemption`) and ends its workers itself. SLURM (time limit, ``scancel``,
    ``--signal``) and ``pkill`` signal every process of the job, workers too, which would otherwise die
    and take the run down with them before it saved. Then Lightning's worker seeding, which it adds
    itself only to loaders without a ``worker_init_fn`` (``seed_everything(workers=True)``)."""
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        pl_worker_init_function(worker_id, rank)


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
            if isinstance(batch, (ClipBatch, PackedBatch)):
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
        positions = [p for r in state["ranks"] for p in worker_positions(r)]
        workers = world * max(1, self.num_workers)
        if state["world_size"] == world and len(positions) == workers:
            return super().load_state_dict(state["ranks"][rank])
        epoch, batches = reshard_position(positions, workers)
        if rank == 0:
            log.warning("data: the checkpoint has stream positions for %d ranks x %d workers, this run has %d x %d: "
                        "resharded, every worker starts at epoch %d after %d batches (within this epoch some clips "
                        "may repeat or be missed)", state["world_size"], len(positions) // state["world_size"],
                        world, max(1, self.num_workers), epoch, batches)
        self.dataset.load_state_dict({**self.dataset.state_dict(), "epoch": epoch, "batches": batches})
        return None


def auto_workers(ranks_per_node: int = 1) -> int:
    """Data workers per rank from the cores this process may use: each rank's share, less one core for its
    training loop, at least 1 and at most 8 (2 cores, 1 rank: 1; 16 cores, 1 GPU: 8; 64 cores, 8 GPUs: 7)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores // max(1, ranks_per_node) - 1))


def data_parallel_rank(size: int, rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    """(data-parallel rank, data-parallel world size) of a rank when groups of ``size`` consecutive
    ranks share one batch (sequence parallelism): the index to split data (and seed per-sample randomness) by."""
    import torch.distributed as dist

    rank = dist.get_rank() if rank is None else rank
    world = dist.get_world_size() if world is None else world
    return rank // size, world // size


class AVDataModule(L.LightningDataModule):
    """Train (and optional validation) clip streams; batching happens inside the streams.
    ``num_workers``: loader processes per rank, or ``"auto"`` (:func:`auto_workers`, from the cores)."""

    def __init__(self, train: ClipStream, val: ClipStream | None = None, num_workers: int | str = "auto",
                 prefetch_factor: int = 2, pin_memory: bool = False):
        super().__init__()
        if num_workers != "auto" and not (isinstance(num_workers, int) and num_workers >= 0):
            raise ValueError(f"data.num_workers={num_workers!r}: give a count >= 0 or 'auto'")
        self.train_stream, self.val_stream = train, val
        self.num_workers, self.prefetch_factor, self.pin_memory = num_workers, prefetch_factor, pin_memory

    def workers(self) -> int:
        if self.num_workers != "auto":
            return self.num_workers
        return auto_workers(self.trainer.num_devices if self.trainer is not None else 1)

    def _loader(self, stream: ClipStream) -> RankedLoader:
        if self.trainer is not None:
            stream.rank, stream.world_size = self.trainer.global_rank, self.trainer.world_size
            sp = getattr(self.trainer.lightning_module, "sequence_parallel", 1)
            if sp > 1:  # the ranks of one sequence-parallel group read the same clips
                stream.rank, stream.world_size = data_parallel_rank(sp, stream.rank, stream.world_size)
        workers, rank = self.workers(), self.trainer.global_rank if self.trainer is not None else 0
        return RankedLoader(stream, batch_size=None, num_workers=workers, pin_memory=self.pin_memory,
                            prefetch_factor=self.prefetch_factor if workers > 0 else None,
                            persistent_workers=False, worker_init_fn=partial(worker_init, rank=rank))

    def train_dataloader(self) -> RankedLoader:
        self._train_loader = self._loader(self.train_stream)
        return self._train_loader

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        return batch.normalize() if isinstance(batch, (ClipBatch, PackedBatch)) else batch

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        loader = getattr(self, "_train_loader", None)
        if (loader is not None and self.trainer is not None and self.trainer.training
                and isinstance(batch, (ClipBatch, PackedBatch))):
            loader.consumed(batch.loader_step)
        return batch

    def val_dataloader(self):
        return self._loader(self.val_stream) if self.val_stream is not None else []
