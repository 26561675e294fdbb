"""Attention with backends, multi-axis rotary positions on the shared time axis, QK RMS-norm.

One entry point, :func:`attention`, for every attention in the models:

* ``"flash"``: ``flash_attn.flash_attn_varlen_func`` on packed (unpadded) sequences. Keys are
  packed with the key-padding mask, queries with ``q_mask`` (all queries when it is None),
  the kernel runs on ``[total_tokens, heads, head_dim]`` with ``cu_seqlens``, and the result
  is unpacked (padded query rows come back as zeros).
* ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` with the key-padding mask
  broadcast to ``[B, 1, 1, L_k]``. Every query row is computed.
* ``"varlen"``: the same packing through PyTorch's own flash kernel for variable lengths
  (``torch.nn.attention.varlen.varlen_attn``, CUDA), for machines without flash-attn.
* ``"auto"``: on CUDA in fp16/bf16, flash when flash-attn imports; else, when keys are padded,
  varlen when PyTorch has it; else sdpa. A boolean mask keeps SDPA off its flash kernel, so no
  mask means no mask: the DiT passes None when nothing is padded.

Key padding without a host sync: when every query row is computed (``q_mask`` None), the kept
keys are moved to the front of a static-size ``[B * Lk]`` buffer by a stable sort of the mask,
``cu_seqlens`` is a cumulative sum on the device and ``max_seqlen_k = Lk`` (an upper bound is all
the kernel needs): no ``nonzero``, no ``.item()`` (:func:`varlen_keys`).

Packed samples (sequence packing, ``AVDiT.forward_packed``): ``mask`` and ``q_mask`` may instead
be integer segment ids ``[B, L]`` (the sample of each key / query; -1 = a key nobody sees). A
query then attends only to the keys of its own segment: block-diagonal attention. sdpa gets the
block mask ``q_seg == k_seg``; flash sorts tokens by segment and runs the varlen kernel with one
``cu_seqlens`` entry per segment (:func:`segment_varlen_attention`), so no FLOP is spent across
samples.

The flash path is written against the flash-attn 2 API; :func:`varlen_attention_reference` is
a CPU twin of the varlen kernel, so tests run the same packing code and prove it equals sdpa.

Rotary positions (:func:`rope_frequencies`, :func:`apply_rope`) are FLOAT and multi-axis:
``(time in seconds, patch row, patch col)``. Audio tokens use ``(time, 0, 0)``, so a video token
and an audio token at the same instant get the same phase on the time sub-space. Time uses
``scale=100`` (positions in units of 10 ms) and ``theta=10000``: component ``i`` of ``d`` turns at
``100 * 10000**(-i/d)`` rad/s. The fastest has period 2*pi/100 s = 63 ms, so 10 ms is a 1 rad
shift and 40 ms (an audio latent step) 4 rad; the slowest has a period of several hundred
seconds, so clips of tens of seconds never wrap. Rows/cols use the usual scale 1, theta 10000.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

try:  # optional CUDA extra
    from flash_attn import flash_attn_varlen_func
except Exception:  # pragma: no cover - not installed on CPU machines
    flash_attn_varlen_func = None
try:  # PyTorch's own varlen flash kernel (CUDA; torch >= 2.10)
    from torch.nn.attention.varlen import varlen_attn as _torch_varlen_attn
except Exception:  # pragma: no cover - older torch
    _torch_varlen_attn = None

BACKENDS = ("auto", "flash", "varlen", "sdpa")
ROPE_THETA = (10000.0, 10000.0, 10000.0)  # per axis: time, row, col
ROPE_SCALE = (100.0, 1.0, 1.0)  # rad per unit of position for the fastest component


# --------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------
def select_backend(q: torch.Tensor, backend: str = "auto", masked: bool = False) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"attention backend={backend!r}: expected one of {BACKENDS}")
    if backend != "auto":
        return backend
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)):
        return "sdpa"
    if flash_attn_varlen_func is not None:
        return "flash"
    return "varlen" if masked and _torch_varlen_attn is not None else "sdpa"


def torch_varlen_kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                        softmax_scale=None, causal=False):
    """``torch.nn.attention.varlen.varlen_attn`` behind flash-attn's ``flash_attn_varlen_func`` signature."""
    if _torch_varlen_attn is None:
        raise RuntimeError("attention backend='varlen' needs torch.nn.attention.varlen (PyTorch >= 2.10, CUDA)")
    if dropout_p or causal:
        raise ValueError("the varlen backend covers the non-causal, no-dropout case")
    scale = {} if softmax_scale is None else {"scale": softmax_scale}
    return _torch_varlen_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **scale)


