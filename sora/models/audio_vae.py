"""Audio VAE and audio decoder: log-mel features, a KL latent at 25 steps/s, a vocoder.

Timing (see :mod:`sora.timeline`), defaults 16 kHz / hop 160 / stride 4:

* ``MelSpectrogram`` uses a *centred* STFT (reflect padding ``n_fft // 2``) and drops the
  extra trailing frame, so ``N`` samples give exactly ``N // hop`` = ``Timeline.num_mel_frames``
  frames, frame ``m`` centred on sample ``m * hop`` (100 frames/s).
* ``AudioVAE`` maps ``[B, n_mels, F]`` to a latent ``[B, latent_channels, F // stride]``
  (25 steps/s); ``F`` must be a multiple of ``stride``.
* ``Vocoder`` and ``griffin_lim`` map ``[B, n_mels, F]`` back to exactly ``F * hop`` samples.

Log-mel is ``log(clamp(mel_basis @ |STFT|, 1e-5))`` (magnitude, not power; Slaney mel scale
and area normalisation, as librosa's default), the HiFi-GAN convention.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from sora.models.distributions import DiagonalGaussian  # re-exported
from sora.models.dtypes import as_weights, at_least_float32

LOG_EPS = 1e-5
STFT_RESOLUTIONS = ((512, 128, 512), (1024, 256, 1024), (256, 64, 256))  # (n_fft, hop, win)


# ------------------------------------------------------------------------------------------
# Log-mel features
# ------------------------------------------------------------------------------------------

def hz_to_mel(f):
    """Slaney mel scale: linear below 1 kHz, logarithmic above (librosa htk=False)."""
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, math.log(6.4) / 27.0
    mel = f / f_sp
    log_part = min_log_hz / f_sp + np.log(np.maximum(f, min_log_hz) / min_log_hz) / logstep
    return np.where(f >= min_log_hz, log_part, mel)


def mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, math.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filterbank(sample_rate=16000, n_fft=1024, n_mels=64, fmin=0.0, fmax=8000.0):
    """[n_mels, n_fft // 2 + 1] triangular Slaney-normalised filters; also the centre freqs."""
    fft_freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    lower = (fft_freqs[None] - edges[:-2, None]) / np.diff(edges)[:-1, None]
    upper = (edges[2:, None] - fft_freqs[None]) / np.diff(edges)[1:, None]
    fb = np.maximum(0.0, np.minimum(lower, upper)) * (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return fb.astype(np.float32), edges[1:-1]


class MelSpectrogram(nn.Module):
    """Waveform [B, N] or [B, 1, N] -> log-mel [B, n_mels, N // hop] (N > n_fft // 2)."""

    def __init__(self, sample_rate=16000, n_fft=1024, hop=160, n_mels=64, fmin=0.0, fmax=8000.0):
        super().__init__()
        self.sample_rate, self.n_fft, self.hop, self.n_mels = sample_rate, n_fft, hop, n_mels
        self.fmin, self.fmax = fmin, fmax
        fb, centres = mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax)
        self.register_buffer("mel_basis", torch.from_numpy(fb), persistent=False)
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.center_freqs = centres  # Hz, one per mel bin

    def magnitude(self, wave):
        """|STFT| [B, n_fft // 2 + 1, N // hop] with the centred framing described above."""
        if wave.dim() == 3:
            wave = rearrange(wave, "b 1 n -> b n")
        # at least float32 whatever a strategy cast the module to (bf16 STFTs lose the quiet bins);
        # float64 when the module was made double
        window = at_least_float32(self.window)
        spec = torch.stft(wave.to(window.dtype), self.n_fft, self.hop, window=window,
                          center=True, pad_mode="reflect", return_complex=True)
        return spec.abs()[..., : wave.shape[-1] // self.hop]

    def forward(self, wave):
        mel = torch.einsum("mf,bft->bmt", at_least_float32(self.mel_basis), self.magnitude(wave))
        return torch.log(torch.clamp(mel, min=LOG_EPS))


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


# ------------------------------------------------------------------------------------------
# Optional adversarial training: HiFi-GAN multi-period discriminator, LSGAN or hinge
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
# Losses
# ------------------------------------------------------------------------------------------

def stft_magnitude(x, n_fft, hop, win_length):
    """|STFT| [B, frames, bins] (centred, Hann), floored at 1e-7 power as Parallel WaveGAN; float32."""
    if x.dim() == 3:
        x = rearrange(x, "b 1 n -> b n")
    x = at_least_float32(x)  # a loss: float32 whatever the vocoder computed in
    window = torch.hann_window(win_length, device=x.device, dtype=x.dtype)
    spec = torch.stft(x, n_fft, hop, win_length, window=window, return_complex=True)
    mag = torch.sqrt(torch.clamp(spec.real ** 2 + spec.imag ** 2, min=1e-7))
    return rearrange(mag, "b f t -> b t f")


def stft_loss_terms(pred, target, resolutions=STFT_RESOLUTIONS):
    """(spectral convergence, log STFT magnitude L1), each averaged over resolutions."""
    sc, mag = 0.0, 0.0
    for n_fft, hop, win in resolutions:
        p, t = stft_magnitude(pred, n_fft, hop, win), stft_magnitude(target, n_fft, hop, win)
        sc = sc + torch.linalg.norm(t - p) / torch.linalg.norm(t)
        mag = mag + F.l1_loss(torch.log(p), torch.log(t))
    return sc / len(resolutions), mag / len(resolutions)


def multi_resolution_stft_loss(pred, target, resolutions=STFT_RESOLUTIONS):
    """Parallel WaveGAN multi-resolution STFT loss: spectral convergence + log magnitude."""
    sc, mag = stft_loss_terms(pred, target, resolutions)
    return sc + mag


def mel_loss(pred, target, mel: MelSpectrogram):
    """L1 between log-mels of two waveforms."""
    return F.l1_loss(mel(pred), mel(target))


# ------------------------------------------------------------------------------------------
# Griffin-Lim fallback
# ------------------------------------------------------------------------------------------

def griffin_lim(mel, n_iter=32, sample_rate=16000, n_fft=1024, hop=160, fmin=0.0, fmax=8000.0,
                momentum=0.99, nnls_iter=32, seed=0):
    """Log-mel [B, n_mels, F] -> waveform [B, 1, F * hop], no learning.

    The mel filterbank is inverted by non-negative least squares: the pseudo-inverse, clamped
    > 0, refined by ``nnls_iter`` Lee-Seung multiplicative updates (they keep it >= 0 and cut
    the log-mel error of the clamped pseudo-inverse ~10x in quiet bins). Phase is
    recovered with fast Griffin-Lim (momentum, Perraudin et al. 2013). The mel frames are the
    first F of a centred STFT of F * hop samples, which has F + 1 frames: the last frame is
    repeated and ``istft(length=F * hop)`` trims to the exact clip length.
    """
    n_mels, frames = mel.shape[-2:]
    fb_np, _ = mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax)
    fb, inv = torch.from_numpy(fb_np).to(mel), torch.from_numpy(np.linalg.pinv(fb_np)).to(mel)
    target = mel.exp()
    mag = torch.einsum("fm,bmt->bft", inv, target).clamp(min=1e-8)
    fb_target = torch.einsum("mf,bmt->bft", fb, target)
    for _ in range(nnls_iter):  # min ||fb @ mag - target||, mag >= 0
        mag = mag * fb_target / torch.einsum("mf,mg,bgt->bft", fb, fb, mag).clamp(min=1e-12)
    mag = torch.cat([mag, mag[..., -1:]], dim=-1)
    length, window = frames * hop, torch.hann_window(n_fft, device=mel.device, dtype=mel.dtype)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    phase = torch.exp(2j * math.pi * torch.rand(mag.shape, generator=gen)).to(mel.device)
    stft = lambda w: torch.stft(w, n_fft, hop, window=window, return_complex=True)  # noqa: E731
    istft = lambda s: torch.istft(s, n_fft, hop, window=window, length=length)  # noqa: E731
    prev = torch.zeros_like(phase)
    for _ in range(n_iter):
        rebuilt = stft(istft(mag * phase))
        angles = rebuilt - momentum / (1 + momentum) * prev
        phase = angles / angles.abs().clamp(min=1e-16)
        prev = rebuilt
    return rearrange(istft(mag * phase), "b n -> b 1 n")


def mel_to_wave(mel, vocoder=None, **griffin_lim_kwargs):
    """The audio decoder switch: the vocoder when given, Griffin-Lim otherwise."""
    if vocoder is not None:
        return vocoder(mel)
    return griffin_lim(mel, **griffin_lim_kwargs)
