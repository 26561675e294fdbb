"""DiT training step on cached latents against raw clips, interleaved in one process.

    sora-cache-latents CACHE OVERRIDES... --workers 0          # first: the cache, in order
    python tools/bench_latents.py CACHE OVERRIDES... [--steps 30] [--json OUT]

Builds the run's raw stream and DiT module as ``sora-train`` would (same OVERRIDES as the cache),
takes the first ``--batches`` batches of the raw stream and the same clips from the cache, then
alternates one optimizer step on a raw batch with one on the cached batch of the same clips, so
that machine noise hits both alike. Reports the medians of: the step (encode + DiT forward +
backward + AdamW), the encoders alone, and the stream's time to produce a batch (world generation
or decoding, against reading the cached tensors).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `sora` and `tools` importable without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from sora.cli.cache_latents import build, compose


def batches(stream, n: int) -> tuple[list, float]:
    """The first ``n`` batches of a stream and the median seconds it took to produce one."""
    out, times = [], []
    it = iter(stream)
    for _ in range(n):
        t0 = time.perf_counter()
        out.append(next(it).normalize())
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def step_seconds(module, optimizer, batch) -> float:
    t0 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    module.training_step(batch, 0).backward()
    optimizer.step()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cache", type=Path)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--steps", type=int, default=30, help="timed steps of each kind (after 3 warm-up each)")
    p.add_argument("--batches", type=int, default=8, help="distinct batches cycled through")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=r".*self\.log\(\).*")  # training_step outside a Trainer

    from sora.data.latents import LatentClipStream

    cfg = compose(args.overrides)
    raw_stream, module = build(cfg)
    raw_stream.shuffle, raw_stream.infinite = False, False
    cached_stream = LatentClipStream(str(args.cache / "latents-*.tar"), raw_stream.timeline, raw_stream.batch_size,
                                     shuffle=False, infinite=False)
    raw, raw_batch_s = batches(raw_stream, args.batches)
    cached, cached_batch_s = batches(cached_stream, args.batches)
    if [b.keys for b in raw] != [b.keys for b in cached]:
        raise SystemExit("bench_latents: the cache holds other clips or another order than the raw stream: make it "
                         "with the same OVERRIDES and --workers 0")
    module.train()
    optimizer = torch.optim.AdamW([q for q in module.parameters() if q.requires_grad], lr=1e-4)
    times = {"raw": [], "cached": []}
    for i in range(args.steps + 3):
        for kind, data in (("raw", raw), ("cached", cached)):
            seconds = step_seconds(module, optimizer, data[i % len(data)])
            if i >= 3:
                times[kind].append(seconds)
    encode = []
    with torch.no_grad():
        for b in raw:
            t0 = time.perf_counter()
            module.encode(b)
            encode.append(time.perf_counter() - t0)
    size = len(raw[0])
    result = {
        "batch_size": size, "steps": args.steps, "threads": torch.get_num_threads(),
        "step_s": {k: statistics.median(v) for k, v in times.items()},
        "step_s_quartiles": {k: statistics.quantiles(v, n=4) for k, v in times.items()},
        "encode_s": statistics.median(encode), "encode_clips_per_s": size / statistics.median(encode),
        "stream_batch_s": {"raw": raw_batch_s, "cached": cached_batch_s},
        "overrides": args.overrides,
    }
    s = result["step_s"]
    print(f"bench_latents: step {s['raw'] * 1e3:.1f} ms on raw clips, {s['cached'] * 1e3:.1f} ms on cached latents "
          f"({s['raw'] / s['cached']:.2f}x), medians of {args.steps} interleaved steps, batch {size}")
    print(f"bench_latents: encoders {result['encode_s'] * 1e3:.1f} ms a batch ({result['encode_clips_per_s']:.1f} "
          f"clips/s); stream {raw_batch_s * 1e3:.1f} ms a raw batch, {cached_batch_s * 1e3:.1f} ms a cached one")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
