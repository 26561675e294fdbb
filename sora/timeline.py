"""The audio-video timing contract: every length in the project derives from seconds here.

One time axis, in seconds, shared by both streams:

* Video frames are instants. A clip of ``seconds`` at ``fps`` holds ``seconds * fps + 1``
  frames, frame ``i`` at ``i / fps``: both ends included, so the frame count is ``1 + s*k``
  for the causal VAE's temporal stride ``s`` (``k`` = ``seconds * fps / s``). The first
  frame is encoded alone (latent 0, the instant 0); latent ``j >= 1`` covers frames
  ``s*(j-1)+1 .. s*j``, i.e. the span ``((j-1)*s/fps, j*s/fps]``.
* Audio samples are instants too: ``seconds * sample_rate`` samples, sample ``n`` at
  ``n / sample_rate``. Log-mel frames step ``mel_hop`` samples; an audio latent step covers
  ``audio_latent_stride`` mel frames, i.e. ``mel_hop * audio_latent_stride`` samples.

So the video latents and the audio latents both tile ``[0, seconds]``. A token's time is the
centre of the span it covers, and rotary positions are built from those times, so a video
token and an audio token at the same instant get the same temporal phase.

Every combination is checked exactly (with fractions, no float rounding): the clip must hold
a whole number of video latents and audio latents. A bad combination raises a
:class:`TimelineError` naming the field and a value that would work.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction

import numpy as np


class TimelineError(ValueError):
    """A timing field that does not fit the contract; the message names the field."""


def as_fraction(x: float | int | str | Fraction, max_denominator: int = 1001) -> Fraction:
    """Exact rational for a config number: 24 -> 24, 29.97 -> 30000/1001, 2.5 -> 5/2."""
    if isinstance(x, Fraction):
        return x
    if isinstance(x, str) and "/" in x:
        return Fraction(x)
    return Fraction(str(x)).limit_denominator(max_denominator)


@dataclass(frozen=True)
class Timeline:
    seconds: float = 2.0
    fps: float = 24.0
    vae_time_stride: int = 4
    sample_rate: int = 16000
    mel_hop: int = 160
    audio_latent_stride: int = 4

    def __post_init__(self):
        for name in ("vae_time_stride", "sample_rate", "mel_hop", "audio_latent_stride"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise TimelineError(f"timeline.{name}={value!r}: must be a positive integer")
        for name in ("seconds", "fps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float, Fraction, np.number)) or not value > 0 or not math.isfinite(value):
                raise TimelineError(f"timeline.{name}={value!r}: must be a positive number")
        steps = self.seconds_q * self.fps_q
        if steps.denominator != 1 or steps.numerator % self.vae_time_stride:
            k = max(1, round(float(steps) / self.vae_time_stride))
            raise TimelineError(
                f"timeline.seconds={self.seconds}: at fps={self.fps} the clip spans {float(steps):g} "
                f"frame steps, not a multiple of vae_time_stride={self.vae_time_stride} "
                f"(frames must be 1 + {self.vae_time_stride}k); try seconds="
                f"{float(k * self.vae_time_stride / self.fps_q):.12g}")
        samples = self.seconds_q * self.sample_rate
        window = self.audio_window
        if samples.denominator != 1 or samples.numerator % window:
            m = max(1, round(float(samples) / window))
            raise TimelineError(
                f"timeline.seconds={self.seconds}: {float(samples):g} audio samples at "
                f"sample_rate={self.sample_rate} are not a multiple of mel_hop*audio_latent_stride="
                f"{window}; try seconds={float(Fraction(m * window, self.sample_rate)):.12g}")

    # -- exact quantities ---------------------------------------------------------------
    @property
    def seconds_q(self) -> Fraction:
        return as_fraction(self.seconds, max_denominator=10**6)

    @property
    def fps_q(self) -> Fraction:
        return as_fraction(self.fps)

    @property
    def audio_window(self) -> int:
        """Samples per audio latent step."""
        return self.mel_hop * self.audio_latent_stride

    # -- video ----------------------------------------------------------------------------
    @property
    def num_frames(self) -> int:
        return int(self.seconds_q * self.fps_q) + 1

    @property
    def video_latent_steps(self) -> int:
        return (self.num_frames - 1) // self.vae_time_stride + 1

    @property
    def read_duration(self) -> float:
        """Seconds of source to read so that ``num_frames`` instants fit: seconds + 1/fps."""
        return float(self.seconds_q + 1 / self.fps_q)

    def frame_times(self) -> np.ndarray:
        return np.arange(self.num_frames, dtype=np.float64) / float(self.fps_q)

    def video_token_spans(self) -> np.ndarray:
        """[video_latent_steps, 2] start/end seconds of what each video latent covers."""
        s = float(self.vae_time_stride / self.fps_q)
        j = np.arange(self.video_latent_steps, dtype=np.float64)
        spans = np.stack([(j - 1) * s, j * s], axis=1)
        spans[0] = 0.0  # the first frame alone: the instant 0
        return spans

    def video_token_times(self) -> np.ndarray:
        return self.video_token_spans().mean(axis=1)

    # -- audio ----------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return int(self.seconds_q * self.sample_rate)

    @property
    def num_mel_frames(self) -> int:
        return self.num_samples // self.mel_hop

    @property
    def audio_latent_steps(self) -> int:
        return self.num_samples // self.audio_window

    @property
    def audio_latent_rate(self) -> float:
        """Audio latent steps per second (25 by default)."""
        return self.sample_rate / self.audio_window

    def audio_token_spans(self) -> np.ndarray:
        d = self.audio_window / self.sample_rate
        m = np.arange(self.audio_latent_steps, dtype=np.float64)
        return np.stack([m * d, (m + 1) * d], axis=1)

    def audio_token_times(self) -> np.ndarray:
        return self.audio_token_spans().mean(axis=1)

    # -- conversions ----------------------------------------------------------------------
    def sample_of(self, t: float) -> int:
        """Index of the audio sample at time ``t`` seconds."""
        return int(round(t * self.sample_rate))

    def frame_of(self, t: float) -> int:
        """Index of the frame at (or last before) time ``t`` seconds."""
        return int(math.floor(t * float(self.fps_q) + 1e-9))

    # -- lengths ----------------------------------------------------------------------------
    @property
    def quantum(self) -> Fraction:
        """The shortest clip this timeline allows (1 + k·stride frames and whole audio latent windows);
        every valid ``seconds`` is a multiple of it."""
        a = Fraction(self.vae_time_stride) / self.fps_q
        b = Fraction(self.audio_window, self.sample_rate)
        return Fraction(math.lcm(a.numerator, b.numerator), math.gcd(a.denominator, b.denominator))

    def fit_seconds(self, duration: float, what: str = "the input") -> float:
        """``duration`` rounded down to a valid clip length; TimelineError if shorter than :attr:`quantum`."""
        q = self.quantum
        k = math.floor(Fraction(duration).limit_denominator(10**6) / q + Fraction(1, 10**6))
        if k < 1:
            raise TimelineError(f"{what} lasts {duration:.3f} s, shorter than the shortest clip this timeline "
                                f"allows (seconds={float(q):g})")
        return float(k * q)

    def nearest_seconds(self, seconds: float) -> float:
        """The valid clip length nearest ``seconds`` (at least one :attr:`quantum`)."""
        q = self.quantum
        return float(max(1, round(Fraction(float(seconds)).limit_denominator(10**6) / q)) * q)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(num_frames=self.num_frames, num_samples=self.num_samples,
                 video_latent_steps=self.video_latent_steps,
                 audio_latent_steps=self.audio_latent_steps)
        return d
