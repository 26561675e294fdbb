"""Decoded frame -> RGB as displayed: display matrix, sample aspect ratio, colour, HDR tone mapping.

Orientation follows FFmpeg's player logic (``fftools`` autorotate): the display matrix's rotation
in multiples of 90 degrees, plus a mirror when its determinant is negative, is applied to the
decoded picture; other angles are recorded (``AVInfo.rotation``) but not applied.

Colour: libswscale converts YUV to RGB with the frame's own matrix (BT.601/709/2020) and range
(limited/full), and from any bit depth (10-bit sources come out as 8-bit RGB).

Interlacing (``deinterlace``): ``None`` (auto) runs FFmpeg's ``bwdif`` on the frames flagged
interlaced, ``True`` on every frame, ``False`` never; one output frame per input frame, same times.

HDR (``hdr="tonemap"``, the default): PQ (SMPTE ST 2084) and HLG (ARIB STD-B67) frames are
decoded to 16-bit R'G'B', linearised to display light in cd/m^2 (PQ: the ST 2084 EOTF; HLG: the
BT.2100 inverse OETF and OOTF for a 1000 cd/m^2 display, system gamma 1.2), divided by the
BT.2408 reference white (203 cd/m^2), converted from BT.2020 to BT.709 primaries, tone mapped
by extended Reinhard on luminance, ``L (1 + L / Lw^2) / (1 + L)`` with ``Lw = 1000 / 203`` (the
mastering peak maps to white, the colour ratios are kept), clipped and encoded with the BT.1886
inverse (gamma 1/2.4).  ``hdr="keep"`` returns the PQ/HLG code values as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import av
import numpy as np

PQ, HLG = 16, 18  # AVColorTransferCharacteristic of SMPTE ST 2084 and ARIB STD-B67
HDR_MODES = ("tonemap", "keep")
REFERENCE_WHITE = 203.0  # cd/m^2, BT.2408
PEAK = 1000.0  # cd/m^2 assumed mastering peak (HLG's nominal display)
_BT2020_TO_709 = np.array([[1.6605, -0.5876, -0.0728], [-0.1246, 1.1329, -0.0083], [-0.0182, -0.1006, 1.1187]],
                          np.float32)
_LUMA_709 = np.array([0.2126, 0.7152, 0.0722], np.float32)


@dataclass(frozen=True)
class Display:
    """How a stored picture is shown: ``turns`` quarter turns counter-clockwise, then ``vflip``
    (top-bottom), at ``width`` x ``height``; ``rotation``/``mirrored`` as reported in AVInfo."""

    turns: int = 0
    vflip: bool = False
    width: int = 0
    height: int = 0
    rotation: int = 0
    mirrored: bool = False
    sar: float = 1.0

    @property
    def swaps(self) -> bool:
        return self.turns % 2 == 1


def hdr_of(trc) -> str:
    return {PQ: "pq", HLG: "hlg"}.get(int(trc or 0), "")


def _matrix(frame) -> np.ndarray | None:
    if frame is None:
        return None
    for item in frame.side_data:  # PyAV <= 18.1.0 yields the side data, 18.1.1 on (a mapping) its types
        sd = item if hasattr(item, "type") else frame.side_data[item]
        if getattr(sd.type, "name", "") == "DISPLAYMATRIX":
            m = np.frombuffer(bytes(sd), "<i4")
            return m if m.size == 9 else None
    return None


def _orientation(m: np.ndarray | None) -> tuple[int, bool, int, bool]:
    """(turns ccw, vflip, ffprobe rotation, mirrored) from a display matrix, as FFmpeg's autorotate."""
    if m is None:
        return 0, False, 0, False
    a, b, c, d = (float(v) / 65536 for v in (m[0], m[1], m[3], m[4]))
    s0, s1 = math.hypot(a, c), math.hypot(b, d)
    if not (s0 > 0 and s1 > 0):
        return 0, False, 0, False
    rotation = -math.degrees(math.atan2(b / s1, a / s0))  # av_display_rotation_get
    rotation = 0 if abs(rotation) < 0.5 else round(rotation)
    rotation = rotation + 360 if rotation <= -180 else rotation
    mirrored = a * d - b * c < 0
    theta = (-rotation) % 360  # clockwise, as fftools' get_rotation
    if abs(theta - 90) < 1:
        return (1, True, rotation, mirrored) if m[3] > 0 else (3, False, rotation, mirrored)
    if abs(theta - 180) < 1:
        h, v = m[0] < 0, m[4] < 0  # hflip + vflip = half turn
        return (2, h != v, rotation, mirrored) if h else (0, v, rotation, mirrored)
    if abs(theta - 270) < 1:
        return (3, True, rotation, mirrored) if m[3] < 0 else (1, False, rotation, mirrored)
    return 0, bool(abs(theta) < 1 and m[4] < 0), rotation, mirrored


