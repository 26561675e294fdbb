"""Models compute in their weights' dtype, whatever float dtype their inputs come in.

A strategy may cast a whole LightningModule (DeepSpeed's bf16 casts every parameter, frozen VAEs
and vocoder included) while batches, noise and cached latents stay float32. Each model's entry
points pass their float inputs through :func:`as_weights`; posteriors and losses stay float32.
"""

from __future__ import annotations

import torch
from torch import nn


def weights_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of ``module``'s first floating parameter (float32 when it has none)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def as_weights(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` in ``module``'s weights' dtype (a no-op when they agree, and under autocast: fp32 weights)."""
    return x.to(weights_dtype(module)) if x.is_floating_point() else x


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` promoted to float32 when it is a narrower float (bf16, fp16); float64 stays float64.
    For what must not lose precision whatever the model computed in: posteriors, STFT/mel DSP, losses."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
