"""Property-based fuzzing of the media readers (issue 15): small real mp4 / webm / mkv files, mutated
(bit flips, overwrites, truncation, inserted / deleted / duplicated / swapped runs, mp4 box and EBML
element length and field corruption, swapped sibling boxes / elements), go through ``probe_av``,
``read_av`` (whole file, and the training-time window on bytes), ``read_audio`` and the shard
worker ``sora.data.shards.process``.  Each call must return well-formed output or raise MediaError
naming its source: never another exception, never a hang (``SORA_FUZZ_TIMEOUT`` s per call, default
10), never a dead worker (calls run in a spawned process, tools/fuzz_media.py).

CI runs a fixed-seed slice (``SORA_FUZZ_EXAMPLES``, default 500 inputs, ~10 s on 2 cores);
``make fuzz`` runs 10,000 (``FUZZ_EXAMPLES=...``, ``FUZZ_SEED=...`` for another sequence), saves
reproducers under outputs/fuzz/ and prints a summary.  The test never raises inside hypothesis
(no shrinking): it collects every outcome and fails at the end, listing each failure kind.
"""

from __future__ import annotations

import io
import os
import random
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from sora.media import write_av
from tools.fuzz_media import CALLS, Fuzzer

EXAMPLES = int(os.environ.get("SORA_FUZZ_EXAMPLES", "500"))
SEED = os.environ.get("SORA_FUZZ_SEED")  # unset: hypothesis' derandomized (fixed) sequence
TIMEOUT = float(os.environ.get("SORA_FUZZ_TIMEOUT", "10"))

# ----------------------------------------------------------------------------- seed files


def _pattern(i: int, h: int, w: int) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0], img[..., 2] = (i * 23) % 256, np.arange(w, dtype=np.uint8)[None] * 3
    x = (i * 3) % (w - 8)
    img[h // 4: h // 4 + 8, x: x + 8] = 255
    return img


def _tone(n: int, sr: int, channels: int) -> np.ndarray:
    t = np.arange(n) / sr
    return np.stack([0.3 * np.sin(2 * np.pi * (440 + 110 * c) * t) for c in range(channels)]).astype(np.float32)


def _write_pyav(fmt, vcodec, acodec, layout, sr, fps=12, w=64, h=48, a_opts=None) -> bytes:
    channels = 2 if layout == "stereo" else 1
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        vs = out.add_stream(vcodec, rate=fps, options={"threads": "1"})
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        ast = out.add_stream(acodec, rate=sr, layout=layout, options=a_opts or {})
        audio, pos, step = _tone(sr, sr, channels), 0, 1024
        for i in range(fps):  # one second
            frame = av.VideoFrame.from_ndarray(_pattern(i, h, w), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            out.mux(vs.encode(frame))
            while pos < round((i + 1) / fps * sr):
                af = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio[:, pos: pos + step]), format="fltp",
                                                layout=layout)
                af.sample_rate, af.pts, af.time_base = sr, pos, Fraction(1, sr)
                out.mux(ast.encode(af))
                pos += step
        out.mux(vs.encode(None))
        out.mux(ast.encode(None))
    return buf.getvalue()


def make_seeds() -> dict[str, tuple[str, bytes]]:
    """Small real files, name -> (extension, bytes): H.264+AAC mp4 (write_av), VP9+Opus webm,
    VP8+Vorbis mkv (VP8+Opus, then H.264+AAC, where this FFmpeg build lacks an encoder)."""
    mp4 = io.BytesIO()
    write_av(mp4, np.stack([_pattern(i, 32, 32) for i in range(24)]), _tone(16000, 16000, 1), 24, 16000)
    seeds = {"mp4": ("mp4", mp4.getvalue()), "webm": ("webm", _write_pyav("webm", "libvpx-vp9", "libopus", "mono",
                                                                         48000))}
    for args in (("libvpx", "vorbis", "stereo", 44100, {"strict": "experimental"}),
                 ("libvpx", "libopus", "stereo", 48000, None), ("libx264", "aac", "stereo", 44100, None)):
        try:
            seeds["mkv"] = ("mkv", _write_pyav("matroska", *args[:4], a_opts=args[4]))
            break
        except Exception:  # noqa: BLE001 - an encoder this build lacks: try the next pair
            continue
    return seeds


