"""Open media files and describe them: stream choice, display size and orientation, colour, length.

What a file *displays* is what sora reads: ``AVInfo.width``/``height`` are the displayed size,
after the display matrix (a phone's portrait clip stored as landscape frames with ``rotation=-90``
is 360 wide and 640 high) and the sample aspect ratio (anamorphic 720x480 at SAR 32:27 is 853
wide).  The stored size stays in ``coded_width``/``coded_height``.
"""

from __future__ import annotations

import io
import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import av

from sora.media.picture import Display, display_of, hdr_of

_LAYOUTS = {1: "mono", 2: "stereo", 3: "3.0", 4: "quad", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}
_PROBE_PACKETS = 256  # video packets demuxed at most to find the first decodable frame


class MediaError(ValueError):
    """Unreadable, empty, truncated or undecodable media; the message is ``"<source>: <reason>"``."""


@dataclass(frozen=True)
class AVInfo:
    """What a file holds (see :mod:`sora.media` for the time axis); sizes are as displayed."""

    has_audio: bool
    fps: float  # native average frame rate of the video stream
    width: int  # displayed width: display matrix and sample aspect ratio applied
    height: int  # displayed height
    sample_rate: int  # native audio rate, 0 without audio
    channels: int  # native audio channel count, 0 without audio
    duration: float  # seconds of the video stream, 0 if unknown
    num_frames: int  # native frame count (from the header when it has one, else fps*duration)
    audio_offset: float  # audio start minus first video frame, seconds (positive = audio late)
    audio_duration: float  # seconds of audio, 0 without audio
    coded_width: int = 0  # the stored frame size
    coded_height: int = 0
    rotation: int = 0  # display rotation as ffprobe prints it: degrees counter-clockwise, (-180, 180]
    mirrored: bool = False  # the display matrix also mirrors the picture
    sar: float = 1.0  # sample (pixel) aspect ratio
    pix_fmt: str = ""  # e.g. yuv420p, yuv420p10le
    color_range: str = ""  # "tv" (limited), "pc" (full) or "" (unspecified: read as limited)
    color_matrix: str = ""  # YUV->RGB matrix, e.g. bt709, bt470bg, bt2020nc; "" = unspecified (BT.601)
    hdr: str = ""  # "pq" (SMPTE 2084), "hlg" (ARIB STD-B67) or "" for SDR
    interlaced: bool = False  # the first frame is flagged interlaced (or the stream's field order says so)
    audio_stream: int = -1  # index (among the audio streams) of the track read, -1 without audio
    audio_streams: int = 0  # audio tracks in the file
    duration_from: str = "header"  # "header", or "scan" when the header has no duration (packets demuxed)

    def to_dict(self) -> dict:
        return asdict(self)


def one_line(err: BaseException) -> str:
    text = getattr(err, "strerror", None) or str(err)  # FFmpegError: skip errno and '<none>' name
    return " ".join(str(text).split()) or type(err).__name__


def source_name(src) -> str:
    """How error messages name `src`: its path (undecodable bytes escaped), or ``<bytes>``."""
    if isinstance(src, (str, os.PathLike)):
        return os.fsencode(src).decode("utf-8", "backslashreplace")  # b"clip\xff.mp4" -> "clip\\xff.mp4"
    return "<bytes>"


@contextmanager
def opened(src, action: str = "read"):
    """Open `src` (path or bytes) for reading: yields (name used in error messages, container),
    turns FFmpeg's errors inside the block into ``MediaError("<name>: cannot <action> (...)")``,
    and closes the container.  A path whose name is not valid UTF-8 (Linux allows any bytes) is
    opened through a Python file object, since FFmpeg takes UTF-8 file names."""
    name, fh = source_name(src), None
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if not data:
            raise MediaError(f"{name}: empty input")
        target = io.BytesIO(data)
    elif isinstance(src, (str, os.PathLike)):
        target = os.fspath(src)
        if not os.path.isfile(target):
            raise MediaError(f"{name}: no such file")
        if os.path.getsize(target) == 0:
            raise MediaError(f"{name}: empty file")
        try:
            target = os.fsdecode(target).encode("utf-8").decode("utf-8")
        except UnicodeEncodeError:
            target = fh = open(target, "rb")  # noqa: SIM115 - closed below
    else:
        raise TypeError(f"src must be a path or bytes, not {type(src).__name__}")
    try:
        try:
            container = av.open(target, mode="r")
        except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
            raise MediaError(f"{name}: cannot open as media ({one_line(e)})") from None
        try:
            yield name, container
        except av.FFmpegError as e:
            raise MediaError(f"{name}: cannot {action} ({one_line(e)})") from None
        finally:
            container.close()
    finally:
        if fh is not None:
            fh.close()


def seconds(ts, time_base) -> float | None:
    return None if ts is None or time_base is None else float(ts * time_base)


def video_stream(container):
    """The first video stream that is a video: a music file's cover art (an attached picture) is not."""
    pic = av.stream.Disposition.attached_pic
    return next((s for s in container.streams.video if not s.disposition & pic), None)


def audio_tracks(container) -> list:
    """The audio streams that can be decoded (a stream in a codec FFmpeg does not know has none)."""
    return [s for s in container.streams.audio if s.codec_context is not None]


