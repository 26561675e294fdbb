"""The audio autoencoder: a log-mel VAE with a KL latent at 25 steps/s, and a vocoder back to waveform.

Timing (see :mod:`sora.timeline`), defaults 16 kHz / hop 160 / stride 4:

* Log-mel features come from :class:`sora.models.mel.MelSpectrogram`: ``N`` samples give
  exactly ``N // hop`` frames (100 frames/s).
* ``AudioVAE`` maps ``[B, n_mels, F]`` to a latent ``[B, latent_channels, F // stride]``
  (25 steps/s); ``F`` must be a multiple of ``stride``.
* ``Vocoder`` (and the Griffin-Lim fallback, :func:`sora.models.mel.griffin_lim`) map
  ``[B, n_mels, F]`` back to exactly ``F * hop`` samples.

The vocoder's reconstruction losses are in :mod:`sora.models.mel`; its optional adversarial
training (multi-period discriminator) in :mod:`sora.models.gan`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from sora.models.distributions import DiagonalGaussian  # re-exported
from sora.models.dtypes import as_weights
from sora.models.mel import MelSpectrogram, mel_loss, mel_to_wave, multi_resolution_stft_loss


# ------------------------------------------------------------------------------------------
# Audio VAE
# ------------------------------------------------------------------------------------------

class ResBlock1d(nn.Module):
    """GroupNorm -> SiLU -> conv3 (x2) with a residual connection."""

    def __init__(self, channels, dilation=1):
        super().__init__()
        groups = math.gcd(32, channels)
        self.block = nn.Sequential(
            nn.GroupNorm(groups, channels), nn.SiLU(),
            nn.Conv1d(channels, channels, 3, padding=dilation, dilation=dilation),
            nn.GroupNorm(groups, channels), nn.SiLU(),
            nn.Conv1d(channels, channels, 3, padding=1))

    def forward(self, x):
        return x + self.block(x)


class AudioVAE(nn.Module):
    """Log-mel [B, n_mels, F] <-> KL latent [B, latent_channels, F // stride].

    Encoder: conv_in, ``num_blocks`` residual blocks at the mel rate, a strided conv
    (kernel = stride), ``num_blocks`` blocks at the latent rate, conv to mean/logvar.
    The decoder mirrors it with nearest upsampling. Receptive field: a few dozen mel frames.
    Log-mel is standardised with fixed ``(mel - mel_mean) / mel_std`` going in and undone
    coming out, so an untrained decoder starts near a typical log-mel level.
    """

    def __init__(self, n_mels=64, latent_channels=8, channels=128, stride=4, num_blocks=2,
                 sample_rate=16000, n_fft=1024, hop=160, fmin=0.0, fmax=8000.0,
                 mel_mean=-5.0, mel_std=4.0, vocoder=None):
        super().__init__()
        self.stride, self.latent_channels = stride, latent_channels
        self.mel_mean, self.mel_std = mel_mean, mel_std
        self.mel = MelSpectrogram(sample_rate, n_fft, hop, n_mels, fmin, fmax)
        self.vocoder = vocoder  # optional nn.Module used by decode_audio; Griffin-Lim otherwise
        dil = lambda i: 2 ** (i % 3)  # noqa: E731  dilations 1, 2, 4, 1, ...
        self.encoder = nn.Sequential(
            nn.Conv1d(n_mels, channels, 3, padding=1),
            *[ResBlock1d(channels, dil(i)) for i in range(num_blocks)],
            nn.Conv1d(channels, channels, stride, stride=stride),
            *[ResBlock1d(channels, dil(i)) for i in range(num_blocks)],
            nn.GroupNorm(math.gcd(32, channels), channels), nn.SiLU(),
            nn.Conv1d(channels, 2 * latent_channels, 3, padding=1))
        self.decoder = nn.Sequential(
            nn.Conv1d(latent_channels, channels, 3, padding=1),
            *[ResBlock1d(channels, dil(i)) for i in range(num_blocks)],
            nn.Upsample(scale_factor=stride, mode="nearest"),
            nn.Conv1d(channels, channels, 3, padding=1),
            *[ResBlock1d(channels, dil(i)) for i in range(num_blocks)],
            nn.GroupNorm(math.gcd(32, channels), channels), nn.SiLU(),
            nn.Conv1d(channels, n_mels, 3, padding=1))

    def encode(self, mel) -> DiagonalGaussian:
        if mel.shape[-1] % self.stride:
            raise ValueError(f"audio_vae: {mel.shape[-1]} mel frames are not a multiple of "
                             f"stride={self.stride}; cut clips with sora.timeline.Timeline")
        x = (mel - self.mel_mean) / self.mel_std
        return DiagonalGaussian(self.encoder(as_weights(self.encoder, x)))

    def decode(self, z):
        return self.decoder(as_weights(self.decoder, z)) * self.mel_std + self.mel_mean

    def forward(self, mel, sample=True):
        posterior = self.encode(mel)
        z = posterior.sample() if sample else posterior.mode()
        return self.decode(z), posterior

    def loss(self, mel, recon, posterior, kl_weight=1e-4):
        l1 = (recon - mel).abs().mean()
        kl = posterior.kl(per_element=True).mean()
        return dict(loss=l1 + kl_weight * kl, l1=l1, kl=kl)

    def encode_audio(self, wave) -> DiagonalGaussian:
        """Waveform [B, N] or [B, 1, N] -> posterior over [B, C, N // (hop * stride)]."""
        return self.encode(self.mel(wave))

    def decode_audio(self, z, vocoder=None):
        """Latent -> waveform [B, 1, T * stride * hop] via the vocoder (or Griffin-Lim)."""
        mel = self.decode(z)
        m = self.mel
        return mel_to_wave(mel, vocoder if vocoder is not None else self.vocoder,
                           sample_rate=m.sample_rate, n_fft=m.n_fft, hop=m.hop, fmin=m.fmin,
                           fmax=m.fmax)


# ------------------------------------------------------------------------------------------
# Vocoder (HiFi-GAN-like generator)
# ------------------------------------------------------------------------------------------

class VocoderResBlock(nn.Module):
    """HiFi-GAN ResBlock1: dilated conv + conv pairs, each with a residual connection."""

    def __init__(self, channels, kernel_size=3, dilations=(1, 3, 5)):
        super().__init__()
        pad = lambda d: d * (kernel_size - 1) // 2  # noqa: E731
        self.convs1 = nn.ModuleList(nn.Conv1d(channels, channels, kernel_size, dilation=d,
                                              padding=pad(d)) for d in dilations)
        self.convs2 = nn.ModuleList(nn.Conv1d(channels, channels, kernel_size,
                                              padding=(kernel_size - 1) // 2) for _ in dilations)

    def forward(self, x):
        for c1, c2 in zip(self.convs1, self.convs2):
            x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, 0.1)), 0.1))
        return x


