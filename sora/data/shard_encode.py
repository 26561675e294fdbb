"""Re-encoding for ``sora-make-shards`` (:mod:`sora.data.shards`): videos resized / resampled and cut
into pieces (at scene cuts, every ``max_seconds``), and still images made into clips, all through
:class:`sora.media.AVWriter`.

A video is decoded in windows of at most WINDOW_SECONDS (fewer frames when WINDOW_BYTES of RGB
frames at the output size would be exceeded), each read with ``read_av(start, duration)`` and
appended to the writer, so memory is bounded by one window whatever the length of the file.
Window ``k`` covers output frames ``[f0, f1)`` at the output rate and audio samples
``[round(f0 / fps * sr), round(f1 / fps * sr))``: the windows tile the timeline exactly, and the
result equals a whole-file ``read_av`` + ``write_av`` up to the codecs (the decoder is restarted
at each window's seek, AUDIO_PREROLL seconds ahead, so audio may differ by AAC rounding there).
"""

from __future__ import annotations

import io
import math
import sys
from fractions import Fraction

import numpy as np

from sora.media import AVWriter, MediaError, read_av

WINDOW_SECONDS = 10.0  # seconds of video decoded at once (one seek + AUDIO_PREROLL of extra decoding each)
WINDOW_BYTES = 256 << 20  # and at most this many bytes of RGB frames at the output size


def output_size(height: int, width: int, max_side: int | None) -> tuple[int, int]:
    """(H, W) scaled so the longer side is <= max_side, rounded to even sizes (yuv420p)."""
    h, w = height, width
    if max_side is not None and max(h, w) > max_side:
        h, w = h * max_side / max(h, w), w * max_side / max(h, w)
    return max(2, int(round(h / 2)) * 2), max(2, int(round(w / 2)) * 2)


def _fit(audio: np.ndarray, n: int) -> np.ndarray:
    audio = audio[:, :n]
    return np.pad(audio, ((0, 0), (0, n - audio.shape[1])))


def reencode(src: str, info, max_side: int | None = None, fps: float | None = None,
             max_seconds: float | None = None, cuts=()) -> list[tuple[float, bytes]]:
    """Re-encode `src` to mp4 (H.264 + AAC at the native sample rate, mono or stereo): longer side
    <= ``max_side``, ``fps`` frames per second (native when None), cut into consecutive pieces: a new
    one at each time of ``cuts`` (seconds: scene cuts; the piece starts with the first output frame
    at or after it) and every ``max_seconds`` within a piece (one piece when neither).
    Returns [(piece start in seconds, mp4 bytes)]."""
    h, w = output_size(info.height, info.width, max_side)
    rate = Fraction(fps or info.fps or 25.0).limit_denominator(1001)  # the writer's rate
    fps = float(rate)
    sr, channels = info.sample_rate or 16000, min(info.channels, 2) or 1
    total = math.floor(info.duration * fps + 1e-6) if info.duration else math.inf  # as a whole-file read_av
    seg = max(1, math.floor(max_seconds * fps + 1e-6)) if max_seconds else sys.maxsize
    window = max(1, min(round(WINDOW_SECONDS * fps), WINDOW_BYTES // (h * w * 3)))
    scene_starts = sorted({math.ceil(c * fps - 1e-6) for c in cuts} - {0}, reverse=True)  # output frames
    segments, writer, buf, seg_start, f, piece_end = [], None, None, 0.0, 0, 0
    try:
        while f < total:
            starts = f == piece_end  # a piece starts here
            if starts:
                while scene_starts and scene_starts[-1] <= f:
                    scene_starts.pop()
                piece_end = min(f + seg, scene_starts[-1] if scene_starts else sys.maxsize)
            n = int(min(window, total - f, piece_end - f))
            clip = read_av(src, start=f / fps, duration=n / fps, fps=fps, size=(h, w), sample_rate=sr,
                           channels=channels)
            got = len(clip.frames)
            if got == 0:
                break
            if starts:
                if writer is not None:
                    segments.append(_finish(writer, buf, seg_start))
                buf, seg_start = io.BytesIO(), f / fps
                writer = AVWriter(buf, rate, sr)
            audio = None
            if info.has_audio:
                audio = _fit(clip.audio, round((f + got) / rate * sr) - round(f / rate * sr))
            writer.write(clip.frames, audio)
            f += got
            if got < n:  # the video ended before the header's duration said
                break
        if writer is None:
            raise MediaError(f"{src}: no decodable video frame")
        segments.append(_finish(writer, buf, seg_start))
        writer = None
        return segments
    finally:
        if writer is not None:
            writer.abort()  # an error: the unfinished file is dropped


def _finish(writer: AVWriter, buf: io.BytesIO, start: float) -> tuple[float, bytes]:
    writer.close()
    return start, buf.getvalue()


def still(src: str, info, seconds: float, max_side: int | None = None, fps: float | None = None) -> bytes:
    """An image as an mp4 without audio: one frame held ``seconds`` (or ``round(seconds * fps)``
    copies of it at ``fps``), longer side <= ``max_side``."""
    h, w = output_size(info.height, info.width, max_side)
    frames = read_av(src, fps=None, size=(h, w)).frames[:1]
    if len(frames) == 0:
        raise MediaError(f"{src}: no decodable image")
    rate = Fraction(fps).limit_denominator(1001) if fps else 1 / Fraction(seconds).limit_denominator(1001)
    n = max(1, round(seconds * rate))
    out = io.BytesIO()
    with AVWriter(out, rate) as writer:
        for _ in range(n):  # one frame at a time: a long still at a high rate stays small in memory
            writer.write(frames)
    return out.getvalue()
