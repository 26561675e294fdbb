"""Timed captions, scene cuts and multi-shot world clips in sora-make-shards (sora.data.timed_captions,
sora.media.scenes, sora.data.shards): real files through the CLI, each skip line and json field checked."""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from sora.cli.make_shards import main
from tests.helpers import read_shards
from sora.data.shards import world_jobs
from sora.data.timed_captions import TimedCaptionError, check_shots, clip_shots
from sora.data.world import WorldConfig, make_clip
from sora.media import detect_cuts, read_av, scene_cuts, scenes, write_av

H, W, FPS, SR = 48, 64, 24.0, 16000
CUT = 29  # first frame of the second scene: 29 / 24 = 1.2083 s, on no round time


def scene(n, first, warm):
    """Drifting bands: warm (red/orange) or cold (blue/green), visibly different scenes."""
    t = np.arange(first, first + n)[:, None, None]
    y, x = np.arange(H)[None, :, None], np.arange(W)[None, None, :]
    if warm:
        r, g, b = 200 + 0 * t, (x * 2 + y + t * 3) % 120, 30 + 0 * t
    else:
        r, g, b = 20 + 0 * t, (y * 3 + x + t * 2) % 100 + 60, 230 + 0 * t
    return np.stack(np.broadcast_arrays(r, g, b), -1).astype(np.uint8)


def two_scenes(cut=CUT, total=60):
    return np.concatenate([scene(cut, 0, True), scene(total - cut, cut, False)])


def tone(frames):
    n = round(len(frames) / FPS * SR)
    return (0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / SR)).astype(np.float32)[None]


def write_video(path, frames):
    write_av(path, frames, tone(frames), FPS, SR)


def run(args, capsys):
    rc = main([str(a) for a in args] + ["--workers", "1"])
    out, err = capsys.readouterr()
    return rc, out, err


def metas(out: Path) -> dict[str, dict]:
    return {k: json.loads(s["json"]) for k, s in read_shards(out).items()}


# ----------------------------------------------------------------------------- scene detection


def test_detect_cuts_finds_the_cut_within_a_frame_and_nothing_in_a_world_clip():
    (cut,) = detect_cuts(two_scenes(), FPS)
    assert abs(cut - CUT / FPS) <= 1 / FPS + 1e-6, cut
    assert detect_cuts(scene(60, 0, True), FPS) == []  # motion alone is no cut
    for seed in (1, 2, 3):
        clip = make_clip(seed, WorldConfig(seconds=3.0))  # balls bouncing in one scene
        assert detect_cuts(clip.frames, clip.fps) == [], seed
    with pytest.raises(ValueError, match=r"uint8 \[T, H, W, 3\]"):
        detect_cuts(np.zeros((4, 8, 8), np.uint8), FPS)


def test_scene_cuts_streams_the_file_in_windows(tmp_path, monkeypatch):
    """A file is decoded a window at a time (the detector carries on across windows, so a cut on a
    window boundary and one inside a window are both found) and scaled down for the detector."""
    frames = np.concatenate([two_scenes(24, 48), scene(36, 48, True)])  # cuts at 1.0 s and 2.0 s
    write_video(tmp_path / "v.mp4", frames)
    calls = []

    def spy(src, **kw):
        clip = read_av(src, **kw)
        calls.append(clip.frames.shape)
        return clip

    monkeypatch.setattr(scenes, "read_av", spy)
    monkeypatch.setattr(scenes, "WINDOW_SECONDS", 1.0)  # 24 frames: the first cut starts a window
    assert scene_cuts(tmp_path / "v.mp4") == [1.0, 2.0]
    assert len(calls) == 4 and max(c[0] for c in calls) == 24 and calls[0][1:3] == (48, 64)  # 64 px: as is
    calls.clear()
    assert scene_cuts((tmp_path / "v.mp4").read_bytes(), side=32) == [1.0, 2.0]  # bytes too
    assert calls[0][1:3] == (24, 32)