class Vocoder(nn.Module):
    """Log-mel [B, n_mels, F] -> waveform [B, 1, F * hop] in [-1, 1].

    Transposed convs upsample by ``upsample`` (product == hop), halving channels each time;
    each level adds a HiFi-GAN residual block. Kernel ``2u + u % 2`` with padding
    ``(k - u) // 2`` makes every level exact (length * u), odd factors included.
    """

    def __init__(self, n_mels=64, hop=160, channels=256, upsample=(5, 4, 4, 2), kernel_size=3,
                 dilations=(1, 3, 5), sample_rate=16000, n_fft=1024, fmin=0.0, fmax=8000.0):
        super().__init__()
        if math.prod(upsample) != hop:
            raise ValueError(f"vocoder.upsample={tuple(upsample)}: product must equal hop={hop}")
        self.hop = hop
        self.mel = MelSpectrogram(sample_rate, n_fft, hop, n_mels, fmin, fmax)  # for mel_loss
        self.conv_pre = nn.Conv1d(n_mels, channels, 7, padding=3)
        self.ups, self.blocks = nn.ModuleList(), nn.ModuleList()
        ch = channels
        for u in upsample:
            k = 2 * u + u % 2
            out = max(ch // 2, 1)
            self.ups.append(nn.ConvTranspose1d(ch, out, k, stride=u, padding=(k - u) // 2))
            ch = out
            self.blocks.append(VocoderResBlock(ch, kernel_size, dilations))
        self.conv_post = nn.Conv1d(ch, 1, 7, padding=3)

    def forward(self, mel):
        x = self.conv_pre(as_weights(self, mel))
        for up, block in zip(self.ups, self.blocks):
            x = block(up(F.leaky_relu(x, 0.1)))
        return torch.tanh(self.conv_post(F.leaky_relu(x, 0.1)))

    def loss(self, mel, wave, mel_weight=1.0, stft_weight=1.0):
        """Reconstruction losses for (mel, wave) pairs; returns dict(loss, stft, mel, pred)."""
        pred = self(mel)
        stft = multi_resolution_stft_loss(pred, wave)
        ml = mel_loss(pred, wave, self.mel)
        return dict(loss=stft_weight * stft + mel_weight * ml, stft=stft, mel=ml, pred=pred)