# ----------------------------------------------------------------------------- mutations: mp4 boxes, EBML elements

_MP4_CHILDREN = {b"moov": 0, b"trak": 0, b"mdia": 0, b"minf": 0, b"stbl": 0, b"edts": 0, b"dinf": 0, b"udta": 0,
                 b"mvex": 0, b"moof": 0, b"traf": 0, b"mfra": 0, b"meta": 4, b"stsd": 8, b"dref": 8, b"avc1": 78,
                 b"mp4a": 28}  # box type -> bytes between its header and its child boxes
_EBML_MASTERS = {0x1A45DFA3, 0x18538067, 0x114D9B74, 0x4DBB, 0x1549A966, 0x1654AE6B, 0xAE, 0xE0, 0xE1, 0x1F43B675,
                 0xA0, 0x1C53BB6B, 0xBB, 0xB7, 0x1254C367, 0x7373, 0x63C0, 0x67C8, 0x6D80, 0x6240}


def _vint(data, pos: int) -> tuple[int, int] | None:
    """(value without the length marker, width) of the EBML variable-length integer at pos."""
    width = 9 - data[pos].bit_length() if pos < len(data) else 9
    if width > 8 or pos + width > len(data):
        return None
    return int.from_bytes(data[pos:pos + width], "big") & ((1 << (7 * width)) - 1), width


def _header(data, pos: int, hi: int, ebml: bool):
    """(header length, total size, name, offset of the size field, children offset or None) or None."""
    if ebml:
        ident = _vint(data, pos)
        size = ident and ident[1] <= 4 and _vint(data, pos + ident[1])
        if not size:
            return None
        eid, head = int.from_bytes(data[pos:pos + ident[1]], "big"), ident[1] + size[1]
        total = hi - pos if size[0] == (1 << (7 * size[1])) - 1 else head + size[0]  # all ones: unknown size
        return head, total, f"{eid:X}", pos + ident[1], 0 if eid in _EBML_MASTERS else None
    if pos + 8 > hi:
        return None
    total, typ, head = int.from_bytes(data[pos:pos + 4], "big"), bytes(data[pos + 4:pos + 8]), 8
    if total == 1 and pos + 16 <= hi:
        total, head = int.from_bytes(data[pos + 8:pos + 16], "big"), 16
    elif total == 0:
        total = hi - pos
    if total < head or not all(32 <= c < 127 for c in typ):
        return None
    return head, total, typ.decode(), pos, _MP4_CHILDREN.get(typ)


def elements(data, lo=0, hi=None, parent=-1, out=None) -> list[tuple]:
    """mp4 boxes, or EBML elements for webm/mkv, depth first: (start, header length, total size,
    name, parent start, offset of the size field)."""
    out, hi, ebml = [] if out is None else out, len(data) if hi is None else hi, data[:4] == b"\x1a\x45\xdf\xa3"
    pos = lo
    while pos < hi and len(out) < 4096:
        h = _header(data, pos, hi, ebml)
        if h is None or pos + h[1] > hi:
            break
        out.append((pos, h[0], h[1], h[2], parent, h[3]))
        if h[4] is not None:
            elements(data, pos + h[0] + h[4], pos + h[1], pos, out)
        pos += h[1]
    return out


def _value(old: int, how: str, k: int, maxv: int) -> int:
    """A corrupted length / field: 0, 1, too small for a header, huge, all ones, old +- k, or k."""
    v = {"zero": 0, "one": 1, "small": 2 + k % 7, "huge": maxv >> 1, "max": maxv, "plus": old + 1 + k % 64,
         "minus": old - 1 - k % 64}.get(how, k)
    return min(max(v, 0), maxv)


