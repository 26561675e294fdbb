"""Webdataset shards from videos (or generated bouncing-ball world clips): the library behind
``sora-make-shards`` (:mod:`sora.cli.make_shards`, where the options are described).  It turns jobs
(:class:`Job`: a folder's files, found and captioned by :mod:`sora.data.inputs`, or the generated clips
of :func:`world_jobs`) and their :class:`Options` into shard files (:func:`write_shards`).

Each sample holds the video under its container extension (original bytes, untouched) or under
``mp4`` when a re-encode is asked (``max_side``/``fps``/``max_seconds``/``split_scenes``, or an
image), a ``json`` with the probe metadata of the stored video plus ``caption``/``source``/``bytes``
(and ``world`` ground truth for world clips, ``from_image`` for images, ``segment``/``segment_start``
for the pieces of a long video, ``scene`` with ``split_scenes``, ``shots`` for timed captions), and
the caption in ``txt``.  Timed captions (:mod:`sora.data.timed_captions`: a ``<stem>.shots.json``
sidecar or a manifest row's ``shots``) are clipped and shifted to each piece and caption the sample
(joined) when it has no other caption; ``split_scenes`` cuts videos at the hard cuts PySceneDetect
finds (:mod:`sora.media.scenes`); ``world_shots`` makes a fraction of world clips multi-shot.
Every input is probed and decoded at its head and tail; unreadable, empty, truncated or undecodable
files, audio-only files, images (unless ``images`` seconds are given) and bad timed captions are
skipped with a reason each.  Workers probe/encode in parallel, in order, so the output is
deterministic; the calling process writes the shards (tar mtimes are 0, so equal inputs give
byte-identical shards).  Re-encoding streams (:mod:`sora.data.shard_encode`): memory is bounded
by a window of a few seconds, not by the file.  File names need not be UTF-8: ``source`` keeps
them losslessly (``os.fsencode(json["source"])`` is the name's bytes; json escapes them as
``\\udcXX``), keys are ASCII (:func:`sora.data.inputs.make_key`), and messages print undecodable
bytes as ``\\xNN``.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import re
import sys
import zlib
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from tqdm import tqdm

from sora.data.world import WorldConfig, clip_seed, make_clip, make_multishot
from sora.data.shard_encode import reencode, still
from sora.data.timed_captions import TimedCaptionError, load_shots, with_shots
from sora.media import MediaError, decoded_seconds, probe_av, read_audio, read_av, write_av
from sora.media import scenes

AUDIO_ONLY = "audio only: no video stream"
CHECK_SECONDS = 0.1  # length of the head / tail windows decoded to validate a file
WORLD_SHOTS = {"prob": 0.0, "max": 3, "cut_every": 0.5, "continue_prob": 0.3}  # world_jobs(shots=) defaults


@dataclass(frozen=True)
class Job:
    key: str
    source: str  # path relative to INPUT, or "world:seed=N"
    caption: str
    path: str | None = None  # absolute path of the video (None for world clips)
    ext: str = "mp4"
    seed: int = 0
    caption_from: str = "generated"  # sidecar / manifest / shots / none / generated
    kind: str = "video"  # video / audio / image (by extension) / world
    shots_file: str | None = None  # a <stem>.shots.json sidecar, read by the worker
    shots: list | None = None  # else a manifest row's raw shots
    shots_from: str = ""  # how messages name where the shots are: sidecar path, or manifest:line
    multishot: bool = False  # a world clip made with make_multishot


@dataclass(frozen=True)
class Options:
    max_side: int | None = None
    fps: float | None = None
    world: WorldConfig | None = None
    images: float | None = None  # seconds an image is held; None: images are skipped
    max_seconds: float | None = None  # longer videos are cut into segments of at most this
    hdr: str = "tonemap"  # PQ/HLG video: "tonemap" (stored as is, re-encodes tone mapped to SDR) or "skip"
    split_scenes: bool = False  # one sample per scene (cuts found by sora.media.scenes)
    scene_threshold: float = scenes.DEFAULT_THRESHOLD
    world_shots: dict | None = None  # make_multishot settings of world clips (WORLD_SHOTS keys)

    def stores_as_is(self, info) -> bool:
        """Whether a video with this probe info is stored untouched (no re-encode asked for it)."""
        return self.max_side is None and self.fps is None and (
            self.max_seconds is None or 0 < info.duration <= self.max_seconds)

    def key(self, key: str, segment: int) -> str:
        """Sample key: with ``max_seconds`` or ``split_scenes`` every key gets ``-NNN`` (never colliding
        with a file's)."""
        return key if self.max_seconds is None and not self.split_scenes else f"{key}-{segment:03d}"


# ----------------------------------------------------------------------------- workers


def describe(info, job: Job, size: int, caption: str | None = None) -> dict:
    caption = job.caption if caption is None else caption
    return {**info.to_dict(), "caption": caption, "source": job.source, "bytes": size}


def one_line(err: Exception, src) -> str:
    """A MediaError's reason without its "<source>: " prefix (the name as given, or with
    undecodable bytes escaped), on one line."""
    msg = " ".join(str(err).split())
    names = [str(src), printable(str(src)), str(src).encode("utf-8", "backslashreplace").decode(), "<bytes>"]
    for prefix in dict.fromkeys(f"{name}: " for name in names):
        msg = msg[len(prefix):] if msg.startswith(prefix) else msg
    return msg


def printable(text: str, stream=None) -> str:
    """``text`` safe to print on ``stream`` (whatever its errors handler): the undecodable bytes of a
    file name (``os.fsdecode``'s surrogates) as ``\\xNN``, what the stream cannot encode escaped."""
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that stands for no byte
        text = text.encode("utf-8", "backslashreplace").decode()
    encoding = getattr(stream, "encoding", None) or "utf-8"
    return text.encode(encoding, "backslashreplace").decode(encoding)


def check_decodes(src: str, info) -> None:
    """Decode the first frames and the last ones: catches bad streams and truncated files.  When
    the read at the end fails, the file is decoded from the top before it is called truncated or
    corrupt: a file whose container cannot seek (a WebM without cues) is kept when it decodes."""
    if len(read_av(src, duration=CHECK_SECONDS).frames) == 0:
        raise MediaError(f"{src}: no decodable video frame")
    if info.duration > 2 * CHECK_SECONDS:  # read_av raises when the data ends before the header says
        try:
            read_av(src, start=info.duration - CHECK_SECONDS)
        except MediaError as e:
            reason = one_line(e, src)
            try:
                end = decoded_seconds(src)
            except MediaError as whole:
                reason, end = f"{one_line(whole, src)}; at the end: {reason}", 0.0
            else:
                if end >= info.duration - max(2 / (info.fps or 25), CHECK_SECONDS):
                    return  # decodes from the top to the end: good
            if not reason.startswith("truncated"):
                reason = f"truncated or corrupt: video decodes to {end:.3f}s of {info.duration:.3f}s ({reason})"
            raise MediaError(f"{src}: {reason}") from None


def holds_audio(src: str) -> bool:
    try:
        read_audio(src, duration=0.01)
        return True
    except MediaError:
        return False


def world_sample(job: Job, opts: Options) -> tuple:
    if job.multishot:
        shots = opts.world_shots
        clip = make_multishot(job.seed, opts.world, shots["cut_every"], shots["max"], shots["continue_prob"])
    else:
        clip = make_clip(job.seed, opts.world)
    out = io.BytesIO()
    write_av(out, clip.frames, clip.audio, clip.fps, clip.sample_rate)
    data = out.getvalue()
    meta = {**describe(probe_av(data), job, len(data), clip.caption), "world": clip.meta}
    if "shots" in clip.meta:
        meta["shots"] = clip.meta["shots"]
    return job.key, "mp4", data, meta


def video_samples(job: Job, opts: Options) -> list[tuple] | str:
    """The samples of a video file, or a skip reason."""
    info = probe_av(job.path)
    if info.hdr and opts.hdr == "skip":
        return f"HDR ({info.hdr}) video: skipped (--hdr skip)"
    shots = load_shots(job.shots_file, job.shots, job.shots_from, info.duration, info.fps or 25.0)
    own = job.caption_from == "shots"  # captioned by its shots
    cuts = scenes.scene_cuts(job.path, opts.scene_threshold) if opts.split_scenes else []
    if not cuts and opts.stores_as_is(info):
        check_decodes(job.path, info)
        meta = {**describe(info, job, os.path.getsize(job.path)), **piece_fields(opts, 0, 0.0, cuts)}
        return [(opts.key(job.key, 0), job.ext, None, with_shots(meta, shots, 0.0, info.fps or 25.0, own))]
    samples = []
    for i, (start, data) in enumerate(reencode(job.path, info, opts.max_side, opts.fps, opts.max_seconds, cuts)):
        meta = {**describe(probe_av(data), job, len(data)), **piece_fields(opts, i, start, cuts)}
        if info.hdr:
            meta["tonemapped_from"] = info.hdr  # re-encoded as SDR (sora.media.picture)
        samples.append((opts.key(job.key, i), "mp4", data, with_shots(meta, shots, start, meta["fps"], own)))
    return samples


def piece_fields(opts: Options, i: int, start: float, cuts: list[float]) -> dict:
    """json fields of piece ``i`` (from ``start`` s) of a video cut by ``max_seconds`` / ``split_scenes``."""
    fields = {}
    if opts.max_seconds is not None or opts.split_scenes:
        fields.update(segment=i, segment_start=round(start, 6))
    if opts.split_scenes:
        fields["scene"] = bisect_right(cuts, start + 1e-6)  # the cuts at or before the piece's start
    return fields


def process(job: Job, opts: Options) -> tuple[Job, list[tuple], str | None]:
    """Worker: (job, its samples as (key, ext, bytes, json dict), skip reason or None).  A sample's
    bytes are None when the file is stored as is (the writer reads it: no video through the pool's pipes)."""
    try:
        if opts.world is not None:
            return job, [world_sample(job, opts)], None
        if job.kind == "audio":
            return job, [], AUDIO_ONLY
        if job.kind == "image":
            if opts.images is None:
                return job, [], "image: not a video (--images SECONDS stores it as a still clip)"
            data = still(job.path, probe_av(job.path), opts.images, opts.max_side, opts.fps)
            meta = {**describe(probe_av(data), job, len(data)), "from_image": True}
            return job, [(opts.key(job.key, 0), "mp4", data, meta)], None
        samples = video_samples(job, opts)
        return (job, [], samples) if isinstance(samples, str) else (job, samples, None)
    except TimedCaptionError as e:
        return job, [], f"bad timed captions: {e}"
    except MediaError as e:
        reason = one_line(e, job.path)
        if reason == "no video stream" and holds_audio(job.path):
            reason = AUDIO_ONLY  # an mp4 (or any video container) holding sound only
        return job, [], reason
    except Exception as e:  # noqa: BLE001 - one bad file must not stop a long run
        return job, [], f"{type(e).__name__}: {' '.join(str(e).split())}"


def reason_kind(reason: str) -> str:
    """'truncated or corrupt: video data ends at 0.4s ...' -> 'truncated or corrupt'."""
    return re.split(r" \(|: ", reason, maxsplit=1)[0]


# ----------------------------------------------------------------------------- jobs and the writer


def world_jobs(n: int, seed: int, config: WorldConfig, shots: dict | None = None) -> tuple[list[Job], Options]:
    """N generated world clips: clip i is ``make_clip(clip_seed(seed, i), config)``, or with ``shots``
    ({"prob", "max", "cut_every", "continue_prob"}, defaults WORLD_SHOTS) for a ``prob`` fraction of
    them (a seeded draw per clip index, as the pipeline's WorldClipStream draws) ``make_multishot(
    clip_seed(seed, i), config, cut_every, max, continue_prob)``."""
    if n < 1 or config.height % 2 or config.width % 2:
        raise ValueError(f"--world needs N >= 1 and an even --world-size (H.264), got {n}, "
                         f"{config.height}x{config.width}")
    prob = 0.0
    if shots is not None:
        shots = {**WORLD_SHOTS, **shots}
        ok = set(shots) == set(WORLD_SHOTS) and 0 <= shots["prob"] <= 1 and int(shots["max"]) >= 1 \
            and 0 < shots["cut_every"] <= config.seconds and 0 <= shots["continue_prob"] <= 1
        if not ok:
            raise ValueError(f"world shots need keys {', '.join(WORLD_SHOTS)} with 0 <= prob <= 1, max >= 1, "
                             f"0 < cut_every <= {config.seconds:g} s (the clip), 0 <= continue_prob <= 1; got {shots}")
        shots["max"], prob = int(shots["max"]), shots["prob"]
    multishot = [zlib.crc32(f"{seed}:shots:{i}".encode()) % 1000 < 1000 * prob for i in range(n)]
    jobs = [Job(f"world-{i:07d}", f"world:seed={seed}:{i}", "", seed=clip_seed(seed, i), kind="world",
                multishot=multishot[i]) for i in range(n)]
    return jobs, Options(world=config, world_shots=shots if prob > 0 else None)


@dataclass
class Written:
    """What :func:`write_shards` wrote: shard paths, sample counts, hours, skip reasons by kind."""
    shards: list[str] = field(default_factory=list)
    samples: int = 0
    with_audio: int = 0
    seconds: float = 0.0
    skipped: Counter = field(default_factory=Counter)
    captions: Counter = field(default_factory=Counter)  # by origin: sidecar / manifest / shots / none / generated
    timed: int = 0  # inputs with timed captions (a world clip's shots too)


def write_shards(jobs: list[Job], opts: Options, out_dir: Path, maxcount: int = 10000, maxsize_mb: float = 256,
                 workers: int = 1) -> Written:
    """Process ``jobs`` (``workers`` spawned processes, results in order) into ``out_dir/shard-%06d.tar``;
    each skipped input is one line on stderr with its reason."""
    import webdataset as wds  # here, not at the top: it imports torch, which workers don't need

    done, writer = Written(), None
    workers = min(workers, len(jobs))
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        results = (pool.imap if pool else map)(partial(process, opts=opts), jobs)
        for job, samples, reason in tqdm(results, total=len(jobs), unit="clip", file=sys.stderr,
                                         disable=None, desc="make_shards"):
            try:  # stored as is: read here, not shipped through the pool's pipes
                samples = [(k, ext, Path(job.path).read_bytes() if data is None else data, meta)
                           for k, ext, data, meta in samples]
            except OSError as e:
                reason = f"cannot read ({e.strerror})"
            if reason is not None:
                tqdm.write(printable(f"skip {job.source}: {reason}", sys.stderr), file=sys.stderr)
                done.skipped[reason_kind(reason)] += 1
                continue
            for key, ext, data, meta in samples:
                if writer is None:  # opened on the first sample: no empty shard when all are skipped
                    writer = wds.ShardWriter(str(out_dir / "shard-%06d.tar"), maxcount=maxcount,
                                             maxsize=maxsize_mb * 1e6, post=done.shards.append, verbose=0, mtime=0)
                writer.write({"__key__": key, ext: data, "json": json.dumps(meta).encode(), "txt": meta["caption"]})
                done.samples, done.with_audio = done.samples + 1, done.with_audio + meta["has_audio"]
                done.seconds += meta["duration"]
                done.captions[job.caption_from] += 1
            done.timed += any("shots" in meta for _, _, _, meta in samples)
    finally:
        if pool is not None:
            pool.terminate()
        if writer is not None:
            writer.close()
    return done
