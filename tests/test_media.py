"""Tests for sora.media: the time axis, audio placement, resampling, seeking, errors, real files."""

from __future__ import annotations

import io
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from sora.media import AVClip, AVInfo, MediaError, probe_av, read_audio, read_av, write_av

SR = 16000
H, W = 48, 64
MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media"  # ../shared/media beside the repo


def beep(n_total: int, at: int, sr: int = SR, length: float = 0.05, amp: float = 0.5) -> np.ndarray:
    """Silence with a 1 kHz burst starting exactly at sample `at`."""
    x = np.zeros(n_total, np.float32)
    n = min(int(length * sr), n_total - at)
    x[at : at + n] = amp * np.sin(2 * np.pi * 1000 * np.arange(n) / sr)
    return x


def onset(x: np.ndarray, thresh: float = 0.1) -> int:
    """First sample whose magnitude crosses `thresh` (-1 if none)."""
    hits = np.flatnonzero(np.abs(x) > thresh)
    return int(hits[0]) if len(hits) else -1


def gray_frames(values) -> np.ndarray:
    return np.stack([np.full((H, W, 3), v, np.uint8) for v in values])


def mux_offset(path, frames, fps, audio, audio_pts0):
    """An mp4 whose audio input sample 0 has pts `audio_pts0` (samples at SR) on the video axis.

    The AAC encoder emits its 1024 priming samples in front, so the audio stream starts at
    audio_pts0 - 1024; a positive start is kept by the muxer as an empty edit (a late stream).
    """
    with av.open(str(path), "w", format="mp4") as out:
        vs = out.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = W, H, "yuv420p"
        ast = out.add_stream("aac", rate=SR, layout="mono")
        for i, img in enumerate(frames):
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts, f.time_base = i, Fraction(1, fps)
            out.mux(vs.encode(f))
        out.mux(vs.encode(None))
        for i in range(0, len(audio), 1024):
            f = av.AudioFrame.from_ndarray(audio[None, i : i + 1024].copy(), format="fltp", layout="mono")
            f.sample_rate, f.pts, f.time_base = SR, audio_pts0 + i, Fraction(1, SR)
            out.mux(ast.encode(f))
        out.mux(ast.encode(None))


# ----------------------------------------------------------------------------- round trip


@pytest.fixture(scope="module")
def flash_clip(tmp_path_factory) -> tuple[Path, int, int]:
    """2 s at 24 fps: white flash at frame k, beep starting at k/24 s."""
    fps, k = 24, 29  # 29/24 s = 1.2083 s: not on an AAC frame boundary
    frames = gray_frames([255 if i == k else 0 for i in range(48)])
    at = round(k / fps * SR)
    path = tmp_path_factory.mktemp("media") / "flash.mp4"
    write_av(path, frames, beep(2 * SR, at), fps, SR)
    return path, k, at


def test_round_trip_flash_and_beep_align(flash_clip):
    path, k, at = flash_clip
    clip = read_av(path)
    assert isinstance(clip, AVClip) and clip.frames.shape == (48, H, W, 3) and clip.frames.dtype == np.uint8
    assert clip.audio.shape == (1, 2 * SR) and clip.audio.dtype == np.float32
    assert clip.audio_mask.all() and clip.fps == 24 and clip.sample_rate == SR and clip.start == 0
    flash = int(clip.frames.mean(axis=(1, 2, 3)).argmax())
    got = onset(clip.audio[0])
    assert flash == k
    assert got > SR // 2  # not at 0: the test can fail
    assert abs(got - at) <= SR // 1000  # within 1 ms
    assert abs(got / SR - flash / clip.fps) < 1 / clip.fps
    # other output rates keep the placement
    for sr in (48000, 22050):
        c = read_av(path, sample_rate=sr)
        assert c.audio.shape == (1, 2 * sr)
        assert abs(onset(c.audio[0]) - at / SR * sr) <= sr / 1000


def test_round_trip_with_start_and_bytes(flash_clip):
    path, k, at = flash_clip
    a = read_av(path, start=0.75, duration=1.0)
    b = read_av(path.read_bytes(), start=0.75, duration=1.0)
    assert a.frames.shape == (24, H, W, 3) and a.audio.shape == (1, SR)
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.audio, b.audio)
    np.testing.assert_array_equal(a.audio_mask, b.audio_mask)
    assert a.info == b.info == probe_av(path) == probe_av(path.read_bytes())
    assert int(a.frames.mean(axis=(1, 2, 3)).argmax()) == k - 18  # 0.75 s = 18 frames
    assert abs(onset(a.audio[0]) - (at - 0.75 * SR)) <= SR // 1000


