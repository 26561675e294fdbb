"""Training-step speed and peak memory of our DiT against diffusers' LTX-2 audio-video transformer.

    python tools/bench_dit.py --width 512 --heads 8 --depth 8 --frames 8 --hw 32 --audio-steps 100 \
        --text-tokens 64 --batch 1 --precision fp32

Both models get the same width, depth, heads (head dim = width / heads, for video and audio),
the same token counts (video: ``frames * (hw / 2)^2`` patches of our patch size 2 = LTX-2's
pre-patchified grid with ``in_channels = 16 * 2 * 2``; audio: ``audio-steps``; text:
``text-tokens`` of width ``width``) and the same step: forward, MSE to a random target,
backward, AdamW. Speed: the two steps alternate in one process (``--rounds`` each, after
``--warmup``), median step time -> tokens/s (video + audio tokens per second). Memory: each
model in its own fresh subprocess, peak resident memory (``VmHWM``) of two training steps
minus the resident memory just before the model is built. The bound: a 2048^3 matmul in the
same dtype, timed in the same rounds; ours as a fraction of it uses the analytic training FLOPs of
:mod:`sora.models.flops`. Prints one JSON line. Needs ``pip install diffusers`` (dev only).

``--device cuda``: everything on the GPU, timed with ``torch.cuda.synchronize``; memory is the
peak of ``torch.cuda.max_memory_allocated`` over two steps (fresh process each) above what was
allocated before the model; the bound is an 8192^3 matmul (``--matmul-n``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

VIDEO_CHANNELS, AUDIO_CHANNELS, PATCH = 16, 8, 2


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--frames", type=int, default=8, help="latent frames")
    ap.add_argument("--hw", type=int, default=32, help="latent height = width")
    ap.add_argument("--audio-steps", type=int, default=100)
    ap.add_argument("--text-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--precision", choices=("fp32", "bf16-mixed"), default="fp32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="cpu | cuda (or cuda:N)")
    ap.add_argument("--no-peer", action="store_true", help="ours and the matmul bound only (no diffusers)")
    ap.add_argument("--matmul-n", type=int, default=None, help="the bound's matmul size (default 2048 on CPU, 8192 on CUDA)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--memory-of", choices=("ours", "peer"), help=argparse.SUPPRESS)  # the subprocess mode
    args = ap.parse_args(argv)
    if args.width % args.heads or args.hw % PATCH:
        ap.error(f"--width must be divisible by --heads and --hw by {PATCH}")
    return args


def tokens(args) -> tuple[int, int, int]:
    return args.frames * (args.hw // PATCH) ** 2, args.audio_steps, args.text_tokens


def build_dit(args):
    from sora.models.dit import AVDiT

    return AVDiT(video_channels=VIDEO_CHANNELS, audio_channels=AUDIO_CHANNELS, text_dim=args.width, dim=args.width,
                 depth=args.depth, heads=args.heads, patch_size=PATCH)


def build(which: str, args):
    """(model, a function running one training step)."""
    torch.manual_seed(0)
    b, (nv, na, nt) = args.batch, tokens(args)
    g = torch.Generator().manual_seed(1)
    text = torch.randn(b, nt, args.width, generator=g)
    t = torch.rand(b, generator=g)
    dev = torch.device(args.device)
    text, t = text.to(dev), t.to(dev)
    if which == "ours":
        model = build_dit(args).to(dev)
        video = torch.randn(b, VIDEO_CHANNELS, args.frames, args.hw, args.hw, generator=g).to(dev)
        audio = torch.randn(b, AUDIO_CHANNELS, na, generator=g).to(dev)
        mask = torch.ones(b, nt, dtype=torch.bool, device=dev)
        vt = (torch.arange(args.frames, dtype=torch.float64) / 6).to(dev)
        at = (torch.arange(na, dtype=torch.float64) / 25).to(dev)

        def forward():
            return model(video, audio, text, mask, t, t, vt, at)
    else:
        from diffusers import LTX2VideoTransformer3DModel

        hd = args.width // args.heads
        model = LTX2VideoTransformer3DModel(
            in_channels=VIDEO_CHANNELS * PATCH ** 2, out_channels=VIDEO_CHANNELS * PATCH ** 2, patch_size=1,
            patch_size_t=1, num_attention_heads=args.heads, attention_head_dim=hd, cross_attention_dim=args.width,
            audio_in_channels=AUDIO_CHANNELS, audio_out_channels=AUDIO_CHANNELS, audio_num_attention_heads=args.heads,
            audio_attention_head_dim=hd, audio_cross_attention_dim=args.width, num_layers=args.depth,
            caption_channels=args.width).to(dev)
        video = torch.randn(b, nv, VIDEO_CHANNELS * PATCH ** 2, generator=g).to(dev)
        audio = torch.randn(b, na, AUDIO_CHANNELS, generator=g).to(dev)
        side = args.hw // PATCH

        def forward():
            return model(hidden_states=video, audio_hidden_states=audio, encoder_hidden_states=text,
                         audio_encoder_hidden_states=text, timestep=t * 1000, audio_timestep=t * 1000,
                         num_frames=args.frames, height=side, width=side, audio_num_frames=na, return_dict=False)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with torch.no_grad():
        targets = [torch.randn_like(o) for o in forward()]
    bf16 = args.precision == "bf16-mixed"

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            outs = forward()
        loss = sum(F.mse_loss(o.float(), y) for o, y in zip(outs, targets))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


def rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory_of(which: str, args) -> dict:
    if which == "ours":  # imports first: their memory is not the model's
        import sora.models.dit  # noqa: F401
    else:
        import diffusers  # noqa: F401
    cuda = torch.device(args.device).type == "cuda"
    before = torch.cuda.memory_allocated() if cuda else rss_kb("VmRSS")
    model, step = build(which, args)
    for _ in range(2):
        step()
    peak_mb = (torch.cuda.max_memory_allocated() - before) / 2**20 if cuda else (rss_kb("VmHWM") - before) / 1024
    return {"peak_mb": peak_mb, "params": sum(p.numel() for p in model.parameters())}


def matmul_step(bf16: bool, n: int = 2048, device="cpu"):
    """A function doing one ``n^3`` matmul in the benchmark's dtype, and its FLOPs."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    if bf16:
        a, b = a.bfloat16(), b.bfloat16()
    return (lambda: a @ b), 2 * n ** 3


