"""Reconstruction metrics, one value per sample: PSNR and SSIM for video, SI-SDR and log-mel L1
for audio. Inputs are torch tensors (arrays are accepted and converted); outputs are ``[B]``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def _tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x), dtype=torch.float64)


def _same_shape(x, y, names=("x", "y")):
    if x.shape != y.shape:
        raise ValueError(f"{names[0]} has shape {tuple(x.shape)} but {names[1]} has {tuple(y.shape)}, expected equal")


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per sample ``[B]`` (video in [-1, 1]: range 2).

    ``10 log10(data_range^2 / mse)`` with the MSE over all but the first dim, floored at
    1e-10 (identical inputs give a finite ~100 dB for range 1). float32 output.
    """
    x, y = _tensor(x), _tensor(y)
    _same_shape(x, y)
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return (10.0 * torch.log10(data_range**2 / mse)).float()


def trivial_psnr(x: torch.Tensor, mean_frame: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """PSNR ``[B]`` of the two reconstructions that know nothing of motion, for video ``[B, 3, T, H, W]``
    in [-1, 1]: ``still``, each clip's temporal median frame shown for every frame; ``mean_frame``,
    one frame ``[3, H, W]`` for every clip (default: the mean over the batch's clips and frames).
    A video autoencoder whose PSNR is not above both has learnt the background, not the clips."""
    x = _tensor(x)
    still = x.median(dim=2, keepdim=True).values.expand_as(x)
    mean_frame = x.mean(dim=(0, 2)) if mean_frame is None else _tensor(mean_frame)
    return {"still": psnr(still, x), "mean_frame": psnr(mean_frame[None, :, None].expand_as(x), x)}


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalised 1D Gaussian ``[size]`` (float64), centred on the middle tap."""
    t = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    return g / g.sum()


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian filter of images ``[N, 1, H, W]``."""
    x = F.conv2d(x, g.view(1, 1, -1, 1))
    return F.conv2d(x, g.view(1, 1, 1, -1))


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Structural similarity per sample ``[B]`` of videos ``[B, C, T, H, W]`` (or images
    ``[B, C, H, W]``), float64.

    Per frame and channel, the SSIM map of Wang et al. (2004): 11x11 Gaussian window,
    sigma 1.5, ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2`` with ``L = data_range``, population
    (not sample) variances, computed only where the window fits in the frame ('valid', as
    skimage's ``gaussian_weights=True, use_sample_covariance=False``; torchmetrics 1.9 also
    averages its reflect-padded border, so it reads slightly differently on small frames).
    The map is averaged over pixels, then channels and frames.
    Frames must be at least 11x11.
    """
    x, y = _tensor(x), _tensor(y)
    _same_shape(x, y)
    if x.dim() == 4:
        x, y = x.unsqueeze(2), y.unsqueeze(2)
    if x.dim() != 5:
        raise ValueError(f"ssim: x has {x.dim()} dims (shape {tuple(x.shape)}), expected [B, C, T, H, W]")
    b, c, t, h, w = x.shape
    if min(h, w) < SSIM_WINDOW:
        raise ValueError(f"ssim: frames are {h}x{w}, need at least {SSIM_WINDOW}x{SSIM_WINDOW}")
    g = gaussian_window().to(x.device)
    xf, yf = (v.double().reshape(b * c * t, 1, h, w) for v in (x, y))
    mu_x, mu_y = _blur(xf, g), _blur(yf, g)
    var_x = _blur(xf * xf, g) - mu_x**2
    var_y = _blur(yf * yf, g) - mu_y**2
    cov_xy = _blur(xf * yf, g) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    smap = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return smap.reshape(b, -1).mean(1)


def si_sdr(estimate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Scale-invariant signal-to-distortion ratio in dB per sample ``[B]`` (Le Roux et al. 2019).

    Waveforms ``[B, N]`` or ``[B, C, N]``. Both are made zero-mean along time; with
    ``alpha = <e, r> / ||r||^2``, ``SI-SDR = 10 log10(||alpha r||^2 / ||e - alpha r||^2)``
    per channel (float64, eps = float64 machine epsilon in numerator and denominator as in
    torchmetrics), then averaged over channels. Multiplying ``estimate`` by a nonzero scalar
    does not change it.
    """
    e, r = _tensor(estimate).double(), _tensor(reference).double()
    _same_shape(e, r, ("estimate", "reference"))
    if e.dim() not in (2, 3):
        raise ValueError(f"si_sdr: estimate has {e.dim()} dims (shape {tuple(e.shape)}), expected [B, N] or [B, C, N]")
    eps = torch.finfo(torch.float64).eps
    e, r = e - e.mean(-1, keepdim=True), r - r.mean(-1, keepdim=True)
    alpha = ((e * r).sum(-1, keepdim=True) + eps) / ((r * r).sum(-1, keepdim=True) + eps)
    target = alpha * r
    noise = e - target
    value = 10.0 * torch.log10(((target**2).sum(-1) + eps) / ((noise**2).sum(-1) + eps))
    return value.reshape(value.shape[0], -1).mean(1)


def _mono_channels_16k(wave: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """``[B, N]`` / ``[B, C, N]`` at ``sample_rate`` -> ``[B * C, N']`` float64 at 16 kHz."""
    if wave.dim() == 2:
        wave = wave.unsqueeze(1)
    if wave.dim() != 3:
        raise ValueError(f"mel_distance: waveform has {wave.dim()} dims (shape {tuple(wave.shape)}), "
                         "expected [B, N] or [B, C, N]")
    flat = wave.double().reshape(-1, wave.shape[-1])
    if sample_rate != 16000:
        from scipy.signal import resample_poly

        g = math.gcd(int(sample_rate), 16000)
        resampled = resample_poly(flat.cpu().numpy(), 16000 // g, int(sample_rate) // g, axis=-1)
        flat = torch.from_numpy(resampled).to(wave.device)
    return flat


def mel_distance(a: torch.Tensor, b: torch.Tensor, sample_rate: int = 16000) -> torch.Tensor:
    """Mean absolute difference of log-mel spectrograms per sample ``[B]`` (nats of magnitude).

    Waveforms ``[B, N]`` or ``[B, C, N]`` at ``sample_rate`` (each channel separately, then
    averaged) are resampled to 16 kHz (``scipy.signal.resample_poly``) and turned into the
    audio VAE's log-mel (:class:`sora.models.mel.MelSpectrogram` defaults: centred STFT,
    n_fft 1024, Hann, hop 160, 64 Slaney mel bands 0-8 kHz, ``log(clamp(mel, 1e-5))`` of the
    magnitude), computed in float64: the same quantity as the training logs' ``mel_l1``.
    Needs more than 512 samples at 16 kHz.
    """
    from sora.models.mel import MelSpectrogram

    a, b = _tensor(a), _tensor(b)
    _same_shape(a, b, ("a", "b"))
    mel = MelSpectrogram().double().to(a.device)
    fa, fb = _mono_channels_16k(a, sample_rate), _mono_channels_16k(b, sample_rate)
    if fa.shape[-1] <= mel.n_fft // 2:
        raise ValueError(f"mel_distance: {fa.shape[-1]} samples at 16 kHz, need more than {mel.n_fft // 2}")
    diff = (mel(fa) - mel(fb)).abs()
    return diff.reshape(a.shape[0], -1).mean(1)
