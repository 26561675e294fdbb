"""Pretrained audio embedding networks, re-implemented so their released weights load as is.

* :class:`VGGish` -- torchvggish's port of Google's VGGish (Hershey et al. 2017). State dict
  keys as in ``vggish-10086976.pth``: ``features.{0,3,6,8,11,13}`` (3x3 convs 64, 128, 256,
  256, 512, 512 with 2x2 max pools after the 1st, 2nd, 4th and 6th) and ``embeddings.{0,2,4}``
  (FC 12288 -> 4096 -> 4096 -> 128, each followed by ReLU, as torchvggish does). Input:
  :func:`vggish_examples`, Google's ``vggish_input.waveform_to_examples`` framing.
* :class:`Cnn14` -- PANNs' Cnn14 (Kong et al. 2020), keys as in ``Cnn14_mAP=0.431.pth``'s
  ``"model"`` dict, with its torchlibrosa front end (an STFT as two frozen Conv1d,
  ``spectrogram_extractor.stft.conv_{real,imag}``, and a frozen Slaney mel matrix,
  ``logmel_extractor.melW``) built here to the same values.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from sora.models.mel import mel_filterbank

# ------------------------------------------------------------------------------------------
# VGGish
# ------------------------------------------------------------------------------------------

VGGISH_RATE, VGGISH_WINDOW, VGGISH_HOP, VGGISH_FFT = 16000, 400, 160, 512  # 25 ms, 10 ms
VGGISH_MELS, VGGISH_FMIN, VGGISH_FMAX, VGGISH_LOG_OFFSET, VGGISH_EXAMPLE = 64, 125.0, 7500.0, 0.01, 96


def htk_mel(f):
    """HTK mel scale as in VGGish's ``mel_features.hertz_to_mel``: ``1127 ln(1 + f / 700)``."""
    return 1127.0 * np.log(1.0 + np.asarray(f, np.float64) / 700.0)


def vggish_mel_matrix() -> np.ndarray:
    """``[257, 64]`` triangular HTK-mel weights, 125-7500 Hz, unnormalised, DC row zeroed
    (``mel_features.spectrogram_to_mel_matrix``)."""
    bins_mel = htk_mel(np.linspace(0.0, VGGISH_RATE / 2, VGGISH_FFT // 2 + 1))
    edges = np.linspace(htk_mel(VGGISH_FMIN), htk_mel(VGGISH_FMAX), VGGISH_MELS + 2)
    lower = (bins_mel[:, None] - edges[None, :-2]) / (edges[1:-1] - edges[:-2])
    upper = (edges[None, 2:] - bins_mel[:, None]) / (edges[2:] - edges[1:-1])
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights[0, :] = 0.0
    return weights


def vggish_log_mel(wave: np.ndarray) -> np.ndarray:
    """Mono 16 kHz waveform ``[N]`` -> VGGish log-mel ``[1 + (N - 400) // 160, 64]`` (float64).

    Frames of 400 samples every 160 (no padding), periodic Hann, ``|rfft(., 512)|``, the
    mel matrix above, then ``log(mel + 0.01)``.
    """
    wave = np.asarray(wave, np.float64)
    if wave.size < VGGISH_WINDOW:
        return np.zeros((0, VGGISH_MELS))
    frames = np.lib.stride_tricks.sliding_window_view(wave, VGGISH_WINDOW)[::VGGISH_HOP]
    window = 0.5 - 0.5 * np.cos(2 * np.pi / VGGISH_WINDOW * np.arange(VGGISH_WINDOW))
    spectrum = np.abs(np.fft.rfft(frames * window, VGGISH_FFT))
    return np.log(spectrum @ vggish_mel_matrix() + VGGISH_LOG_OFFSET)


def vggish_examples(wave: np.ndarray) -> np.ndarray:
    """Mono 16 kHz waveform -> examples ``[K, 96, 64]``: consecutive non-overlapping 96-frame
    (0.96 s) blocks of :func:`vggish_log_mel`; a trailing partial block is dropped, so
    ``K = (1 + (N - 400) // 160) // 96``."""
    mel = vggish_log_mel(wave)
    k = mel.shape[0] // VGGISH_EXAMPLE
    return mel[: k * VGGISH_EXAMPLE].reshape(k, VGGISH_EXAMPLE, VGGISH_MELS)


class VGGish(nn.Module):
    """Examples ``[K, 1, 96, 64]`` -> embeddings ``[K, 128]`` (torchvggish ``VGG``, no PCA)."""

    def __init__(self):
        super().__init__()
        layers, channels = [], 1
        for v in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, v, 3, padding=1), nn.ReLU(inplace=True)]
                channels = v
        self.features = nn.Sequential(*layers)
        self.embeddings = nn.Sequential(nn.Linear(512 * 4 * 6, 4096), nn.ReLU(True), nn.Linear(4096, 4096),
                                        nn.ReLU(True), nn.Linear(4096, 128), nn.ReLU(True))

    def forward(self, x):
        x = self.features(x)  # [K, 512, 6, 4]
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # TF's NHWC flattening order
        return self.embeddings(x)