def test_missing_pyscenedetect_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "scenedetect", None)  # import scenedetect -> ImportError
    with pytest.raises(ImportError, match=r"^scene detection needs PySceneDetect: pip install 'sora\[scenes\]'$"):
        detect_cuts(two_scenes(), FPS)
    write_video(tmp_path / "v.mp4", scene(12, 0, True))
    rc, out, err = run([tmp_path / "v.mp4", tmp_path / "out", "--split-scenes"], capsys)
    assert rc == 2 and err.strip() == ("make_shards: error: scene detection needs PySceneDetect: "
                                       "pip install 'sora[scenes]'")


# ----------------------------------------------------------------------------- --split-scenes


@pytest.fixture(scope="module")
def scene_folder(tmp_path_factory):
    """two.mp4: a warm scene to 1.2083 s, then a cold one to 2.5 s, with timed captions; one.mp4: one scene."""
    root = tmp_path_factory.mktemp("scenes")
    write_video(root / "two.mp4", two_scenes())
    (root / "two.shots.json").write_text(json.dumps([[0, 0.5, "warm bands drift"], [0.5, 1.5, "the picture turns"],
                                                     [2.0, 2.5, "cold bands"]]))
    write_video(root / "one.mp4", scene(24, 0, True))
    return root


def test_split_scenes_gives_one_sample_per_scene_with_shifted_shots(scene_folder, tmp_path, capsys):
    rc, out, err = run([scene_folder, tmp_path / "out", "--split-scenes"], capsys)
    assert rc == 0, err
    samples = read_shards(tmp_path / "out")
    assert list(samples) == ["one-000", "two-000", "two-001"]
    one = json.loads(samples["one-000"]["json"])  # no cut: stored as it is
    assert samples["one-000"]["mp4"] == (scene_folder / "one.mp4").read_bytes()
    assert (one["scene"], one["segment"], one["segment_start"]) == (0, 0, 0) and "shots" not in one
    first, second = (json.loads(samples[k]["json"]) for k in ("two-000", "two-001"))
    assert (first["scene"], first["segment_start"], first["num_frames"]) == (0, 0, CUT)
    assert (second["scene"], second["segment_start"], second["num_frames"]) == (1, round(CUT / FPS, 6), 60 - CUT)
    assert first["duration"] == pytest.approx(CUT / FPS, abs=0.01)
    assert second["duration"] == pytest.approx((60 - CUT) / FPS, abs=0.01)
    start = CUT / FPS
    assert first["shots"] == [{"start": 0.0, "end": 0.5, "caption": "warm bands drift"},
                              {"start": 0.5, "end": round(start, 6), "caption": "the picture turns"}]
    assert second["shots"] == [{"start": 0.0, "end": round(1.5 - start, 6), "caption": "the picture turns"},
                               {"start": round(2.0 - start, 6), "end": round(2.5 - start, 6), "caption": "cold bands"}]
    assert first["caption"] == "warm bands drift the picture turns" == samples["two-000"]["txt"].decode()
    assert second["caption"] == "the picture turns cold bands"
    for key, warm in (("two-000", True), ("two-001", False)):  # each piece shows its own scene only
        frames = read_av(samples[key]["mp4"]).frames.astype(float)
        assert ((frames[..., 0] > frames[..., 2]).mean(axis=(1, 2)) > 0.9).all() if warm else \
            ((frames[..., 2] > frames[..., 0]).mean(axis=(1, 2)) > 0.9).all()
    assert "written 3 samples" in out and "captions: 1 none, 2 shots; timed captions: 1 input(s)" in out


def test_split_scenes_with_max_seconds_cuts_long_scenes(scene_folder, tmp_path, capsys):
    rc, out, err = run([scene_folder / "two.mp4", tmp_path / "out", "--split-scenes", "--max-seconds", "1"], capsys)
    assert rc == 0, err
    got = metas(tmp_path / "out")
    start = round(CUT / FPS, 6)
    # scene 0 (29 frames) -> 24 + 5, scene 1 (31 frames) -> 24 + 7
    assert [(k, m["scene"], m["segment"], m["segment_start"], m["num_frames"]) for k, m in got.items()] == [
        ("two-000", 0, 0, 0.0, 24), ("two-001", 0, 1, 1.0, 5), ("two-002", 1, 2, start, 24),
        ("two-003", 1, 3, round(start + 1, 6), 7)]
    assert [[(s["start"], s["end"]) for s in m["shots"]] for m in got.values()] == [
        [(0.0, 0.5), (0.5, 1.0)], [(0.0, round(start - 1, 6))],
        [(0.0, round(1.5 - start, 6)), (round(2 - start, 6), 1.0)], [(0.0, round(2.5 - start - 1, 6))]]