def audio_stream(container, track: int | str | None, name: str):
    """The audio stream to read: ``track=None`` the one marked default (else the first), an int
    the n-th audio stream, a str the first with that language tag (e.g. "eng"); None without audio."""
    streams = audio_tracks(container)
    if not streams:
        return None
    if track is None:
        return next((s for s in streams if s.disposition & av.stream.Disposition.default), streams[0])
    if isinstance(track, bool) or not isinstance(track, (int, str)):
        raise ValueError(f"audio_track must be None, an index or a language, got {track!r}")
    if isinstance(track, int):
        if not 0 <= track < len(streams):
            raise MediaError(f"{name}: no audio track {track} (the file has {len(streams)})")
        return streams[track]
    found = [s for s in streams if (s.language or s.metadata.get("language", "")) == track]
    if not found:
        langs = ", ".join(sorted({s.language or "und" for s in streams}))
        raise MediaError(f"{name}: no audio track in language {track!r} (the file has: {langs})")
    return found[0]


def first_frame(container, vs):
    """Decode the first video frame (then rewind), or None when the first packets decode nothing."""
    frame = None
    try:
        for packet, _ in zip(container.demux(vs), range(_PROBE_PACKETS)):
            frame = next(iter(packet.decode()), None)
            if frame is not None:
                break
    except av.FFmpegError:
        frame = None
    container.seek(0)
    return frame


def scan_end(container, vs, t0: float) -> float:
    """Seconds from the first frame to the end of the last video packet, demuxing (not decoding) all."""
    end = 0.0
    for packet in container.demux(vs):
        if packet.pts is not None:
            end = max(end, float((packet.pts + (packet.duration or 0)) * vs.time_base) - t0)
    container.seek(0)
    return end


def probe(container, name: str, track: int | str | None = None, frame=None) -> tuple[AVInfo, float, Display]:
    """Describe the container; returns (info, first video frame's time in stream seconds, display).

    ``frame``: a decoded first frame when the caller has one; otherwise one is decoded here (the
    display matrix, interlacing and colour tags travel with decoded frames)."""
    vs = video_stream(container)
    if vs is None:
        raise MediaError(f"{name}: no video stream")
    cc = vs.codec_context
    if cc is None:
        raise MediaError(f"{name}: video stream in an unknown codec")
    if not cc.width or not cc.height:
        raise MediaError(f"{name}: video stream has no frame size")
    t0 = seconds(vs.start_time, vs.time_base)
    if t0 is None:  # no header start time: take the smallest pts of the first packets
        pts = [p.pts for p, _ in zip(container.demux(vs), range(64)) if p.pts is not None]
        t0 = float(min(pts) * vs.time_base) if pts else 0.0
        container.seek(0)
    duration, duration_from = seconds(vs.duration, vs.time_base), "header"
    if not duration and container.duration:  # fall back to the container's duration
        c_start = (container.start_time or 0) / av.time_base
        duration = container.duration / av.time_base + c_start - t0
    if not duration or not math.isfinite(duration) or duration < 0:  # e.g. a recorder's WebM
        duration, duration_from = scan_end(container, vs, t0), "scan"
    rate = vs.average_rate or vs.guessed_rate or vs.base_rate
    fps = float(rate) if rate else (vs.frames / duration if vs.frames and duration else 0.0)
    fps = fps if math.isfinite(fps) and fps > 0 else 0.0
    num_frames = vs.frames or int(round(fps * duration))
    if frame is None:
        frame = first_frame(container, vs)
    display = display_of(frame, cc)
    ast = audio_stream(container, track, name)
    sample_rate = channels = 0
    audio_offset = audio_duration = 0.0
    if ast is not None:
        sample_rate = ast.codec_context.sample_rate or 0
        channels = ast.codec_context.channels or 0
        a_start = seconds(ast.start_time, ast.time_base)
        audio_offset = 0.0 if a_start is None else a_start - t0
        audio_duration = seconds(ast.duration, ast.time_base) or max(0.0, duration - audio_offset)
    src = frame if frame is not None else cc
    info = AVInfo(
        has_audio=ast is not None, fps=fps, width=display.width, height=display.height,
        sample_rate=sample_rate, channels=channels, duration=duration, num_frames=num_frames,
        audio_offset=audio_offset, audio_duration=audio_duration, coded_width=cc.width, coded_height=cc.height,
        rotation=display.rotation, mirrored=display.mirrored, sar=display.sar,
        pix_fmt=(frame.format.name if frame is not None else cc.pix_fmt) or "",
        color_range={1: "tv", 2: "pc"}.get(int(src.color_range or 0), ""),
        color_matrix=_enum_name(src.colorspace), hdr=hdr_of(src.color_trc),
        interlaced=bool(frame.interlaced_frame) if frame is not None else False,
        audio_stream=audio_tracks(container).index(ast) if ast is not None else -1,
        audio_streams=len(audio_tracks(container)), duration_from=duration_from,
    )
    return info, t0, display


def _enum_name(value) -> str:
    names = {1: "bt709", 4: "fcc", 5: "bt470bg", 6: "smpte170m", 7: "smpte240m", 9: "bt2020nc", 10: "bt2020c"}
    return names.get(int(value or 0), "")


def probe_av(src, audio_track: int | str | None = None) -> AVInfo:
    """Describe `src` (path or bytes): its header, plus the first decoded video frame (display
    matrix, colour, interlacing); a header without duration is completed by demuxing the packets.
    ``audio_track``: which audio stream the audio fields describe (see :func:`audio_stream`)."""
    with opened(src, "read header") as (name, container):
        return probe(container, name, audio_track)[0]
