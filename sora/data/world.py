"""A procedural bouncing-ball audio-video world with exact ground truth.

Each clip shows one to a few coloured balls falling under gravity in a 2-D box: they bounce
off the floor, both walls and the ceiling, and every impact fast enough makes a percussive
"tock" that starts at exactly the impact's audio sample. The clips are the quickstart's
training data and the physics / audio-video sync probe of the evaluation, so everything the
picture and the sound show is also returned as plain numbers in ``clip.meta``.

Timing contract (see :mod:`sora.timeline`): a clip of ``seconds`` at ``fps`` holds
``round(seconds * fps) + 1`` frames, frame ``i`` is the picture at ``i / fps``; the audio holds
``round(seconds * sample_rate)`` samples, sample ``n`` at ``n / sample_rate``.

Physics. The world is simulated in pixels (y grows downwards); a metre is
``pixels_per_metre = floor_y / box_height_m`` pixels, so gravity is ``gravity * ppm`` px/s^2.
Integration is event-driven and exact: between impacts a ball follows a parabola, the next
impact time is solved analytically (floor/ceiling: quadratic; walls: linear), the normal
velocity is reflected and scaled by the ball's restitution. A floor bounce whose rebound speed
is below ``rest_speed`` leaves the ball resting on the floor (it keeps rolling sideways at
constant speed and can still tap the walls). Balls do not collide with each other: they
simply overlap.

Rendering is vectorised numpy: plain background, a floor strip below ``floor_y``, balls as
anti-aliased filled discs drawn in ball order (coverage = clip(r + 0.5 - distance, 0, 1),
pixel centres at +0.5), each frame touching only a small patch around each disc.

Sound. An impact with normal speed >= ``audible_speed`` adds, from sample ``round(t * sr)``,
a damped sum of inharmonic partials (ratios of a struck bar) at the ball's pitch (small ~1200
Hz, medium ~700 Hz, large ~400 Hz, +-6 % per ball) plus a 1.5 ms noise click, with amplitude
proportional to the normal impact speed. The mix is soft-limited with ``tanh``; sounds that run
past the end are truncated. Before the first audible impact the audio is exactly zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

PALETTE = {  # ball and floor colours, by the name used in captions
    "red": (220, 40, 40), "green": (50, 190, 70), "blue": (50, 90, 230),
    "yellow": (240, 220, 50), "orange": (245, 140, 30), "purple": (150, 60, 200),
    "white": (235, 235, 235), "cyan": (40, 200, 220), "pink": (245, 120, 180),
    "gray": (128, 128, 128), "brown": (120, 80, 45),
}
FLOOR_SHADE = 0.7  # floors are a darker shade of their named colour, to stand out from balls
SIZES = {  # radius as a fraction of min(floor_y, width), base pitch (Hz), decay time (s)
    "small": (0.06, 1200.0, 0.035), "medium": (0.09, 700.0, 0.05), "large": (0.125, 400.0, 0.08)}
PARTIALS = ((1.0, 0.6), (2.76, 0.28), (5.40, 0.12))  # (frequency ratio, amplitude)
COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


@dataclass(frozen=True)
class WorldConfig:
    width: int = 64
    height: int = 64
    fps: float = 24.0
    seconds: float = 2.0
    sample_rate: int = 16000
    min_balls: int = 1
    max_balls: int = 3
    gravity: float = 9.81                  # m/s^2
    restitution: tuple[float, float] = (0.75, 0.9)   # sampled per ball
    box_height_m: float = 2.5              # floor to ceiling; sets pixels_per_metre
    floor_fraction: float = 0.125          # floor strip height / image height
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow", "orange", "purple", "white")
    floor_colors: tuple[str, ...] = ("gray", "green", "brown")
    sizes: tuple[str, ...] = ("small", "medium", "large")
    background: tuple[int, int, int] = (18, 20, 28)
    horizontal_speed: tuple[float, float] = (0.2, 1.0)  # |vx| at start, m/s, random sign
    rest_speed: float = 0.3                # m/s: slower floor rebounds stop the ball
    audible_speed: float = 0.4             # m/s: slower impacts make no sound
    loudness: float = 0.1                  # amplitude per m/s of normal impact speed

    def __post_init__(self):
        if self.width < 8 or self.height < 8:
            raise ValueError(f"WorldConfig: width/height must be >= 8, got {self.width}x{self.height}")
        if not (1 <= self.min_balls <= self.max_balls):
            raise ValueError("WorldConfig: need 1 <= min_balls <= max_balls, got "
                             f"{self.min_balls}, {self.max_balls}")
        if not (self.fps > 0 and self.seconds > 0 and self.sample_rate > 0 and self.gravity > 0):
            raise ValueError("WorldConfig: fps, seconds, sample_rate and gravity must be positive")
        lo, hi = self.restitution
        if not 0 < lo <= hi < 1:
            raise ValueError(f"WorldConfig.restitution={self.restitution}: need 0 < lo <= hi < 1")
        for name in (*self.colors, *self.floor_colors):
            if name not in PALETTE:
                raise ValueError(f"WorldConfig: unknown colour {name!r}; choose from {sorted(PALETTE)}")
        for name in self.sizes:
            if name not in SIZES:
                raise ValueError(f"WorldConfig: unknown size {name!r}; choose from {sorted(SIZES)}")

    @property
    def num_frames(self) -> int:
        return int(round(self.seconds * self.fps)) + 1

    @property
    def num_samples(self) -> int:
        return int(round(self.seconds * self.sample_rate))

    @property
    def floor_y(self) -> int:
        return self.height - max(2, int(round(self.floor_fraction * self.height)))

    @property
    def pixels_per_metre(self) -> float:
        return self.floor_y / self.box_height_m


@dataclass(eq=False)
class WorldClip:
    frames: np.ndarray   # uint8 [T, H, W, 3]
    audio: np.ndarray    # float32 [1, N] in [-1, 1]
    caption: str
    meta: dict           # json-serializable ground truth
    fps: float
    sample_rate: int

    def __eq__(self, other) -> bool:
        return (isinstance(other, WorldClip) and np.array_equal(self.frames, other.frames)
                and np.array_equal(self.audio, other.audio) and self.caption == other.caption
                and self.meta == other.meta and self.fps == other.fps
                and self.sample_rate == other.sample_rate)


def simulate_ball(x, y, vx, vy, radius, restitution, config: WorldConfig):
    """Exact event-driven flight of one ball from t=0 to ``config.seconds``, in pixels.

    Returns ``(segments, impacts)``: ``segments`` is an array [S, 6] of (t0, x0, y0, vx, vy,
    ay), the motion ``x0 + vx dt``, ``y0 + vy dt + ay dt^2 / 2`` valid from ``t0`` to the
    next row; ``impacts`` is a list of (time, surface, x, y, normal speed in px/s).
    """
    g, ppm = config.gravity * config.pixels_per_metre, config.pixels_per_metre
    lo_x, hi_x, top, bottom = radius, config.width - radius, radius, config.floor_y - radius
    t, ay = 0.0, g
    segments, impacts = [(t, x, y, vx, vy, ay)], []
    for _ in range(100_000):  # the cap is never reached: each event takes finite time
        events = []
        if ay > 0:  # flying: floor (always ahead) and ceiling (only when rising high enough)
            dy = max(bottom - y, 0.0)
            root = math.sqrt(max(vy * vy + 2 * g * dy, 0.0))
            events.append((2 * dy / (vy + root) if vy > 0 else (root - vy) / g, "floor"))
            if vy < 0 and vy * vy - 2 * g * max(y - top, 0.0) >= 0:
                dy = max(y - top, 0.0)
                events.append((2 * dy / (math.sqrt(vy * vy - 2 * g * dy) - vy), "ceiling"))
        if vx > 0:
            events.append((max((hi_x - x) / vx, 0.0), "right"))
        elif vx < 0:
            events.append((max((lo_x - x) / vx, 0.0), "left"))
        if not events:
            break
        dt, surface = min(events)
        if t + dt >= config.seconds:
            break
        t += dt
        x, y, vy = x + vx * dt, y + vy * dt + 0.5 * ay * dt * dt, vy + ay * dt
        if surface == "floor":
            speed, y, vy = vy, bottom, -restitution * vy
            if -vy < config.rest_speed * ppm:
                vy, ay = 0.0, 0.0  # resting on the floor from now on
        elif surface == "ceiling":
            speed, y, vy = -vy, top, -restitution * vy
        else:
            speed, x, vx = abs(vx), (hi_x if surface == "right" else lo_x), -restitution * vx
        impacts.append((t, surface, x, y, speed))
        segments.append((t, x, y, vx, vy, ay))
    return np.array(segments, dtype=np.float64), impacts


def trajectory_at(segments: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Ball centre [len(times), 2] (x, y pixels) from :func:`simulate_ball` segments."""
    t0, x0, y0, vx, vy, ay = segments[np.searchsorted(segments[:, 0], times, side="right") - 1].T
    dt = times - t0
    return np.stack([x0 + vx * dt, y0 + vy * dt + 0.5 * ay * dt * dt], axis=1)


