"""Real-world inputs (issue 15): phone rotation, anamorphic pixels, seeking in files without an index,
variable frame rate, several audio tracks, 10-bit colour and HDR, file names that are not UTF-8."""

from __future__ import annotations

import io
import json
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from media_makers import Track, Video, audio_with_cover_art, encode, pattern, strip_cues

from sora.media import MediaError, decoded_seconds, probe_av, read_audio, read_av
from sora.media.picture import PEAK, REFERENCE_WHITE

FIXTURES = Path(__file__).parent / "fixtures" / "media"
SR = 16000


def mad(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean())


# ----------------------------------------------------------------------------- display matrix


def test_phone_portrait_clip_reads_upright_like_the_clip_stored_upright():
    """The ffmpeg-made fixture: a phone's rotation=-90 landscape file equals the portrait one."""
    phone, upright = FIXTURES / "portrait_phone.mp4", FIXTURES / "portrait_upright.mp4"
    info = probe_av(phone)
    assert (info.width, info.height, info.coded_width, info.coded_height, info.rotation) == (36, 64, 64, 36, -90)
    got, want = read_av(phone).frames, read_av(upright).frames
    assert got.shape == want.shape == (10, 64, 36, 3)
    assert mad(got, want) <= 3  # measured 1.31: the two files are two lossy encodes of one picture
    assert mad(got[:, ::-1, ::-1], want) > 20  # a wrong turn would fail the check above


def test_portrait_written_by_pyav_and_resized_reads_upright():
    upright = pattern(6, 64, 36)
    stored = np.ascontiguousarray(np.rot90(upright, 1, axes=(1, 2)))  # the sensor's landscape frames
    phone = encode(Video(stored, rotation=-90))
    ref = encode(Video(upright))
    assert mad(read_av(phone).frames, read_av(ref).frames) <= 3
    small = read_av(phone, size=(32, 18)).frames  # size is the displayed (H, W)
    assert small.shape == (6, 32, 18, 3)
    assert mad(small, read_av(ref, size=(32, 18)).frames) <= 4
    assert probe_av(phone).to_dict()["rotation"] == -90  # what a shard's json records