# ----------------------------------------------------------------------------- sidecars and manifests


BAD = {  # name -> (sidecar text, what the skip line says after "bad timed captions: NAME.shots.json")
    "notjson": ('[[0, 1, "a"]', ": not JSON (Expecting ',' delimiter at line 1)"),
    "notlist": ('{"0": "a"}', ": expected a JSON list of [t0, t1, caption] rows, got a dict"),
    "shape": ('[[0, 1, "a"], [1, 2]]', " row 2: expected [t0, t1, caption] with t0, t1 in seconds, got [1, 2]"),
    "empty": ('[[0, 1, "a"], [1, 1, "b"]]', " row 2: t1 = 1 is not after t0 = 1"),
    "overlap": ('[[0, 1, "a"], [0.5, 1.5, "b"]]', " row 2: overlaps row 1 (starts at 0.5 s, before its end 1 s)"),
    "unsorted": ('[[1, 2, "a"], [0, 0.5, "b"]]', " row 2: not sorted (starts at 0 s, before row 1's 1 s)"),
    "late": ('[[0, 1, "a"], [1, 2.6, "b"], [2.6, 3, "c"]]', " row 2: t1 = 2.6 is past the video's end (2.500 s)"),
    "nottext": ('[[0, 1, "a"], [1, 2, ["b"]]]', " row 2: the caption is a list, not text"),
    "negative": ('[[-0.5, 1, "a"]]', " row 1: t0 = -0.5 is before the start (0 s)"),
}