def render_frames(trajectory: np.ndarray, radii, colors, floor_color: str, config: WorldConfig) -> np.ndarray:
    """uint8 [T, H, W, 3] frames for ball centres ``trajectory`` [B, T, 2] (pixels)."""
    n_frames, H, W = trajectory.shape[1], config.height, config.width
    img = np.empty((n_frames, H, W, 3), dtype=np.float32)
    img[:] = np.asarray(config.background, dtype=np.float32)
    img[:, config.floor_y:] = np.rint(FLOOR_SHADE * np.asarray(PALETTE[floor_color], dtype=np.float64))
    t = np.arange(n_frames)[:, None, None]
    for centres, r, color in zip(trajectory, radii, colors):
        # each frame touches only a P x P patch around the disc: gather, blend, scatter back
        # (indices clipped at the borders repeat the same pixel with the same value)
        P = int(math.ceil(2 * r + 2)) + 1
        start = np.floor(centres - r - 1).astype(np.int64)           # [T, 2] (x, y)
        cols = np.clip(start[:, 0:1] + np.arange(P), 0, W - 1)       # [T, P]
        rows = np.clip(start[:, 1:2] + np.arange(P), 0, H - 1)
        dx2 = (cols + 0.5 - centres[:, 0:1]) ** 2
        dy2 = (rows + 0.5 - centres[:, 1:2]) ** 2
        cover = np.clip(r + 0.5 - np.sqrt(dy2[:, :, None] + dx2[:, None, :]), 0.0, 1.0)
        idx = (t, rows[:, :, None], cols[:, None, :])
        patch = img[idx]                                              # [T, P, P, 3]
        rgb = np.asarray(PALETTE[color], dtype=np.float32)
        img[idx] = patch + cover[..., None].astype(np.float32) * (rgb - patch)
    return np.rint(img).astype(np.uint8)