def display_of(frame, codec_context) -> Display:
    """The display transform of a stream, from its first decoded frame (None: none known)."""
    turns, vflip, rotation, mirrored = _orientation(_matrix(frame))
    w, h = (frame.width, frame.height) if frame is not None else (codec_context.width, codec_context.height)
    sar = codec_context.sample_aspect_ratio
    sar = float(sar) if sar and 0.1 <= float(sar) <= 10 else 1.0  # absurd ratios are damage, not intent
    w = max(1, round(w * sar)) if sar != 1.0 else w
    width, height = (h, w) if turns % 2 else (w, h)
    return Display(turns, vflip, width, height, rotation, mirrored, sar)


def to_rgb(frame, display: Display, size: tuple[int, int] | None = None, hdr: str = "tonemap") -> np.ndarray:
    """uint8 [H, W, 3] RGB of `frame` as displayed, at ``size=(H, W)`` (default: the displayed size)."""
    h, w = size if size is not None else (display.height, display.width)
    sh, sw = (w, h) if display.swaps else (h, w)  # the stored picture's target size
    if hdr == "tonemap" and hdr_of(frame.color_trc):
        rgb = tonemap(frame.reformat(width=sw, height=sh, format="rgb48le").to_ndarray(), hdr_of(frame.color_trc))
    elif (sw, sh) == (frame.width, frame.height):
        rgb = frame.to_ndarray(format="rgb24")
    else:
        rgb = frame.reformat(width=sw, height=sh, format="rgb24").to_ndarray()
    if display.turns:
        rgb = np.rot90(rgb, display.turns)
    if display.vflip:
        rgb = rgb[::-1]
    return np.ascontiguousarray(rgb)


def pq_eotf(e: np.ndarray) -> np.ndarray:
    """SMPTE ST 2084: non-linear signal in [0, 1] -> display light in cd/m^2."""
    m1, m2, c1, c2, c3 = 0.1593017578125, 78.84375, 0.8359375, 18.8515625, 18.6875
    p = np.power(np.clip(e, 0, 1), 1 / m2)
    return 10000.0 * np.power(np.maximum(p - c1, 0) / (c2 - c3 * p), 1 / m1)


def hlg_display(e: np.ndarray) -> np.ndarray:
    """BT.2100 HLG: non-linear R'G'B' in [0, 1] -> display light in cd/m^2 on a 1000 cd/m^2 display."""
    a, b, c = 0.17883277, 0.28466892, 0.55991073
    e = np.clip(e, 0, 1)
    scene = np.where(e <= 0.5, e * e / 3, (np.exp((e - c) / a) + b) / 12)
    ys = scene @ np.array([0.2627, 0.6780, 0.0593], np.float32)  # BT.2020 luminance
    return PEAK * np.power(np.maximum(ys, 1e-12), 0.2)[..., None] * scene  # OOTF, system gamma 1.2


def tonemap(rgb16: np.ndarray, kind: str) -> np.ndarray:
    """16-bit BT.2020 PQ/HLG R'G'B' [H, W, 3] -> 8-bit BT.709 SDR RGB (operator: module docstring)."""
    e = rgb16.astype(np.float32) / 65535.0
    light = (pq_eotf(e) if kind == "pq" else hlg_display(e)) / REFERENCE_WHITE
    rgb = np.maximum(light @ _BT2020_TO_709.T, 0)
    lum = rgb @ _LUMA_709
    peak = PEAK / REFERENCE_WHITE
    scale = np.where(lum > 0, (1 + lum / peak**2) / (1 + lum), 0)
    sdr = np.clip(rgb * scale[..., None], 0, 1)
    return np.round(np.power(sdr, 1 / 2.4) * 255).astype(np.uint8)


class Deinterlacer:
    """FFmpeg's bwdif in send-frame mode (one frame out per frame in, the frame's pts kept):
    ``push(frame)`` returns the frames ready (bwdif looks one frame ahead), ``flush()`` the rest."""

    def __init__(self, stream, every_frame: bool):
        self.graph = av.filter.Graph()
        src = self.graph.add_buffer(template=stream)
        bwdif = self.graph.add("bwdif", f"mode=send_frame:parity=auto:deint={'all' if every_frame else 'interlaced'}")
        sink = self.graph.add("buffersink")
        src.link_to(bwdif)
        bwdif.link_to(sink)
        self.graph.configure()

    def push(self, frame) -> list:
        self.graph.push(frame)
        return self._pull()

    def flush(self) -> list:
        return self.push(None)

    def _pull(self) -> list:
        out = []
        while True:
            try:
                out.append(self.graph.pull())
            except (BlockingIOError, av.error.EOFError):
                return out