@pytest.mark.parametrize("rotation", [0, 90, 180, -90])
@pytest.mark.parametrize("hflip,vflip", [(False, False), (True, False), (False, True)])
def test_every_orientation_matches_the_display_matrix(rotation, hflip, vflip):
    """PyAV's writer: rotate counter-clockwise by `rotation`, then mirror; 12 cases, 8 distinct pictures."""
    stored = pattern(2, 32, 48)
    plain = read_av(encode(Video(stored))).frames
    want = np.rot90(plain, rotation // 90, axes=(1, 2))
    want = want[:, :, ::-1] if hflip else want
    want = want[:, ::-1] if vflip else want
    clip = read_av(encode(Video(stored, rotation=rotation, hflip=hflip, vflip=vflip)))
    assert clip.frames.shape == want.shape
    assert mad(clip.frames, want) < 0.5
    assert (clip.info.width, clip.info.height) == (want.shape[2], want.shape[1])
    assert clip.info.mirrored == (hflip != vflip)


def test_anamorphic_pixels_are_resized_to_the_display_aspect():
    stored = pattern(3, 32, 48)
    clip = read_av(encode(Video(stored, sar=Fraction(2, 1))))
    info = clip.info
    assert (info.width, info.height, info.coded_width, info.sar) == (96, 32, 48, 2.0)
    assert clip.frames.shape == (3, 32, 96, 3)
    plain = read_av(encode(Video(stored))).frames
    assert mad(clip.frames[:, :, ::2], plain) < 6  # every stored column shown twice as wide
    assert mad(clip.frames, np.repeat(plain, 2, axis=2)) < 6


# ----------------------------------------------------------------------------- seeking


def _counter(t=30, fps=10):
    """Frame i is gray 8*i: which frame a read returned is plain to see."""
    return np.stack([np.full((32, 48, 3), 8 * i, np.uint8) for i in range(t)]), fps


SEEK_CASES = {
    "mp4": lambda v: encode(Video(v, options={"g": "10"})),
    "mpeg-ps (byte seeking)": lambda v: encode(Video(v, codec="mpeg2video", options={"g": "10"}), fmt="mpeg"),
    "mpeg-ts": lambda v: encode(Video(v, options={"g": "10"}), fmt="mpegts"),
    "webm without cues": lambda v: strip_cues(encode(Video(v, codec="libvpx", options={"g": "10"}), fmt="webm")),
    "recorder webm (no cues, no duration)": lambda v: encode(Video(v, codec="libvpx", options={"g": "10"}),
                                                             fmt="webm", seekable=False),
}


@pytest.mark.parametrize("case", list(SEEK_CASES))
def test_windowed_reads_equal_the_whole_decode(case):
    frames, fps = _counter()
    data = SEEK_CASES[case](frames)
    full = read_av(data, fps=fps).frames
    assert len(full) == len(frames), f"{case}: {len(full)} frames"
    for start in (0.3, 1.0, 1.7, 2.5):
        clip = read_av(data, start=start, duration=0.4, fps=fps)
        i = round(start * fps)
        assert len(clip.frames) == 4
        assert np.array_equal(clip.frames, full[i:i + 4]), f"{case} at {start}s"
        assert abs(float(clip.frames[0].mean()) - 8 * i) < 4
    if "mpeg-ps" not in case:  # MPEG-PS has no duration; FFmpeg (and ffprobe) estimate 2.6 s here
        assert abs(probe_av(data).duration - 3.0) < 0.11, case


def test_recorder_webm_has_its_duration_scanned_and_its_audio_read():
    frames, fps = _counter()
    data = encode(Video(frames, codec="libvpx"), [Track(0.3 * np.sin(np.arange(3 * SR) / 3))], fmt="webm",
                  seekable=False)
    info = probe_av(data)
    assert info.duration_from == "scan" and abs(info.duration - 3.0) < 0.05
    clip = read_av(data, start=2.0, duration=0.5, fps=fps)
    assert clip.audio_mask.all() and np.abs(clip.audio).max() > 0.1
    assert len(read_av(data, fps=fps).frames) == 30


def test_make_shards_keeps_a_webm_without_an_index(tmp_path):
    from sora.data.shards import Job, Options, process

    frames, _ = _counter()
    path = tmp_path / "recording.webm"
    path.write_bytes(encode(Video(frames, codec="libvpx"), fmt="webm", seekable=False))
    _, samples, reason = process(Job("recording", "recording.webm", "", path=str(path), ext="webm"), Options())
    assert reason is None, reason
    meta = samples[0][3]
    assert meta["duration_from"] == "scan" and abs(meta["duration"] - 3.0) < 0.05
    assert decoded_seconds(str(path)) == pytest.approx(3.0, abs=0.05)


# ----------------------------------------------------------------------------- variable frame rate


def test_variable_frame_rate_frames_and_audio_stay_on_their_times():
    """30 fps for a second, then 12 fps: every output instant shows the frame displayed then, and
    a beep written at 1.5 s is heard at 1.5 s."""
    pts = [round(1000 * i / 30) for i in range(30)] + [1000 + round(1000 * j / 12) for j in range(12)]
    frames = np.stack([np.full((32, 48, 3), 6 * i, np.uint8) for i in range(len(pts))])
    audio = np.zeros(2 * SR, np.float32)
    audio[int(1.5 * SR):int(1.55 * SR)] = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(int(0.05 * SR)) / SR)
    data = encode(Video(frames, fps=30, pts_ms=pts), [Track(audio)])
    clip = read_av(data, fps=24, duration=1.9, sample_rate=SR)  # the muxer gives the last frame 1/30 s
    assert len(clip.frames) == 45
    for k, frame in enumerate(clip.frames):
        shown = max(i for i, p in enumerate(pts) if p <= 1000 * k / 24 + 1e-6)
        assert abs(float(frame.mean()) - 6 * shown) < 3, f"instant {k}/24 s shows frame {frame.mean() / 6:.1f}, not {shown}"
    onset = int(np.flatnonzero(np.abs(clip.audio[0]) > 0.1)[0])
    assert abs(onset - 1.5 * SR) <= 0.002 * SR
    window = read_av(data, start=1.25, duration=0.5, fps=24, sample_rate=SR)  # a window in the 12 fps part
    onset = int(np.flatnonzero(np.abs(window.audio[0]) > 0.1)[0])
    assert abs(onset - 0.25 * SR) <= 0.002 * SR
    assert probe_av(data).num_frames == 42


