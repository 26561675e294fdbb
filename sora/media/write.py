"""Write mp4 (H.264 + AAC) and PNG files with PyAV; the time axis is the one of :mod:`sora.media`."""

from __future__ import annotations

import os
import shutil
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np

from sora.media.read import _LAYOUTS

_AAC_FRAME = 1024  # samples per AAC-LC frame: the encoder needs exactly this many per frame

def write_av(path: str | Path | BinaryIO, frames: np.ndarray, audio: np.ndarray | None,
             fps: float, sample_rate: int) -> None:
    """Write an mp4: H.264 (libx264, yuv420p, crf 18) video + AAC audio, ``movflags=+faststart``.

    frames: uint8 [T, H, W, 3] RGB with H and W even (yuv420p needs even sizes; odd sizes raise
    ValueError rather than being padded silently).  audio: float [C, N] or [N] (mono) in [-1, 1]
    at `sample_rate`, or None for a file without audio.  Audio is made exactly T/fps long: zero
    padded when shorter, trimmed when longer by at most one video frame's worth, ValueError when
    longer than that.  `path` is a path or a writable binary file object (written via a temporary
    file, since faststart needs to re-read the output).  Sample n of `audio` is presented at
    n/sample_rate on the video's timeline: the encoder's first packet gets pts -1024 (AAC
    priming) and the mp4 muxer writes an edit list that makes readers skip those samples, so
    read_av returns the audio exactly where it was written.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames must be uint8 [T>0, H, W, 3], got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"frame size must be even for yuv420p H.264, got H={h} W={w}")
    if fps <= 0 or sample_rate <= 0:
        raise ValueError(f"fps and sample_rate must be > 0, got {fps}, {sample_rate}")
    rate = Fraction(fps).limit_denominator(1001)
    if audio is not None:
        audio = np.asarray(audio)
        if not np.issubdtype(audio.dtype, np.floating) or audio.ndim not in (1, 2):
            raise ValueError(f"audio must be float [C, N] or [N], got {audio.dtype} {audio.shape}")
        audio = np.ascontiguousarray(np.atleast_2d(audio), dtype=np.float32)
        if not 1 <= audio.shape[0] <= 8:
            raise ValueError(f"audio must have 1..8 channels, got shape {audio.shape}")
        n = round(t / rate * sample_rate)
        slack = round(sample_rate / rate)
        if audio.shape[1] > n + slack:
            raise ValueError(f"audio has {audio.shape[1]} samples ({audio.shape[1] / sample_rate:.3f}s) "
                             f"but the video lasts {n} samples ({t / float(rate):.3f}s at {float(rate)} fps)")
        audio = np.pad(audio[:, :n], ((0, 0), (0, max(0, n - audio.shape[1]))))
    if isinstance(path, (str, os.PathLike)):
        _encode(str(path), frames, audio, rate, sample_rate)
        return
    with tempfile.TemporaryDirectory() as tmp:  # faststart re-opens its output by name
        tmp_path = os.path.join(tmp, "out.mp4")
        _encode(tmp_path, frames, audio, rate, sample_rate)
        with open(tmp_path, "rb") as f:
            shutil.copyfileobj(f, path)


def _encode(path: str, frames: np.ndarray, audio, rate: Fraction, sample_rate: int) -> None:
    # movie_timescale: edit-list durations in 1/90000 s instead of the default whole milliseconds
    options = {"movflags": "+faststart", "movie_timescale": "90000"}
    with av.open(path, mode="w", format="mp4", options=options) as out:
        # one x264 thread: frame-threaded x264 gave run-to-run different bytes under load
        vs = out.add_stream("libx264", rate=rate, options={"crf": "18", "threads": "1"})
        vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        vs.codec_context.time_base = 1 / rate
        ast = None
        if audio is not None:
            layout = _LAYOUTS[audio.shape[0]]
            ast = out.add_stream("aac", rate=sample_rate, layout=layout)
            ast.bit_rate = audio.shape[0] * min(128_000, 4 * sample_rate)
            ast.codec_context.time_base = Fraction(1, sample_rate)
        a_pos = 0
        for i, img in enumerate(frames):
            # convert here: the encoder's own reused converter gave run-to-run different bytes
            frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p")
            frame.pts, frame.time_base = i, 1 / rate
            out.mux(vs.encode(frame))
            if ast is None:
                continue
            # interleave: audio up to the end of this video frame
            a_end = audio.shape[1] if i == len(frames) - 1 else round((i + 1) / rate * sample_rate)
            while a_pos < a_end:
                chunk = audio[:, a_pos : a_pos + _AAC_FRAME]
                af = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout=layout)
                af.sample_rate, af.pts, af.time_base = sample_rate, a_pos, Fraction(1, sample_rate)
                out.mux(ast.encode(af))
                a_pos += chunk.shape[1]
        out.mux(vs.encode(None))
        if ast is not None:
            out.mux(ast.encode(None))


def write_image(path: str | Path, image: np.ndarray) -> None:
    """Write a uint8 [H, W, 3] RGB image as PNG (FFmpeg's png encoder, no other dependency)."""
    image = np.ascontiguousarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"write_image({path}): need uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = image.shape[1], image.shape[0], "rgb24"
    frame = av.VideoFrame.from_ndarray(image, format="rgb24")
    with open(path, "wb") as f:
        for packet in [*codec.encode(frame), *codec.encode(None)]:
            f.write(bytes(packet))
