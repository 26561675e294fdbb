"""End to end through the real command lines: make_shards on a mixed folder -> pipeline, and the demo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sora.data.pipeline import ShardClipStream
from sora.data.world import WorldConfig, make_clip
from sora.evaluation.sync import match_errors, onset_times
from sora.media import write_av
from sora.timeline import Timeline

REPO = Path(__file__).resolve().parents[1]
MEDIA = REPO.parent / "shared" / "media"


def _cli(*args, cwd=REPO):
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_mixed_folder_to_shards_to_batches(tmp_path):
    """Good clips (with and without sound, real and generated) and broken files: the good ones come
    back through the pipeline with the right has_audio flags and sound aligned to the picture."""
    src = tmp_path / "videos"
    (src / "world").mkdir(parents=True)
    truth = {}
    for i in range(6):
        clip = make_clip(i, WorldConfig(width=64, height=48, seconds=2.0))
        write_av(src / "world" / f"w{i}.mp4", clip.frames, clip.audio, fps=24, sample_rate=16000)
        truth[f"world/w{i}"] = [x["time"] for x in clip.meta["impacts"] if x["audible"]]
    if MEDIA.is_dir():
        shutil.copy(MEDIA / "bikes_noaudio.mp4", src / "bikes_noaudio.mp4")
    (src / "empty.mp4").write_bytes(b"")
    (src / "garbage.mkv").write_bytes(os.urandom(5000))
    good = (src / "world" / "w0.mp4").read_bytes()
    (src / "cut.mp4").write_bytes(good[: len(good) // 3])

    proc = _cli("tools/make_shards.py", src, tmp_path / "shards", "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    for name in ("empty.mp4", "garbage.mkv", "cut.mp4"):
        assert sum(name in line for line in proc.stderr.splitlines()) == 1, proc.stderr
    expected = 6 + MEDIA.is_dir()
    assert f"{expected} samples" in proc.stdout or f"wrote {expected}" in proc.stdout, proc.stdout

    tl = Timeline(seconds=1.0, fps=24, sample_rate=16000)
    stream = ShardClipStream(str(tmp_path / "shards" / "shard-*.tar"), tl, batch_size=1, size=(48, 48),
                             infinite=False, seed=1)
    seen, errors = {}, []
    for batch in stream:
        key = batch.keys[0]
        seen[key] = bool(batch.has_audio[0])
        if key in truth:
            start = float(batch.start[0])
            onsets = onset_times(batch.audio[0].numpy(), 16000)
            onsets = onsets[onsets > 0.02]
            errors.append(match_errors(onsets, np.array(truth[key]) - start))
    assert set(seen) == set(truth) | ({"bikes_noaudio"} if MEDIA.is_dir() else set())
    assert all(seen[k] for k in truth) and not seen.get("bikes_noaudio", False)
    errors = np.abs(np.concatenate(errors))
    assert errors.size >= 6 and errors.max() < 1 / 24


def test_demo_runs_end_to_end(tmp_path):
    proc = _cli("-m", "sora.cli.demo", f"out_dir={tmp_path / 'demo'}", "world.clips=8", "world.seconds=2",
                "timeline.seconds=1", "data.train.batch_size=2", "preview_batches=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "demo" / "preview.json").read_text())
    assert summary["clips"] == 4 and summary["video"] == [2, 3, 25, 64, 64] and summary["audio"] == [2, 1, 16000]
    assert summary["sync_impacts"] > 0 and summary["sync_error_ms_max"] < 1000 / 24
    assert (tmp_path / "demo" / "preview.png").read_bytes()[:4] == b"\x89PNG"
    from sora.media import probe_av

    info = probe_av(tmp_path / "demo" / "preview.mp4")
    assert info.has_audio and abs(info.duration - 4 * 25 / 24) < 0.05
    assert "audio-video sync" in proc.stdout
