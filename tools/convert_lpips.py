"""Make the LPIPS weights file of the video VAE's perceptual loss from the two public files.

    python tools/convert_lpips.py --vgg vgg16-397923af.pth --lin vgg.pth --out lpips_vgg.safetensors

``--vgg``: torchvision's ImageNet VGG16 weights (``vgg16-397923af.pth``); ``--lin``: LPIPS v0.1's
linear layers for VGG (``lpips/weights/v0.1/vgg.pth`` in the ``lpips`` package). Both are read
with ``torch.load(weights_only=True)`` (no code runs from them). The output is one safetensors
file for :meth:`sora.models.perceptual.LPIPS.from_file`; point the video VAE at it with
``model.perceptual_weights=PATH``.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys

import torch
from safetensors.torch import save_file

from sora.models.perceptual import LPIPS


def convert(vgg_path: str, lin_path: str) -> dict[str, torch.Tensor]:
    """The LPIPS state dict (``features.*`` from VGG16, ``lins.*`` from LPIPS), checked complete."""
    state = {}
    for path, what in ((vgg_path, "vgg"), (lin_path, "lin")):
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise SystemExit(f"convert_lpips: --{what} {path}: no such file") from None
        except Exception as e:  # not a torch file, or one that needs pickled code
            raise SystemExit(f"convert_lpips: --{what} {path}: not a weights-only torch file ({e.__class__.__name__})")
        for key, value in loaded.items():
            if what == "vgg" and key.startswith("features."):
                state[key] = value
            elif what == "lin" and (m := re.fullmatch(r"lin(\d)\.model\.1\.weight", key)):
                state[f"lins.{m.group(1)}.weight"] = value
    want = LPIPS().state_dict()
    missing = sorted(set(want) - set(state))
    if missing:
        raise SystemExit(f"convert_lpips: the inputs lack {missing[:3]} ({len(missing)} tensors): "
                         "--vgg must be torchvision's vgg16, --lin LPIPS v0.1 vgg.pth")
    for key, value in want.items():
        if state[key].shape != value.shape:
            raise SystemExit(f"convert_lpips: {key} has shape {tuple(state[key].shape)}, expected {tuple(value.shape)}")
    return {k: state[k].float().contiguous() for k in want}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vgg", required=True, help="torchvision vgg16-397923af.pth")
    ap.add_argument("--lin", required=True, help="LPIPS v0.1 vgg.pth")
    ap.add_argument("--out", required=True, help="output .safetensors")
    args = ap.parse_args(argv)
    save_file(convert(args.vgg, args.lin), args.out, metadata={"format": "sora.lpips_vgg16.v0.1"})
    with open(args.out, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    print(f"wrote {args.out} sha256={digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
