"""Clips per second of the full data pipeline against raw PyAV decoding of the same clips.

Both sides decode the same clips (same files, same start times, same number of processes):

* pipeline: ``ShardClipStream`` through the ``StatefulDataLoader`` with ``--workers`` workers:
  tar reading, shuffle buffer, probe, seek, decode, frame picking, resize, crop, audio
  resampling and placement, float conversion, collation;
* raw: a ``multiprocessing.Pool`` of as many processes that opens each file with PyAV, seeks,
  decodes every video frame of the window converted to RGB at the same size, and decodes the
  window's audio: the work no pipeline can avoid.

Prints both rates and their ratio (target >= 0.9 with 2 workers).

    python tools/bench_data.py                       # real media in ../shared/media
    python tools/bench_data.py --clips 48 --size 256 --seconds 2 --workers 2
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

import av
import webdataset as wds
from torchdata.stateful_dataloader import StatefulDataLoader

from sora.data.buckets import Bucket, cover_size
from sora.data.streams import ShardClipStream
from sora.media import probe_av
from sora.timeline import Timeline

DEFAULT_MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media"


def raw_decode(job: tuple[bytes, float, float, tuple[int, int]]) -> int:
    """Decode one window's video (RGB at ``size``) and audio with plain PyAV; returns frames."""
    data, start, duration, (h, w) = job
    frames = 0
    with av.open(io.BytesIO(data)) as container:
        vs = container.streams.video[0]
        streams = [vs] + list(container.streams.audio[:1])
        t0 = float(vs.start_time * vs.time_base) if vs.start_time is not None else 0.0
        if start > 0:
            container.seek(int((t0 + start) / vs.time_base), stream=vs, backward=True)
        end = t0 + start + duration
        done = {s.index: False for s in streams}
        for packet in container.demux(streams):
            if done[packet.stream.index]:
                if all(done.values()):
                    break
                continue
            for frame in packet.decode():
                t = frame.time if frame.time is not None else 0.0
                if t >= end:
                    done[packet.stream.index] = True
                elif packet.stream.type == "video" and t >= t0 + start - 1e-6:
                    frame.to_ndarray(width=w, height=h, format="rgb24")
                    frames += 1
    return frames


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--media", type=Path, default=DEFAULT_MEDIA, help="folder of mp4 files")
    p.add_argument("--clips", type=int, default=48, help="clips to decode on each side")
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--fps", type=float, default=24)
    p.add_argument("--size", type=int, default=256, help="square crop side")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--copies", type=int, default=8, help="samples per file in the shard (random starts differ)")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each side; medians reported")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)

    files = sorted(args.media.glob("*.mp4"))
    if not files:
        print(f"bench_data: no .mp4 files in {args.media}", file=sys.stderr)
        return 2
    tl = Timeline(seconds=args.seconds, fps=args.fps)
    blobs = {f.stem: f.read_bytes() for f in files}
    infos = {k: probe_av(d) for k, d in blobs.items()}
    meta = {k: json.dumps(i.to_dict()).encode() for k, i in infos.items()}  # as make_shards writes it
    bucket = Bucket(args.size, args.size)
    pipeline_s, raw_s = [], []
    with tempfile.TemporaryDirectory() as tmp, get_context("spawn").Pool(args.workers) as pool:
        shards = f"{tmp}/bench-%02d.tar"
        # each file under several keys (random starts differ), one shard per copy: a mixed set with
        # more shards than workers, as any real dataset has
        with wds.ShardWriter(shards, maxcount=len(blobs), verbose=0) as sink:
            for copy in range(args.copies):
                for key, data in blobs.items():
                    sink.write({"__key__": f"{key}/{copy}", "mp4": data, "json": meta[key]})
        for _ in range(args.repeats):  # alternate the two so machine noise hits both alike
            stream = ShardClipStream(f"{tmp}/bench-*.tar", tl, batch_size=1, size=(args.size, args.size), shuffle_buffer=16, seed=0)
            loader = StatefulDataLoader(stream, batch_size=None, num_workers=args.workers, prefetch_factor=2)
            it = iter(loader)
            next(it)  # start-up (worker spawn, imports) is not throughput
            t = time.perf_counter()
            picked = [next(it) for _ in range(args.clips)]
            pipeline_s.append(time.perf_counter() - t)
            it._shutdown_workers()
            files = [b.keys[0].split("/")[0] for b in picked]
            jobs = [(blobs[f], float(b.start[0]), tl.read_duration, cover_size(infos[f].height, infos[f].width, bucket))
                    for f, b in zip(files, picked)]
            pool.map(raw_decode, jobs[:args.workers])  # warm the processes
            t = time.perf_counter()
            frames = sum(pool.map(raw_decode, jobs, chunksize=1))
            raw_s.append(time.perf_counter() - t)
    pipeline_s, raw_s = statistics.median(pipeline_s), statistics.median(raw_s)

    result = {
        "clips": args.clips, "repeats": args.repeats, "workers": args.workers, "seconds": args.seconds, "fps": args.fps, "size": args.size,
        "files": {k: f"{i.width}x{i.height} {i.fps:g} fps" for k, i in infos.items()},
        "pipeline_clips_per_s": args.clips / pipeline_s, "raw_pyav_clips_per_s": args.clips / raw_s,
        "raw_frames_decoded": frames,
    }
    result["ratio"] = result["pipeline_clips_per_s"] / result["raw_pyav_clips_per_s"]
    print(f"pipeline  {result['pipeline_clips_per_s']:7.2f} clips/s  (median of {args.repeats}; {args.clips} clips, {args.workers} workers, "
          f"{tl.num_frames} frames {args.size}x{args.size} + {tl.num_samples} samples each)")
    print(f"raw PyAV  {result['raw_pyav_clips_per_s']:7.2f} clips/s  (same clips and starts, {args.workers} processes)")
    print(f"ratio     {result['ratio']:7.2f}  (target >= 0.9)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
