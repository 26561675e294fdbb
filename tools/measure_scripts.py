"""Timed two-shot scripts on held-out world clips (issue 16): where the cut lands, and whether each shot shows
what its caption names, against the same captions given as one prompt.

    python tools/measure_scripts.py --ckpt outputs/demo/dit/checkpoints/last.ckpt --pairs 8 --seed 1000

Each pair is two held-out world clips with different floor colours (``make_clip(seed + k)``, at the
checkpoint's timeline and frame size). The script: shot 1 ``[0, cut)`` is the first clip's caption, shot 2
``[cut, end)`` the second's, the cut on the video latent step nearest the middle. The same two captions as
one prompt ("A, then B") is the baseline: without shot masks nothing tells the model when to cut.

- ``cut``: the frame where the floor colour changes most (the median floor pixel's largest jump between
  consecutive frames), when that jump exceeds ``--min-jump`` levels; within one frame of the scripted
  cut counts. The detector is checked on the real clips first: each pair's two real clips joined at the
  cut (it must find the cut), and the first real clip alone (it must find none).
- ``floor``: each shot's floor colour (the median floor pixel's nearest world floor colour) is the one
  its caption names.
- ``ball colour``: every ball colour a shot's caption names is the colour of a ball the physics probe
  tracks within that shot (:func:`sora.evaluation.checks.colour_match`, the eval's prompt adherence).

Prints one line per pair and a Markdown table: real joined clips (the ceiling), scripted samples, one prompt.
"""

from __future__ import annotations

import argparse

import numpy as np


def floor_rgb(frames: np.ndarray, floor_y: int) -> np.ndarray:
    """float [T, 3]: the median floor pixel of each frame."""
    return np.median(frames[:, floor_y:].reshape(len(frames), -1, 3).astype(np.float64), axis=1)


def floor_name(frames: np.ndarray, config) -> str:
    """The world floor colour nearest the frames' median floor pixel."""
    from sora.data.world import FLOOR_SHADE, PALETTE

    rgb = np.median(floor_rgb(frames, config.floor_y), axis=0)
    return min(config.floor_colors, key=lambda c: np.linalg.norm(FLOOR_SHADE * np.array(PALETTE[c]) - rgb))


def detect_cut(frames: np.ndarray, floor_y: int, min_jump: float) -> int | None:
    """The first frame after the largest floor-colour jump, or None when no jump reaches ``min_jump``."""
    jumps = np.abs(np.diff(floor_rgb(frames, floor_y), axis=0)).max(axis=1)
    return int(jumps.argmax()) + 1 if jumps.size and jumps.max() >= min_jump else None


def judge(frames, audio, captions, cut_frame, tl, config, min_jump) -> dict:
    """The cut's frame error (None: no cut found) and, per shot, floor and ball-colour adherence."""
    from sora.evaluation.checks import colour_match
    from sora.evaluation.physics import probe_clip

    found = detect_cut(frames, config.floor_y, min_jump)
    cut_sample = round(cut_frame / float(tl.fps_q) * tl.sample_rate)
    spans = [(slice(0, cut_frame), slice(0, cut_sample)), (slice(cut_frame, None), slice(cut_sample, None))]
    floors, balls = [], []
    for (fs, as_), caption in zip(spans, captions):
        floors.append(f" {floor_name(frames[fs], config)} floor" in caption)
        probe = probe_clip(frames[fs], audio[..., as_], float(tl.fps_q), tl.sample_rate, config)
        balls.append(colour_match(caption, probe.track_colors, config.colors))
    return {"error": None if found is None else abs(found - cut_frame), "floors": floors, "balls": balls}


def pairs_of(seed: int, n: int, config) -> list:
    """``n`` pairs of consecutive held-out clips whose floors differ (seeds from ``seed`` on)."""
    from sora.data.world import make_clip

    out, k = [], seed
    while len(out) < n:
        a, b = make_clip(k, config), make_clip(k + 1, config)
        k += 1
        if a.meta["floor_color"] != b.meta["floor_color"]:
            out.append((a, b))
            k += 1
    return out


