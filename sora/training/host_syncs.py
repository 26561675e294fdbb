"""Host-device synchronisations of the training step, found on any device (the CPU twin of CUDA's sync debug mode).

On a GPU the host queues kernels ahead of the device; a step that reads a device tensor's value on the host
(``.item()``, ``bool()``, ``float()``, ``int()``, ``nonzero``, boolean indexing, ``masked_select``, ...)
waits until the device has run everything queued before it, and the device then idles while the host
queues the rest. ``torch.cuda.set_sync_debug_mode`` finds such reads on CUDA only. :class:`HostSyncs` finds
the same reads on any device: a ``TorchDispatchMode`` that records every op whose result size or value the
host must wait for, with the innermost frame of our code or Lightning's that asked for it.

:class:`SyncAudit` (a callback) keeps a :class:`HostSyncs` on from one training batch's start to the next
one's (the training step, backward, gradient clipping, optimizer, callbacks, logging and checkpoint hooks,
and fetching the next batch from the loader's workers) and counts what it saw per optimizer step:
``tools/find_syncs.py`` prints the table, ``tests/test_host_syncs.py`` asserts that the steps between
two logging steps hold none. On a CPU every tensor is a host tensor, so the audit is strict: it also
counts reads of tensors that a GPU run would keep on the host (build those from Python values instead).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from torch.utils._python_dispatch import TorchDispatchMode

from sora.training.callbacks import logger_writes

aten = torch.ops.aten
# ops whose result the host needs before it can go on: a value (item, bool, int, float), or a size that
# depends on the data (nonzero and what builds on it); each one drains the device queue under CUDA
SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
            aten.is_nonzero.default, aten.equal.default, aten.unique_consecutive.default, aten._unique2.default,
            aten.unique_dim.default, aten.repeat_interleave.Tensor}
_OURS = (str(Path(__file__).resolve().parents[1]), "/lightning/")


def _where() -> str:
    """``path:line qualname`` of the innermost frame in sora or Lightning (else the innermost Python frame)."""
    root, here = str(Path(__file__).resolve().parents[2]) + "/", str(Path(__file__).resolve())
    frame, first = sys._getframe(2), None
    while frame is not None:
        path = frame.f_code.co_filename
        if first is None and path != here and "/torch/" not in path:
            first = frame
        if any(part in path for part in _OURS) and path != here:
            break
        frame = frame.f_back
    frame = frame or first
    if frame is None:
        return "?"
    path = frame.f_code.co_filename.split("site-packages/")[-1].replace(root, "")
    return f"{path}:{frame.f_lineno} {frame.f_code.co_qualname}"


class HostSyncs(TorchDispatchMode):
    """Counts the ops of :data:`SYNC_OPS` run while active, by where they were asked for (``self.seen``)."""

    def __init__(self):
        super().__init__()
        self.seen: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNC_OPS or (func is aten.index.Tensor and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()))):
            self.seen[f"{func.__name__}: {_where()}"] += 1
        return func(*args, **(kwargs or {}))


class SyncAudit(Callback):
    """Records :class:`HostSyncs` between consecutive training batch starts; ``steps[global_step]`` holds what
    the span that began at that optimizer step saw (its step, its callbacks and logging, the next batch's fetch).
    On a CUDA device it also turns on ``torch.cuda.set_sync_debug_mode("warn")`` in each span and counts its
    warnings (``cuda sync: file:line``), which also catch blocking host-to-device copies and ``.tolist()``."""

    def __init__(self, path: str | None = None):
        self.path = path  # where on_train_end writes {step: {where: count}} as JSON, when given
        self.steps: dict[int, Counter[str]] = {}
        self._mode: HostSyncs | None = None
        self._warnings = None  # (catch_warnings, its records) on CUDA
        self._step = None

    def _close(self) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            seen = self._mode.seen
            if self._warnings is not None:
                torch.cuda.set_sync_debug_mode(0)
                catcher, records = self._warnings
                catcher.__exit__(None, None, None)
                for w in records:
                    if "synchroniz" in str(w.message):
                        seen[f"cuda sync: {w.filename.split('site-packages/')[-1]}:{w.lineno}"] += 1
                self._warnings = None
            self.steps[self._step] = seen
            self._mode = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._close()
        self._step = trainer.global_step
        if pl_module.device.type == "cuda":
            import warnings

            catcher = warnings.catch_warnings(record=True)
            self._warnings = (catcher, catcher.__enter__())
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        self._mode = HostSyncs()
        self._mode.__enter__()

    def on_train_end(self, trainer, pl_module) -> None:
        self._close()
        if self.path and trainer.is_global_zero:
            import json

            report = {"log_every_n_steps": trainer.log_every_n_steps, "device": str(pl_module.device),
                      "logging_steps": [s for s in sorted(self.steps) if logger_writes(trainer, s + 1)],
                      "steps": {str(s): dict(c) for s, c in sorted(self.steps.items())}}
            Path(self.path).write_text(json.dumps(report, indent=1) + "\n")

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._close()
