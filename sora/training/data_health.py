"""``data/skipped``: how much bad data the train streams skipped, logged every step.

The streams (:mod:`sora.data.pipeline`) skip a bad sample or an unreadable shard (part) with one
warning line and attach the count to the next batch they yield (``batch.skipped_by``, by kind).
:class:`DataHealth` sums those counts over the batches trained on and over the data-parallel
ranks, and logs the cumulative totals: ``data/skipped`` and one ``data/skipped_<kind>`` per kind
(``decode``: bad samples; ``shard``: shards or parts of them that could not be read).

Ranks: every rank adds the counts of its own batches; at the steps where the logger writes
(``trainer.log_every_n_steps``) and when a checkpoint is saved, one ``sum`` reduction over the ranks
(``trainer.strategy.reduce``: an all-reduce under DDP, FSDP, DeepSpeed; nothing on one device) gives the
global totals, which every rank then logs as is (no ``sync_dist``). No step in between sends a tensor
to the device or reduces one. The ranks of one sequence-parallel group read the same clips, so their sum
is divided by the group size.

The totals are in the callback's ``state_dict`` (in checkpoints): a resumed run continues the count.
"""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import Callback

from sora.data.pipeline import KINDS
from sora.training.callbacks import logger_writes


class DataHealth(Callback):
    """Logs ``data/skipped`` (and ``data/skipped_<kind>``): samples and shard parts skipped so far."""

    def __init__(self):
        self.base = dict.fromkeys(KINDS, 0)    # global totals restored from a checkpoint
        self.local = dict.fromkeys(KINDS, 0)   # this rank's counts since this run started
        self._global = None                     # global totals at the last reduction (a tensor: no host sync)
        self._at = None                         # (strategy, device, sequence-parallel size, step) of the last batch
        self._reduced_step = None               # the step of the last reduction

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for kind, n in (getattr(batch, "skipped_by", None) or {}).items():
            if kind in self.local:
                self.local[kind] += int(n)
        step = getattr(trainer, "global_step", 0)
        self._at = (trainer.strategy, pl_module.device, max(1, int(getattr(pl_module, "sequence_parallel", 1) or 1)),
                    step)
        if not logger_writes(trainer):
            return  # the logger writes at its steps only: counted on the host in between
        self._reduce()
        logs = {"data/skipped": self._global.sum(), **{f"data/skipped_{k}": c for k, c in zip(KINDS, self._global)}}
        pl_module.log_dict(logs, on_step=True, on_epoch=False, batch_size=1)

    def _reduce(self) -> None:
        strategy, device, group, step = self._at
        counts = torch.tensor([float(self.local[k]) for k in KINDS], device=device)
        counts = strategy.reduce(counts, reduce_op="sum") / group  # every rank at the same steps: matched
        self._global = counts + torch.tensor([float(self.base[k]) for k in KINDS], device=counts.device)
        self._reduced_step = step

    @property
    def totals(self) -> dict[str, int]:
        """Global totals by kind after the last step (those restored before the first). Reduces over the ranks when
        the last step's counts were not (every rank asks at the same step, e.g. when a checkpoint is saved)."""
        if self._at is None:
            return dict(self.base)
        if self._reduced_step != self._at[3]:
            self._reduce()
        return dict(zip(KINDS, self._global.round().long().tolist()))

    def state_dict(self) -> dict:
        return {"skipped": self.totals}

    def load_state_dict(self, state: dict) -> None:
        self.base = {k: int(state.get("skipped", {}).get(k, 0)) for k in KINDS}
        self.local, self._global, self._at, self._reduced_step = dict.fromkeys(KINDS, 0), None, None, None