def main(argv=None) -> dict:
    args = parse(argv)
    if args.memory_of:
        print(json.dumps(memory_of(args.memory_of, args)))
        return {}
    from sora.models.flops import dit_training_flops

    nv, na, nt = tokens(args)
    models = ("ours",) if args.no_peer else ("ours", "peer")
    steps = {w: build(w, args)[1] for w in models}
    cuda = torch.device(args.device).type == "cuda"
    n = args.matmul_n or (8192 if cuda else 2048)
    steps["matmul"], matmul_flops = matmul_step(args.precision == "bf16-mixed", n, args.device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times = {w: [] for w in steps}
    for _ in range(args.rounds):  # alternate: all three see the same machine state
        for which, step in steps.items():
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            times[which].append(time.perf_counter() - t0)
    step_s = {w: sorted(ts)[len(ts) // 2] for w, ts in times.items()}
    matmul = matmul_flops / step_s.pop("matmul")
    del steps
    memory = {}
    for which in models:  # a fresh process each: peak memory is per process
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-of", which, *(argv if argv is not None else sys.argv[1:])]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        memory[which] = json.loads(proc.stdout.strip().splitlines()[-1])
    ours_flops = args.batch * dit_training_flops(build_dit(args), nv, na, nt) / step_s["ours"]
    tps = {w: args.batch * (nv + na) / s for w, s in step_s.items()}
    result = {
        "config": {k: v for k, v in vars(args).items() if k != "memory_of"},
        "tokens": {"video": nv, "audio": na, "text": nt}, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "device": torch.cuda.get_device_name() if cuda else "cpu",
        "ours": {"step_s": step_s["ours"], "tokens_per_s": tps["ours"], "peak_mb": memory["ours"]["peak_mb"],
                 "params": memory["ours"]["params"]},
        "matmul_flops_per_s": matmul, "ours_flops_per_s": ours_flops, "ours_fraction_of_matmul": ours_flops / matmul,
    }
    if not args.no_peer:
        result |= {
            "peer": {"model": "diffusers.LTX2VideoTransformer3DModel", "step_s": step_s["peer"],
                     "tokens_per_s": tps["peer"], "peak_mb": memory["peer"]["peak_mb"],
                     "params": memory["peer"]["params"]},
            "tokens_per_s_ratio": tps["ours"] / tps["peer"],
            "memory_ratio": memory["ours"]["peak_mb"] / memory["peer"]["peak_mb"]}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
