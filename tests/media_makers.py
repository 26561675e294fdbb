"""Small real-world-style media files for tests, written with PyAV (no ffmpeg CLI needed).

``encode`` writes any container/codec with the knobs phones, recorders and broadcasters set:
display matrix, sample aspect ratio, colour tags and bit depth, frame times (variable rate),
several audio tracks with languages and dispositions, and a non-seekable output (which is how
browser and screen recorders write WebM: no cues, no duration).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from fractions import Fraction

import av
import numpy as np


_CODES = {"bt709": 1, "bt470bg": 5, "bt2020nc": 9, "tv": 1, "pc": 2}  # FFmpeg's enum values of colour tags


@dataclass
class Track:
    """One audio track: mono float32 samples at `rate`."""

    samples: np.ndarray
    rate: int = 16000
    language: str | None = None
    default: bool | None = None  # None: leave the muxer's choice


@dataclass
class Video:
    frames: np.ndarray  # uint8 [T, H, W, 3] RGB, or uint16 [T, H, W, 3] for 10-bit (values 0..65535)
    fps: int = 10
    pts_ms: list[int] | None = None  # frame times in ms (variable frame rate); default i / fps
    codec: str = "libx264"
    pix_fmt: str = "yuv420p"
    rotation: int = 0  # set_display_rotation(degrees ccw, hflip, vflip)
    hflip: bool = False
    vflip: bool = False
    sar: Fraction | None = None
    color: dict = field(default_factory=dict)  # colorspace / color_range / color_trc / color_primaries
    options: dict = field(default_factory=dict)


class _NoSeek(io.RawIOBase):
    def __init__(self):
        self.data = bytearray()

    def writable(self):
        return True

    def seekable(self):
        return False

    def write(self, b):
        self.data += bytes(b)
        return len(b)


def encode(video: Video, tracks: list[Track] = (), fmt: str = "mp4", seekable: bool = True) -> bytes:
    out = io.BytesIO() if seekable else _NoSeek()
    with av.open(out, "w", format=fmt) as c:
        t, h, w, _ = video.frames.shape
        vs = c.add_stream(video.codec, rate=video.fps, options=dict(video.options))
        vs.width, vs.height, vs.pix_fmt = w, h, video.pix_fmt
        if video.pts_ms is not None:
            vs.time_base = vs.codec_context.time_base = Fraction(1, 1000)
        if video.rotation or video.hflip or video.vflip:
            vs.set_display_rotation(video.rotation, hflip=video.hflip, vflip=video.vflip)
        if video.sar is not None:
            vs.codec_context.sample_aspect_ratio = video.sar
        for k, v in video.color.items():
            setattr(vs.codec_context, k, _CODES.get(v, v))
        streams = []
        for tr in tracks:
            a = c.add_stream("aac" if fmt in ("mp4", "mov") else "libopus", rate=48000 if fmt == "webm" else tr.rate,
                             layout="mono")
            if tr.language:
                a.metadata["language"] = tr.language
            if tr.default is not None:
                a.disposition = av.stream.Disposition.default if tr.default else av.stream.Disposition(0)
            streams.append(a)
        for i, img in enumerate(video.frames):
            f = _frame(img, video)
            if video.pts_ms is not None:
                f.pts, f.time_base = video.pts_ms[i], Fraction(1, 1000)
            else:
                f.pts, f.time_base = i, Fraction(1, video.fps)
            c.mux(vs.encode(f))
        c.mux(vs.encode(None))
        for tr, a in zip(tracks, streams):
            x, rate = tr.samples.astype(np.float32), a.codec_context.sample_rate
            if rate != tr.rate:  # resample by interpolation: tests use smooth tones and clicks only
                x = np.interp(np.arange(round(len(x) * rate / tr.rate)) * tr.rate / rate, np.arange(len(x)), x)
                x = x.astype(np.float32)
            n = a.codec_context.frame_size or 1024
            for i in range(0, len(x), n):
                fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[None, i:i + n]), format="fltp", layout="mono")
                fr.sample_rate, fr.pts, fr.time_base = rate, i, Fraction(1, rate)
                c.mux(a.encode(fr))
            c.mux(a.encode(None))
    return bytes(out.getvalue() if seekable else out.data)


def _frame(img: np.ndarray, video: Video):
    if img.dtype == np.uint16:  # 10-bit: through 16-bit RGB; the encoder converts with the stream's tags
        f = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb48le")
    else:
        f = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
    cs = _CODES.get(video.color.get("colorspace"), video.color.get("colorspace"))
    rng = _CODES.get(video.color.get("color_range"), video.color.get("color_range"))
    if cs is not None or rng is not None or video.pix_fmt != "yuv420p":
        f = f.reformat(format=video.pix_fmt, dst_colorspace=cs, dst_color_range=rng)
        if cs is not None:
            f.colorspace = cs
        if rng is not None:
            f.color_range = rng
    return f


def pattern(t: int, h: int, w: int) -> np.ndarray:
    """An asymmetric moving picture: every flip or quarter turn of it is a different picture."""
    y, x = np.mgrid[0:h, 0:w]
    out = np.zeros((t, h, w, 3), np.uint8)
    for i in range(t):
        out[i, ..., 0] = (255 * x / (w - 1)).astype(np.uint8)  # red grows to the right
        out[i, ..., 1] = (255 * y / (h - 1)).astype(np.uint8)  # green grows downwards
        out[i, : h // 4, : w // 4, 2] = 255  # a blue block in the top-left corner
        out[i, h // 2 - 2: h // 2 + 2, (4 * i) % w: (4 * i) % w + 4] = 255  # a white dot moving right
    return out


def strip_cues(data: bytes) -> bytes:
    """A Matroska/WebM file with its Cues element (the seek index) overwritten by a Void element."""
    data = bytearray(data)
    i = data.rfind(b"\x1c\x53\xbb\x6b")
    if i < 0:
        raise ValueError("no Cues element")
    n = 1
    while not data[i + 4] & (0x80 >> (n - 1)):
        n += 1
    size = int.from_bytes(bytes([data[i + 4] & (0xFF >> n)]) + bytes(data[i + 5:i + 4 + n]), "big")
    total = 4 + n + size
    data[i:i + total] = b"\xec\x01" + (total - 9).to_bytes(7, "big") + bytes(total - 9)
    return bytes(data)


def audio_with_cover_art(seconds: float = 1.0, rate: int = 16000) -> bytes:
    """An m4a-style mp4: AAC audio plus a cover picture (a one-frame MJPEG stream marked attached_pic)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        a = c.add_stream("aac", rate=rate, layout="mono")
        v = c.add_stream("mjpeg", rate=1)
        v.width = v.height = 32
        v.pix_fmt, v.disposition = "yuvj420p", av.stream.Disposition.attached_pic
        cover = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 128, np.uint8), format="rgb24").reformat(format="yuvj420p")
        cover.pts = 0
        c.mux(v.encode(cover))
        c.mux(v.encode(None))
        x = (0.3 * np.sin(np.arange(int(seconds * rate)) / 3)).astype(np.float32)
        for i in range(0, len(x), 1024):
            fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[None, i:i + 1024]), format="fltp", layout="mono")
            fr.sample_rate, fr.pts = rate, i
            c.mux(a.encode(fr))
        c.mux(a.encode(None))
    return buf.getvalue()
