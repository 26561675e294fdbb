"""`sora-make-shards` (``python -m sora.cli.make_shards``): pack videos (or generated bouncing-ball
world clips) into webdataset tar shards (the library: :mod:`sora.data.inputs` finds the inputs,
:mod:`sora.data.shards` writes the shards).

    sora-make-shards INPUT OUTPUT [--captions FILE] [--max-side S] [--fps F] [--max-seconds S] [--images SECONDS]
                     [--hdr tonemap|skip] [--split-scenes [--scene-threshold 27]]
    sora-make-shards --world N OUTPUT [--world-size 64] [--world-seconds 4] [--seed 0]
                     [--world-shots PROB [--world-max-shots 3] [--world-cut-every 0.5] [--world-continue 0.3]]

INPUT is a folder searched recursively for videos, audio files and images (or a single file).
Each sample holds the video under its container extension (original bytes, untouched) or under
``mp4`` when ``--max-side``/``--fps`` ask for a re-encode, a ``json`` with the probe metadata of
the stored video plus ``caption``/``source``/``bytes`` (and ``world`` ground truth for world
clips), and the caption in ``txt``.  Captions come from a sidecar ``<stem>.txt``, else from
``--captions`` (JSONL or CSV with path/file and caption), else are empty.  Every input is probed
and decoded at its head and tail; unreadable, empty, truncated or undecodable files are skipped
with one warning line each, and so are audio-only files (wav, flac, mp3, ogg, opus, m4a, aac, or a
video container without a video stream: "audio only: no video stream") and images (png, jpg,
jpeg, webp, bmp) unless ``--images SECONDS`` stores each as an mp4 of its one frame held that long
(``from_image`` in its json).  ``--max-seconds S`` cuts longer videos into consecutive samples of at
most S seconds, re-encoded (keys ``<key>-000``, ``<key>-001``..., json ``segment`` and
``segment_start`` in seconds; with it every key gets the suffix, shorter videos are stored as they
are under ``<key>-000``).  Timed captions: a sidecar ``<stem>.shots.json`` (or a ``shots`` field in
a JSONL ``--captions`` row) holds ``[[t0, t1, "caption"], ...]`` rows in seconds of the video
(sorted, not overlapping, gaps allowed), stored as json ``shots`` (``start``/``end``/``caption``),
clipped and shifted to each segment; with no ``.txt`` or manifest caption the shots' captions,
joined, are the caption; a bad sidecar skips its video with the file and row named.
``--split-scenes`` cuts each video at the hard cuts PySceneDetect finds (``pip install
'sora[scenes]'``; ``--scene-threshold``: lower finds subtler cuts) into one re-encoded sample per
scene (json ``scene``; longer scenes are further cut by ``--max-seconds``).  ``--world-shots P``
makes a fraction P of the world clips multi-shot (up to ``--world-max-shots`` shots, cuts on
multiples of ``--world-cut-every`` seconds, a shot continuing the previous scene with probability
``--world-continue``), their shots in the json.  Re-encoding streams: the video is decoded and
encoded a window of a few seconds at a time, so memory does not grow with its length.  Phone rotation, anamorphic pixels,
colour and HDR are read as displayed (README, "Real-world inputs"); HDR (PQ/HLG) videos are kept
and tone mapped to SDR when read or re-encoded, or left out with ``--hdr skip``.  File names need not be UTF-8:
``source`` keeps them losslessly (``os.fsencode(json["source"])`` gives the bytes back) and
messages show undecodable bytes as ``\\xNN``.  Workers probe/encode in parallel, in order, so the
output is deterministic; the main process writes the shards (tar mtimes are 0, so equal inputs give
byte-identical shards).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

from sora.data.inputs import folder_jobs
from sora.data.shards import WORLD_SHOTS, printable, world_jobs, write_shards
from sora.data.world import WorldConfig
from sora.media.scenes import DEFAULT_THRESHOLD


EPILOG = """Timed captions: clip.shots.json beside clip.mp4 (or "shots" in a JSONL --captions row) holds
[[t0, t1, "caption"], ...] in seconds of the video (sorted, not overlapping, gaps allowed); stored as
json "shots", clipped and shifted to each --max-seconds segment or --split-scenes scene; without a
.txt or manifest caption the shots' captions, joined, are the caption. --split-scenes needs
PySceneDetect (pip install 'sora[scenes]'). --world-shots P makes that fraction of world clips
multi-shot, their shots in the json.
Skipped, one line each with its reason and counted in the summary: unreadable, empty,
truncated or undecodable files; audio-only files (wav, flac, mp3, ogg, opus, m4a, aac, or a video
container without a video stream); images (png, jpg, jpeg, webp, bmp) unless --images; videos with
bad timed captions (the sidecar and row named). Re-encoding (--max-side, --fps, --max-seconds,
--split-scenes) streams a window of a few seconds at a time: memory does not grow with a file's
length. File names need not be UTF-8: json "source" keeps them losslessly (os.fsencode gives the
bytes back), messages show undecodable bytes as \\xNN."""


def size_arg(text: str) -> tuple[int, int]:
    """'64' -> (64, 64); '48x64' -> (48, 64) as (H, W)."""
    try:
        h, _, w = text.lower().partition("x")
        return int(h), int(w or h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SIDE or HxW, got {text!r}") from None


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EPILOG)
    p.add_argument("input", nargs="?", help="folder of videos, or one file (omit or ignored with --world)")
    p.add_argument("output", help="folder for shard-%%06d.tar")  # one positional = OUTPUT
    p.add_argument("--captions", type=Path, help="JSONL or CSV manifest of path/file -> caption")
    p.add_argument("--max-side", type=int, help="re-encode so the longer side is <= this")
    p.add_argument("--fps", type=float, help="re-encode at this frame rate")
    p.add_argument("--max-seconds", type=float, metavar="S",
                   help="cut longer videos into re-encoded samples of at most S seconds, keyed KEY-000, KEY-001...")
    p.add_argument("--images", type=float, metavar="SECONDS",
                   help="store each image as an mp4 of its one frame held SECONDS (<= 1000; default: skip images)")
    p.add_argument("--hdr", choices=("tonemap", "skip"), default="tonemap",
                   help="PQ/HLG videos: keep them (training and re-encodes tone map them to SDR; default) or skip them")
    p.add_argument("--split-scenes", action="store_true",
                   help="cut videos at detected hard cuts: one re-encoded sample per scene, keyed KEY-000, KEY-001...")
    p.add_argument("--scene-threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="cut where the mean HSV change between frames (0-255) reaches this (default %(default)g)")
    p.add_argument("--maxsize", type=float, default=256, help="MB per shard (default 256)")
    p.add_argument("--maxcount", type=int, default=10000, help="samples per shard (default 10000)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--overwrite", action="store_true", help="delete existing shards in OUTPUT first")
    p.add_argument("--world", type=int, metavar="N", help="generate N bouncing-ball clips instead")
    p.add_argument("--world-size", type=size_arg, default=(64, 64), help="SIDE or HxW (default 64)")
    p.add_argument("--world-seconds", type=float, default=4.0)
    p.add_argument("--world-fps", type=float, default=24.0)
    p.add_argument("--world-sample-rate", type=int, default=16000)
    p.add_argument("--seed", type=int, default=0, help="world clip i is BouncingWorld(seed=SEED)[i]")
    p.add_argument("--world-shots", type=float, default=0.0, metavar="PROB",
                   help="fraction of world clips made multi-shot (default 0: none)")
    p.add_argument("--world-max-shots", type=int, default=WORLD_SHOTS["max"], help="shots per multi-shot clip, at most")
    p.add_argument("--world-cut-every", type=float, default=WORLD_SHOTS["cut_every"], metavar="SECONDS",
                   help="cuts fall on multiples of this (default %(default)s)")
    p.add_argument("--world-continue", type=float, default=WORLD_SHOTS["continue_prob"], metavar="PROB",
                   help="chance a shot continues the previous shot's scene (default %(default)s)")
    return p.parse_args(argv)


def make_jobs(args):
    if args.maxsize <= 0 or args.maxcount < 1 or args.workers < 1:
        raise ValueError("--maxsize, --maxcount and --workers must be positive")
    if (args.max_side is not None and args.max_side < 2) or (args.fps is not None and args.fps <= 0):
        raise ValueError("--max-side must be >= 2 and --fps > 0")
    if (args.max_seconds is not None and not args.max_seconds > 0) or \
            (args.images is not None and not 0 < args.images <= 1000):
        raise ValueError("--max-seconds must be > 0 and --images in (0, 1000] seconds")
    if args.world is not None:
        (h, w) = args.world_size
        config = WorldConfig(width=w, height=h, fps=args.world_fps, seconds=args.world_seconds,
                             sample_rate=args.world_sample_rate)  # raises ValueError when invalid
        shots = None if args.world_shots == 0 else {
            "prob": args.world_shots, "max": args.world_max_shots, "cut_every": args.world_cut_every,
            "continue_prob": args.world_continue}
        return world_jobs(args.world, args.seed, config, shots)
    if args.input is None:
        raise ValueError("INPUT is required (or use --world N)")
    return folder_jobs(Path(args.input), args.captions, args.max_side, args.fps, args.images, args.max_seconds,
                       args.hdr, args.split_scenes, args.scene_threshold)


def fail(msg: str, code: int = 1) -> int:
    print(printable(f"make_shards: error: {' '.join(msg.split())}", sys.stderr), file=sys.stderr)
    return code


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        jobs, opts = make_jobs(args)
    except (ValueError, csv.Error) as e:  # bad options or manifest, nothing to do
        return fail(str(e), 2)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = sorted(out_dir.glob("shard-*.tar"))
    if stale and not args.overwrite:
        return fail(f"{out_dir} already holds {len(stale)} shard(s); pass --overwrite to replace them", 2)
    for f in stale:
        f.unlink()

    done = write_shards(jobs, opts, out_dir, args.maxcount, args.maxsize, args.workers)
    why = ", ".join(f"{n} {kind}" for kind, n in done.skipped.most_common())
    if not done.samples:
        return fail(f"no sample written: all {len(jobs)} input(s) were skipped ({why})")
    shards = done.shards
    total_mb = sum(os.path.getsize(f) for f in shards) / 1e6
    glob = shards[0] if len(shards) == 1 else str(out_dir / f"shard-{{000000..{len(shards) - 1:06d}}}.tar")
    say = lambda text: print(printable(text, sys.stdout))  # noqa: E731 - OUTPUT's name may not be UTF-8
    say(f"written {done.samples} samples in {len(shards)} shard(s) ({total_mb:.1f} MB) to {out_dir}")
    say(f"skipped {sum(done.skipped.values())}" + (f" ({why})" if why else ""))
    say(f"video: {done.seconds / 3600:.3f} hours, {done.with_audio} of {done.samples} with audio; captions: "
        + ", ".join(f"{n} {kind}" for kind, n in done.captions.items()) + f"; timed captions: {done.timed} input(s)")
    say(f"shards: {glob}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