# ----------------------------------------------------------------------------- audio tracks


def _peak_hz(x, sr=SR) -> float:
    return float(np.argmax(np.abs(np.fft.rfft(x))) * sr / len(x))


def test_the_default_audio_track_or_the_one_asked_for():
    t = np.arange(SR) / SR
    data = encode(Video(pattern(10, 32, 48)), [Track(0.3 * np.sin(2 * np.pi * 440 * t), language="eng", default=False),
                                              Track(0.3 * np.sin(2 * np.pi * 1000 * t), language="fra", default=True)])
    info = probe_av(data)
    assert (info.audio_streams, info.audio_stream) == (2, 1)
    assert _peak_hz(read_av(data).audio[0]) == 1000  # the default-disposition track
    assert _peak_hz(read_av(data, audio_track=0).audio[0]) == 440
    assert _peak_hz(read_av(data, audio_track="eng").audio[0]) == 440
    assert _peak_hz(read_audio(data, audio_track="eng")[0][0]) == 440
    with pytest.raises(MediaError, match=r"<bytes>: no audio track 2 \(the file has 2\)"):
        read_av(data, audio_track=2)
    with pytest.raises(MediaError, match="no audio track in language 'deu' .*eng, fra"):
        probe_av(data, audio_track="deu")


def test_cover_art_is_not_video(tmp_path):
    """A music file's cover picture (an attached_pic stream) is no video: the shard maker says audio only."""
    from sora.data.shards import AUDIO_ONLY, Job, Options, process

    data = audio_with_cover_art()
    with pytest.raises(MediaError, match="<bytes>: no video stream"):
        probe_av(data)
    audio, info = read_audio(data)
    assert not info.has_video and audio.shape == (1, SR)
    path = tmp_path / "song.mp4"
    path.write_bytes(data)
    assert process(Job("song", "song.mp4", "", path=str(path), ext="mp4"), Options())[2] == AUDIO_ONLY


# ----------------------------------------------------------------------------- colour, bit depth, HDR