def attention(q, k, v, mask=None, backend="auto", q_mask=None):
    """q [B, H, Lq, D], k/v [B, H, Lk, D]; mask: bool [B, Lk], True = keep. -> [B, H, Lq, D].

    ``q_mask`` (bool [B, Lq]) only lets the flash path skip padded queries (their rows come
    back as zeros); sdpa computes every row. Compare the two on unmasked rows only.
    Integer ``mask`` and ``q_mask``: segment ids of keys and queries (block-diagonal, see above).
    A full bool ``mask`` [B, 1, Lq, Lk] (e.g. a script's shot mask) runs SDPA whatever ``backend``.
    """
    if mask is not None and mask.dim() == 4:
        return sdpa_attention(q, k, v, mask)
    backend = select_backend(q, backend, masked=mask is not None)
    segments = mask is not None and mask.dtype != torch.bool
    if segments and (q_mask is None or q_mask.dtype == torch.bool):
        raise ValueError("attention: key segment ids need the queries' segment ids as q_mask")
    if backend in ("flash", "varlen"):
        if backend == "flash" and flash_attn_varlen_func is None:
            raise RuntimeError("attention backend='flash' needs flash-attn (pip install flash-attn)")
        kernel = flash_attn_varlen_func if backend == "flash" else torch_varlen_kernel
        if segments:
            return segment_varlen_attention(q, k, v, mask, q_mask, kernel=kernel)
        if q_mask is None:
            return varlen_keys(q, k, v, mask, kernel=kernel)
        return varlen_attention(q, k, v, mask, q_mask, kernel=kernel)
    if segments:
        return sdpa_attention(q, k, v, segment_mask(q_mask, mask))
    return sdpa_attention(q, k, v, mask)


def sdpa_attention(q, k, v, mask=None):
    """``mask``: bool [B, Lk] key padding, or a full bool [B, 1, Lq, Lk] (e.g. :func:`segment_mask`)."""
    if mask is not None and mask.dim() == 2:
        mask = mask[:, None, None, :]
    attn_mask = None if mask is None else mask.to(torch.bool)  # no host sync
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def segment_mask(q_seg: torch.Tensor, k_seg: torch.Tensor) -> torch.Tensor:
    """Block-diagonal bool mask [B, 1, Lq, Lk]: query i sees key j iff they share a segment (>= 0)."""
    return ((q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] >= 0))[:, None]


def shot_attention_mask(shots: dict, queries, keys, key_padding=None) -> torch.Tensor:
    """bool [B, 1, Lq, Lk] for a timed script: a video or audio query token sees a text key only when the key
    belongs to its shot or to the global caption (shot id -1); every other pair is open (text queries see
    everything, video and audio see each other across shots). ``shots``: per-token shot ids, int [B, L] for
    ``video``, ``audio`` and ``text``."""
    def ids(m, restricted):  # -1: unrestricted on this side
        return shots[m] if m in restricted else torch.full_like(shots[m], -1)

    q = torch.cat([ids(m, ("video", "audio")) for m in queries], dim=1)
    k = torch.cat([ids(m, ("text",)) for m in keys], dim=1)
    allowed = (q[:, :, None] == -1) | (k[:, None, :] == -1) | (q[:, :, None] == k[:, None, :])
    if key_padding is not None:
        allowed = allowed & key_padding[:, None, :]
    return allowed[:, None]


def segment_order(seg: torch.Tensor, segments: int):
    """Token order for the varlen kernel: seg [B, L] int (-1 = left out) -> (indices into the
    flattened B*L tokens, grouped by (row, segment), cu_seqlens int32 [B*segments+1], max_len)."""
    b = seg.shape[0]
    offset = torch.arange(b, device=seg.device)[:, None] * segments
    group = torch.where(seg >= 0, seg + offset, -1).reshape(-1)
    kept = torch.nonzero(group >= 0, as_tuple=False).flatten()
    indices = kept[torch.argsort(group[kept], stable=True)]
    counts = torch.bincount(group[kept], minlength=b * segments)
    cu_seqlens = F.pad(torch.cumsum(counts, dim=0, dtype=torch.int32), (1, 0))
    return indices, cu_seqlens, int(counts.max().item()) if counts.numel() else 0