def synthesize_audio(impacts: list, balls: list, n_samples: int, sample_rate: int, seed: int,
                     loudness: float = 0.1) -> np.ndarray:
    """float32 [1, n_samples] soundtrack of the ``audible`` impacts (meta dicts), tanh-limited.

    The noise click of each impact is seeded by (seed, ball, sample), so removing one impact
    leaves every other sample of the mix unchanged before its start.
    """
    mix = np.zeros(n_samples, dtype=np.float64)
    n_sound = int(0.5 * sample_rate)
    for imp in impacts:
        start = imp["sample"]
        if not imp["audible"] or start >= n_samples:
            continue
        ball = balls[imp["ball"]]
        t = np.arange(min(n_sound, n_samples - start)) / sample_rate
        wave = np.zeros_like(t)
        for k, (ratio, amp) in enumerate(PARTIALS):
            f = ball["pitch_hz"] * ratio
            if f < 0.45 * sample_rate:
                wave += amp * np.sin(2 * np.pi * f * t) * np.exp(-t * (k + 1) / ball["decay_s"])
        noise = np.random.Generator(np.random.PCG64([seed, imp["ball"], start])).standard_normal(t.size)
        wave += 0.3 * noise * np.exp(-t / 0.0015)
        mix[start:start + t.size] += loudness * imp["speed"] * wave
    return np.tanh(mix).astype(np.float32)[None]


