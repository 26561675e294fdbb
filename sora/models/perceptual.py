"""LPIPS (Zhang et al. 2018, VGG16 variant): the perceptual loss of the video VAE, from a local file.

The network is VGG16's convolutional features (torchvision's layer layout, so its
``features.*`` weights load as they are) and LPIPS v0.1's five 1x1 "lin" layers (``lins.*``).
Weights come only from a local ``.safetensors`` file, made once from the two public files by
``tools/convert_lpips.py``; nothing is downloaded. The network is frozen; gradients reach the
images only.

Distance of images ``x, y`` in [-1, 1], ``[N, 3, H, W]``: shift and scale each into VGG's input
range, take the features after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3, normalise each
feature vector over channels, square the difference, weight channels by the lin layer, average
over space and sum over the five layers. Output ``[N]``.
"""

from __future__ import annotations

import torch
from torch import nn

# VGG16 "D": channels per conv, "M" a 2x2 max-pool (torchvision's ``features`` order).
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
TAPS = (3, 8, 15, 22, 29)  # indices in ``features`` of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
TAP_CHANNELS = (64, 128, 256, 512, 512)


class LPIPS(nn.Module):
    """``LPIPS()(x, y) -> [N]`` perceptual distance; ``LPIPS.from_file(path)`` loads the weights."""

    def __init__(self):
        super().__init__()
        layers, ch = [], 3
        for v in VGG16[:-1]:  # the last pool is never used
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(ch, v, 3, padding=1), nn.ReLU()]
                ch = v
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in TAP_CHANNELS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    @classmethod
    def from_file(cls, path: str) -> "LPIPS":
        """Load weights from a local ``.safetensors`` file (see ``tools/convert_lpips.py``)."""
        from safetensors.torch import load_file

        model = cls()
        try:
            state = load_file(str(path))
        except FileNotFoundError:
            raise FileNotFoundError(f"perceptual weights {path}: no such file "
                                    "(make it with tools/convert_lpips.py)") from None
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"perceptual weights {path}: not an LPIPS-VGG16 file "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        return model

    def train(self, mode: bool = True):
        return super().train(False)  # always frozen: no dropout, no batch statistics

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, h = [], (x - self.shift) / self.scale
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in TAPS:
                out.append(h)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS takes two [N, 3, H, W] images in [-1, 1]; got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")
        dist = x.new_zeros(x.shape[0])
        for lin, fx, fy in zip(self.lins, self.taps(x), self.taps(y)):
            fx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            fy = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            dist = dist + lin((fx - fy).pow(2)).mean((1, 2, 3))
        return dist