def segment_varlen_attention(q, k, v, k_seg, q_seg, kernel: Callable | None = None):
    """The flash path for packed samples: gather each segment's queries and keys into one varlen
    sequence, run ``kernel`` (``flash_attn_varlen_func`` or its CPU twin), scatter back."""
    kernel = kernel or flash_attn_varlen_func
    b, _, lq, _ = q.shape
    segments = int(torch.maximum(q_seg.max(), k_seg.max()).item()) + 1
    idx_q, cu_q, max_q = segment_order(q_seg, segments)
    idx_k, cu_k, max_k = segment_order(k_seg, segments)
    flat = lambda x: x.transpose(1, 2).flatten(0, 1)  # noqa: E731  [B, H, L, D] -> [B*L, H, D]
    qp, kp, vp = flat(q)[idx_q], flat(k)[idx_k], flat(v)[idx_k]  # (indexing: a faster backward than index_select's)
    out = kernel(qp, kp, vp, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False)
    return unpack(out, idx_q, b, lq).transpose(1, 2)


def pack(x: torch.Tensor, mask: torch.Tensor | None):
    """x [B, L, ...], mask bool [B, L] -> (x_packed [total, ...], cu_seqlens int32 [B+1],
    max_len, indices [total] into the flattened B*L positions)."""
    b, length = x.shape[:2]
    if mask is None:
        mask = torch.ones(b, length, dtype=torch.bool, device=x.device)
    seqlens = mask.sum(dim=1, dtype=torch.int32)
    indices = torch.nonzero(mask.reshape(-1), as_tuple=False).flatten()
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    x_packed = x.reshape(b * length, *x.shape[2:]).index_select(0, indices)
    return x_packed, cu_seqlens, int(seqlens.max().item()) if b else 0, indices


def unpack(x_packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int):
    """Inverse of :func:`pack`: [total, ...] -> [batch, seqlen, ...], zeros where masked."""
    out = x_packed.new_zeros(batch * seqlen, *x_packed.shape[1:])
    out = out.index_copy(0, indices, x_packed)
    return out.reshape(batch, seqlen, *x_packed.shape[1:])


def varlen_attention(q, k, v, mask=None, q_mask=None, kernel: Callable | None = None):
    """The flash path: pack [B, H, L, D] inputs, run a varlen ``kernel``, unpack."""
    kernel = kernel or flash_attn_varlen_func
    b, _, lq, _ = q.shape
    qp, cu_q, max_q, idx_q = pack(q.transpose(1, 2), q_mask)
    kp, cu_k, max_k, _ = pack(k.transpose(1, 2), mask)
    vp, _, _, _ = pack(v.transpose(1, 2), mask)
    out = kernel(qp, kp, vp, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False)
    return unpack(out, idx_q, b, lq).transpose(1, 2)


def varlen_keys(q, k, v, mask=None, kernel: Callable | None = None):
    """Every query row against its sample's kept keys (bool ``mask`` [B, Lk], None = all), through a
    varlen ``kernel``, with no host-device sync: static shapes, the kept keys first (stable sort),
    ``cu_seqlens`` cumulated on the device, ``max_seqlen`` the padded lengths (upper bounds)."""
    kernel = kernel or flash_attn_varlen_func
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    flat = lambda x: x.transpose(1, 2).reshape(-1, h, x.shape[-1])  # noqa: E731  [B, H, L, D] -> [B*L, H, D]
    kp, vp = flat(k), flat(v)
    counts = torch.full((b,), lk, dtype=torch.int32, device=q.device)
    if mask is not None:
        order = torch.argsort((~mask).reshape(-1).to(torch.uint8), stable=True)  # kept keys first, in order
        kp, vp, counts = kp[order], vp[order], mask.sum(1, dtype=torch.int32)
    cu_k = F.pad(torch.cumsum(counts, 0, dtype=torch.int32), (1, 0))
    cu_q = torch.arange(0, (b + 1) * lq, lq, dtype=torch.int32, device=q.device)
    out = kernel(flat(q), kp, vp, cu_q, cu_k, lq, lk, dropout_p=0.0, softmax_scale=None, causal=False)
    return out.reshape(b, lq, h, -1).transpose(1, 2)