def describe(balls: list, floor_color: str) -> str:
    """Caption such as 'two small red balls and a large blue ball bounce on a gray floor'."""
    groups: dict[tuple[str, str], int] = {}
    for b in balls:
        groups[(b["size"], b["color"])] = groups.get((b["size"], b["color"]), 0) + 1
    words = [f"a {s} {c} ball" if n == 1 else
             f"{COUNT_WORDS[n] if n < len(COUNT_WORDS) else n} {s} {c} balls"
             for (s, c), n in groups.items()]
    subject = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    verb = "bounces" if len(balls) == 1 else "bounce"
    return f"{subject} {verb} on a {floor_color} floor"


def make_clip(seed: int, config: WorldConfig = WorldConfig()) -> WorldClip:
    """The clip of ``seed``: frames, synchronized audio, caption and ground-truth meta."""
    rng = np.random.Generator(np.random.PCG64(seed))
    ppm, floor_y = config.pixels_per_metre, config.floor_y
    n_balls = int(rng.integers(config.min_balls, config.max_balls + 1))
    floor_color = str(rng.choice(config.floor_colors))
    balls, segments = [], []
    for _ in range(n_balls):
        size = str(rng.choice(config.sizes))
        frac, pitch, decay = SIZES[size]
        r = frac * min(floor_y, config.width) * rng.uniform(0.9, 1.1)
        ball = {"color": str(rng.choice(config.colors)), "size": size, "radius_px": float(r),
                "restitution": float(rng.uniform(*config.restitution)),
                "pitch_hz": float(pitch * rng.uniform(0.94, 1.06)), "decay_s": decay}
        x = rng.uniform(r, config.width - r)
        y = floor_y - r - rng.uniform(0.4, 0.95) * (floor_y - 2 * r)  # start high up
        vx = rng.uniform(*config.horizontal_speed) * rng.choice([-1.0, 1.0]) * ppm
        vy = rng.uniform(-1.0, 0.5) * ppm
        segs, hits = simulate_ball(x, y, vx, vy, r, ball["restitution"], config)
        balls.append(ball)
        segments.append((segs, hits))

    times = np.arange(config.num_frames, dtype=np.float64) / config.fps
    trajectory = np.stack([trajectory_at(segs, times) for segs, _ in segments])  # [B, T, 2]
    impacts = sorted(
        ({"time": float(t), "sample": int(round(t * config.sample_rate)), "ball": b,
          "surface": surface, "x": float(x), "y": float(y), "speed": float(speed / ppm),
          "audible": bool(speed / ppm >= config.audible_speed)}
         for b, (_, hits) in enumerate(segments) for t, surface, x, y, speed in hits),
        key=lambda imp: (imp["time"], imp["ball"]))

    frames = render_frames(trajectory, [b["radius_px"] for b in balls], [b["color"] for b in balls],
                           floor_color, config)
    audio = synthesize_audio(impacts, balls, config.num_samples, config.sample_rate, seed, config.loudness)
    meta = {"seed": int(seed), "fps": float(config.fps), "sample_rate": int(config.sample_rate),
            "seconds": float(config.seconds), "width": int(config.width), "height": int(config.height),
            "gravity_px": float(config.gravity * ppm), "pixels_per_metre": float(ppm),
            "floor_y": int(floor_y), "floor_color": floor_color, "balls": balls, "impacts": impacts,
            "trajectory": trajectory.tolist()}
    return WorldClip(frames, audio, describe(balls, floor_color), meta, float(config.fps),
                     int(config.sample_rate))