def _colour_bars(h=32, w=48) -> np.ndarray:
    bars = np.array([[235, 40, 40], [40, 200, 60], [50, 60, 220], [230, 220, 60], [128, 128, 128], [20, 20, 20]])
    img = np.repeat(bars, w // len(bars), axis=0)[None].repeat(h, 0).astype(np.uint8)
    return np.stack([img] * 3)


@pytest.mark.parametrize("pix_fmt,colorspace,color_range", [
    ("yuv420p", "bt709", "tv"), ("yuv420p", "bt470bg", "pc"), ("yuv420p10le", "bt709", "pc"),
    ("yuv420p10le", "bt2020nc", "tv")])
def test_matrix_range_and_bit_depth_are_honoured(pix_fmt, colorspace, color_range):
    bars = _colour_bars()
    data = encode(Video(bars, pix_fmt=pix_fmt, color={"colorspace": colorspace, "color_range": color_range}))
    info = probe_av(data)
    assert (info.color_matrix, info.color_range) == (colorspace, color_range)
    assert info.pix_fmt.endswith("p10le") == pix_fmt.endswith("p10le")  # 8-bit full range may say yuvj420p
    inner = np.concatenate([np.arange(8 * k + 2, 8 * k + 6) for k in range(6)])  # away from chroma blur at edges
    got = read_av(data).frames
    assert got.dtype == np.uint8 and mad(got[:, :, inner], bars[:, :, inner]) < 2
    # the same decode read with the wrong matrix and range is far off: the check above can fail
    with av.open(io.BytesIO(data)) as c:
        frame = next(c.decode(video=0))
        wrong = frame.reformat(format="rgb24", src_colorspace=5 if colorspace != "bt470bg" else 1,  # 5: BT.601
                               src_color_range=2 if color_range == "tv" else 1).to_ndarray()  # 1: tv, 2: pc
    assert mad(wrong[:, inner], bars[0][:, inner]) > 5


def _pq(nits: float) -> float:
    m1, m2, c1, c2, c3 = 0.1593017578125, 78.84375, 0.8359375, 18.8515625, 18.6875
    y = (nits / 10000) ** m1
    return ((c1 + c2 * y) / (1 + c3 * y)) ** m2


def test_hdr_pq_is_detected_and_tone_mapped():
    levels = [0.0, 100.0, REFERENCE_WHITE, 1000.0]  # cd/m^2 of four gray bars
    row = np.concatenate([np.full((16, 12, 3), round(_pq(n) * 65535), np.uint16) for n in levels], axis=1)
    data = encode(Video(np.stack([row] * 3), pix_fmt="yuv420p10le",
                        color={"colorspace": "bt2020nc", "color_range": "tv", "color_trc": 16, "color_primaries": 9}))
    info = probe_av(data)
    assert info.hdr == "pq"
    got = read_av(data).frames[0, 8, 6::12].mean(-1)  # the centre of each bar
    lw = PEAK / REFERENCE_WHITE
    for nits, value in zip(levels, got):
        lum = nits / REFERENCE_WHITE
        want = 255 * (lum * (1 + lum / lw**2) / (1 + lum)) ** (1 / 2.4)
        assert abs(value - want) < 6, (nits, value, want)
    assert got[-1] > 245 and got[0] < 8  # the mastering peak is white, black stays black
    kept = read_av(data, hdr="keep").frames[0, 8, 6::12].mean(-1)  # the PQ code values, unmapped
    assert abs(kept[2] - 255 * _pq(REFERENCE_WHITE)) < 6


def _pq_clip(t=20) -> bytes:
    row = np.full((16, 48, 3), round(_pq(REFERENCE_WHITE) * 65535), np.uint16)
    return encode(Video(np.stack([row] * t), pix_fmt="yuv420p10le",
                        color={"colorspace": "bt2020nc", "color_range": "tv", "color_trc": 16, "color_primaries": 9}))


def test_hdr_in_make_shards_and_training(tmp_path):
    from sora.data.buckets import Bucket
    from sora.data.streams import ShardClipStream
    from sora.data.shards import Job, Options, process
    from sora.timeline import Timeline

    path = tmp_path / "hdr.mp4"
    path.write_bytes(_pq_clip())
    job = Job("hdr", "hdr.mp4", "", path=str(path), ext="mp4")
    assert process(job, Options(hdr="skip"))[2] == "HDR (pq) video: skipped (--hdr skip)"
    (_, _, _, meta), = process(job, Options())[1]  # kept as is, its json says what it is
    assert meta["hdr"] == "pq"
    (_, _, data, meta), = process(job, Options(max_side=32))[1]  # re-encoded: tone mapped to SDR
    assert meta["hdr"] == "" and meta["tonemapped_from"] == "pq"
    assert abs(read_av(data).frames.mean() - read_av(str(path), size=(16, 32)).frames.mean()) < 4
    tl = Timeline(seconds=0.8, fps=10, sample_rate=SR)
    meta = {"hdr": "pq", "duration": 2.0, "height": 16, "width": 48}
    sample = {"__key__": "hdr", "mp4": path.read_bytes(), "json": json.dumps(meta).encode()}
    kw = dict(urls=[str(path)], timeline=tl, batch_size=1, size=(16, 48), random_crop=False)
    with pytest.raises(ValueError, match=r"HDR \(pq\) video skipped \(data.train.hdr=skip\)"):
        ShardClipStream(**kw, hdr="skip").decode(sample, Bucket(16, 48), None)
    mapped = ShardClipStream(**kw).decode(sample, Bucket(16, 48), None).frames
    kept = ShardClipStream(**kw, hdr="keep").decode(sample, Bucket(16, 48), None).frames
    assert abs(mapped.mean() - kept.mean()) > 10


def test_hlg_is_detected():
    row = np.full((16, 48, 3), 30000, np.uint16)
    data = encode(Video(np.stack([row] * 2), pix_fmt="yuv420p10le",
                        color={"colorspace": "bt2020nc", "color_range": "tv", "color_trc": 18, "color_primaries": 9}))
    assert probe_av(data).hdr == "hlg"
    mapped, kept = read_av(data).frames.mean(), read_av(data, hdr="keep").frames.mean()
    assert 0 < mapped < 255 and abs(kept - 255 * 30000 / 65535) < 6 and abs(mapped - kept) > 3


# ----------------------------------------------------------------------------- interlacing


def _combed(t=6, h=32, w=48) -> np.ndarray:
    """A bar moving right, its bottom field caught half a frame after its top field."""
    out = np.zeros((t, h, w, 3), np.uint8)
    for i in range(t):
        out[i, 0::2, 4 * i:4 * i + 8] = 255
        out[i, 1::2, 4 * i + 6:4 * i + 14] = 255
    return out


def _comb(frames) -> float:
    return float(np.abs(np.diff(frames.astype(np.int32), axis=1)).mean())  # row-to-row change


def test_interlaced_video_is_deinterlaced_unless_switched_off():
    data = encode(Video(_combed(), options={"flags": "+ildct+ilme", "x264-params": "interlaced=1:tff=1"}))
    assert probe_av(data).interlaced
    raw, auto = read_av(data, deinterlace=False).frames, read_av(data).frames
    assert len(auto) == len(raw) == 6
    assert _comb(auto) < 0.3 * _comb(raw)  # measured 10.6 vs 63.9 on one frame
    window = read_av(data, start=0.2, duration=0.3, fps=10)  # windows go through the same filter
    assert np.array_equal(window.frames, auto[2:5])
    progressive = encode(Video(_combed()))
    assert not probe_av(progressive).interlaced
    assert np.array_equal(read_av(progressive).frames, read_av(progressive, deinterlace=False).frames)
    assert _comb(read_av(progressive, deinterlace=True).frames) < 0.5 * _comb(read_av(progressive).frames)


# ----------------------------------------------------------------------------- file names


def test_a_file_name_that_is_not_utf8(tmp_path):
    raw = os.path.join(os.fsencode(tmp_path), b"clip\xff.mp4")
    with open(raw, "wb") as f:
        f.write(encode(Video(pattern(4, 32, 48))))
    name = os.fsdecode(raw)  # a str with a surrogate escape, as os.listdir gives it
    assert probe_av(name).width == 48
    assert read_av(name).frames.shape == (4, 32, 48, 3)
    os.remove(raw)
    with pytest.raises(MediaError, match=r"clip\\xff\.mp4: no such file") as e:
        read_av(name)
    str(e.value).encode("utf-8")  # the message prints anywhere


# ----------------------------------------------------------------------------- end to end


def test_recorder_webm_and_phone_clip_are_sharded_and_train(tmp_path):
    """sora-make-shards keeps both, their json records what was found, and sora-train reads them."""
    import subprocess
    import sys
    import tarfile

    src, out = tmp_path / "in", tmp_path / "shards"
    src.mkdir()
    tone = Track(0.3 * np.sin(np.arange(3 * SR) / 3))
    (src / "recording.webm").write_bytes(encode(Video(pattern(30, 48, 64), codec="libvpx"), [tone], fmt="webm",
                                                seekable=False))
    upright = pattern(30, 64, 48)
    (src / "phone.mp4").write_bytes(encode(Video(np.ascontiguousarray(np.rot90(upright, 1, axes=(1, 2))),
                                                 rotation=-90), [tone]))
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONWARNINGS="ignore")
    run = [sys.executable, "-m"]
    proc = subprocess.run([*run, "sora.cli.make_shards", str(src), str(out)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0 and "written 2 samples" in proc.stdout + proc.stderr, proc.stderr[-2000:]
    with tarfile.open(out / "shard-000000.tar") as tar:
        metas = {m.name.split(".")[0]: json.load(tar.extractfile(m)) for m in tar if m.name.endswith(".json")}
    assert (metas["phone"]["width"], metas["phone"]["height"], metas["phone"]["rotation"]) == (48, 64, -90)
    assert metas["recording"]["duration_from"] == "scan" and abs(metas["recording"]["duration"] - 3.0) < 0.05
    proc = subprocess.run([*run, "sora.cli.train", "model=video_vae", "data=shards", f"data.train.urls={out}/shard-*.tar",
                           "data.train.size=[32,32]", "data.train.batch_size=2", "data.num_workers=0", "timeline.seconds=1",
                           "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}", "trainer.enable_progress_bar=false",
                           "model.vae.base_channels=8"], capture_output=True, text=True, env=env, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "step 2" in log, log[-3000:]
    assert "skipped" not in log.replace("skipped 0", ""), log[-3000:]
