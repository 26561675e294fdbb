"""Throughput of sequence packing against padding, on one mixed-bucket batch of our DiT.

    python tools/bench_packing.py --width 256 --heads 4 --depth 4 --area 16384 --seconds 1 --fps 24 \
        --ratios 16:9 9:16 1:1 4:3 3:4 --rounds 5

The batch: one clip per aspect-ratio bucket of ``make_buckets(area, ratios, multiple=16)`` (the
data pipeline's buckets; video latents are the bucket / 8, patches of 2), one duration per clip
cycling through ``--seconds``, all on the timing contract at ``--fps``; ``--text-tokens`` real text
tokens each. Three training steps (forward, MSE, backward, AdamW), alternated round by round:

* ``padded``: every clip zero-padded to the batch's largest latent height, width and length (and
  audio to the longest), one dense forward. That is the compute a padded batch costs (masking
  the pad keys out would only add work), so it stands for "pad to the largest bucket".
* ``packed_sdpa``: ``AVDiT.forward_packed``, attention through SDPA with the block-diagonal mask
  (the CPU default: every query x key pair is computed, off-diagonal blocks masked).
* ``packed_varlen``: the same with the flash-attn varlen path, run by its CPU twin (one SDPA per
  sample): the attention FLOPs flash-attn's kernel does on CUDA.

Tokens/s count the real video + audio tokens only (the same for all three). Median over
``--rounds`` after ``--warmup`` of the wall time and of the process's CPU time per step; on a
machine shared with other work, ``--threads 1`` and the CPU time (``cpu_s``, the speedups) measure
the work itself. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from sora.data.buckets import make_buckets
from sora.models import attention as A
from sora.models.dit import AVDiT
from sora.timeline import Timeline

VIDEO_CHANNELS, AUDIO_CHANNELS, PATCH, VAE_STRIDE = 16, 8, 2, 8


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--area", type=int, default=128 * 128, help="bucket pixel area")
    ap.add_argument("--ratios", nargs="+", default=["16:9", "9:16", "1:1", "4:3", "3:4"])
    ap.add_argument("--seconds", type=float, nargs="+", default=[1.0], help="clip durations, cycled over clips")
    ap.add_argument("--fps", type=float, default=24.0)
    ap.add_argument("--text-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    return ap.parse_args(argv)


def clips(args):
    """One (latent video shape, timeline) per bucket."""
    buckets = make_buckets(args.area, args.ratios, multiple=VAE_STRIDE * PATCH)
    out = []
    for i, b in enumerate(buckets):
        tl = Timeline(seconds=args.seconds[i % len(args.seconds)], fps=args.fps)
        out.append(((tl.video_latent_steps, b.height // VAE_STRIDE, b.width // VAE_STRIDE), tl))
    return buckets, out


def build(which: str, args):
    """A function running one training step of ``which`` on the batch."""
    torch.manual_seed(0)
    _, batch = clips(args)
    model = AVDiT(video_channels=VIDEO_CHANNELS, audio_channels=AUDIO_CHANNELS, text_dim=args.width, dim=args.width,
                  depth=args.depth, heads=args.heads, patch_size=PATCH,
                  attn_backend="flash" if which == "packed_varlen" else "sdpa").train()
    g = torch.Generator().manual_seed(1)
    n = len(batch)
    video = [torch.randn(VIDEO_CHANNELS, *shape, generator=g) for shape, _ in batch]
    audio = [torch.randn(AUDIO_CHANNELS, tl.audio_latent_steps, generator=g) for _, tl in batch]
    vt = [torch.from_numpy(tl.video_token_times()) for _, tl in batch]
    at = [torch.from_numpy(tl.audio_token_times()) for _, tl in batch]
    text, mask, t = torch.randn(n, args.text_tokens, args.width, generator=g), torch.ones(n, args.text_tokens,
                                                                                        dtype=torch.bool), torch.rand(n)
    if which == "padded":
        frames, h, w = (max(shape[i] for shape, _ in batch) for i in range(3))
        steps = max(a.shape[1] for a in audio)
        video = torch.stack([F.pad(v, (0, w - v.shape[3], 0, h - v.shape[2], 0, frames - v.shape[1])) for v in video])
        audio = torch.stack([F.pad(a, (0, steps - a.shape[1])) for a in audio])
        longest = max(range(n), key=lambda i: len(vt[i]))
        vt, at = vt[longest], at[max(range(n), key=lambda i: len(at[i]))]

    def forward():
        return model(video, audio, text, mask, t, t, vt, at)

    with torch.no_grad():
        targets = [torch.randn_like(o) for o in forward()] if which == "padded" else \
            [[torch.randn_like(o) for o in outs] for outs in forward()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        outs = forward()
        if which == "padded":
            loss = sum(F.mse_loss(o, y) for o, y in zip(outs, targets))
        else:
            loss = sum(F.mse_loss(o, y) for os, ys in zip(outs, targets) for o, y in zip(os, ys))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main(argv=None) -> dict:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    A.flash_attn_varlen_func = A.flash_attn_varlen_func or A.varlen_attention_reference  # the CPU twin
    buckets, batch = clips(args)
    real = sum(t * (h // PATCH) * (w // PATCH) + tl.audio_latent_steps for (t, h, w), tl in batch)
    frames, h, w = (max(shape[i] for shape, _ in batch) for i in range(3))
    padded = len(batch) * (frames * (h // PATCH) * (w // PATCH) + max(tl.audio_latent_steps for _, tl in batch))
    steps = {w_: build(w_, args) for w_ in ("padded", "packed_sdpa", "packed_varlen")}
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times = {w_: [] for w_ in steps}
    cpu = {w_: [] for w_ in steps}
    for _ in range(args.rounds):  # alternate: all three see the same machine state
        for which, step in steps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            times[which].append(time.perf_counter() - t0)
            cpu[which].append(time.process_time() - c0)
    median = lambda ts: sorted(ts)[len(ts) // 2]  # noqa: E731
    step_s, cpu_s = {w_: median(ts) for w_, ts in times.items()}, {w_: median(ts) for w_, ts in cpu.items()}
    result = {
        "config": vars(args), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "clips": [{"bucket": b.name, "latent": list(shape), "seconds": tl.seconds} for b, (shape, tl) in
                  zip(buckets, batch)],
        "real_tokens": real, "padded_tokens": padded,
        "step_s": step_s, "cpu_s": cpu_s, "tokens_per_s": {w_: real / s for w_, s in step_s.items()},
        "tokens_per_cpu_s": {w_: real / s for w_, s in cpu_s.items()},
        "speedup_packed_sdpa": cpu_s["padded"] / cpu_s["packed_sdpa"],
        "speedup_packed_varlen": cpu_s["padded"] / cpu_s["packed_varlen"],
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
