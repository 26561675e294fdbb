"""Read clips, audio and probe metadata with PyAV, on the time axis of :mod:`sora.media`."""

from __future__ import annotations

import io
import math
import os
from dataclasses import asdict, dataclass

import av
import numpy as np

__all__ = ["AVClip", "AVInfo", "AudioInfo", "MediaError", "probe_av", "read_audio", "read_av", "VIDEO_EXTS"]

VIDEO_EXTS = ("mp4", "mov", "mkv", "webm", "avi", "mpg", "mpeg", "m4v")  # containers the project reads
_WARMUP = 0.05  # seconds of audio resampled before the clip: the resampler's filter settles there
AUDIO_PREROLL = 0.25  # seconds demuxed before `start`: covers AAC/MP3 decoder warm-up and B-frame reordering
_EPS = 1e-6  # seconds; slack for float comparisons of timestamps
_GAP = 0.002  # seconds; an audio pts jump larger than this restarts the resampler
_LAYOUTS = {1: "mono", 2: "stereo", 3: "3.0", 4: "quad", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}


class MediaError(ValueError):
    """Unreadable, empty, truncated or undecodable media; the message is ``"<source>: <reason>"``."""


@dataclass(frozen=True)
class AVInfo:
    """What the container header says about a file (see the module docstring for the time axis)."""

    has_audio: bool
    fps: float  # native average frame rate of the video stream
    width: int
    height: int
    sample_rate: int  # native audio rate, 0 without audio
    channels: int  # native audio channel count, 0 without audio
    duration: float  # seconds of the video stream, 0 if unknown
    num_frames: int  # native frame count (from the header when it has one, else fps*duration)
    audio_offset: float  # audio start minus first video frame, seconds (positive = audio late)
    audio_duration: float  # seconds of audio, 0 without audio

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AVClip:
    """A decoded window of a file: ``frames`` uint8 [T,H,W,3] RGB at ``fps``, ``audio`` float32
    [channels, N] in [-1, 1] at ``sample_rate`` with ``audio_mask`` bool [N] (True = decoded,
    False = zero padding), ``start`` = where the window starts on the source's timeline."""

    frames: np.ndarray
    audio: np.ndarray
    audio_mask: np.ndarray
    info: AVInfo
    fps: float
    sample_rate: int
    start: float


# ----------------------------------------------------------------------------- opening / probing


def _one_line(err: BaseException) -> str:
    text = getattr(err, "strerror", None) or str(err)  # FFmpegError: skip errno and '<none>' name
    return " ".join(str(text).split()) or type(err).__name__


