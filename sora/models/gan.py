"""Adversarial training add-ons of both autoencoders: discriminators and their losses.

* Audio (the vocoder, :class:`sora.models.audio_vae.Vocoder`): HiFi-GAN's multi-period
  discriminator, LSGAN or hinge losses, and discriminator feature matching.
* Video (:class:`sora.models.video_vae.VideoVAE`): a small 3D-conv PatchGAN, hinge losses, and
  VQGAN's adaptive weight balancing the generator term against reconstruction (used by
  :meth:`sora.models.video_vae.VideoVAE.loss`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from sora.models.dtypes import as_weights


# ------------------------------------------------------------------------------------------
# Audio: HiFi-GAN multi-period discriminator, LSGAN or hinge
# ------------------------------------------------------------------------------------------

class PeriodDiscriminator(nn.Module):
    """Folds [B, 1, T] into [B, 1, T / period, period] and runs (k, 1) 2D convs."""

    def __init__(self, period, channels=16, num_layers=4):
        super().__init__()
        self.period = period
        chans = [1] + [channels * 2 ** min(i, 2) for i in range(num_layers)]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, (5, 1), (3, 1), padding=(2, 0))
                                   for a, b in zip(chans[:-1], chans[1:]))
        self.conv_post = nn.Conv2d(chans[-1], 1, (3, 1), padding=(1, 0))

    def forward(self, wave):
        wave = as_weights(self, wave)
        pad = -wave.shape[-1] % self.period
        x = F.pad(wave, (0, pad), mode="reflect") if pad else wave
        x = rearrange(x, "b c (t p) -> b c t p", p=self.period)
        features = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.1)
            features.append(x)
        return rearrange(self.conv_post(x), "b 1 t p -> b (t p)"), features


class MultiPeriodDiscriminator(nn.Module):
    """[B, 1, T] -> list of (logits [B, *], features) over periods (2, 3, 5, 7, 11)."""

    def __init__(self, periods=(2, 3, 5, 7, 11), channels=16, num_layers=4):
        super().__init__()
        self.discriminators = nn.ModuleList(PeriodDiscriminator(p, channels, num_layers)
                                            for p in periods)

    def forward(self, wave):
        return [d(wave) for d in self.discriminators]


def discriminator_loss(real_outs, fake_outs, kind="lsgan"):
    """Real -> 1, fake -> 0 (LSGAN), or hinge; summed over sub-discriminators."""
    loss = 0.0
    for (real, _), (fake, _) in zip(real_outs, fake_outs):
        if kind == "hinge":
            loss = loss + F.relu(1 - real).mean() + F.relu(1 + fake).mean()
        else:
            loss = loss + ((real - 1) ** 2).mean() + (fake ** 2).mean()
    return loss


def generator_adversarial_loss(fake_outs, kind="lsgan"):
    """LSGAN: fake -> 1; hinge: -D(fake)."""
    return sum((-fake).mean() if kind == "hinge" else ((fake - 1) ** 2).mean()
               for fake, _ in fake_outs)


def feature_matching_loss(real_outs, fake_outs):
    """L1 between discriminator features of real (detached) and generated audio."""
    return sum(F.l1_loss(f, r.detach()) for (_, rf), (_, ff) in zip(real_outs, fake_outs)
               for r, f in zip(rf, ff))


# ------------------------------------------------------------------------------------------
# Video: 3D PatchGAN, hinge losses, adaptive weight
# ------------------------------------------------------------------------------------------

class PatchDiscriminator3D(nn.Module):
    """Small 3D-conv PatchGAN: [B, 3, T, H, W] -> patch logits [B, 1, T', H/8, W/8]."""

    def __init__(self, base_channels: int = 32, num_layers: int = 3):
        super().__init__()
        layers, ch = [nn.Conv3d(3, base_channels, (3, 4, 4), stride=(1, 2, 2), padding=(1, 1, 1))], base_channels
        for i in range(1, num_layers):
            c = base_channels * 2 ** min(i, 3)
            layers += [nn.LeakyReLU(0.2), nn.Conv3d(ch, c, (3, 4, 4), stride=(2 if i == 1 else 1, 2, 2), padding=1),
                       nn.GroupNorm(min(32, c // 4), c)]
            ch = c
        layers += [nn.LeakyReLU(0.2), nn.Conv3d(ch, 1, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(as_weights(self, x))


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()


def adaptive_weight(rec_loss: torch.Tensor, adv_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """VQGAN's balance (Esser et al. 2021): ``|d rec / d W| / |d adv / d W|`` at the decoder's last
    weight ``W``, detached, so an adversarial term scaled by it pushes ``W`` as hard as the
    reconstruction does. Without a graph (validation) it is 0."""
    if not (rec_loss.requires_grad and adv_loss.requires_grad):
        return rec_loss.new_zeros(())
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(max=max_weight).detach()