def summary(rows: list[dict]) -> dict:
    shots = [x for r in rows for x in r["balls"] if x is not None]
    return {"cuts": sum(r["error"] is not None and r["error"] <= 1 for r in rows),
            "errors": [r["error"] for r in rows], "floors": sum(sum(r["floors"]) for r in rows),
            "shots": 2 * len(rows), "balls": sum(shots), "naming": len(shots)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--seed", type=int, default=1000, help="held-out world clips: seed, seed + 1, ...")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--min-jump", type=float, default=20.0, help="floor colour jump (0-255 levels) that is a cut")
    args = p.parse_args(argv)

    from sora.data.world import WorldConfig
    from sora.inference import AVPipeline
    from sora.script import Script, Shot

    pipe = AVPipeline.from_checkpoint(args.ckpt)
    tl, (h, w) = pipe.timeline, pipe.frame_size()
    config = WorldConfig(width=w, height=h, fps=float(tl.fps_q), seconds=tl.seconds, sample_rate=tl.sample_rate)
    step = tl.vae_time_stride / float(tl.fps_q)
    cut = round(tl.seconds / 2 / step) * step
    cut_frame = round(cut * float(tl.fps_q))
    opts = dict(steps=args.steps, guidance=args.guidance, seed=0)
    runs = {"real": [], "real_single": [], "script": [], "one_prompt": []}
    for k, (a, b) in enumerate(pairs_of(args.seed, args.pairs, config)):
        captions = (a.caption, b.caption)
        n = tl.num_samples
        joined = np.concatenate([a.frames[:cut_frame], b.frames[cut_frame:]])
        joined_audio = np.concatenate([a.audio[:, :round(cut * tl.sample_rate)],
                                       b.audio[:, round(cut * tl.sample_rate):n]], axis=1)
        script = Script((Shot(0.0, cut, a.caption), Shot(cut, tl.seconds, b.caption)))
        scripted = pipe.generate(script, **opts)
        single = pipe.generate(f"{a.caption}, then {b.caption}", **opts)
        for name, (frames, audio) in {"real": (joined, joined_audio), "real_single": (a.frames, a.audio[:, :n]),
                                      "script": (scripted.frames, scripted.audio),
                                      "one_prompt": (single.frames, single.audio)}.items():
            runs[name].append(judge(frames, audio, captions, cut_frame, tl, config, args.min_jump))
        print(f"pair {k}: " + "; ".join(f"{name} cut {r[-1]['error']}, floors {r[-1]['floors']}, balls "
                                        f"{r[-1]['balls']}" for name, r in runs.items()), flush=True)
    s = {name: summary(rows) for name, rows in runs.items()}
    n = args.pairs
    print(f"\n{n} pairs, cut at {cut:g} s (frame {cut_frame}), {args.steps} Euler steps, guidance {args.guidance:g}\n")
    print("| measure | real clips joined at the cut | scripted sample | one prompt |\n|---|---|---|---|")
    print(f"| cut found within one frame | {s['real']['cuts']}/{n} (a single real clip: "
          f"{sum(e is not None for e in s['real_single']['errors'])}/{n} cuts found) | {s['script']['cuts']}/{n} | "
          f"{s['one_prompt']['cuts']}/{n} |")
    print("| shots whose floor is the caption's | " + " | ".join(
        f"{s[x]['floors']}/{s[x]['shots']}" for x in ("real", "script", "one_prompt")) + " |")
    print("| shots where every named ball colour is tracked | " + " | ".join(
        f"{s[x]['balls']}/{s[x]['naming']}" for x in ("real", "script", "one_prompt")) + " |")
    print("\ncut errors (frames; None: no cut found): " + "; ".join(
        f"{x} {s[x]['errors']}" for x in ("script", "one_prompt")))


if __name__ == "__main__":
    main()
