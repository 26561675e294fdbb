"""Sequence parallelism for long clips (DeepSpeed-Ulysses), applied to an ``AVDiT`` from outside.

The DiT's token sequence (video patches, audio latent steps, text tokens) is split across the N
ranks of a process group. Everything per token (projections, QK norm, rotary phases, MLPs,
AdaLN modulation) runs on each rank's shard; inside every attention an all-to-all switches
from a split over tokens to a split over heads (each rank: all tokens, ``heads / N`` heads),
the plain attention runs (sdpa or flash-attn varlen, unchanged), and a second all-to-all
switches back. Per attention and rank that is 4 all-to-alls of ``1/N`` of q, k, v, o.

How it attaches to :class:`sora.models.dit.AVDiT` (which stays parallelism-agnostic):

* Input. ``AVDiT.forward`` embeds the full sequence on every rank (cheap, per token) and
  computes the rotary angles and masks of the full sequence. A forward pre-hook on every block
  pads each modality to a multiple of N (pad tokens: zeros, mask False, angle 0) and keeps this
  rank's contiguous chunk of tokens, angles and mask (and of the conditioning, when timesteps
  are per token), so every shard carries its global rotary
  positions (time in seconds, row, col). Only the first block receives full tokens.
* Attention. Each block's ``attention_fn`` hook becomes :class:`UlyssesAttention`. After the
  exchange the full sequence is in rank-major order (rank 0's ``[video, audio, text]`` chunks,
  then rank 1's, ...), not the model's: attention does not depend on the order of tokens as
  long as keys, values and the key mask (all-gathered) are permuted alike, and the rotary
  phases were applied before the exchange. Pad keys are masked out of every attention.
* Output. A forward hook on the last block all-gathers each stream and drops the padding, so
  the final layers and the loss see exactly the single-process tensors.
* Autograd. An all-to-all is its own adjoint (the backward is the same exchange of gradients);
  the all-gather's adjoint is a reduce-scatter (sum), done with an all-to-all. Every rank of a
  group computes the same loss, so each rank's gradient is N times its tokens' share, and the
  MEAN of the group's gradients is the single-process gradient: a data-parallel average over
  all ranks (SP peers included) is therefore right, provided the peers of a group see the
  same batch, timesteps and noise.

Collectives: ``torch.distributed.all_to_all_single`` and ``all_gather``, on NCCL and on gloo
(CPU; checked on torch 2.13), one code path, no fallback needed; the tests run it on 2 gloo processes.
Not combined with ``torch.compile`` yet (the hooks hold collectives; apply before compiling).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sora.models.attention import attention
from sora.models.dit import expand_steps

CONFIG_KEY = "model.sequence_parallel"


# --------------------------------------------------------------------------------------------
# config-time checks and process groups
# --------------------------------------------------------------------------------------------
def check_sequence_parallel(heads: int, size: int, key: str = CONFIG_KEY) -> int:
    """Raise one clear error unless ``size`` ranks can split ``heads`` attention heads; -> size.

    Sequence lengths need no check: every modality is padded to a multiple of ``size``.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{key}={size!r}: must be a positive integer (1 = off)")
    if heads % size:
        divisors = [d for d in range(1, heads + 1) if heads % d == 0]
        raise ValueError(f"{key}={size}: the DiT's heads={heads} do not split over {size} ranks; use one of "
                         f"{divisors} or set model.dit.heads to a multiple of {size}")
    return size


def new_sequence_parallel_group(size: int):
    """Split the world into groups of ``size`` consecutive ranks; -> this rank's group.

    Every rank must call it (``new_group`` is collective). Data parallelism then runs over
    :func:`sora.data.datamodule.data_parallel_rank`: the ``size`` ranks of a group must get the same batch.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{CONFIG_KEY}={size}: torch.distributed is not initialised; start the run with "
                           "torchrun or a Lightning multi-process strategy")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % size:
        raise ValueError(f"{CONFIG_KEY}={size}: the world size {world} is not a multiple of it; use a divisor "
                         f"of {world} or run {size * -(-world // size)} processes")
    mine = None
    for start in range(0, world, size):
        group = dist.new_group(list(range(start, start + size)))
        if start <= rank < start + size:
            mine = group
    return mine


# --------------------------------------------------------------------------------------------
# differentiable collectives
# --------------------------------------------------------------------------------------------
def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """x [N, ...]: send x[j] to rank j; out[j] is what rank j sent here."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """The exchange of :func:`_all_to_all`; it is its own adjoint."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_to_all(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.group), None