def make_multishot(seed: int, config: WorldConfig, cut_every: float, max_shots: int = 3,
                   continue_prob: float = 0.3) -> WorldClip:
    """A clip of 1..``max_shots`` shots with cuts on multiples of ``cut_every`` seconds (the video latent step): each
    shot shows a new scene, or (``continue_prob``) the previous shot's scene going on, its balls where they were.
    Each shot's frames and sound come from its scene's clip over the shot's seconds (a frame or sample at a cut
    belongs to the shot that starts there). ``caption`` is the first shot's; ``meta["shots"]`` lists every shot
    ``{start, end, caption, scene}`` (scene: the clip seed it shows) and ``meta["scenes"]`` their ground truth."""
    rng = np.random.Generator(np.random.PCG64([seed, 7]))
    steps = int(round(config.seconds / cut_every))
    n = int(rng.integers(1, min(max_shots, steps) + 1))
    cuts = sorted(rng.choice(np.arange(1, steps), n - 1, replace=False).tolist()) if n > 1 else []
    bounds = [0.0, *(c * cut_every for c in cuts), float(config.seconds)]
    scenes, shots, frames, audio = {}, [], None, None
    scene = seed
    for i, (t0, t1) in enumerate(zip(bounds, bounds[1:])):
        if i and rng.random() >= continue_prob:
            scene = int(rng.integers(2**62))
        if scene not in scenes:
            scenes[scene] = make_clip(scene, config)
        clip = scenes[scene]
        if frames is None:
            frames, audio = clip.frames.copy(), clip.audio.copy()
        f0, f1 = math.ceil(t0 * config.fps - 1e-9), math.ceil(t1 * config.fps - 1e-9) if i < len(bounds) - 2 else None
        s0, s1 = round(t0 * config.sample_rate), round(t1 * config.sample_rate) if i < len(bounds) - 2 else None
        frames[f0:f1], audio[:, s0:s1] = clip.frames[f0:f1], clip.audio[:, s0:s1]
        shots.append({"start": t0, "end": t1, "caption": clip.caption, "scene": scene})
    first = scenes[seed]
    meta = {**first.meta, "shots": shots, "scenes": {str(k): v.meta for k, v in scenes.items()}}
    return WorldClip(frames, audio, first.caption, meta, float(config.fps), int(config.sample_rate))


def clip_seed(seed: int, index: int) -> int:
    """Seed of clip ``index`` of a world seeded ``seed`` (a 63-bit hash of the pair)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


@dataclass
class BouncingWorld:
    """Dataset of clips: ``world[i] == make_clip(clip_seed(seed, i), config)``.

    With ``length`` it is a finite map-style dataset (``len``, negative indices, IndexError);
    without, ``len`` raises TypeError and iteration never ends.
    """
    config: WorldConfig = field(default_factory=WorldConfig)
    seed: int = 0
    length: int | None = None

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("BouncingWorld without length is infinite")
        return self.length

    def __getitem__(self, index: int) -> WorldClip:
        index = int(index)
        if self.length is not None:
            if index < 0:
                index += self.length
            if not 0 <= index < self.length:
                raise IndexError(f"BouncingWorld index {index} out of range({self.length})")
        elif index < 0:
            raise IndexError("negative index into an infinite BouncingWorld")
        return make_clip(clip_seed(self.seed, index), self.config)

    def __iter__(self) -> Iterator[WorldClip]:
        i = 0
        while self.length is None or i < self.length:
            yield self[i]
            i += 1
