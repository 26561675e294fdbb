"""Peak memory of the video VAE's chunked encode + decode against clip length, and its speed
against diffusers' Wan 2.1 VAE (``AutoencoderKLWan``) at matched channels.

    python tools/bench_vae.py --size 64 --fps 24 --seconds 2 4 8 16 --chunk 1

Memory: each clip length in a fresh subprocess: peak resident memory (``VmHWM``) of
``decode(encode(x).mode(), chunk)`` under ``torch.no_grad`` minus the resident memory just
before the clip is made; also that peak minus the bytes of the input clip, its latents and the
output clip (which grow with the length by definition): the "working" memory the chunking
keeps bounded. The subprocesses run with ``MALLOC_MMAP_THRESHOLD_=131072`` (large blocks go back to
the OS when freed) unless ``--glibc-default``: glibc's default dynamic threshold keeps freed heap
resident and fragmented, and RSS then measures the allocator's history more than live tensors. Speed: encode + decode of the first length, ours and Wan's alternating
(``--rounds``), median seconds and frames/s. Both VAEs: 16 latent channels, 4x time, 8x space,
base width 64, one residual block per level (Wan: ``base_dim=64, dim_mult=[1, 2, 4, 4],
num_res_blocks=1``; ours: the default ``VideoVAE()``), random weights (speed and memory do not
depend on them). Prints one JSON line. Needs ``pip install diffusers`` (dev only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=64, help="frame height = width (multiple of 8)")
    ap.add_argument("--fps", type=int, default=24)
    ap.add_argument("--seconds", type=float, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--chunk", type=int, default=1, help="latent steps per causal chunk (ours)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--glibc-default", action="store_true",
                    help="measure with glibc's default malloc (it keeps freed heap resident: the peak then "
                         "includes fragmentation, not only live tensors)")
    ap.add_argument("--memory-of", type=float, help=argparse.SUPPRESS)  # subprocess mode: one clip length
    return ap.parse_args(argv)


def frames(seconds: float, fps: int) -> int:
    return int(round(seconds * fps)) // 4 * 4 + 1  # 1 + 4k


def ours():
    from sora.models.video_vae import VideoVAE

    torch.manual_seed(0)
    return VideoVAE().eval()


def wan():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=64, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1).eval()


def rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


@torch.no_grad()
def memory_of(seconds: float, args) -> dict:
    vae = ours()
    n = frames(seconds, args.fps)
    before = rss_kb("VmRSS")
    x = torch.rand(1, 3, n, args.size, args.size) * 2 - 1
    z = vae.encode(x, chunk=args.chunk).mode()
    y = vae.decode(z, chunk=args.chunk)
    peak = (rss_kb("VmHWM") - before) * 1024
    io = x.numel() * 4 + z.numel() * 4 * 3 + y.numel() * 4  # clip, posterior moments + mode, reconstruction
    return {"seconds": seconds, "frames": n, "peak_mb": peak / 2**20, "io_mb": io / 2**20,
            "working_mb": (peak - io) / 2**20}


@torch.no_grad()
def speed(args) -> dict:
    n = frames(args.seconds[0], args.fps)
    x = torch.rand(1, 3, n, args.size, args.size) * 2 - 1
    models = {"ours": ours(), "wan": wan()}
    steps = {"ours": lambda: models["ours"].decode(models["ours"].encode(x, chunk=args.chunk).mode(), chunk=args.chunk),
             "wan": lambda: models["wan"].decode(models["wan"].encode(x).latent_dist.mode()).sample}
    shapes = {k: tuple(f().shape) for k, f in steps.items()}  # also the warm-up
    times = {k: [] for k in steps}
    for _ in range(args.rounds):
        for k, f in steps.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"frames": n, "output_shapes": shapes, "seconds": med, "frames_per_s": {k: n / v for k, v in med.items()},
            "params": {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()},
            "speed_ratio": med["wan"] / med["ours"]}


def main(argv=None) -> dict:
    args = parse(argv)
    if args.memory_of is not None:
        print(json.dumps(memory_of(args.memory_of, args)))
        return {}
    rest = [a for a in (argv if argv is not None else sys.argv[1:])]
    memory = []
    for s in args.seconds:
        env = dict(os.environ) if args.glibc_default else dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-of", str(s), *rest],
                              capture_output=True, text=True, check=True, env=env)
        memory.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    work = [m["working_mb"] for m in memory]
    result = {"config": {k: v for k, v in vars(args).items() if k != "memory_of"}, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "memory": memory,
              "working_mb_spread": (max(work) - min(work)) / (sum(work) / len(work)), "speed": speed(args)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
