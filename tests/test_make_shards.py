"""sora-make-shards (sora.cli.make_shards, sora.data.shards): folders of videos and generated world clips -> webdataset shards."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import av
import numpy as np
import pytest
import webdataset as wds

from sora.data import shard_encode
from sora.data.world import clip_seed
from sora.media import AVWriter, probe_av, read_av, write_av, write_image
from sora.cli.make_shards import main
from tests.helpers import read_shards

REPO = Path(__file__).resolve().parents[1]
H, W, FPS, SR = 48, 64, 24.0, 16000
GOOD = {  # relative path -> (key, has_audio, caption)
    "a.mp4": ("a", True, ""),
    "b.mp4": ("b", False, "caption from the manifest"),
    "sub/c.mp4": ("sub/c", True, "caption from a sidecar"),
    "sub/odd name.v2.MOV": ("sub/odd_name_v2", True, "bare-name manifest caption"),
}
BROKEN = ["empty.mp4", "truncated.mp4", "notavideo.mp4"]


def clip(seconds=1.0, audio=True, phase=0):
    """A smooth moving gradient (cheap to encode) and a sine tone."""
    t = np.arange(int(seconds * FPS))[:, None, None]
    x = np.arange(W)[None, None, :] + np.arange(H)[None, :, None]
    frames = np.stack([(x * 3 + t * 5 + phase) % 256, (x + t * 2) % 256, np.broadcast_to(t * 9 % 256, (len(t), H, W))], -1)
    tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * SR)) / SR).astype(np.float32)
    return frames.astype(np.uint8), tone[None] if audio else None


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    (root / "sub").mkdir()
    for i, (rel, (_, has_audio, _)) in enumerate(GOOD.items()):
        frames, audio = clip(audio=has_audio, phase=40 * i)
        write_av(root / rel, frames, audio, FPS, SR)
    (root / "sub/c.txt").write_text("caption from a sidecar\n")
    (root / "empty.mp4").write_bytes(b"")
    data = (root / "a.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(data[: int(len(data) * 0.4)])
    (root / "notavideo.mp4").write_text("this is not a video\n" * 50)
    (root / "notes.txt").write_text("a text file that is not a video: ignored")
    manifest = root.parent / "captions.jsonl"
    manifest.write_text(json.dumps({"path": "b.mp4", "caption": "caption from the manifest"}) + "\n"
                        + json.dumps({"file": "odd name.v2.MOV", "caption": "bare-name manifest caption"}) + "\n"
                        + json.dumps({"path": "sub/c.mp4", "caption": "loses to the sidecar"}) + "\n")
    return root, manifest


def run(args, capsys):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def mixed_run(videos, tmp_path_factory):
    """The mixed folder packed in-process with one worker: (rc, stdout, stderr, out dir)."""
    root, manifest = videos
    out = tmp_path_factory.mktemp("mixed") / "shards"
    capture = pytest.MonkeyPatch()
    o, e = io.StringIO(), io.StringIO()
    capture.setattr(sys, "stdout", o)
    capture.setattr(sys, "stderr", e)
    try:
        rc = main([str(root), str(out), "--captions", str(manifest), "--workers", "1"])
    finally:
        capture.undo()
    return rc, o.getvalue(), e.getvalue(), out


def test_mixed_folder_keeps_good_and_names_broken(videos, mixed_run):
    root, _ = videos
    rc, out, err, shards = mixed_run
    assert rc == 0, err
    samples = read_shards(shards)
    assert list(samples) == sorted(k for k, _, _ in GOOD.values())  # walk order: files, then subfolders
    for rel, (key, has_audio, caption) in GOOD.items():
        s = samples[key]
        ext = rel.rsplit(".", 1)[1].lower()
        assert set(s) == {ext, "json", "txt"}
        assert s[ext] == (root / rel).read_bytes()  # stored untouched
        meta = json.loads(s["json"])
        assert meta["has_audio"] is has_audio and meta["caption"] == caption == s["txt"].decode()
        assert meta["source"] == rel and meta["bytes"] == len(s[ext])
        assert (meta["width"], meta["height"], meta["num_frames"]) == (W, H, 24)
        assert meta["fps"] == pytest.approx(FPS) and meta["duration"] == pytest.approx(1.0, abs=0.05)
        assert meta["sample_rate"] == (SR if has_audio else 0)
        for field in ("channels", "audio_offset", "audio_duration"):
            assert field in meta
    lines = [l for l in err.splitlines() if l.startswith("skip ")]
    assert len(lines) == len(BROKEN)
    for name in BROKEN:
        (line,) = [l for l in lines if l.startswith(f"skip {name}: ")]
        assert len(line) > len(f"skip {name}: ") + 3  # a reason follows
    assert "empty" in next(l for l in lines if "empty.mp4" in l)
    assert "truncated" in next(l for l in lines if "truncated.mp4" in l)  # the head decodes, the end not
    assert "notes.txt" not in err
    assert "written 4 samples in 1 shard(s)" in out and "skipped 3 (" in out
    assert "3 of 4 with audio" in out and "captions: 1 none, 2 manifest, 1 sidecar" in out
    assert f"shards: {shards}/shard-000000.tar" in out
    # webdataset reads the shards back
    ds = wds.WebDataset(str(shards / "shard-000000.tar"), shardshuffle=False)
    assert [s["__key__"] for s in ds] == list(samples)


def test_subprocess_with_two_workers_matches_one_worker(videos, mixed_run, tmp_path):
    root, manifest = videos
    out = tmp_path / "shards"
    proc = subprocess.run([sys.executable, "-m", "sora.cli.make_shards", str(root), str(out), "--captions",
                           str(manifest), "--workers", "2"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "written 4 samples" in proc.stdout and proc.stderr.count("skip ") == 3
    one, two = read_shards(mixed_run[3]), read_shards(out)
    assert list(one) == list(two)
    assert [json.loads(s["json"]) for s in one.values()] == [json.loads(s["json"]) for s in two.values()]
    assert (mixed_run[3] / "shard-000000.tar").read_bytes() == (out / "shard-000000.tar").read_bytes()


def test_all_broken_and_missing_input_fail(videos, tmp_path, capsys):
    root, _ = videos
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in BROKEN:
        (bad / name).write_bytes((root / name).read_bytes())
    rc, out, err = run([bad, tmp_path / "out1", "--workers", "1"], capsys)
    assert rc != 0 and "no sample written: all 3 input(s) were skipped" in err
    assert not list((tmp_path / "out1").glob("*.tar"))
    rc, out, err = run([tmp_path / "missing", tmp_path / "out2"], capsys)
    assert rc != 0 and "does not exist" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "novideo").mkdir()
    rc, out, err = run([tmp_path / "novideo", tmp_path / "out3"], capsys)
    assert rc != 0 and "no videos" in err


def test_undecodable_frames_are_skipped(videos, tmp_path, capsys):
    """The header is intact but every video sample is garbage: probing passes, decoding must not."""
    root, _ = videos
    data = bytearray((root / "b.mp4").read_bytes())
    mdat = data.index(b"mdat") + 4
    data[mdat:] = bytes(len(data) - mdat)  # zero all media data
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "zeroed.mp4").write_bytes(bytes(data))
    (folder / "good.mp4").write_bytes((root / "a.mp4").read_bytes())
    probe_av(folder / "zeroed.mp4")  # the header alone looks fine
    rc, out, err = run([folder, tmp_path / "out", "--workers", "1"], capsys)
    assert rc == 0 and "skip zeroed.mp4: " in err and "written 1 samples" in out


def test_world_clips_are_deterministic(tmp_path, capsys):
    args = ["--world", "5", "--world-size", "32x48", "--world-seconds", "1", "--world-fps", "12",
            "--seed", "7", "--workers", "1"]
    rc, out, err = run([*args, tmp_path / "w1"], capsys)
    assert rc == 0, err
    first = read_shards(tmp_path / "w1")
    assert list(first) == [f"world-{i:07d}" for i in range(5)]
    for i, s in enumerate(first.values()):
        meta = json.loads(s["json"])
        assert meta["world"]["seed"] == clip_seed(7, i) and meta["world"]["balls"] and "impacts" in meta["world"]
        assert meta["caption"] and meta["caption"] == s["txt"].decode() and "ball" in meta["caption"]
        info = probe_av(s["mp4"])
        assert (info.height, info.width, info.fps, info.has_audio) == (32, 48, 12.0, True)
        assert (meta["height"], meta["width"], meta["bytes"]) == (32, 48, len(s["mp4"]))
    # INPUT given and ignored, same seed -> the same samples.  "bytes" is left out: FFmpeg's AAC
    # encoder now and then gives a 1-byte different stream under load (H.264 is byte-stable).
    rc, out, err = run([*args, "ignored-input", tmp_path / "w2"], capsys)
    assert rc == 0, err
    second = read_shards(tmp_path / "w2")
    assert list(second) == list(first)
    strip = lambda s: {k: v for k, v in json.loads(s["json"]).items() if k != "bytes"}  # noqa: E731
    assert [strip(s) for s in first.values()] == [strip(s) for s in second.values()]
    assert [s["txt"] for s in first.values()] == [s["txt"] for s in second.values()]
    # existing shards are not silently mixed with new ones
    rc, out, err = run([*args, tmp_path / "w2"], capsys)
    assert rc == 2 and "--overwrite" in err
    rc, out, err = run([*args, "--overwrite", "--world", "1", tmp_path / "w2"], capsys)
    assert rc == 0 and len(read_shards(tmp_path / "w2")) == 1


def test_reencode_max_side_and_fps(videos, tmp_path, capsys):
    root, manifest = videos
    rc, out, err = run([root, tmp_path / "out", "--max-side", "32", "--fps", "12", "--workers", "1"], capsys)
    assert rc == 0, err
    samples = read_shards(tmp_path / "out")
    assert len(samples) == 4
    for rel, (key, has_audio, _) in GOOD.items():
        s = samples[key]
        assert set(s) == {"mp4", "json", "txt"}
        meta = json.loads(s["json"])
        assert (meta["width"], meta["height"], meta["fps"], meta["num_frames"]) == (32, 24, 12.0, 12)
        assert meta["has_audio"] is has_audio and meta["bytes"] == len(s["mp4"])
        assert meta["sample_rate"] == (SR if has_audio else 0) and meta["source"] == rel
        decoded = read_av(s["mp4"])
        assert decoded.frames.shape == (12, 24, 32, 3)


def test_small_maxsize_splits_shards(videos, tmp_path, capsys):
    root, _ = videos
    rc, out, err = run([root, tmp_path / "out", "--maxsize", "0.01", "--workers", "1"], capsys)  # clips ~4-12 kB
    assert rc == 0, err
    shards = sorted((tmp_path / "out").glob("shard-*.tar"))
    assert len(shards) > 1
    assert f"shards: {tmp_path / 'out'}/shard-{{000000..{len(shards) - 1:06d}}}.tar" in out
    ds = wds.WebDataset(f"{tmp_path / 'out'}/shard-{{000000..{len(shards) - 1:06d}}}.tar", shardshuffle=False)
    assert sorted(s["__key__"] for s in ds) == sorted(k for k, _, _ in GOOD.values())
    rc, out, err = run([root, tmp_path / "out2", "--maxcount", "1", "--workers", "1"], capsys)
    assert rc == 0 and len(list((tmp_path / "out2").glob("shard-*.tar"))) == 4


def test_csv_manifest_with_absolute_and_relative_paths(videos, tmp_path, capsys):
    root, _ = videos
    csv = tmp_path / "caps.csv"
    csv.write_text(f'file,caption\n{root / "a.mp4"},"absolute, with a comma"\nsub/odd name.v2.MOV,relative\n')
    rc, out, err = run([root, tmp_path / "out", "--captions", csv, "--workers", "1"], capsys)
    assert rc == 0, err
    samples = read_shards(tmp_path / "out")
    assert samples["a"]["txt"] == b"absolute, with a comma"
    assert samples["sub/odd_name_v2"]["txt"] == b"relative"
    assert samples["sub/c"]["txt"] == b"caption from a sidecar" and samples["b"]["txt"] == b""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"path": "a.mp4", "caption": "x"}\nnot json\n')
    rc, out, err = run([root, tmp_path / "out3", "--captions", bad], capsys)
    assert rc == 2 and "bad.jsonl:2" in err


# ----------------------------------------------------------------------------- audio, images, long files, odd names


def write_sound(path, fmt, codec, seconds=0.5):
    """An audio-only file (PyAV): a wav, or an mp4 holding nothing but AAC."""
    tone = clip(seconds)[1]
    with av.open(str(path), "w", format=fmt) as out:
        st = out.add_stream(codec, rate=SR, layout="mono")
        frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
        frame.sample_rate, frame.pts = SR, 0
        out.mux(st.encode(frame))
        out.mux(st.encode(None))


def test_audio_files_and_images_are_seen(tmp_path, capsys):
    """Audio-only files are skipped as such (by extension, or an mp4 without video); images are skipped,
    or with --images stored as an mp4 of their one frame held that long."""
    folder = tmp_path / "in"
    folder.mkdir()
    write_av(folder / "a.mp4", *clip(), FPS, SR)
    write_sound(folder / "tone.wav", "wav", "pcm_s16le")
    write_sound(folder / "voice.mp4", "mp4", "aac")
    (folder / "voice.m4a").write_bytes((folder / "voice.mp4").read_bytes())
    y, x = np.mgrid[:47, :63]  # odd sizes: the still is made 48x64 (yuv420p)
    image = np.stack([x * 4, y * 5, np.full_like(x, 128)], -1).astype(np.uint8)
    write_image(folder / "pic.png", image)
    rc, out, err = run([folder, tmp_path / "out", "--workers", "1"], capsys)
    assert rc == 0, err
    assert list(read_shards(tmp_path / "out")) == ["a"]
    skips = sorted(line for line in err.splitlines() if line.startswith("skip "))
    assert skips == ["skip pic.png: image: not a video (--images SECONDS stores it as a still clip)",
                     "skip tone.wav: audio only: no video stream", "skip voice.m4a: audio only: no video stream",
                     "skip voice.mp4: audio only: no video stream"]
    assert "skipped 4 (3 audio only, 1 image)" in out

    rc, out, err = run([folder, tmp_path / "out2", "--images", "2.5", "--workers", "1"], capsys)
    assert rc == 0 and "skipped 3 (3 audio only)" in out, err
    s = read_shards(tmp_path / "out2")["pic"]
    meta = json.loads(s["json"])
    assert set(s) == {"mp4", "json", "txt"} and meta["from_image"] is True and meta["source"] == "pic.png"
    assert (meta["width"], meta["height"], meta["num_frames"], meta["has_audio"]) == (64, 48, 1, False)
    assert meta["duration"] == pytest.approx(2.5)
    frames = read_av(s["mp4"], fps=4).frames  # the one frame, shown for the whole 2.5 s
    assert len(frames) == 10
    expected = read_av(folder / "pic.png", size=(48, 64)).frames[0].astype(float)
    assert np.abs(frames.astype(float) - expected).mean() < 2

    rc, out, err = run([folder / "tone.wav", tmp_path / "out3"], capsys)  # one audio file as INPUT
    assert rc == 1 and "all 1 input(s) were skipped (1 audio only)" in err


def gradient(first, n, h, w):
    t = np.arange(first, first + n)[:, None, None]
    x = np.arange(w)[None, None, :] + np.arange(h)[None, :, None]
    frames = np.stack([(x * 2 + t * 3) % 256, (x + t) % 256, np.broadcast_to(t * 2 % 256, (n, h, w))], -1)
    return frames.astype(np.uint8)


def test_reencode_streams_in_bounded_memory(tmp_path, monkeypatch):
    """A long clip re-encoded window by window: peak memory follows the window, not the file, and the
    result is the whole-file re-encode's (frames up to the codec, audio the same length)."""
    src, seconds, h, w = tmp_path / "long.mp4", 8, 96, 128
    with AVWriter(src, FPS, SR) as writer:  # written in 1 s pieces too
        for i in range(seconds):
            tone = 0.3 * np.sin(2 * np.pi * 330 * np.arange(i * SR, (i + 1) * SR) / SR)
            writer.write(gradient(i * 24, 24, h, w), tone.astype(np.float32))
    info = probe_av(src)

    def encode(window):
        monkeypatch.setattr(shard_encode, "WINDOW_SECONDS", window)
        tracemalloc.start()
        try:
            (start, data), = shard_encode.reencode(str(src), info, max_side=64, fps=12)
            return data, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    streamed, streamed_peak = encode(0.5)
    whole, whole_peak = encode(1e9)
    frames_bytes = seconds * 12 * 48 * 64 * 3  # decoded frames of the whole clip at the output size
    assert whole_peak > frames_bytes  # the whole-file path holds them all
    assert streamed_peak < whole_peak / 5, (streamed_peak, whole_peak)  # ~0.35 MB: a window + the mp4 bytes
    a, b = read_av(streamed, sample_rate=SR), read_av(whole, sample_rate=SR)
    assert a.frames.shape == b.frames.shape == (96, 48, 64, 3)
    # libx264 (one thread) gives run-to-run different bytes for the same frames about once in 20 encodes (0.6-1.65
    # mean difference, measured 2026-12-07); frames one step out of place differ by 5.4-8.1: the bound sits between
    assert np.abs(a.frames.astype(float) - b.frames.astype(float)).mean() < 2.5
    assert a.audio.shape == b.audio.shape == (1, seconds * SR) and a.audio_mask.all()
    assert np.abs(a.audio - b.audio).mean() < 0.01


