"""Write mp4 (H.264 + AAC) and PNG files with PyAV; the time axis is the one of :mod:`sora.media`.

:class:`AVWriter` encodes a clip piece by piece (memory bounded by the pieces, not the clip);
:func:`write_av` writes a whole clip through it.
"""

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


def _check_frames(frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"frame size must be even for yuv420p H.264, got H={frames.shape[1]} W={frames.shape[2]}")
    return frames


def _check_audio(audio) -> np.ndarray:
    audio = np.asarray(audio)
    if not np.issubdtype(audio.dtype, np.floating) or audio.ndim not in (1, 2):
        raise ValueError(f"audio must be float [C, N] or [N], got {audio.dtype} {audio.shape}")
    audio = np.ascontiguousarray(np.atleast_2d(audio), dtype=np.float32)
    if not 1 <= audio.shape[0] <= 8:
        raise ValueError(f"audio must have 1..8 channels, got shape {audio.shape}")
    return audio


class AVWriter:
    """Write an mp4 piece by piece: H.264 (libx264, yuv420p, crf 18) video + AAC audio, faststart.

    ``with AVWriter(path, fps, sample_rate) as w: w.write(frames, audio)`` as many times as needed;
    the streams are set up by the first :meth:`write` (its frame size, and audio or not), later ones
    must match.  Audio goes on the video's timeline sample by sample: the pieces are concatenated,
    and :meth:`close` makes the total exactly T/fps long (zero padded when shorter, trimmed when
    longer by at most one video frame's worth, ValueError when longer than that).  Encoded audio
    follows the video as it arrives, so memory holds one piece, not the clip.  `path` is a path or a
    writable binary file object (written via a temporary file, since faststart re-reads the output,
    and copied there on :meth:`close`).  Leaving the ``with`` block by an exception abandons the file (:meth:`abort`).
    """

    def __init__(self, path: str | Path | BinaryIO, fps: float, sample_rate: int = 16000):
        if fps <= 0 or sample_rate <= 0:
            raise ValueError(f"fps and sample_rate must be > 0, got {fps}, {sample_rate}")
        self.rate, self.sample_rate = Fraction(fps).limit_denominator(1001), int(sample_rate)
        self._target, self._tmp = path, None
        if not isinstance(path, (str, os.PathLike)):
            self._tmp = tempfile.TemporaryDirectory()  # faststart re-opens its output by name
            path = os.path.join(self._tmp.name, "out.mp4")
        # movie_timescale: edit-list durations in 1/90000 s instead of the default whole milliseconds
        options = {"movflags": "+faststart", "movie_timescale": "90000"}
        self._out = av.open(str(path), mode="w", format="mp4", options=options)
        self._vs = self._as = None
        self.frames = 0  # video frames written
        self._pending = np.zeros((0, 0), np.float32)  # audio received, not encoded yet
        self._a_pos = 0  # audio samples encoded
        self._a_in = 0  # audio samples received

    def __enter__(self) -> AVWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _start(self, frames: np.ndarray, audio: np.ndarray | None) -> None:
        # one x264 thread: frame-threaded x264 gave run-to-run different bytes under load
        vs = self._out.add_stream("libx264", rate=self.rate, options={"crf": "18", "threads": "1"})
        vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        vs.codec_context.time_base = 1 / self.rate
        self._vs = vs
        if audio is not None:
            self._layout = _LAYOUTS[audio.shape[0]]
            self._as = self._out.add_stream("aac", rate=self.sample_rate, layout=self._layout)
            self._as.bit_rate = audio.shape[0] * min(128_000, 4 * self.sample_rate)
            self._as.codec_context.time_base = Fraction(1, self.sample_rate)
            self._pending = np.zeros((audio.shape[0], 0), np.float32)

    def write(self, frames: np.ndarray, audio: np.ndarray | None = None) -> None:
        """Append ``frames`` (uint8 [T, H, W, 3] RGB, H and W even) and the ``audio`` that goes with
        them (float [C, N] or [N] in [-1, 1] at ``sample_rate``; None for a file without audio)."""
        frames = _check_frames(frames)
        audio = None if audio is None else _check_audio(audio)
        if self._vs is None:
            if len(frames) == 0:
                raise ValueError("the first write must hold at least one frame")
            self._start(frames, audio)
        elif frames.shape[1:3] != (self._vs.height, self._vs.width) and len(frames):
            raise ValueError(f"frames are {frames.shape[1]}x{frames.shape[2]}, the file is "
                             f"{self._vs.height}x{self._vs.width}")
        if (audio is None) != (self._as is None) or (audio is not None and audio.shape[0] != self._pending.shape[0]):
            raise ValueError("audio must be given with every write, with the channels of the first, or never")
        if audio is not None:
            self._pending = np.concatenate([self._pending, audio], axis=1)
            self._a_in += audio.shape[1]
        for img in frames:
            # convert here: the encoder's own reused converter gave run-to-run different bytes
            frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p")
            frame.pts, frame.time_base = self.frames, 1 / self.rate
            self._out.mux(self._vs.encode(frame))
            self.frames += 1
            if self._as is not None:  # interleave: audio up to the end of this video frame, in whole AAC frames
                self._encode_audio(round(self.frames / self.rate * self.sample_rate), whole=True)

    def _encode_audio(self, end: int, whole: bool) -> None:
        while self._a_pos < end:
            n = min(_AAC_FRAME, self._pending.shape[1])
            if n == 0 or (whole and (n < _AAC_FRAME or self._a_pos + n > end)):
                return  # a partial AAC frame waits for more audio, or for close()
            chunk, self._pending = self._pending[:, :n], self._pending[:, n:]
            af = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout=self._layout)
            af.sample_rate, af.pts, af.time_base = self.sample_rate, self._a_pos, Fraction(1, self.sample_rate)
            self._out.mux(self._as.encode(af))
            self._a_pos += n

    def close(self) -> None:
        """Finish the file: the audio made T/fps long, encoders flushed, a file object filled."""
        if self._out is None:
            return
        try:
            if self._vs is None:
                raise ValueError("no frame written")
            if self._as is not None:
                n = round(self.frames / self.rate * self.sample_rate)
                slack = round(self.sample_rate / self.rate)
                if self._a_in > n + slack:
                    fps = float(self.rate)
                    raise ValueError(f"audio has {self._a_in} samples ({self._a_in / self.sample_rate:.3f}s) but the "
                                     f"video lasts {n} samples ({self.frames / fps:.3f}s at {fps} fps)")
                pad = max(0, n - self._a_in)
                self._pending = np.pad(self._pending[:, : n - self._a_pos], ((0, 0), (0, pad)))
                self._encode_audio(n, whole=False)
            self._out.mux(self._vs.encode(None))
            if self._as is not None:
                self._out.mux(self._as.encode(None))
            self._out.close()
            self._out = None
            if self._tmp is not None:
                with open(os.path.join(self._tmp.name, "out.mp4"), "rb") as f:
                    shutil.copyfileobj(f, self._target)
        finally:
            self.abort()

    def abort(self) -> None:
        """Abandon the file: close what is open, write nothing to a file object (idempotent)."""
        if self._out is not None:
            try:
                self._out.close()
            except (av.FFmpegError, ValueError, OSError):
                pass  # a file without header or streams: nothing to finish
            self._out = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


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
    read_av returns the audio exactly where it was written.  The whole clip at once; for a long
    one, write it piece by piece with :class:`AVWriter`.
    """
    frames = _check_frames(frames)
    if len(frames) == 0:
        raise ValueError(f"frames must be uint8 [T>0, H, W, 3], got {frames.dtype} {frames.shape}")
    if fps <= 0 or sample_rate <= 0:
        raise ValueError(f"fps and sample_rate must be > 0, got {fps}, {sample_rate}")
    if audio is not None:  # checked before a file is made
        audio = _check_audio(audio)
        rate = Fraction(fps).limit_denominator(1001)
        n, slack = round(len(frames) / rate * sample_rate), round(sample_rate / rate)
        if audio.shape[1] > n + slack:
            raise ValueError(f"audio has {audio.shape[1]} samples ({audio.shape[1] / sample_rate:.3f}s) "
                             f"but the video lasts {n} samples ({len(frames) / float(rate):.3f}s at {float(rate)} fps)")
    with AVWriter(path, fps, sample_rate) as w:
        w.write(frames, audio)


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