def _all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class _GatherSeq(torch.autograd.Function):
    """All-gather along ``dim`` (rank order); backward: reduce-scatter (sum) of the gradient."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        chunks = torch.stack(grad.chunk(dist.get_world_size(ctx.group), dim=ctx.dim))
        return _all_to_all(chunks, ctx.group).sum(0), None, None


def seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """[B, H, L, D] (this rank's tokens, all heads) -> [B, H/N, N*L, D] (all tokens, rank-major)."""
    n = dist.get_world_size(group)
    b, h, length, d = x.shape
    x = x.reshape(b, n, h // n, length, d).transpose(0, 1)  # [N (head group = destination), B, H/N, L, D]
    y = _AllToAll.apply(x, group)  # [N (source rank), B, H/N, L, D]
    return y.permute(1, 2, 0, 3, 4).reshape(b, h // n, n * length, d)


def heads_to_seq(y: torch.Tensor, group) -> torch.Tensor:
    """Inverse of :func:`seq_to_heads`: [B, H/N, N*L, D] -> [B, H, L, D]."""
    n = dist.get_world_size(group)
    b, hn, total, d = y.shape
    y = y.reshape(b, hn, n, total // n, d).permute(2, 0, 1, 3, 4)  # [N (destination rank), B, H/N, L, D]
    z = _AllToAll.apply(y, group)  # [N (source = head group), B, H/N, L, D]
    return z.transpose(0, 1).reshape(b, n * hn, total // n, d)


class UlyssesAttention:
    """Drop-in for :func:`sora.models.attention.attention` on sequence shards: q [B, H, Lq/N, D],
    k/v [B, H, Lk/N, D], key mask [B, Lk/N] -> [B, H, Lq/N, D]; ``inner`` runs on all tokens."""

    def __init__(self, group, inner: Callable = attention):
        self.group, self.inner = group, inner
        self.size = dist.get_world_size(group)

    def __call__(self, q, k, v, mask=None, backend="auto", q_mask=None):
        if q.shape[1] % self.size:
            raise ValueError(f"sequence parallelism over {self.size} ranks: {q.shape[1]} heads do not split")
        q = seq_to_heads(q, self.group)
        k, v = seq_to_heads(torch.cat([k, v]), self.group).chunk(2)  # one exchange for keys and values
        mask = None if mask is None else _all_gather(mask, 1, self.group)
        q_mask = None if q_mask is None else _all_gather(q_mask, 1, self.group)
        return heads_to_seq(self.inner(q, k, v, mask, backend=backend, q_mask=q_mask), self.group)


# --------------------------------------------------------------------------------------------
# sharding the token streams
# --------------------------------------------------------------------------------------------
def shard(x: torch.Tensor, dim: int, rank: int, size: int, value=0) -> torch.Tensor:
    """Pad ``x`` along ``dim`` (with ``value``) to a multiple of ``size``; -> chunk ``rank``."""
    dim = dim % x.dim()
    pad = -x.shape[dim] % size
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 1 - dim) + (0, pad), value=value)
    return x.chunk(size, dim=dim)[rank]


@dataclass
class _State:
    group: object
    rank: int
    size: int
    lengths: dict = field(default_factory=dict)  # full token count per stream, for the output


def _shard_block_inputs(block, args, state: _State, shard_tokens: bool):
    if len(args) < 4:
        raise RuntimeError("sequence parallelism expects blocks called as block(x, c, rope, masks, rope_time)")
    x, c, rope, masks, *rest = args
    if masks.get("shots") is not None:
        raise RuntimeError("sequence parallelism does not take timed scripts (shot masks) yet: train it on "
                           "single-shot clips (data.train.shots=null)")
    r, n = state.rank, state.size
    if shard_tokens:  # the first block: full-length tokens
        state.lengths = {m: t.shape[1] for m, t in x.items()}
        for m, mk in masks.items():
            if mk is not None and mk.shape[1] != state.lengths[m]:
                raise RuntimeError(f"sequence parallelism: {m} has {state.lengths[m]} tokens but a mask of "
                                   f"{mk.shape[1]}")
        x = {m: shard(t, 1, r, n) for m, t in x.items()}
    # a stream without a mask (nothing padded) gets one here: the shards' pad tokens must be masked out
    full = lambda m: torch.ones(x[m].shape[0], state.lengths[m], dtype=torch.bool, device=x[m].device)  # noqa: E731
    masks = {m: shard(full(m) if mk is None else mk, 1, r, n, value=False) for m, mk in masks.items()}
    angles = lambda d: None if d is None else {m: shard(f, -2, r, n) for m, f in d.items()}  # noqa: E731
    # per-token timesteps: conditioning per latent step [B, T', D] -> per token, this rank's shard of it
    c = {m: shard(expand_steps(v, state.lengths[m]), 1, r, n) if v.dim() == 3 else v for m, v in c.items()}
    return (x, c, angles(rope), masks, *(angles(a) for a in rest))


def _gather_block_output(block, args, out, state: _State):
    return {m: _GatherSeq.apply(t, 1, state.group)[:, :state.lengths[m]] for m, t in out.items()}


@dataclass
class SequenceParallel:
    """What :func:`apply_sequence_parallel` attached to a model (see :func:`remove_sequence_parallel`)."""

    group: object
    size: int
    handles: list
    attention_fns: list


def apply_sequence_parallel(dit: nn.Module, group=None, inner: Callable = attention) -> nn.Module:
    """Split ``dit``'s token sequence over the ranks of ``group`` (default: the world), in place.

    Call it on every rank of the group, after ``init_process_group`` and before wrapping the
    model for data parallelism or compiling it. ``inner`` is the attention run on all tokens.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("sequence parallelism needs torch.distributed initialised (torchrun, or a "
                           "Lightning multi-process strategy) before it is applied")
    if getattr(dit, "_sequence_parallel", None) is not None:
        raise RuntimeError("sequence parallelism is already applied to this model")
    blocks = getattr(dit, "blocks", None)
    if not blocks or not all(hasattr(b, "attention_fn") for b in blocks):
        raise TypeError(f"{type(dit).__name__}: sequence parallelism needs blocks with an attention_fn hook "
                        "(sora.models.dit.AVDiT)")
    size = dist.get_world_size(group)
    check_sequence_parallel(dit.heads, size)
    state = _State(group, dist.get_rank(group), size)
    fns = [b.attention_fn for b in blocks]
    handles = []
    for i, block in enumerate(blocks):
        block.attention_fn = UlyssesAttention(group, inner)
        hook = partial(_shard_block_inputs, state=state, shard_tokens=i == 0)
        handles.append(block.register_forward_pre_hook(hook))
    handles.append(blocks[-1].register_forward_hook(partial(_gather_block_output, state=state)))
    dit._sequence_parallel = SequenceParallel(group, size, handles, fns)
    return dit


def remove_sequence_parallel(dit: nn.Module) -> nn.Module:
    """Undo :func:`apply_sequence_parallel` (e.g. to sample on one process)."""
    sp = getattr(dit, "_sequence_parallel", None)
    if sp is None:
        return dit
    for h in sp.handles:
        h.remove()
    for block, fn in zip(dit.blocks, sp.attention_fns):
        block.attention_fn = fn
    dit._sequence_parallel = None
    return dit


def sequence_parallel_size(dit: nn.Module) -> int:
    """The number of ranks ``dit``'s sequence is split over (1 when not applied)."""
    sp = getattr(dit, "_sequence_parallel", None)
    return 1 if sp is None else sp.size


__all__ = ["check_sequence_parallel", "new_sequence_parallel_group", "seq_to_heads",
           "heads_to_seq", "UlyssesAttention", "shard", "apply_sequence_parallel", "remove_sequence_parallel",
           "sequence_parallel_size", "SequenceParallel", "CONFIG_KEY"]