def test_probe_and_info_dict(flash_clip):
    import json

    info = probe_av(flash_clip[0])
    assert isinstance(info, AVInfo)
    assert (info.width, info.height, info.fps, info.num_frames) == (W, H, 24.0, 48)
    assert info.has_audio and info.sample_rate == SR and info.channels == 1
    assert info.duration == pytest.approx(2.0, abs=1e-3) and abs(info.audio_offset) < 1e-3
    assert json.loads(json.dumps(info.to_dict())) == info.to_dict()


# ----------------------------------------------------------------------------- audio offset


@pytest.fixture(scope="module")
def late_audio(tmp_path_factory) -> Path:
    """3 s video at 24 fps; the audio stream starts at 0.125 s; a beep at video time 1.125 s."""
    path = tmp_path_factory.mktemp("media") / "late.mp4"
    pts0 = 2000 + 1024  # stream (priming included) starts at 2000 = 125 ms
    audio = beep(2 * SR, round(1.125 * SR) - pts0)
    mux_offset(path, gray_frames([40] * 72), 24, audio, pts0)
    return path


def test_audio_offset_is_honoured(late_audio):
    info = probe_av(late_audio)
    assert info.audio_offset == pytest.approx(0.125, abs=1e-3)
    clip = read_av(late_audio)
    assert clip.audio.shape == (1, 3 * SR)
    assert abs(onset(clip.audio[0]) - 1.125 * SR) <= SR // 1000
    lead = round(0.125 * SR)
    assert not clip.audio_mask[:lead].any() and not clip.audio[:, :lead].any()
    # the stream holds priming + 2 s + the last packet's share; the header's length is honoured
    stop = round((info.audio_offset + info.audio_duration) * SR)
    assert stop == lead + 1024 + 2 * SR
    assert clip.audio_mask[lead:stop].all() and not clip.audio_mask[stop:].any()  # then padding


@pytest.mark.parametrize("start", [0.5, 0.05])
def test_audio_offset_with_start(late_audio, start):
    clip = read_av(late_audio, start=start, duration=1.5)
    assert clip.start == start and clip.audio.shape == (1, round(1.5 * SR)) and len(clip.frames) == 36
    assert abs(onset(clip.audio[0]) - (1.125 - start) * SR) <= SR // 1000
    lead = max(0, round((0.125 - start) * SR))  # the clip starts before the audio does
    assert not clip.audio_mask[:lead].any() and clip.audio_mask[lead:].all()


# ----------------------------------------------------------------------------- fps / size / channels