def test_max_seconds_cuts_long_videos(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    write_av(folder / "a.mp4", *clip(), FPS, SR)
    write_av(folder / "long.mp4", *clip(2.5), FPS, SR)
    rc, out, err = run([folder, tmp_path / "out", "--max-seconds", "1", "--workers", "1"], capsys)
    assert rc == 0, err
    samples = read_shards(tmp_path / "out")
    assert list(samples) == ["a-000", "long-000", "long-001", "long-002"]
    assert samples["a-000"]["mp4"] == (folder / "a.mp4").read_bytes()  # not longer than 1 s: as is
    assert json.loads(samples["a-000"]["json"])["segment_start"] == 0
    source = read_av(folder / "long.mp4", sample_rate=SR)
    for i, (seconds, frames) in enumerate([(1.0, 24), (1.0, 24), (0.5, 12)]):
        meta = json.loads(samples[f"long-{i:03d}"]["json"])
        assert (meta["segment"], meta["segment_start"], meta["num_frames"]) == (i, i, frames)
        assert meta["source"] == "long.mp4"
        assert meta["duration"] == pytest.approx(seconds, abs=0.01) and meta["has_audio"]
        seg = read_av(samples[f"long-{i:03d}"]["mp4"], sample_rate=SR)
        assert np.abs(seg.frames.astype(float) - source.frames[24 * i: 24 * i + frames]).mean() < 3
        assert seg.audio.shape == (1, int(seconds * SR))
        assert np.abs(seg.audio - source.audio[:, i * SR: i * SR + seg.audio.shape[1]]).mean() < 0.02
    assert "written 4 samples" in out


def test_file_names_that_are_not_utf8(videos, tmp_path, monkeypatch):
    """b'clip\\xff.mp4' is sharded under an ASCII key with its name kept losslessly in json; a broken one
    is skipped; nothing breaks while printing on streams that refuse surrogates."""
    root, _ = videos
    folder, out_dir = os.fsencode(tmp_path / "in"), os.fsencode(tmp_path) + b"/out\xfd"
    os.mkdir(folder)
    try:
        fd = os.open(os.path.join(folder, b"clip\xff.mp4"), os.O_WRONLY | os.O_CREAT, 0o644)
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    os.write(fd, (root / "a.mp4").read_bytes())
    os.close(fd)
    open(os.path.join(folder, b"bad\xfe.mp4"), "wb").close()
    stdout, stderr = (io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict") for _ in range(2))
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(sys, "stderr", stderr)
    rc = main([os.fsdecode(folder), os.fsdecode(out_dir), "--workers", "1"])
    stdout.flush(), stderr.flush()
    out, err = stdout.buffer.getvalue().decode(), stderr.buffer.getvalue().decode()
    assert rc == 0, err
    assert "skip bad\\xfe.mp4: empty" in err and "written 1 samples" in out and "/out\\xfd" in out
    (key, s), = read_shards(Path(os.fsdecode(out_dir))).items()
    assert key == "clip" and s["mp4"] == (root / "a.mp4").read_bytes()
    assert b'"source": "clip\\udcff.mp4"' in s["json"]  # ASCII json, the byte escaped
    assert os.fsencode(json.loads(s["json"])["source"]) == b"clip\xff.mp4"
