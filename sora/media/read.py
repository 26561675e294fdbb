"""Read clips and audio with PyAV, on the time axis of :mod:`sora.media`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import av
import numpy as np

from sora.media.picture import HDR_MODES, Deinterlacer, to_rgb
from sora.media.probe import _LAYOUTS, AVInfo, MediaError, audio_stream, opened, probe, seconds, video_stream

__all__ = ["AVClip", "AudioInfo", "decoded_seconds", "read_audio", "read_av", "VIDEO_EXTS"]

VIDEO_EXTS = ("mp4", "mov", "mkv", "webm", "avi", "mpg", "mpeg", "m4v")  # containers the project reads
_WARMUP = 0.05  # seconds of audio resampled before the clip: the resampler's filter settles there
AUDIO_PREROLL = 0.25  # seconds demuxed before `start`: covers AAC/MP3 decoder warm-up and B-frame reordering
_BACKOFF = 10.0  # seconds further back a second seek tries when the first lands after `start`
_EPS = 1e-6  # seconds; slack for float comparisons of timestamps
_GAP = 0.002  # seconds; an audio pts jump larger than this restarts the resampler


@dataclass
class AVClip:
    """A decoded window of a file: ``frames`` uint8 [T,H,W,3] RGB at ``fps`` as displayed (display
    matrix and sample aspect ratio applied), ``audio`` float32 [channels, N] in [-1, 1] at
    ``sample_rate`` with ``audio_mask`` bool [N] (True = decoded, False = zero padding),
    ``start`` = where the window starts on the source's timeline."""

    frames: np.ndarray
    audio: np.ndarray
    audio_mask: np.ndarray
    info: AVInfo
    fps: float
    sample_rate: int
    start: float


# ----------------------------------------------------------------------------- reading


