"""Log-mel signal processing for the audio path: features, spectral losses, Griffin-Lim.

Timing (see :mod:`sora.timeline`), defaults 16 kHz / hop 160:

* ``MelSpectrogram`` uses a *centred* STFT (reflect padding ``n_fft // 2``) and drops the
  extra trailing frame, so ``N`` samples give exactly ``N // hop`` = ``Timeline.num_mel_frames``
  frames, frame ``m`` centred on sample ``m * hop`` (100 frames/s).
* ``griffin_lim`` maps ``[B, n_mels, F]`` back to exactly ``F * hop`` samples; ``mel_to_wave``
  picks a vocoder (:class:`sora.models.audio_vae.Vocoder`) when given, Griffin-Lim otherwise.

Log-mel is ``log(clamp(mel_basis @ |STFT|, 1e-5))`` (magnitude, not power; Slaney mel scale
and area normalisation, as librosa's default), the HiFi-GAN convention. The vocoder's
reconstruction losses live here too: the multi-resolution STFT loss and the log-mel L1.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from sora.models.dtypes import at_least_float32

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
