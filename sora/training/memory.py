"""Live memory of a training step without running it: a dispatch mode that runs every op on fake tensors
(shapes and dtypes, no memory, no arithmetic) and counts the bytes of each live storage by category.

Storages are followed through weak references, so a freed tensor leaves the count when Python frees it;
``peak`` is the largest weighted total seen (``factors``: per category, e.g. 1/world for sharded weights).
Tensors of at most :data:`SMALL` elements made from real inputs are computed for real, so data-dependent
Python (``if x.any()``) runs unchanged. Used by the dry run (:mod:`sora.training.dry_run`).
"""

from __future__ import annotations

import weakref

import torch
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException, FakeTensor,
                                           FakeTensorMode)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

SMALL = 1 << 20  # elements: tensors made from real inputs up to this size are computed for real
CATEGORIES = ("weights", "frozen", "buffers", "gradients", "optimizer", "ema", "activations")
_INDEX_OPS = (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default)


class MemoryTracker(TorchDispatchMode):
    """A dispatch mode that runs ops on fake tensors (``fake=False``: for real) and counts the bytes
    of every live storage by category; ``peak`` is the largest weighted total seen (``factors``:
    per category, e.g. 1/world for sharded weights), ``at_peak`` its breakdown."""

    def __init__(self, factors: dict[str, float] | None = None, fake: bool = True):
        super().__init__()
        self.fake = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
        self.factors = {**dict.fromkeys(CATEGORIES, 1.0), **(factors or {})}
        self.live = dict.fromkeys(CATEGORIES, 0)
        self.category = "activations"  # of the tensors that ops make
        self._storages: dict[int, tuple] = {}  # id(storage) -> (weakref, category, bytes)
        self.reset_peak()

    def total(self) -> float:
        return sum(self.factors[c] * n for c, n in self.live.items())

    def reset_peak(self) -> None:
        self.peak, self.at_peak = self.total(), dict(self.live)

    def add(self, tensor: torch.Tensor, category: str | None = None) -> None:
        """Count ``tensor``'s storage once; given a ``category``, a counted storage moves to it."""
        storage = tensor.untyped_storage()
        key = id(storage)
        entry = self._storages.get(key)
        if entry is not None and entry[0]() is storage:
            if category is None or category == entry[1]:
                return
            self.live[entry[1]] -= entry[2]
        else:
            entry = (weakref.ref(storage, lambda _, key=key: self._free(key)), None, storage.nbytes())
        category = category or self.category
        self.live[category] += entry[2]
        self._storages[key] = (entry[0], category, entry[2])
        if self.total() > self.peak:
            self.peak, self.at_peak = self.total(), dict(self.live)

    def _free(self, key: int) -> None:
        _, category, nbytes = self._storages.pop(key)
        self.live[category] -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.prim.device.default:  # asked of fake tensors all the time; makes no tensor
            return args[0].fake_device if isinstance(args[0], FakeTensor) else func(*args)
        out = self._run(func, args, kwargs or {}) if self.fake else func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out

    def _run(self, func, args, kwargs):
        if any(isinstance(t, FakeTensor) for t in tree_flatten((args, kwargs))[0]):
            if func in _INDEX_OPS:  # a real boolean mask indexes by its (real) nonzero positions
                index = [j for i in args[1] for j in (i.nonzero(as_tuple=True) if isinstance(i, torch.Tensor) and not
                                                      isinstance(i, FakeTensor) and i.dtype == torch.bool else (i,))]
                args = (args[0], index, *args[2:])
            with self.fake:
                return func(*args, **kwargs)
        if func._schema.is_mutable:  # in place on real inputs: real, as small as they are
            return func(*args, **kwargs)
        try:  # real inputs: fake first to learn the outputs' sizes, then for real when small
            with self.fake:
                out = func(*args, **kwargs)
            small = all(t.numel() <= SMALL for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        except (DataDependentOutputException, DynamicOutputShapeException):
            small = True
        return func(*args, **kwargs) if small else out
