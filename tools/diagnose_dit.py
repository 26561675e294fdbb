"""At which noise level does a DiT checkpoint lose the balls? (issue 12's diagnosis of the DiT stage)

    python tools/diagnose_dit.py --ckpt outputs/demo/dit/checkpoints/last.ckpt --clips 8 --seed 1000

On held-out world clips (``make_clip(seed + i)`` at the checkpoint's timeline and frame size):

- ``remix``: each clip's latents noised to ``strength`` s and sampled back under its own caption (SDEdit,
  :meth:`AVPipeline.remix`; s = 1 is plain text-to-AV generation), then the eval's per-clip checks
  (balls tracked, sound in sync, named colours tracked) and the PSNR against the clip. Where the tracked
  count falls tells which noise levels the model has not learned: a model that only fails near s = 1 has
  the picture's details but not its layout.
- ``x0``: the model's one-step estimate of the clean video latents, ``x_t - t v``, at fixed t (fixed noise,
  the audio given as pure noise), its mean squared error beside two trivial predictors: zeros (the latents'
  mean) and the batch's mean latent. A model worse than the batch mean at some t has not learned that t.
  The same estimate under other captions (each clip's caption moved one clip along; the empty caption) says
  how much the model uses its caption at each t: a model that does gains most where the noise hides the
  picture, at high t.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make `sora` and `tools` importable without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.measure_edits import psnr  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--seed", type=int, default=1000, help="held-out world clips: seed, seed + 1, ...")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--strengths", type=float, nargs="*", default=[0.3, 0.6, 0.8, 0.9, 1.0],
                   help="remix strengths (none: only the x0 table)")
    p.add_argument("--times", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0])
    args = p.parse_args(argv)

    import torch

    from sora.data.world import WorldConfig, make_clip
    from sora.diffusion.flow import interpolate
    from sora.evaluation.physics import probe_batch
    from sora.inference import AVPipeline

    pipe = AVPipeline.from_checkpoint(args.ckpt)
    tl, (h, w), module = pipe.timeline, pipe.frame_size(), pipe.module
    world = WorldConfig(width=w, height=h, fps=float(tl.fps_q), seconds=tl.seconds, sample_rate=tl.sample_rate)
    clips = [make_clip(args.seed + i, world) for i in range(args.clips)]
    captions, n = [c.caption for c in clips], len(clips)
    opts = dict(steps=args.steps, guidance=args.guidance, seed=0)

    if args.strengths:
        print("| strength | tracked | in sync | colour named = tracked | PSNR vs the clip |\n|---|---|---|---|---|")
    for s in args.strengths:
        made = [pipe.remix(c.caption, c.frames, c.audio[:, :tl.num_samples], strength=s, **opts) if s < 1
                else pipe.generate(c.caption, **opts) for c in clips]
        m = probe_batch([(g.frames, g.audio) for g in made], float(tl.fps_q), tl.sample_rate, world,
                        captions=captions, prefix="")
        score = np.mean([psnr(g.frames, c.frames) for g, c in zip(made, clips)])
        print(f"| {s:g} | {m['clips_tracked']}/{n} | {m['clips_in_sync']}/{n} | "
              f"{m['clips_colour_match']}/{m['clips_naming_colour']} | {score:.2f} dB |", flush=True)

    with torch.no_grad():
        z = torch.cat([pipe.encode(video=c.frames)["video"] for c in clips])
        gen = torch.Generator().manual_seed(0)
        noise = torch.randn(z.shape, generator=gen)
        audio = torch.randn((n, module.audio_vae.latent_channels, tl.audio_latent_steps), generator=gen)
        variants = {"own": captions, "shuffled": captions[1:] + captions[:1], "empty": [""] * n}
        encoded = {k: module.text_encoder(v) for k, v in variants.items()}
        print("\n| t | x0 MSE (video, normalised latents), own caption | shuffled captions | empty caption | zeros "
              "| batch mean |\n|---|---|---|---|---|---|")
        zeros, batch_mean = float(z.square().mean()), float((z - z.mean(0, keepdim=True)).square().mean())
        for t in args.times:
            xt = interpolate(z, noise, t)
            row = []
            for text, mask in encoded.values():
                v = module.velocity({"video": xt, "audio": audio}, {"video": torch.full((n,), t),
                                                                    "audio": torch.ones(n)}, text, mask)["video"]
                row.append(f"{float((xt - t * v - z).square().mean()):.3f}")
            print(f"| {t:g} | {' | '.join(row)} | {zeros:.3f} | {batch_mean:.3f} |")


if __name__ == "__main__":
    main()
