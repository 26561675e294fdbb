"""Hard cuts (scene changes) in a video, found with PySceneDetect's ``ContentDetector``.

:func:`detect_cuts` runs the detector over frames in memory; :func:`scene_cuts` over a whole file,
decoded with :func:`sora.media.read_av` a window of WINDOW_SECONDS at a time and scaled down so the
longer side is DETECT_SIDE pixels (enough to see a cut), so memory does not grow with the file's
length.  A cut is reported as the time of the first frame of the new scene (frame ``i`` of a video
read at ``fps`` is at ``i / fps`` s).  The detector scores each frame by the mean change of hue,
saturation and brightness (0-255) from the frame before; a score of at least ``threshold`` is a cut,
and a cut less than ``min_scene_seconds`` after the previous one (or the start) is merged into it.

PySceneDetect is optional (``pip install 'sora[scenes]'``) and imported only when detecting.
"""

from __future__ import annotations

import math

import numpy as np

from sora.media.probe import probe_av
from sora.media.read import read_av

DEFAULT_THRESHOLD = 27.0  # ContentDetector's own default: mean HSV change between frames, 0-255
MIN_SCENE_SECONDS = 0.5
DETECT_SIDE = 64  # longer side of the frames the detector sees (pixels)
WINDOW_SECONDS = 10.0  # seconds decoded at once by scene_cuts
MISSING = "scene detection needs PySceneDetect: pip install 'sora[scenes]'"


def require() -> None:
    """ImportError with a one-line hint when PySceneDetect is not installed."""
    try:
        import scenedetect  # noqa: F401
    except ImportError:
        raise ImportError(MISSING) from None


class CutFinder:
    """Feeds RGB frames, in order, to a ``ContentDetector``; :meth:`finish` gives the cut times."""

    def __init__(self, fps: float, threshold: float = DEFAULT_THRESHOLD,
                 min_scene_seconds: float = MIN_SCENE_SECONDS):
        require()
        from scenedetect import ContentDetector, FrameTimecode

        if not fps > 0 or not threshold > 0 or not min_scene_seconds >= 0:
            raise ValueError(f"need fps > 0, threshold > 0 and min_scene_seconds >= 0, got {fps}, {threshold}, "
                             f"{min_scene_seconds}")
        self.fps, self.timecode = float(fps), FrameTimecode
        # float min_scene_len: seconds (an int would be frames)
        self.detector = ContentDetector(threshold=float(threshold), min_scene_len=float(min_scene_seconds))
        self.frames, self.cuts = 0, []

    def feed(self, frames: np.ndarray) -> None:
        for frame in frames:
            bgr = np.ascontiguousarray(frame[..., ::-1])  # the detector takes OpenCV's BGR
            self.cuts += self.detector.process_frame(self.timecode(self.frames, fps=self.fps), bgr)
            self.frames += 1

    def finish(self) -> list[float]:
        """Seconds at which each new scene starts, sorted (none at 0 s)."""
        if self.frames:
            self.cuts += self.detector.post_process(self.timecode(self.frames - 1, fps=self.fps))
        found = sorted({tc.frame_num for tc in self.cuts if 0 < tc.frame_num < self.frames})
        return [round(i / self.fps, 6) for i in found]


def detect_cuts(frames: np.ndarray, fps: float, threshold: float = DEFAULT_THRESHOLD,
                min_scene_seconds: float = MIN_SCENE_SECONDS) -> list[float]:
    """Cut times (s) in ``frames`` (uint8 [T, H, W, 3] RGB at ``fps``): each the time of the first
    frame after the cut."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    finder = CutFinder(fps, threshold, min_scene_seconds)
    finder.feed(frames)
    return finder.finish()


def detect_size(height: int, width: int, side: int = DETECT_SIDE) -> tuple[int, int]:
    """(H, W) scaled so the longer side is at most ``side``, the aspect kept."""
    scale = min(1.0, side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def scene_cuts(src, threshold: float = DEFAULT_THRESHOLD, min_scene_seconds: float = MIN_SCENE_SECONDS,
               side: int = DETECT_SIDE) -> list[float]:
    """Cut times (s, on the video's timeline) in the file ``src`` (path or bytes), read at its native
    frame rate a window at a time, scaled down to ``side`` pixels.  MediaError for unreadable input."""
    require()
    info = probe_av(src)
    fps = info.fps or 25.0
    size = detect_size(info.height, info.width, side)
    finder = CutFinder(fps, threshold, min_scene_seconds)
    total = math.floor(info.duration * fps + 1e-6) if info.duration else math.inf
    window = max(1, round(WINDOW_SECONDS * fps))
    f = 0
    while f < total:
        n = int(min(window, total - f))
        frames = read_av(src, start=f / fps, duration=n / fps, fps=fps, size=size).frames
        finder.feed(frames)
        f += len(frames)
        if len(frames) < n:  # the video ended before the header's duration said
            break
    return finder.finish()
