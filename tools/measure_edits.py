"""What retake and extension keep, and how an extension's seam looks, on held-out world clips (issue 16).

    python tools/measure_edits.py --ckpt outputs/demo/dit/checkpoints/last.ckpt --clips 8 --seed 1000

For each held-out clip (``make_clip(seed + i)`` at the checkpoint's timeline and frame size):

- ``recon``: PSNR of the video VAE's round trip (encode, decode) against the clip: what any kept
  region can at best reach, since edits decode their latents.
- ``retake``: the middle third of the clip regenerated (both streams); PSNR against the input over
  the frames of the kept latent steps, beside ``recon`` over the same frames (the target: no more
  than 1 dB below it).
- ``extend``: the first half as context, the second half generated. ``seam``: the mean absolute
  frame difference across the seam (last context frame -> first new frame) divided by the clip's
  mean frame difference elsewhere (the target: at most 2); ``shuffled`` is the same ratio for an
  extension whose context comes from another clip, the trivial baseline of a jump.
- ``physics``: the eval's per-clip checks (:func:`sora.evaluation.physics.probe_batch`: balls tracked,
  impacts in sync with the sound, gravity within 20 %, named colours tracked) of the extensions beside
  plain text-to-AV samples of the same captions and the real clips, over the whole clip (an extension's
  first half is its real context) and over the generated second half alone.

Prints one line per clip and the means as a Markdown table.
"""

from __future__ import annotations

import argparse

import numpy as np


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255.0 ** 2 / max(mse, 1e-10))


def kept_frames(timeline, start: float, end: float) -> np.ndarray:
    """bool [num_frames]: frames whose video latent step lies outside [start, end) (kept by a retake)."""
    spans, s = timeline.video_token_spans(), timeline.vae_time_stride
    keep = np.zeros(timeline.num_frames, bool)
    for j, (lo, hi) in enumerate(spans):
        if (lo < end and hi > start) or (lo == hi and start <= lo < end):
            continue
        keep[0 if j == 0 else (j - 1) * s + 1: j * s + 1] = True
    return keep


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--seed", type=int, default=1000, help="held-out world clips: seed, seed + 1, ...")
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args(argv)

    import torch

    from sora.data.world import WorldConfig, make_clip
    from sora.inference import AVPipeline

    pipe = AVPipeline.from_checkpoint(args.ckpt)
    tl, (h, w) = pipe.timeline, pipe.frame_size()
    world = WorldConfig(width=w, height=h, fps=float(tl.fps_q), seconds=tl.seconds, sample_rate=tl.sample_rate)
    third = tl.seconds / 3
    q = float(tl.quantum)
    context = max(q, round(tl.seconds / 2 / q) * q)
    if context >= tl.seconds:
        raise SystemExit(f"measure_edits: a {tl.seconds:g} s clip has no room for a context of whole {q:g} s quanta")
    step = tl.vae_time_stride / float(tl.fps_q)  # the middle third, on video latent steps
    window = (round(third / step) * step, round(2 * third / step) * step)
    keep = kept_frames(tl, *window)
    opts = dict(steps=args.steps, guidance=4.0, seed=0)
    n_ctx, s_ctx = round(context * float(tl.fps_q)) + 1, round(context * tl.sample_rate)
    rows, made = [], {"real": [], "extension": [], "plain": []}
    clips = [make_clip(args.seed + i, world) for i in range(args.clips)]
    for i, clip in enumerate(clips):
        frames, audio = clip.frames, clip.audio[:, :tl.num_samples]
        with torch.no_grad():
            z = pipe.module.video_vae.encode(torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1)
            recon = ((pipe.module.video_vae.decode(z.mode()).clamp(-1, 1)[0].permute(1, 2, 3, 0).numpy() + 1)
                     * 127.5).round().clip(0, 255).astype(np.uint8)
        retake = pipe.retake(clip.caption, frames, audio, *window, **opts)
        ext = pipe.extend(clip.caption, frames[:n_ctx], audio[:, :s_ctx], tl.seconds - context, **opts)
        made["real"].append((frames, audio))
        made["extension"].append((ext.frames, ext.audio))
        plain = pipe.generate(clip.caption, **opts)
        made["plain"].append((plain.frames, plain.audio))
        other = clips[(i + 1) % len(clips)]
        shuffled = np.concatenate([other.frames[:n_ctx], ext.frames[n_ctx:]])

        def seam(f):
            d = np.abs(np.diff(f.astype(np.float64), axis=0)).mean(axis=(1, 2, 3))
            rest = np.delete(d, n_ctx - 1)
            return float(d[n_ctx - 1] / max(rest.mean(), 1e-6))

        rows.append({"recon": psnr(recon, frames), "recon_kept": psnr(recon[keep], frames[keep]),
                     "retake_kept": psnr(retake.frames[keep], frames[keep]), "seam": seam(ext.frames),
                     "shuffled": seam(shuffled)})
        print(f"clip {args.seed + i}: " + ", ".join(f"{k} {v:.2f}" for k, v in rows[-1].items()), flush=True)
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    print(f"\nretake window {window[0]:.2f}-{window[1]:.2f} s, extension {context:g} s context + "
          f"{tl.seconds - context:g} s, {args.clips} held-out clips, {args.steps} Euler steps\n")
    print("| measure | value | beside |\n|---|---|---|")
    print(f"| retake: PSNR of kept frames vs input | {mean['retake_kept']:.2f} dB | VAE round trip on the same frames "
          f"{mean['recon_kept']:.2f} dB (target: >= {mean['recon_kept'] - 1:.2f}) |")
    print(f"| extension seam jump / mean frame change | {mean['seam']:.2f} | context from another clip "
          f"{mean['shuffled']:.2f} (target: <= 2) |")
    print(f"| VAE round trip, whole clip | {mean['recon']:.2f} dB | |")
    physics_table(made, [c.caption for c in clips], n_ctx, s_ctx, tl, world)


def physics_table(made: dict, captions: list, n_ctx: int, s_ctx: int, tl, world) -> None:
    """The eval's per-clip checks of real clips, extensions and plain samples: whole clips and the second half."""
    from sora.evaluation.physics import probe_batch

    n = len(captions)
    keys = ("clips_tracked", "clips_in_sync", "clips_gravity_ok", "clips_colour_match")
    print("\n| clips passing | " + " | ".join(k.removeprefix("clips_") for k in keys) + " |\n|---|---|---|---|---|")
    for part, cut in (("whole clip", lambda f, a: (f, a)), ("generated half", lambda f, a: (f[n_ctx:], a[:, s_ctx:]))):
        for name in ("real", "extension", "plain"):
            m = probe_batch([cut(f, a) for f, a in made[name]], float(tl.fps_q), tl.sample_rate, world,
                            captions=captions, prefix="")
            cells = [f"{m[k]}/{m['clips_naming_colour'] if k == 'clips_colour_match' else n}" for k in keys]
            print(f"| {name}, {part} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