def _structural(b: bytearray, op: str, a: list) -> None:
    elems, ebml = elements(b), b[:4] == b"\x1a\x45\xdf\xa3"
    if not elems:  # no structure left: a bit flip instead
        b[a[0] % len(b)] ^= 0x10
        return
    start, head, total, _, parent, at = elems[a[0] % len(elems)]
    if op == "length" and not ebml:  # the box's 32-bit size
        b[at:at + 4] = _value(total, a[1], a[2], (1 << 32) - 1).to_bytes(4, "big")
    elif op == "length" and a[1] == "random" and a[2] % 4 == 0:
        b[at] = 0  # an invalid EBML vint: no length marker
    elif op == "length":  # the element's size vint, same width
        w = _vint(b, at)[1]
        b[at:at + w] = ((1 << (7 * w)) | _value(total - head, a[1], a[2], (1 << (7 * w)) - 1)).to_bytes(w, "big")
    elif op == "field" and total > head:  # a 32-bit word among the first 32 payload bytes (or a short payload)
        w = min(4, total - head)
        p = start + head + 4 * (a[1] % max(1, min(8, (total - head) // 4)))
        b[p:p + w] = _value(int.from_bytes(b[p:p + w], "big"), a[2], a[3], (1 << (8 * w)) - 1).to_bytes(w, "big")
    elif op == "swap_elems":  # with a sibling
        sibs = [(e[0], e[2]) for e in elems if e[4] == parent and e[0] != start]
        if sibs:
            (x, xl), (y, yl) = sorted([(start, total), sibs[a[1] % len(sibs)]])
            b[x:y + yl] = b[y:y + yl] + b[x + xl:y] + b[x:x + xl]


def mutate(data: bytes, ops: list[tuple]) -> bytes:
    """Apply ops in order, positions modulo the current length: ("flips", seed, n), ("overwrite", pos,
    bytes), ("truncate", pos), ("insert", pos, bytes), ("delete", pos, n), ("dup", from, to, n),
    ("swap", a, b, n), ("length", pick, how, k), ("field", pick, word, how, k), ("swap_elems", i, j)."""
    b = bytearray(data)
    for op, *a in ops:
        n = len(b)
        if n == 0:
            break
        p = a[0] % n
        if op == "flips":
            rng = random.Random(a[0])
            for _ in range(a[1]):
                b[rng.randrange(n)] ^= 1 << rng.randrange(8)
        elif op == "overwrite":
            b[p:p + len(a[1])] = a[1][: n - p]
        elif op == "truncate":
            del b[p:]
        elif op == "insert":
            b[p:p] = a[1]
        elif op == "delete":
            del b[p:p + a[1]]
        elif op == "dup":  # a copy of a run of the file, inserted elsewhere
            b[a[1] % n: a[1] % n] = b[p:p + a[2]]
        elif op == "swap":
            x, y = sorted((p, a[1] % n))
            m = min(a[2], y - x, n - y)
            b[x:y + m] = b[y:y + m] + b[x + m:y] + b[x:x + m]
        else:
            _structural(b, op, a)
    return bytes(b)


# ----------------------------------------------------------------------------- strategies

pos = st.integers(0, 1 << 24)  # positions are taken modulo the input's current length
runs = st.binary(min_size=1, max_size=24)
how = st.sampled_from(["zero", "one", "small", "huge", "max", "plus", "minus", "random"])
k = st.integers(0, (1 << 32) - 1)
MUTATION = st.one_of(
    st.tuples(st.just("flips"), k, st.integers(1, 32)),
    st.tuples(st.just("overwrite"), pos, runs | st.sampled_from([b"\0" * 8, b"\xff" * 8])),
    st.tuples(st.just("truncate"), pos),
    st.tuples(st.just("insert"), pos, runs),
    st.tuples(st.just("delete"), pos, st.integers(1, 512)),
    st.tuples(st.just("dup"), pos, pos, st.integers(1, 2048)),
    st.tuples(st.just("swap"), pos, pos, st.integers(1, 2048)),
    st.tuples(st.just("length"), pos, how, k),
    st.tuples(st.just("field"), pos, st.integers(0, 7), how, k),
    st.tuples(st.just("swap_elems"), pos, pos),
)
WINDOW = st.fixed_dictionaries({
    "start": st.sampled_from([0.0, 0.25, 0.5]) | st.floats(0, 1.5),
    "duration": st.sampled_from([0.1, 0.5, 1.0]) | st.floats(0.04, 1.2),
    "fps": st.sampled_from([8.0, 12.0, 24.0, 25.0, 30.0]),
    "size": st.sampled_from([(16, 16), (24, 32), (48, 64), (30, 17)]),
    "channels": st.sampled_from([1, 2]),
})


@st.composite
def cases(draw, seeds: dict):
    """(call, mutated bytes, extension, call parameters, note for the reproducer)."""
    name = draw(st.sampled_from(sorted(seeds)))
    ext, original = seeds[name]
    ops = draw(st.lists(MUTATION, min_size=1, max_size=3))
    call = draw(st.sampled_from(CALLS))
    params = draw(WINDOW) if call == "read_window" else {"channels": draw(st.sampled_from([1, 2]))} \
        if call == "read_audio" else {}
    return call, mutate(original, ops), ext, params, {"seed": name, "ops": ops}


@pytest.fixture(scope="module")
def seeds() -> dict:
    return make_seeds()


def test_mutations_find_the_structure(seeds):
    boxes = {e[3] for e in elements(seeds["mp4"][1])}
    assert {"ftyp", "moov", "trak", "stsz", "avcC", "mdat"} <= boxes, boxes
    for name in ("webm", "mkv"):  # Segment, Tracks, Cluster, SimpleBlock
        assert {"18538067", "1654AE6B", "1F43B675", "A3"} <= {e[3] for e in elements(seeds[name][1])}, name
    data = seeds["mp4"][1]
    moov = [e for e in elements(data) if e[3] == "moov"][0]
    out = mutate(data, [("length", elements(data).index(moov), "zero", 0)])
    assert len(out) == len(data) and out[moov[0]:moov[0] + 4] == bytes(4) and out[moov[0] + 4:] == data[moov[0] + 4:]


def test_seed_files_are_clean(seeds, tmp_path):
    """The unmutated seeds read normally (else the fuzzer would only exercise the error paths)."""
    assert {"mp4", "webm", "mkv"} <= set(seeds), sorted(seeds)
    with Fuzzer(tmp_path, timeout=60) as fz:
        for name, (ext, data) in seeds.items():
            assert 1000 < len(data) < 60_000, (name, len(data))
            for call in CALLS:
                params = {"start": 0.2, "duration": 0.5, "fps": 12.0, "size": (24, 32)} if call == "read_window" else {}
                assert fz.run(call, data, ext, params, {"seed": name}) == "ok", (name, call, fz.summary())


def test_mutated_media_fail_only_with_media_error(seeds, tmp_path_factory):
    out = Path(os.environ.get("SORA_FUZZ_OUT") or tmp_path_factory.mktemp("fuzz"))
    t0 = time.monotonic()
    with Fuzzer(out, timeout=TIMEOUT) as fz:

        @settings(max_examples=EXAMPLES, deadline=None, derandomize=SEED is None, database=None,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=cases(seeds))
        def fuzz(case):
            fz.run(*case)

        (seed(int(SEED))(fuzz) if SEED is not None else fuzz)()
        report = f"{fz.summary()}\n  {time.monotonic() - t0:.0f}s, reproducers under {out}"
        print("\n" + report)
        assert not fz.failures, report