class _AudioPlacer:
    """Resamples decoded audio frames and remembers where on the clip each output sample goes."""

    def __init__(self, sample_rate: int, channels: int, zero: float, limit: float):
        self.sr, self.channels = sample_rate, channels
        self.zero = zero  # stream time (s) of clip sample 0
        self.limit = limit  # clip samples at or past this are dropped (math.inf = keep all)
        self.pieces: list[tuple[int, np.ndarray]] = []  # (clip sample, [channels, n])
        self.resampler = None
        self.pos = 0  # clip sample where the resampler's next output sample goes
        self.next_t = None  # expected pts (s) of the next input frame if the stream is contiguous

    def push(self, frame) -> None:
        t = None if frame.pts is None else float(frame.pts * frame.time_base)
        if t is not None and self.resampler is None and t + frame.samples / frame.sample_rate < self.zero - _WARMUP:
            return  # decoded from a keyframe far before the clip: resample only from just before it
        if t is not None and (self.next_t is None or abs(t - self.next_t) > _GAP):
            self.flush()  # first frame, or a discontinuity: restart placement from this pts
            self.pos = round((t - self.zero) * self.sr)
        if self.resampler is None:
            self.resampler = av.AudioResampler(format="fltp", layout=self._layout(frame), rate=self.sr)
        self.next_t = (t if t is not None else self.next_t or 0.0) + frame.samples / frame.sample_rate
        self._place(self.resampler.resample(frame))

    def flush(self) -> None:
        if self.resampler is not None:
            self._place(self.resampler.resample(None))
            self.resampler = None

    def render(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Return (audio [channels, n], mask [n]) with every remembered piece in place."""
        out, mask = np.zeros((self.channels, n), np.float32), np.zeros(n, bool)
        for a, x in self.pieces:
            lo, hi = max(a, 0), min(a + x.shape[1], n, self.limit)
            if lo < hi:
                out[:, lo:hi] = x[:, lo - a : hi - a]
                mask[lo:hi] = True
        return np.clip(out, -1.0, 1.0), mask

    def _layout(self, frame):
        n_in = frame.layout.nb_channels
        # keep the native layout and mix in numpy where that is exact (average / duplicate)
        if self.channels == 1 or n_in == 1 or n_in == self.channels:
            return None
        return _LAYOUTS.get(self.channels, f"{self.channels}c")

    def _place(self, frames) -> None:
        for f in frames:
            x = f.to_ndarray().reshape(f.layout.nb_channels, -1)
            if x.shape[0] != self.channels:  # average to mono, or duplicate mono
                x = x.mean(0, keepdims=True) if self.channels == 1 else np.repeat(x[:1], self.channels, 0)
            if self.pos + x.shape[1] > 0 and self.pos < self.limit:
                self.pieces.append((self.pos, x))
            self.pos += x.shape[1]


def read_av(src, start: float = 0.0, duration: float | None = None, fps: float | None = None,
            size: tuple[int, int] | None = None, sample_rate: int = 16000, channels: int = 1,
            threads: int = 0, audio_track: int | str | None = None, hdr: str = "tonemap",
            deinterlace: bool | None = None) -> AVClip:
    """Decode the window [start, start+duration) of `src` (path or bytes) into an AVClip.

    Video: with ``fps=None`` the native frames whose pts lies in the window; with `fps` the frame
    displayed at each instant ``start + i/fps`` (i < floor(duration*fps)), i.e. the last native
    frame with pts <= that instant (so a variable frame rate is sampled on its timestamps);
    instants past the last frame's display time give no frame.  Frames come out as displayed
    (:mod:`sora.media.picture`: rotation, mirroring, sample aspect ratio, colour matrix and range,
    HDR tone mapping unless ``hdr="keep"``, deinterlacing of interlaced frames unless
    ``deinterlace=False``; ``True`` deinterlaces every frame); ``size=(H, W)`` is the displayed size to rescale to
    (libswscale).  ``duration=None`` reads to the last decodable frame (not to the header's
    duration, which some containers only estimate).
    Audio: the track chosen by `audio_track` (see :func:`sora.media.probe.audio_stream`),
    down-mixed to `channels` (1 = channel average, 2 from mono = duplicate, other cases by
    libswresample's mixing), resampled to `sample_rate`, placed by pts (module docstring), and
    exactly ``round(duration * sample_rate)`` samples long (video duration when not given).
    ``threads``: decoder threads, 0 = FFmpeg's frame+slice threading over all cores (fastest for
    one reader), 1 = single-threaded (fastest when several processes decode at once, as
    DataLoader workers do: measured in experiments/benchmarks).
    Seeking never rejects a good file: a seek that fails (no index) or lands past `start` or on
    nothing decodable is retried further back and finally from the top of the file.
    Raises MediaError for unreadable input, and for a truncated file whose video data ends well
    before its header's duration when the requested window reaches past the damage; a window
    that lies wholly in the intact part of a truncated file reads normally.
    """
    if not (start >= 0 and (duration is None or duration >= 0)) or not math.isfinite(start):
        raise ValueError(f"start and duration must be >= 0, got start={start} duration={duration}")
    if (fps is not None and not fps > 0) or sample_rate <= 0 or channels < 1:
        raise ValueError(f"bad fps={fps} / sample_rate={sample_rate} / channels={channels}")
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise ValueError(f"size must be (H, W) with positive ints, got {size}")
    if hdr not in HDR_MODES:
        raise ValueError(f"hdr must be one of {HDR_MODES}, got {hdr!r}")
    with opened(src, "decode") as (name, container):
        for stream in container.streams:
            if stream.codec_context is None:  # a data stream, or a codec FFmpeg does not know
                continue
            if threads != 1:
                stream.codec_context.thread_type = "AUTO"
            stream.codec_context.thread_count = threads
        return _read(container, name, float(start), duration, fps, size, sample_rate, channels, audio_track, hdr,
                     deinterlace)


def _read(container, name, start, duration, fps, size, sample_rate, channels, audio_track, hdr,
          deinterlace) -> AVClip:
    info, t0, display = probe(container, name, audio_track)
    end = start + duration if duration is not None else math.inf  # None: to the last decodable frame
    vs = video_stream(container)
    ast = audio_stream(container, audio_track, name)
    picture = _Picture(display, size, hdr)
    deint = info.interlaced if deinterlace is None else deinterlace  # auto: when the stream says so
    tries = [t for t in (start - AUDIO_PREROLL, start - AUDIO_PREROLL - _BACKOFF) if t > 0] + [0.0]
    for seek_t in tries:
        if seek_t > 0:
            try:
                container.seek(int((t0 + seek_t) / vs.time_base), stream=vs, backward=True)
            except av.FFmpegError:  # cannot seek (e.g. no index): try further back, then the top
                continue
        else:
            container.seek(0)
        frames, first_t, last_end, hit_eof, placer = _decode(
            container, vs, ast, t0, info, start, end, fps, picture, sample_rate, channels, keyframe=seek_t > 0,
            deinterlacer=Deinterlacer(vs, every_frame=deinterlace is True) if deint else None)
        if seek_t <= 0 or (first_t is not None and first_t <= start + _EPS):
            break  # landed on a keyframe at or before `start` (or decoded from the top)
    # truncation check, only against a duration the video stream itself declares
    slack = max(2.0 / info.fps if info.fps else 0.08, 0.05)
    if hit_eof and vs.duration and last_end < min(end, info.duration) - slack:
        seen = f"video data ends at {last_end:.3f}s" if first_t is not None else "no decodable video"
        raise MediaError(f"{name}: truncated or corrupt: {seen} but the header says {info.duration:.3f}s")
    if math.isinf(end):  # read to the end: the decoded video defines the clip (headers may estimate)
        end = max(start, last_end)
        if fps is not None:  # floor(seconds * fps), forgiving one tick of the stream's timestamp rounding
            frames = frames[:math.floor((end - start) * fps + _EPS + fps * float(vs.time_base or 0))]
    audio, mask = placer.render(round((end - start) * sample_rate))
    h, w = size if size is not None else (info.height, info.width)
    arr = np.stack(frames) if frames else np.zeros((0, h, w, 3), np.uint8)
    return AVClip(frames=arr, audio=audio, audio_mask=mask, info=info,
                  fps=float(fps) if fps is not None else info.fps, sample_rate=sample_rate, start=start)


class _Picture:
    """Frame -> displayed RGB at the read's size (every frame, also after a mid-stream size change)."""

    def __init__(self, display, size, hdr):
        self.display, self.hdr = display, hdr
        self.size = size if size is not None else (display.height, display.width)

    def __call__(self, frame) -> np.ndarray:
        return to_rgb(frame, self.display, self.size, self.hdr)


def _decode(container, vs, ast, t0, info, start, end, fps, picture, sample_rate, channels, keyframe, deinterlacer):
    """One demux pass from the container's current position; with `keyframe`, video packets
    before the first keyframe are skipped (a seek may land mid-GOP: decoding from there would
    give broken pictures).

    Returns (frames, time of the first decoded video frame, display end of the last one,
    whether EOF was reached, audio placer); times are on the clip's source timeline.
    """
    # keep samples inside the window and inside the stream's declared length: decoders output whole
    # codec frames, but the container's last packet duration says how much of it is real audio
    limit = end - start
    if ast is not None and ast.duration and ast.start_time is not None:
        limit = min(limit, float((ast.start_time + ast.duration) * ast.time_base) - t0 - start)
    limit = limit if math.isinf(limit) else round(limit * sample_rate)
    placer = _AudioPlacer(sample_rate, channels, zero=t0 + start, limit=limit)
    n_targets = math.inf if fps is None or math.isinf(end) else math.floor((end - start) * fps + _EPS)
    # audio is complete once a decoded frame starts at/after `end` or reaches the stream's end
    audio_end = min(end, info.audio_offset + info.audio_duration if info.audio_duration else math.inf)
    frames: list[np.ndarray] = []
    first_t, prev, last_end = None, None, 0.0  # prev: [time, frame, rgb or None], last shown frame
    video_done, audio_done, hit_eof = False, ast is None, True

    def emit_until(limit_t):  # repeat `prev` for each target instant before limit_t
        while len(frames) < n_targets and start + len(frames) / fps < limit_t - _EPS:
            if prev[2] is None:
                prev[2] = picture(prev[1])
            frames.append(prev[2])

    def show(decoded):  # place decoded video frames on the window
        nonlocal first_t, prev, last_end, video_done
        for frame in decoded:
            if frame.pts is None:
                continue
            t = float(frame.pts * frame.time_base) - t0
            dur = float(frame.duration * frame.time_base) if frame.duration else 1.0 / (info.fps or 25)
            first_t = t if first_t is None else first_t
            last_end = max(last_end, t + dur)
            if fps is None:
                if start - _EPS <= t < end - _EPS:
                    frames.append(picture(frame))
            else:
                if prev is None:  # nothing shown before the first frame: it covers earlier instants
                    prev = [t, frame, None]
                emit_until(t)
                prev = [t, frame, None]
            video_done = video_done or t >= end - _EPS

    for packet in container.demux(*([vs] if ast is None else [vs, ast])):
        if packet.stream is vs and not video_done:
            if keyframe and not packet.is_keyframe:
                continue
            keyframe = False
            decoded = packet.decode()
            show(decoded if deinterlacer is None else [f for d in decoded for f in deinterlacer.push(d)])
        elif packet.stream is ast and not audio_done:
            for frame in packet.decode():
                placer.push(frame)
                t = float(frame.pts * frame.time_base) - t0 if frame.pts is not None else None
                if t is not None and (t >= end or t + frame.samples / frame.sample_rate >= audio_end - 1e-3):
                    audio_done = True
        if video_done and audio_done:
            hit_eof = False
            break
    if deinterlacer is not None and not video_done:
        show(deinterlacer.flush())  # the frames bwdif held back to look ahead
    if hit_eof and fps is not None and prev is not None:  # the last frame shows until its end
        emit_until(last_end)
    placer.flush()
    return frames, first_t, last_end, hit_eof, placer


def decoded_seconds(src) -> float:
    """Decode every video frame of `src` from the top (no conversion, constant memory) and return
    where the last one's display ends, in seconds from the first frame; MediaError when decoding
    fails on the way. The judge of "truncated or corrupt" when a windowed read near the end fails."""
    with opened(src, "decode") as (name, container):
        vs = video_stream(container)
        if vs is None:
            raise MediaError(f"{name}: no video stream")
        t0, end = None, 0.0
        for packet in container.demux(vs):
            for frame in packet.decode():
                if frame.pts is not None:
                    t = float(frame.pts * frame.time_base)
                    t0 = t if t0 is None else min(t0, t)
                    end = max(end, t + float((frame.duration or 0) * frame.time_base))
        if t0 is None:
            raise MediaError(f"{name}: no decodable video frame")
        return end - t0


@dataclass(frozen=True)
class AudioInfo:
    """The audio stream :func:`read_audio` decoded: native rate / channels, seconds returned."""

    sample_rate: int
    channels: int
    duration: float
    has_video: bool

    def to_dict(self) -> dict:
        return asdict(self)


def read_audio(src, sample_rate: int = 16000, channels: int = 1, start: float = 0.0,
               duration: float | None = None, audio_track: int | str | None = None) -> tuple[np.ndarray, AudioInfo]:
    """Decode an audio stream of `src` (path or bytes; a wav / flac / mp3 / ogg file, or a video
    file's audio; `audio_track` as in :func:`read_av`) -> (audio float32 [channels, N] in [-1, 1]
    at `sample_rate`, info).

    The time axis is the *audio stream's own*: time zero is its start time (0 when the header has
    none), whatever a video stream in the same file does; samples are placed by pts and resampled
    exactly as :func:`read_av` does (edit lists / skip samples honoured, gaps kept as zeros).
    ``duration=None`` reads to the end of the stream (N = the decoded length), otherwise N is
    ``round(duration * sample_rate)``, zero-padded past the end. Raises MediaError for an
    unreadable file or one without audio."""
    if start < 0 or (duration is not None and duration < 0):
        raise ValueError(f"start and duration must be >= 0, got start={start} duration={duration}")
    if sample_rate <= 0 or channels < 1:
        raise ValueError(f"bad sample_rate={sample_rate} / channels={channels}")
    with opened(src, "decode") as (name, container):
        ast = audio_stream(container, audio_track, name)
        if ast is None:
            raise MediaError(f"{name}: no audio stream")
        zero = (seconds(ast.start_time, ast.time_base) or 0.0) + start
        limit = math.inf if duration is None else round(duration * sample_rate)
        if ast.duration and ast.start_time is not None:  # whole codec frames decode: keep the declared length
            limit = min(limit, round((float((ast.start_time + ast.duration) * ast.time_base) - zero) * sample_rate))
        placer = _AudioPlacer(sample_rate, channels, zero=zero, limit=limit)
        done = False
        for packet in container.demux(ast):
            for frame in packet.decode():
                placer.push(frame)
                t = None if frame.pts is None else float(frame.pts * frame.time_base)
                done = done or (duration is not None and t is not None and t >= zero + duration)
            if done:
                break
        placer.flush()
        n = round(duration * sample_rate) if duration is not None else \
            min(max((a + x.shape[1] for a, x in placer.pieces), default=0), limit)
        if n <= 0 and duration is None:
            raise MediaError(f"{name}: no decodable audio")
        audio, _ = placer.render(n)
        cc = ast.codec_context
        return audio, AudioInfo(sample_rate=cc.sample_rate or 0, channels=cc.channels or 0,
                                duration=n / sample_rate, has_video=video_stream(container) is not None)