def test_bad_sidecars_skip_with_the_file_and_row(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    frames = scene(60, 0, True)  # 2.5 s
    write_video(folder / "good.mp4", frames)
    data = (folder / "good.mp4").read_bytes()
    (folder / "good.shots.json").write_text('[[0, 1, "a"], [1.5, 2.52, "ends within a frame of the end"]]')
    for name, (text, _) in BAD.items():
        (folder / f"{name}.mp4").write_bytes(data)
        (folder / f"{name}.shots.json").write_text(text)
    (folder / "listed.mp4").write_bytes(data)
    manifest = tmp_path / "caps.jsonl"
    manifest.write_text('{"path": "good.mp4", "caption": "x", "shots": [[0, 1, "loses to the sidecar"]]}\n'
                        '{"path": "listed.mp4", "shots": [[0, 1, "a"], [0.9, 2, "b"]]}\n')
    rc, out, err = run([folder, tmp_path / "out", "--captions", manifest], capsys)
    assert rc == 0, err
    skips = sorted(line for line in err.splitlines() if line.startswith("skip "))
    expected = sorted([f"skip {n}.mp4: bad timed captions: {n}.shots.json{why}" for n, (_, why) in BAD.items()]
                      + ["skip listed.mp4: bad timed captions: caps.jsonl:2 shots row 2: overlaps row 1 "
                         "(starts at 0.9 s, before its end 1 s)"])
    assert skips == expected
    assert f"skipped {len(BAD) + 1} ({len(BAD) + 1} bad timed captions)" in out
    (meta,) = metas(tmp_path / "out").values()
    assert meta["caption"] == "x" and [s["caption"] for s in meta["shots"]] == ["a", "ends within a frame of the end"]
    with pytest.raises(TimedCaptionError, match="^m row 1: the caption is a NoneType, not text$"):
        check_shots([[0, 1, None]], "m", 2.0, FPS)
    assert clip_shots([{"start": 0.0, "end": 2.0, "caption": "a", "scene": 7}], 0.5, 1.0, FPS) == [
        {"start": 0.0, "end": 0.5, "caption": "a", "scene": 7}]  # other keys kept


def test_max_seconds_clips_and_shifts_the_shots(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    write_video(folder / "long.mp4", scene(60, 0, True))  # 2.5 s
    (folder / "long.shots.json").write_text('[[0.5, 0.98, "a"], [0.98, 1.3, "b"], [2.2, 2.5, "c"]]')
    (folder / "long.txt").write_text("the plain caption\n")
    write_video(folder / "short.mp4", scene(12, 0, False))  # 0.5 s: stored as is
    manifest = tmp_path / "caps.jsonl"
    manifest.write_text('{"path": "short.mp4", "shots": [[0, 0.25, "first"], [0.25, 0.5, "second"]]}\n')
    rc, out, err = run([folder, tmp_path / "out", "--max-seconds", "1", "--captions", manifest], capsys)
    assert rc == 0, err
    got = metas(tmp_path / "out")
    assert list(got) == ["long-000", "long-001", "long-002", "short-000"]
    # "b" keeps 0.02 s of piece 0 (under a frame): dropped there, its 0.3 s in piece 1 shifted to 0
    assert [[(s["start"], s["end"], s["caption"]) for s in got[f"long-00{i}"]["shots"]] for i in range(3)] == [
        [(0.5, 0.98, "a")], [(0.0, 0.3, "b")], [(0.2, 0.5, "c")]]
    assert {m["caption"] for k, m in got.items() if k.startswith("long")} == {"the plain caption"}
    short = got["short-000"]
    assert short["shots"] == [{"start": 0.0, "end": 0.25, "caption": "first"},
                              {"start": 0.25, "end": 0.5, "caption": "second"}]
    assert short["caption"] == "first second" and short["segment_start"] == 0
    assert "captions: 3 sidecar, 1 shots; timed captions: 2 input(s)" in out


# ----------------------------------------------------------------------------- multi-shot world clips


def test_world_shots_cover_the_clip_in_order(tmp_path, capsys):
    n, seconds = 8, 2.0
    world = ["--world", n, "--world-size", "32", "--world-seconds", seconds, "--world-fps", "12", "--seed", "3"]
    rc, out, err = run([*world, tmp_path / "w", "--world-shots", "0.6", "--world-max-shots", "3",
                        "--world-cut-every", "0.5"], capsys)
    assert rc == 0, err
    got = list(metas(tmp_path / "w").values())
    drawn = [zlib.crc32(f"3:shots:{i}".encode()) % 1000 < 600 for i in range(n)]  # as WorldClipStream draws
    assert [("shots" in m) for m in got] == drawn and 0 < sum(drawn) < n
    assert f"timed captions: {sum(drawn)} input(s)" in out
    several = 0
    for m in got:
        if "shots" not in m:
            assert "shots" not in m["world"]
            continue
        shots = m["shots"]
        assert shots == m["world"]["shots"] and m["caption"] == shots[0]["caption"]
        assert shots[0]["start"] == 0 and shots[-1]["end"] == seconds
        assert all(a["end"] == b["start"] for a, b in zip(shots, shots[1:]))  # sorted, no gaps, no overlap
        assert all(s["end"] > s["start"] and (s["start"] * 2) % 1 == 0 for s in shots)  # cuts every 0.5 s
        assert all(isinstance(s["caption"], str) and "ball" in s["caption"] and "scene" in s for s in shots)
        several += len(shots) > 1
    assert several  # some clips really have cuts
    jobs, opts = world_jobs(n, 3, WorldConfig(width=32, height=32, fps=12, seconds=seconds),
                            {"prob": 0.6, "max": 3, "cut_every": 0.5, "continue_prob": 0.3})  # as sora-demo calls it
    assert [j.multishot for j in jobs] == drawn and opts.world_shots["max"] == 3
    with pytest.raises(ValueError, match="world shots need keys"):
        world_jobs(1, 0, WorldConfig(), {"prob": 0.5, "maxx": 2})
    rc, out, err = run([*world, tmp_path / "w2", "--world-shots", "1.5"], capsys)
    assert rc == 2 and "0 <= prob <= 1" in err


def test_no_timed_captions_change_nothing(tmp_path, capsys):
    """Without timed captions nothing changes: no shots in the json, 0 inputs counted."""
    write_video(tmp_path / "a.mp4", scene(12, 0, True))
    rc, out, err = run([tmp_path / "a.mp4", tmp_path / "out"], capsys)
    assert rc == 0, err
    (meta,) = metas(tmp_path / "out").values()
    assert "shots" not in meta and "scene" not in meta and "segment" not in meta
    assert "captions: 1 none; timed captions: 0 input(s)" in out
