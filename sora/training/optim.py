"""AdamW with a linear warm-up, then cosine decay or a constant rate (``LambdaLR``, per step); fused where torch
has the kernel, and gradient clipping that works with it under bf16-mixed."""

from __future__ import annotations

import math
from functools import partial
from typing import Iterable

import torch

SCHEDULES = ("cosine", "constant")


def lr_factor(step: int, warmup_steps: int = 0, total_steps: int | None = None, schedule: str = "cosine",
              min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

    Warm-up: ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps (so step 0 already
    moves the weights). Then ``constant``: 1; ``cosine``: from 1 down to ``min_lr_ratio`` at
    ``total_steps`` (and held there after), following half a cosine. Cosine without
    ``total_steps`` is constant.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}: choose from {SCHEDULES}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or not total_steps or total_steps <= 0:
        return 1.0
    progress = min(1.0, max(0, step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def fusable(p: torch.Tensor) -> bool:
    """Whether torch's fused AdamW kernel takes this parameter (its device type and a floating dtype)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return p.device.type in _get_fused_kernels_supported_devices() and torch.is_floating_point(p)


def adamw_with_schedule(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.0,
                        betas=(0.9, 0.99), warmup_steps: int = 0, total_steps: int | None = None,
                        schedule: str = "cosine", min_lr_ratio: float = 0.0, fused: bool | None = None) -> dict:
    """The ``configure_optimizers`` return value: AdamW and its per-step ``LambdaLR``.

    ``params``: parameters, or groups ``{"params": [...], "lr": ...}`` (without ``lr``: ``lr``).
    Parameters of one dimension (norm gains, biases) get no weight decay. ``fused`` (None: wherever torch has
    the kernel for the parameters' device and dtype): one kernel for every update, which also skips a step
    on a device flag (``found_inf``) without a host sync (:class:`sora.training.guards.NonFiniteGuard`).
    """
    params = list(params)
    given = params if params and isinstance(params[0], dict) else [{"params": params}]
    groups = [d for g in given for d in decay_groups(g["params"], weight_decay, lr=g.get("lr", lr))]
    if not groups:
        raise ValueError("no trainable parameters")
    if fused is None:
        fused = all(fusable(p) for g in groups for p in g["params"])
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=bool(fused))
    return scheduled(optimizer, warmup_steps, total_steps, schedule, min_lr_ratio)


def decay_groups(params: Iterable[torch.nn.Parameter], weight_decay: float, **extra) -> list[dict]:
    """The trainable ``params`` as param groups: matrices with ``weight_decay``, one-dimensional ones (norm gains,
    biases) without; ``extra`` keys in both; empty groups left out."""
    ps = [p for p in params if p.requires_grad]
    return [g for g in ({"params": [p for p in ps if p.ndim >= 2], "weight_decay": weight_decay, **extra},
                        {"params": [p for p in ps if p.ndim < 2], "weight_decay": 0.0, **extra}) if g["params"]]


def scheduled(optimizer: torch.optim.Optimizer, warmup_steps: int = 0, total_steps: int | None = None,
              schedule: str = "cosine", min_lr_ratio: float = 0.0) -> dict:
    """``optimizer`` with its per-step ``LambdaLR`` of :func:`lr_factor`, as ``configure_optimizers`` returns them."""
    fn = partial(lr_factor, warmup_steps=int(warmup_steps), total_steps=total_steps, schedule=schedule,
                 min_lr_ratio=float(min_lr_ratio))
    fn(0)  # a bad schedule name fails here, not at the first step
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


def fused_for(trainer) -> bool | None:
    """``fused`` for :func:`adamw_with_schedule` under ``trainer``: auto, except with a GradScaler (``16-mixed``),
    which hands a fused optimizer scaled gradients to unscale in its kernel: clipping them first would be wrong."""
    return False if getattr(getattr(trainer, "precision_plugin", None), "scaler", None) is not None else None


def clip_gradients(module, optimizer, clip_val, algorithm) -> None:
    """A module's ``configure_gradient_clipping``: Lightning's, except that its mixed-precision plugin refuses any
    fused optimizer (under a GradScaler it would clip scaled gradients); without a scaler (bf16-mixed) nothing
    is scaled, so the base plugin's clipping is right."""
    from lightning.pytorch.plugins.precision import Precision
    from lightning.pytorch.utilities import GradClipAlgorithmType

    plugin = module.trainer.precision_plugin
    if clip_val and getattr(plugin, "scaler", None) is None and getattr(optimizer, "_step_supports_amp_scaling", False):
        Precision.clip_gradients(plugin, optimizer, clip_val, GradClipAlgorithmType(algorithm or "norm"))
    else:
        module.clip_gradients(optimizer, gradient_clip_val=clip_val, gradient_clip_algorithm=algorithm)
