"""The diagonal Gaussian posterior shared by the video and audio VAEs."""

from __future__ import annotations

import torch

from sora.models.dtypes import at_least_float32


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) from encoder moments [B, 2C, ...] split on channels; at least
    float32 whatever the encoder computed in (latents, samples and the KL; float64 stays float64)."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = at_least_float32(moments).chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, per_element: bool = False) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, [B]: summed over latent elements, or their mean."""
        kl = 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).flatten(1)
        return kl.mean(1) if per_element else kl.sum(1)