# ------------------------------------------------------------------------------------------
# PANNs Cnn14
# ------------------------------------------------------------------------------------------

class _STFT(nn.Module):
    """torchlibrosa STFT: centred (reflect pad n_fft // 2), periodic Hann, DFT as Conv1d."""

    def __init__(self, n_fft: int, hop: int):
        super().__init__()
        self.n_fft = n_fft
        bins = n_fft // 2 + 1
        window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
        phase = 2 * np.pi * np.outer(np.arange(bins), np.arange(n_fft)) / n_fft
        self.conv_real = nn.Conv1d(1, bins, n_fft, stride=hop, bias=False)
        self.conv_imag = nn.Conv1d(1, bins, n_fft, stride=hop, bias=False)
        self.conv_real.weight.data = torch.tensor(np.cos(phase) * window, dtype=torch.float32)[:, None]
        self.conv_imag.weight.data = torch.tensor(-np.sin(phase) * window, dtype=torch.float32)[:, None]
        self.requires_grad_(False)

    def forward(self, wave):  # [B, N] -> real, imag [B, 1, frames, bins]
        x = F.pad(wave[:, None], (self.n_fft // 2, self.n_fft // 2), mode="reflect")
        return self.conv_real(x).transpose(1, 2)[:, None], self.conv_imag(x).transpose(1, 2)[:, None]


class _Spectrogram(nn.Module):
    def __init__(self, n_fft: int, hop: int):
        super().__init__()
        self.stft = _STFT(n_fft, hop)

    def forward(self, wave):  # power spectrogram [B, 1, frames, bins]
        real, imag = self.stft(wave)
        return real**2 + imag**2


class _LogmelFilterBank(nn.Module):
    """Slaney mel (librosa default) then ``10 log10(clamp(., 1e-10))`` (ref 1, no top_db)."""

    def __init__(self, sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float):
        super().__init__()
        fb, _ = mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax)
        self.melW = nn.Parameter(torch.from_numpy(fb.T.copy()), requires_grad=False)

    def forward(self, power):
        return 10.0 * torch.log10(torch.clamp(power @ self.melW, min=1e-10))


class _ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn1, self.bn2 = nn.BatchNorm2d(cout), nn.BatchNorm2d(cout)

    def forward(self, x, pool=(2, 2)):
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return F.avg_pool2d(x, pool)


class Cnn14(nn.Module):
    """Waveform ``[B, N]`` at 32 kHz -> 2048-d embedding ``[B, 2048]`` (``fc1`` after ReLU,
    PANNs' ``"embedding"`` output). Log-mel: n_fft 1024, hop 320, 64 bands 50-14000 Hz, then
    ``bn0`` over mel bands, six conv blocks (2x2 average pools after the first five), mean
    over frequency, max + mean over time. ``fc_audioset`` (527 AudioSet classes) is kept so
    the checkpoint loads strictly; :meth:`classify` uses it. Needs >= 32 frames (~0.31 s)."""

    def __init__(self, sample_rate=32000, n_fft=1024, hop=320, n_mels=64, fmin=50.0, fmax=14000.0, classes=527):
        super().__init__()
        self.spectrogram_extractor = _Spectrogram(n_fft, hop)
        self.logmel_extractor = _LogmelFilterBank(sample_rate, n_fft, n_mels, fmin, fmax)
        self.bn0 = nn.BatchNorm2d(n_mels)
        widths = (1, 64, 128, 256, 512, 1024, 2048)
        for i in range(6):
            setattr(self, f"conv_block{i + 1}", _ConvBlock(widths[i], widths[i + 1]))
        self.fc1 = nn.Linear(2048, 2048)
        self.fc_audioset = nn.Linear(2048, classes)

    def forward(self, wave):
        x = self.logmel_extractor(self.spectrogram_extractor(wave))  # [B, 1, frames, mels]
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)
        for i in range(6):
            x = getattr(self, f"conv_block{i + 1}")(x, (2, 2) if i < 5 else (1, 1))
        x = x.mean(3)
        x = x.max(2).values + x.mean(2)
        return F.relu(self.fc1(x))

    def classify(self, wave):
        """AudioSet class probabilities ``[B, 527]``."""
        return torch.sigmoid(self.fc_audioset(self.forward(wave)))