def varlen_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None,
                               max_seqlen_k=None, dropout_p=0.0, softmax_scale=None, causal=False):
    """CPU twin of ``flash_attn_varlen_func``: q/k/v [total, H, D], one sdpa per sequence."""
    assert dropout_p == 0.0 and not causal, "the reference covers the non-causal, no-dropout case"
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    for i in range(len(cu_seqlens_q) - 1):
        q0, q1 = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        k0, k1 = int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1])
        if q1 == q0 or k1 == k0:
            continue
        o = F.scaled_dot_product_attention(q[None, q0:q1].transpose(1, 2), k[None, k0:k1].transpose(1, 2),
                                           v[None, k0:k1].transpose(1, 2), scale=softmax_scale)  # 4D: fused CPU kernel
        out[q0:q1] = o[0].transpose(0, 1)
    return out


# --------------------------------------------------------------------------------------------
# rotary positions
# --------------------------------------------------------------------------------------------
def rope_axes_dims(dim: int, n_axes: int = 3) -> tuple[int, ...]:
    """Split head_dim among axes in pairs: time gets half (and any remainder), the rest share."""
    if dim % 2:
        raise ValueError(f"rotary head_dim={dim} must be even")
    pairs = dim // 2
    if n_axes == 1:
        return (dim,)
    other = pairs // (2 * (n_axes - 1))
    if other < 1:
        raise ValueError(f"head_dim={dim} too small for {n_axes} rotary axes")
    return (2 * (pairs - other * (n_axes - 1)),) + (2 * other,) * (n_axes - 1)


def rope_frequencies(dim: int, positions: torch.Tensor, theta: Sequence[float] = ROPE_THETA,
                     scale: Sequence[float] = ROPE_SCALE, axes_dims: Sequence[int] | None = None):
    """Rotation angles [..., L, dim // 2] (float32, in [0, 2pi)) for FLOAT positions [..., L, n_axes].

    Axis ``a`` owns ``axes_dims[a]`` channels; its component ``i`` of ``d = axes_dims[a] / 2``
    turns at ``scale[a] * theta[a] ** (-i / d)`` radians per unit of position.
    """
    n_axes = positions.shape[-1]
    axes_dims = tuple(axes_dims) if axes_dims is not None else rope_axes_dims(dim, n_axes)
    if sum(axes_dims) != dim or len(axes_dims) != n_axes:
        raise ValueError(f"rotary axes_dims={axes_dims} do not split head_dim={dim} into {n_axes}")
    angles = []
    for a, d in enumerate(axes_dims):
        half = d // 2
        i = torch.arange(half, dtype=torch.float64, device=positions.device)
        omega = float(scale[a]) * float(theta[a]) ** (-i / max(half, 1))
        angles.append(positions[..., a : a + 1].double() * omega)
    # float64, reduced mod 2*pi before the cast: 60 s at 100 rad/s is 6000 rad, whose float32
    # rounding (~5e-4 rad) would otherwise swamp the phase of nearby tokens
    return torch.remainder(torch.cat(angles, dim=-1), 2 * math.pi).float()


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, H, L, D] by angles [L, D/2] or [B, L, D/2]."""
    if freqs.dim() == 3:
        freqs = freqs[:, None]
    cos, sin = freqs.cos(), freqs.sin()
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


# --------------------------------------------------------------------------------------------
# QK norm
# --------------------------------------------------------------------------------------------
class RMSNorm(nn.RMSNorm):
    """RMS norm over one dimension, in float32 (also under autocast, where x is bf16 and the weight fp32):
    ``dim=-1`` the features (the DiT's QK norm), ``dim=1`` the channels of a ``(B, C, T, H, W)`` volume at each
    position (the video VAE: causal and tile-friendly, unlike GroupNorm)."""

    def __init__(self, size: int, eps: float = 1e-6, dim: int = -1):
        super().__init__(size, eps=eps)
        self.dim = dim

    def forward(self, x):
        y = F.rms_norm(x.float().movedim(self.dim, -1), self.normalized_shape, self.weight.float(), self.eps)
        return y.movedim(-1, self.dim).to(x.dtype)


__all__ = ["attention", "select_backend", "sdpa_attention", "varlen_attention", "varlen_keys", "segment_mask",
           "segment_order", "segment_varlen_attention",
           "varlen_attention_reference", "pack", "unpack", "rope_axes_dims",
           "rope_frequencies", "apply_rope", "RMSNorm", "ROPE_THETA", "ROPE_SCALE"]