def _open(src) -> tuple[str, av.container.InputContainer]:
    """Open `src` (path or bytes) for reading; returns (name used in error messages, container)."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        name, data = "<bytes>", bytes(src)
        if not data:
            raise MediaError(f"{name}: empty input")
        target = io.BytesIO(data)
    elif isinstance(src, (str, os.PathLike)):
        name = target = str(src)
        if not os.path.isfile(name):
            raise MediaError(f"{name}: no such file")
        if os.path.getsize(name) == 0:
            raise MediaError(f"{name}: empty file")
    else:
        raise TypeError(f"src must be a path or bytes, not {type(src).__name__}")
    try:
        return name, av.open(target, mode="r")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise MediaError(f"{name}: cannot open as media ({_one_line(e)})") from None


def _seconds(ts, time_base) -> float | None:
    return None if ts is None or time_base is None else float(ts * time_base)


def _probe(container, name: str) -> tuple[AVInfo, float]:
    """Build AVInfo from the header; returns (info, video_t0 in stream seconds)."""
    if not container.streams.video:
        raise MediaError(f"{name}: no video stream")
    vs = container.streams.video[0]
    cc = vs.codec_context
    if not cc.width or not cc.height:
        raise MediaError(f"{name}: video stream has no frame size")
    t0 = _seconds(vs.start_time, vs.time_base)
    if t0 is None:  # no header start time: take the smallest pts of the first packets
        pts = [p.pts for p, _ in zip(container.demux(vs), range(64)) if p.pts is not None]
        t0 = float(min(pts) * vs.time_base) if pts else 0.0
        container.seek(0)
    duration = _seconds(vs.duration, vs.time_base)
    if not duration and container.duration:  # fall back to the container's duration
        c_start = (container.start_time or 0) / av.time_base
        duration = container.duration / av.time_base + c_start - t0
    duration = max(0.0, duration or 0.0)
    rate = vs.average_rate or vs.guessed_rate or vs.base_rate
    fps = float(rate) if rate else (vs.frames / duration if vs.frames and duration else 0.0)
    num_frames = vs.frames or int(round(fps * duration))
    sample_rate = channels = 0
    audio_offset = audio_duration = 0.0
    if container.streams.audio:
        ast = container.streams.audio[0]
        sample_rate = ast.codec_context.sample_rate or 0
        channels = ast.codec_context.channels or 0
        a_start = _seconds(ast.start_time, ast.time_base)
        audio_offset = 0.0 if a_start is None else a_start - t0
        audio_duration = _seconds(ast.duration, ast.time_base) or max(0.0, duration - audio_offset)
    info = AVInfo(
        has_audio=bool(container.streams.audio), fps=fps, width=cc.width, height=cc.height,
        sample_rate=sample_rate, channels=channels, duration=duration, num_frames=num_frames,
        audio_offset=audio_offset, audio_duration=audio_duration,
    )
    return info, t0


def probe_av(src) -> AVInfo:
    """Describe `src` (path or bytes) from its header; decodes nothing."""
    name, container = _open(src)
    try:
        return _probe(container, name)[0]
    except av.FFmpegError as e:
        raise MediaError(f"{name}: cannot read header ({_one_line(e)})") from None
    finally:
        container.close()


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


def _to_rgb(frame, size) -> np.ndarray:
    if size is None:
        return frame.to_ndarray(format="rgb24")
    return frame.reformat(width=size[1], height=size[0], format="rgb24").to_ndarray()


def read_av(src, start: float = 0.0, duration: float | None = None, fps: float | None = None,
            size: tuple[int, int] | None = None, sample_rate: int = 16000, channels: int = 1,
            threads: int = 0) -> AVClip:
    """Decode the window [start, start+duration) of `src` (path or bytes) into an AVClip.

    Video: with ``fps=None`` the native frames whose pts lies in the window; with `fps` the frame
    displayed at each instant ``start + i/fps`` (i < floor(duration*fps)), i.e. the last native
    frame with pts <= that instant; instants past the last frame's display time give no frame.
    ``size=(H, W)`` rescales with libswscale.  ``duration=None`` reads to the end of the video.
    Audio: down-mixed to `channels` (1 = channel average, 2 from mono = duplicate, other cases by
    libswresample's mixing), resampled to `sample_rate`, placed by pts (module docstring), and
    exactly ``round(duration * sample_rate)`` samples long (video duration when not given).
    ``threads``: decoder threads, 0 = FFmpeg's frame+slice threading over all cores (fastest for
    one reader), 1 = single-threaded (fastest when several processes decode at once, as
    DataLoader workers do: measured in experiments/benchmarks).
    Raises MediaError for unreadable input, and for a truncated file whose video data ends well
    before its header's duration when the requested window reaches past the damage; a window
    that lies wholly in the intact part of a truncated file reads normally.
    """
    if start < 0 or (duration is not None and duration < 0):
        raise ValueError(f"start and duration must be >= 0, got start={start} duration={duration}")
    if (fps is not None and fps <= 0) or sample_rate <= 0 or channels < 1:
        raise ValueError(f"bad fps={fps} / sample_rate={sample_rate} / channels={channels}")
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise ValueError(f"size must be (H, W) with positive ints, got {size}")
    name, container = _open(src)
    try:
        for stream in container.streams:
            if threads != 1:
                stream.codec_context.thread_type = "AUTO"
            stream.codec_context.thread_count = threads
        return _read(container, name, float(start), duration, fps, size, sample_rate, channels)
    except av.FFmpegError as e:
        raise MediaError(f"{name}: cannot decode ({_one_line(e)})") from None
    finally:
        container.close()


def _read(container, name, start, duration, fps, size, sample_rate, channels) -> AVClip:
    info, t0 = _probe(container, name)
    if duration is not None:
        end = start + duration
    else:  # to the end of the video; unknown (0) duration: to EOF
        end = max(start, info.duration) if info.duration else math.inf
    vs = container.streams.video[0]
    ast = container.streams.audio[0] if container.streams.audio else None
    seek_t = start - AUDIO_PREROLL
    while True:
        if seek_t > 0:
            container.seek(int((t0 + seek_t) / vs.time_base), stream=vs, backward=True)
        frames, first_t, last_end, hit_eof, placer = _decode(
            container, vs, ast, t0, info, start, end, fps, size, sample_rate, channels)
        if seek_t <= 0 or first_t is None or first_t <= start + _EPS:
            break
        seek_t = 0.0  # landed on a keyframe after `start`: decode from the top instead
        container.seek(0)
    # truncation check, only against a duration the video stream itself declares
    slack = max(2.0 / info.fps if info.fps else 0.08, 0.05)
    if hit_eof and vs.duration and last_end < min(end, info.duration) - slack:
        seen = f"video data ends at {last_end:.3f}s" if first_t is not None else "no decodable video"
        raise MediaError(f"{name}: truncated or corrupt: {seen} but the header says {info.duration:.3f}s")
    if math.isinf(end):  # no duration known up front: the decoded video defines the clip
        end = max(start, last_end)
    audio, mask = placer.render(round((end - start) * sample_rate))
    h, w = size if size is not None else (info.height, info.width)
    arr = np.stack(frames) if frames else np.zeros((0, h, w, 3), np.uint8)
    return AVClip(frames=arr, audio=audio, audio_mask=mask, info=info,
                  fps=float(fps) if fps is not None else info.fps, sample_rate=sample_rate, start=start)


def _decode(container, vs, ast, t0, info, start, end, fps, size, sample_rate, channels):
    """One demux pass from the container's current position.

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
                prev[2] = _to_rgb(prev[1], size)
            frames.append(prev[2])

    for packet in container.demux(*([vs] if ast is None else [vs, ast])):
        if packet.stream is vs and not video_done:
            for frame in packet.decode():
                if frame.pts is None:
                    continue
                t = float(frame.pts * frame.time_base) - t0
                dur = float(frame.duration * frame.time_base) if frame.duration else 1.0 / (info.fps or 25)
                first_t = t if first_t is None else first_t
                last_end = max(last_end, t + dur)
                if fps is None:
                    if start - _EPS <= t < end - _EPS:
                        frames.append(_to_rgb(frame, size))
                else:
                    if prev is None:  # nothing shown before the first frame: it covers earlier instants
                        prev = [t, frame, None]
                    emit_until(t)
                    prev = [t, frame, None]
                video_done = video_done or t >= end - _EPS
        elif packet.stream is ast and not audio_done:
            for frame in packet.decode():
                placer.push(frame)
                t = float(frame.pts * frame.time_base) - t0 if frame.pts is not None else None
                if t is not None and (t >= end or t + frame.samples / frame.sample_rate >= audio_end - 1e-3):
                    audio_done = True
        if video_done and audio_done:
            hit_eof = False
            break
    if hit_eof and fps is not None and prev is not None:  # the last frame shows until its end
        emit_until(last_end)
    placer.flush()
    return frames, first_t, last_end, hit_eof, placer


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
               duration: float | None = None) -> tuple[np.ndarray, AudioInfo]:
    """Decode the first audio stream of `src` (path or bytes; a wav / flac / mp3 / ogg file, or the
    audio track of a video file) -> (audio float32 [channels, N] in [-1, 1] at `sample_rate`, info).

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
    name, container = _open(src)
    try:
        if not container.streams.audio:
            raise MediaError(f"{name}: no audio stream")
        ast = container.streams.audio[0]
        zero = (_seconds(ast.start_time, ast.time_base) or 0.0) + start
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
                                duration=n / sample_rate, has_video=bool(container.streams.video))
    except av.FFmpegError as e:
        raise MediaError(f"{name}: cannot decode ({_one_line(e)})") from None
    finally:
        container.close()