def counter_frames(n: int) -> np.ndarray:
    """Frame i shows i in binary: 8 vertical stripes, white where the bit is set."""
    frames = np.zeros((n, H, W, 3), np.uint8)
    for i in range(n):
        for b in range(8):
            if i >> b & 1:
                frames[i, :, b * W // 8 : (b + 1) * W // 8] = 255
    return frames


def indices(frames: np.ndarray) -> list[int]:
    w = frames.shape[2]
    cols = [int((b + 0.5) * w / 8) for b in range(8)]
    bits = frames[:, :, cols].mean(axis=(1, 3)) > 128  # [T, 8]
    return [int(sum(1 << b for b in range(8) if row[b])) for row in bits]


@pytest.fixture(scope="module")
def counter30(tmp_path_factory) -> Path:
    """64 frames at 30 fps showing their own index."""
    path = tmp_path_factory.mktemp("media") / "counter.mp4"
    write_av(path, counter_frames(64), np.zeros(SR, np.float32), 30, SR)
    return path


def test_native_frames_in_window(counter30):
    assert indices(read_av(counter30).frames) == list(range(64))
    assert indices(read_av(counter30, start=0.5, duration=0.5).frames) == list(range(15, 30))


@pytest.mark.parametrize(
    "fps,start,duration", [(15, 0.0, 2.0), (24, 0.0, 2 + 1 / 24), (24, 0.5, 1.0), (7.5, 0.3, 1.2)]
)
def test_fps_picks_displayed_frame(counter30, fps, start, duration):
    clip = read_av(counter30, start=start, duration=duration, fps=fps)
    n = int(np.floor(duration * fps + 1e-6))
    expected = [int(np.floor((start + i / fps) * 30 + 1e-6)) for i in range(n)]
    assert clip.fps == fps and len(clip.frames) == n
    assert indices(clip.frames) == expected
    assert clip.audio.shape == (1, round(duration * SR))


def test_fps_does_not_invent_frames_past_the_end(counter30):
    clip = read_av(counter30, start=1.5, fps=24)  # video ends at 64/30 = 2.133 s: 0.633 s left
    assert len(clip.frames) == 15 and clip.audio.shape == (1, round((64 / 30 - 1.5) * SR))
    clip = read_av(counter30, start=1.5, duration=2.0, fps=24)
    assert len(clip.frames) == 16 and indices(clip.frames)[-1] == 63
    assert clip.audio.shape == (1, 2 * SR) and clip.audio_mask[: round(0.63 * SR)].all()
    assert not clip.audio_mask[round(0.64 * SR) :].any()  # audio (padded to the video) ends at 2.133


def test_resize(counter30):
    clip = read_av(counter30, duration=0.5, size=(24, 40))
    assert clip.frames.shape == (15, 24, 40, 3)
    assert indices(clip.frames) == list(range(15))


def test_fractional_fps(tmp_path):
    path = tmp_path / "ntsc.mp4"
    write_av(path, counter_frames(30), np.zeros(SR, np.float32), 30000 / 1001, SR)
    info = probe_av(path)
    assert info.fps == pytest.approx(30000 / 1001, abs=1e-3) and info.num_frames == 30
    assert info.duration == pytest.approx(30 * 1001 / 30000, abs=1e-3)
    assert info.audio_duration == pytest.approx(info.duration, abs=1001 / 30000)
    assert indices(read_av(path).frames) == list(range(30))
    clip = read_av(path, start=0.5, duration=0.4, fps=10)  # instants 0.5, 0.6, 0.7, 0.8
    assert indices(clip.frames) == [int((0.5 + i / 10) * 30000 / 1001) for i in range(4)]


def test_channels_mix(tmp_path):
    path = tmp_path / "stereo.mp4"
    stereo = np.stack([beep(SR, 4000), beep(SR, 10000, amp=0.3)])
    write_av(path, gray_frames([0] * 24), stereo, 24, SR)
    assert probe_av(path).channels == 2
    two = read_av(path, channels=2)
    one = read_av(path, channels=1)
    assert two.audio.shape == (2, SR) and one.audio.shape == (1, SR)
    assert abs(onset(two.audio[0]) - 4000) <= 16 and abs(onset(two.audio[1], 0.05) - 10000) <= 16
    np.testing.assert_allclose(one.audio[0], two.audio.mean(0), atol=1e-6)
    mono_path = tmp_path / "mono.mp4"
    write_av(mono_path, gray_frames([0] * 24), beep(SR, 4000), 24, SR)
    dup = read_av(mono_path, channels=2)
    assert dup.audio.shape == (2, SR)
    np.testing.assert_array_equal(dup.audio[0], dup.audio[1])
    np.testing.assert_allclose(dup.audio[0], read_av(mono_path).audio[0], atol=1e-6)


# ----------------------------------------------------------------------------- write_av contract


def test_write_equal_durations_and_limits(tmp_path):
    fps, frames = 24, gray_frames([0] * 48)
    for n in (round(1.5 * SR), 2 * SR + SR // 48):  # shorter: padded; longer by < 1 frame: trimmed
        buf = io.BytesIO()
        write_av(buf, frames, np.zeros(n, np.float32), fps, SR)
        info = probe_av(buf.getvalue())
        assert abs(info.audio_duration - info.duration) < 1 / fps
        clip = read_av(buf.getvalue())
        assert clip.audio.shape == (1, 2 * SR) and clip.audio_mask.all()
    with pytest.raises(ValueError, match="samples"):
        write_av(tmp_path / "x.mp4", frames, np.zeros(2 * SR + SR // 10, np.float32), fps, SR)
    with pytest.raises(ValueError):
        write_av(tmp_path / "x.mp4", frames.astype(np.float32), np.zeros(SR, np.float32), fps, SR)
    with pytest.raises(ValueError, match="even"):
        write_av(tmp_path / "x.mp4", np.zeros((4, 47, 64, 3), np.uint8), np.zeros(SR, np.float32), fps, SR)
    write_av(tmp_path / "silent.mp4", frames, None, fps, SR)
    assert not probe_av(tmp_path / "silent.mp4").has_audio


# ----------------------------------------------------------------------------- errors


def test_errors_name_the_source(tmp_path, flash_clip):
    for bad in (b"", b"not a video at all" * 100, np.random.default_rng(0).bytes(4096)):
        with pytest.raises(MediaError, match="^<bytes>: "):
            read_av(bad)
        with pytest.raises(MediaError, match="^<bytes>: "):
            probe_av(bad)
    missing = tmp_path / "missing.mp4"
    with pytest.raises(MediaError, match=str(missing)):
        read_av(missing)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(MediaError, match="empty"):
        probe_av(empty)
    audio_only = tmp_path / "audio_only.m4a"
    with av.open(str(audio_only), "w", format="mp4") as out:
        s = out.add_stream("aac", rate=SR, layout="mono")
        f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        f.sample_rate, f.pts = SR, 0
        out.mux(s.encode(f))
        out.mux(s.encode(None))
    with pytest.raises(MediaError, match="no video stream"):
        read_av(audio_only)


def test_truncated_file(tmp_path):
    """A faststart file cut to 30%: the header survives, so probe works and a window inside the
    intact part decodes; reading past the damage raises MediaError (never a silently short clip)."""
    full = tmp_path / "noise.mp4"
    noise = np.random.default_rng(0).integers(0, 256, (48, H, W, 3), dtype=np.uint8)
    write_av(full, noise, np.random.default_rng(1).uniform(-0.5, 0.5, 2 * SR).astype(np.float32), 24, SR)
    data = full.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.3)])
    assert probe_av(cut).num_frames == 48
    with pytest.raises(MediaError, match=f"^{cut}: truncated"):
        read_av(cut)
    with pytest.raises(MediaError, match="^<bytes>: truncated"):
        read_av(cut.read_bytes(), start=1.0)
    assert len(read_av(cut, duration=0.25).frames) == 6


# ----------------------------------------------------------------------------- real files


def real(name: str) -> Path:
    path = MEDIA / name
    if not path.is_file():
        pytest.skip(f"{path} not available")
    return path


def test_real_51_aac():
    path = real("bbb_excerpt_6ch.mp4")
    info = probe_av(path)
    assert info.channels == 6 and info.sample_rate == 48000 and info.has_audio
    assert (info.width, info.height, info.num_frames) == (1280, 720, 132)
    clip = read_av(path, start=2.0, duration=1.0, size=(72, 128))
    assert clip.frames.shape == (25, 72, 128, 3) and clip.audio.shape == (1, SR)
    assert clip.audio_mask.all() and np.sqrt(np.mean(clip.audio**2)) > 1e-3


def test_real_mp3_shorter_than_video():
    path = real("bbb_trailer.mp4")
    info = probe_av(path)
    assert info.sample_rate == 44100 and info.channels == 2
    assert info.duration == pytest.approx(55.125) and info.audio_duration == pytest.approx(52.167, abs=1e-2)
    t = time.perf_counter()
    mid = read_av(path, start=30.0, duration=2.0, fps=12, size=(72, 128))
    assert time.perf_counter() - t < 3.0
    assert mid.frames.shape == (24, 72, 128, 3) and mid.audio_mask.all() and np.abs(mid.audio).max() > 1e-3
    tail = read_av(path, start=51.5, duration=1.5, size=(72, 128))
    assert tail.frames.shape == (36, 72, 128, 3) and tail.audio.shape == (1, 24000)
    cut = round((info.audio_offset + info.audio_duration - 51.5) * SR)
    assert tail.audio_mask[: cut - 16].all() and not tail.audio_mask[cut + 16 :].any()
    assert not tail.audio[:, cut + 16 :].any() and np.abs(tail.audio[:, : cut - 16]).max() > 1e-3
    assert not read_av(path, start=53.0, duration=1.5, size=(72, 128)).audio_mask.any()


def test_real_seek_is_exact():
    """Windows starting on either side of a keyframe (24.54 s) decode the same frames and samples.

    Compared at the native 44.1 kHz: at other rates the resampler's sub-sample phase depends on
    where decoding started (placement is exact to half an output sample, ~30 us at 16 kHz)."""
    path = real("bbb_trailer.mp4")
    kw = dict(size=(36, 64), sample_rate=44100, channels=2)
    a = read_av(path, start=24.75, duration=1.25, **kw)  # seeks to the keyframe at 14.1 s
    b = read_av(path, start=25.0, duration=1.0, **kw)  # seeks to the keyframe at 24.5 s
    np.testing.assert_array_equal(a.frames[6:], b.frames)
    np.testing.assert_array_equal(a.audio[:, round(0.25 * 44100) :], b.audio)
    assert b.audio_mask.all() and np.abs(b.audio).max() > 1e-2


def test_real_no_audio():
    path = real("bikes_noaudio.mp4")
    info = probe_av(path)
    assert not info.has_audio and info.sample_rate == 0 and info.channels == 0 and info.num_frames == 250
    clip = read_av(path, start=3.0, duration=2.0, size=(68, 160))
    assert clip.frames.shape == (50, 68, 160, 3)
    assert clip.audio.shape == (1, 2 * SR) and not clip.audio.any() and not clip.audio_mask.any()
    whole = read_av(path, size=(68, 160), channels=2)
    np.testing.assert_array_equal(whole.frames[75:125], clip.frames)
    assert whole.audio.shape == (2, 10 * SR)


def test_write_image_round_trip(tmp_path):
    from sora.media import write_image

    img = (np.arange(24 * 40 * 3) % 251).astype(np.uint8).reshape(24, 40, 3)
    write_image(tmp_path / "x.png", img)
    assert (tmp_path / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with av.open(str(tmp_path / "x.png")) as c:
        back = next(c.decode(video=0)).to_ndarray(format="rgb24")
    np.testing.assert_array_equal(back, img)
    with pytest.raises(ValueError, match="uint8"):
        write_image(tmp_path / "y.png", img.astype(np.float32))


def write_wav(path, audio: np.ndarray, sr: int) -> None:
    """int16 PCM wav of float [C, N] audio."""
    layout = {1: "mono", 2: "stereo"}[audio.shape[0]]
    with av.open(str(path), "w") as out:
        s = out.add_stream("pcm_s16le", rate=sr, layout=layout)
        f = av.AudioFrame.from_ndarray((audio.T.reshape(1, -1) * 32767).round().astype(np.int16), format="s16",
                                       layout=layout)
        f.sample_rate, f.pts = sr, 0
        out.mux(s.encode(f))
        out.mux(s.encode(None))


def test_read_audio_reads_wav_and_the_audio_track_of_an_mp4(tmp_path):
    sr = 22050
    left = beep(sr, at=sr // 2, sr=sr)  # a burst at 0.5 s in the left channel, silence on the right
    wav = tmp_path / "a.wav"
    write_wav(wav, np.stack([left, np.zeros_like(left)]), sr)
    audio, info = read_audio(wav)  # 16 kHz mono: channel mean, resampled, placed by pts
    assert audio.dtype == np.float32 and audio.shape == (1, SR)
    assert (info.sample_rate, info.channels, info.duration, info.has_video) == (sr, 2, 1.0, False)
    assert abs(onset(audio[0], 0.1) - SR // 2) <= 2 and abs(np.abs(audio).max() - 0.25) < 0.02
    stereo, _ = read_audio(wav, sample_rate=sr, channels=2)
    assert np.abs(stereo - np.stack([left, np.zeros_like(left)])).max() < 1e-3
    cut, info = read_audio(wav, start=0.25, duration=2.0)  # window: zero-padded past the end
    assert cut.shape == (1, 2 * SR) and abs(onset(cut[0], 0.1) - SR // 4) <= 2 and not cut[0, 13000:].any()
    # the audio track of an mp4 (AAC priming skipped via the edit list; the declared length kept)
    mp4 = tmp_path / "v.mp4"
    write_av(mp4, gray_frames([100] * 9), beep(18000, at=8000)[None], fps=8, sample_rate=SR)
    audio, info = read_audio(mp4)
    assert audio.shape == (1, 18000) and info.has_video and abs(onset(audio[0]) - 8000) <= 32
    with pytest.raises(MediaError, match="no audio stream"):
        write_av(tmp_path / "mute.mp4", gray_frames([0, 0]), None, fps=8, sample_rate=SR)
        read_audio(tmp_path / "mute.mp4")
    with pytest.raises(MediaError, match="no such file"):
        read_audio(tmp_path / "none.wav")
