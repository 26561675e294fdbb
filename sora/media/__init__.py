"""Read and write clips (video + audio) with PyAV; nothing else in sora touches containers.

Frames come out as a player displays them (display matrix, sample aspect ratio, colour matrix
and range, HDR tone mapping: :mod:`sora.media.picture`); :mod:`sora.media.probe` describes a file.

Time axis
---------
Every time in this module is in seconds on the *presentation timeline of the video stream*:
time zero is the presentation time (pts) of the first video frame.  ``start``/``duration`` of
:func:`read_av` are on that axis, and so is the audio: a decoded audio frame whose pts (in
seconds) is ``p`` lands at sample ``round((p - video_t0 - start) * sample_rate)`` of the clip,
so a sound heard at second 1.0 of the clip sits at sample ``1.0 * sample_rate``.  Stream start
offsets are honoured (audio that starts 125 ms after the video comes out 125 ms late, with
``audio_mask`` False in front), and so is whatever FFmpeg exposes about codec priming: the mp4
demuxer turns an edit list into a negative first-packet pts plus "skip samples" side data, and
the decoder drops those samples, so the first decoded frame is already on the timeline.  When a
file carries no edit list the AAC priming samples (1024 of near-silence) are decoded and placed
at their pts, i.e. the audio is as late as the file says it is; nothing is re-aligned.

Audio is always resampled by one ``av.AudioResampler`` per contiguous run of decoded frames;
the position of every output sample is counted from the first input frame's pts (the resampler
compensates its own filter delay), and the resampler is flushed at the end.

The video defines the clip: audio is cut or zero-padded to the video window
(``audio_mask`` tells real samples from padding); a file without audio gives silence.
"""

from sora.media.probe import AVInfo, MediaError, probe_av  # noqa: F401
from sora.media.read import (  # noqa: F401
    AUDIO_PREROLL, VIDEO_EXTS, AudioInfo, AVClip, decoded_seconds, read_audio, read_av)
from sora.media.write import AVWriter, write_av, write_image  # noqa: F401
from sora.media.scenes import detect_cuts, scene_cuts  # noqa: F401  (PySceneDetect is imported when used)

__all__ = ["AVClip", "AVInfo", "AVWriter", "AudioInfo", "MediaError", "VIDEO_EXTS", "decoded_seconds", "detect_cuts",
           "probe_av", "read_audio", "read_av", "scene_cuts", "write_av", "write_image"]
