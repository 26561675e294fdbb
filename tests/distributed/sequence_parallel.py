"""Two CPU ranks (gloo): a sequence-parallel AVDiT equals the single-process one, forward and backward.

    python tests/distributed/sequence_parallel.py OUT.json

Two forked processes; each builds the same tiny DiT (every weight random, so no zero-initialised
gate hides a path) and the same inputs, runs it alone (the reference), then with
``apply_sequence_parallel`` over both ranks. Compared: the outputs, and the mean over the two
ranks of the gradients w.r.t. every input and every parameter against the reference's (the
documented gradient semantics). Cases: joint and dual_stream fusion, token counts that need
padding and ones that do not, activation checkpointing, and the flash (varlen, packed) path
through its CPU twin. Rank 0 writes the maximum errors and what the attention saw to OUT.json.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sora.models.attention import attention, varlen_attention, varlen_attention_reference
from sora.models.dit import AVDiT
from sora.training.sequence_parallel import apply_sequence_parallel, remove_sequence_parallel

HEADS = 4
CASES = {  # name: (fusion, video latent [C, T', H, W], audio steps, text tokens, checkpointing, inner[, per-token t])
    "joint_padded": ("joint", (4, 3, 2, 6), 7, 5, False, "sdpa"),
    "dual_stream_per_token_t": ("dual_stream", (4, 3, 2, 6), 7, 5, False, "sdpa", True),
    "joint_even_checkpointed": ("joint", (4, 2, 4, 4), 6, 4, True, "sdpa"),
    "dual_stream_padded": ("dual_stream", (4, 3, 2, 6), 7, 5, False, "sdpa"),
    "joint_padded_flash_twin": ("joint", (4, 3, 2, 6), 7, 5, False, "flash_twin"),
}


def flash_twin(q, k, v, mask=None, backend="auto", q_mask=None):
    """The flash path (pack by mask, varlen kernel, unpack) with the kernel's CPU twin."""
    return varlen_attention(q, k, v, mask, q_mask, kernel=varlen_attention_reference)


def build(fusion: str, checkpointing: bool) -> AVDiT:
    torch.manual_seed(0)
    dit = AVDiT(video_channels=4, audio_channels=3, text_dim=8, dim=32, depth=2, heads=HEADS, fusion=fusion,
                checkpoint_activations=checkpointing, attn_backend="sdpa")
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0.0, 0.15)
    return dit


def inputs(video_shape, audio_len, text_len, per_token=False):
    g = torch.Generator().manual_seed(1)
    c, t, h, w = video_shape
    text_mask = torch.ones(2, text_len, dtype=torch.bool)
    text_mask[1, -2:] = False  # a padded caption
    return dict(video=torch.randn(2, c, t, h, w, generator=g), audio=torch.randn(2, 3, audio_len, generator=g),
                text=torch.randn(2, text_len, 8, generator=g), text_mask=text_mask,
                t_video=torch.rand(2, generator=g), t_audio=torch.rand(2, generator=g),
                video_times=torch.arange(t, dtype=torch.float64) * 0.16,
                audio_times=torch.arange(audio_len, dtype=torch.float64) * 0.04) | (dict(  # a clean first step
                    t_video=torch.rand(2, t, generator=g) * (torch.arange(t) > 0),
                    t_audio=torch.rand(2, audio_len, generator=g) * (torch.arange(audio_len) > 1)) if per_token else {})


GRAD_INPUTS = ("video", "audio", "text", "t_video", "t_audio")


def run(dit, x, weights):
    """Forward, a fixed linear loss of both outputs, backward -> (outputs, input grads, param grads)."""
    x = {k: v.clone().requires_grad_(k in GRAD_INPUTS) for k, v in x.items()}
    out = dit(**x)
    loss = sum((o * w).sum() for o, w in zip(out, weights))
    loss.backward()
    grads = {k: x[k].grad for k in GRAD_INPUTS}
    params = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in dit.named_parameters()}
    dit.zero_grad(set_to_none=True)
    return [o.detach() for o in out], grads, params


def max_err(a: dict, b: dict) -> dict:
    """Over matching tensors: max |a - b|, max |b|, and max of |a - b| / max(1, max |b|) per tensor
    (absolute for small tensors, relative for large ones: the gradients w.r.t. t are ~1e3)."""
    diff = {k: float((a[k] - b[k]).abs().max()) for k in b}
    scale = {k: float(b[k].abs().max()) for k in b}
    return {"abs": max(diff.values()), "ref_max": max(scale.values()),
            "scaled": max(diff[k] / max(1.0, scale[k]) for k in b)}


def case(name, fusion, video_shape, audio_len, text_len, checkpointing, inner_name, per_token=False):
    world = dist.get_world_size()
    ref_model = build(fusion, checkpointing)
    sp_model = copy.deepcopy(ref_model)
    x = inputs(video_shape, audio_len, text_len, per_token)
    g = torch.Generator().manual_seed(2)
    ref_out = ref_model(**x)
    weights = [torch.randn(o.shape, generator=g) for o in ref_out]
    ref = run(ref_model, x, weights)

    seen = []
    base = flash_twin if inner_name == "flash_twin" else attention

    def inner(q, k, v, mask=None, backend="auto", q_mask=None):
        seen.append((q.shape[1], q.shape[2], k.shape[2], None if mask is None else mask.shape[1]))
        return base(q, k, v, mask, backend=backend, q_mask=q_mask)

    apply_sequence_parallel(sp_model, inner=inner)
    t0 = time.perf_counter()
    out, grads, params = run(sp_model, x, weights)
    seconds = time.perf_counter() - t0
    for d in (grads, params):  # mean over the group
        for v in d.values():
            dist.all_reduce(v)
            v /= world
    result = {
        "out": max_err(dict(enumerate(out)), dict(enumerate(ref[0]))),
        "grad_inputs": max_err(grads, ref[1]),
        "grad_params": max_err(params, ref[2]),
        "params_with_grad": sum(int(v.abs().sum() > 0) for v in ref[2].values()),
        "params": len(ref[2]),
        "attention_calls": seen,
        "tokens": {"video": video_shape[1] * (video_shape[2] // 2) * (video_shape[3] // 2), "audio": audio_len,
                   "text": text_len},
        "sp_forward_backward_s": seconds,
    }
    remove_sequence_parallel(sp_model)
    with torch.no_grad():
        result["removed_out"] = max_err(dict(enumerate(sp_model(**x))), dict(enumerate(ref[0])))
    return result


def worker(rank: int, world: int, port: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        results = {name: case(name, *spec) for name, spec in CASES.items()}
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump({"world": world, "heads": HEADS, "cases": results}, f, indent=1)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    mp.start_processes(worker, args=(2, free_port(), sys.argv[1]), nprocs=2, start_method="fork")
