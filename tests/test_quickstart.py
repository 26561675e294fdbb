"""End to end through the real command lines: make_shards on a mixed folder -> pipeline, and the demo."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from sora.data.streams import ShardClipStream
from sora.data.world import WorldConfig, make_clip
from sora.evaluation.sync import match_errors, onset_times
from sora.media import write_av
from sora.timeline import Timeline
from tests.conftest import PROMPTS
from tests.conftest import run_cli as _cli

REPO = Path(__file__).resolve().parents[1]
MEDIA = REPO.parent / "shared" / "media"


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

    proc = _cli("-m", "sora.cli.make_shards", src, tmp_path / "shards", "--workers", "2")
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


def test_demo_runs_end_to_end(demo):
    """`sora-demo` at a tiny size: data preview + sync check, the three training stages, sora-sample,
    sora-eval, report."""
    run, proc = demo
    prompts = PROMPTS
    out = proc.stdout

    summary = json.loads((run / "preview.json").read_text())  # 1. the data check
    assert summary["clips"] == 4 and summary["video"] == [2, 3, 25, 64, 64] and summary["audio"] == [2, 1, 16000]
    assert summary["sync_impacts"] > 0 and summary["sync_error_ms_max"] < 1000 / 24
    assert "audio-video sync" in out

    for stage in ("video_vae", "audio_vae", "dit"):  # 2. the stages, each printed as its command
        assert f"$ sora-train experiment=quickstart/{stage} hydra.run.dir={run / stage} trainer.max_steps=3" in out
        assert (run / stage / "checkpoints" / "last.ckpt").is_file()
        assert f"[{stage}] 3 steps in" in out
    assert f"model.video_vae_ckpt={run / 'video_vae' / 'checkpoints' / 'last.ckpt'}" in out
    assert f"$ sora-cache-latents {run / 'latents'} experiment=quickstart/dit" in out  # the DiT's latents
    assert "[latents] 16 clips in" in out and f"data.train.urls={run / 'latents' / 'latents-*.tar'}" in out
    assert out.count(f"$ sora-sample ckpt={run / 'dit' / 'checkpoints' / 'last.ckpt'} prompts=") == 1  # one start-up

    from sora.media import probe_av  # 3. samples: both streams, the asked 1 s (17 frames at 16 fps)

    mp4s = sorted((run / "samples").glob("*.mp4"))
    assert len(mp4s) == len(prompts)
    for mp4 in mp4s:
        info = probe_av(mp4)
        assert info.has_audio and info.num_frames == 17 and (info.width, info.height) == (32, 32)
        assert 1.0 - 0.01 <= info.duration <= 1.0 + 1 / 16 + 0.01
        assert 1.0 - 0.01 <= info.audio_duration <= 1.0 + 1 / 16 + 0.01

    report = (run / "report.md").read_text()  # 4. the report, its pictures and links
    for png in ("preview.png", "plots/video_vae.png", "plots/audio_vae.png", "plots/dit.png", "plots/samples.png"):
        assert (run / png).read_bytes()[:4] == b"\x89PNG", png
        assert f"({png})" in report, png
    for mp4 in mp4s:
        assert f"(samples/{mp4.name})" in report
    for text in ("sora-train experiment=quickstart/dit", "sora-sample ckpt=", "val PSNR", "val mel L1", "val loss"):
        assert text in report, text
    assert "[report]" in out
    results = json.loads((run / "report.json").read_text())
    assert [s["name"] for s in results["stages"]] == ["video_vae", "audio_vae", "latents", "dit"]
    assert [s["prompt"] for s in results["samples"]] == prompts
    assert all(0 < s["seconds"] <= s["call_seconds"] for s in results["samples"])  # each clip's own time, parsed

    # 5. sora-eval on held-out world clips: both autoencoders' reconstructions, the DiT's samples
    evaluations = {e["name"]: e for e in results["evaluations"]}
    assert set(evaluations) == {"video_vae", "audio_vae", "dit"}
    assert f"$ sora-eval ckpt={run / 'dit' / 'checkpoints' / 'last.ckpt'} data={run / 'heldout'}" in out
    assert "[eval dit] 3 clips" in out and "[eval video_vae] 3 clips" in out
    dit = evaluations["dit"]
    assert dit["protocol"]["references"] == 3 and dit["protocol"]["frames"] == 33
    assert len(list((run / "eval" / "samples").glob("*.mp4"))) == 3
    for key in ("fd_mel", "val/loss", "sync/clips", "physics/clips_tracked", "physics/clips_colour_match"):
        assert key in dit["metrics"], key
    assert "recon/psnr_still" in evaluations["video_vae"]["metrics"]
    assert "## Evaluation: dit" in report and "(eval/report.md)" in report and "(eval/side_by_side.png)" in report

    # 6. the targets table: each row measured beside real clips, judged against the demo's targets
    rows = {r["key"]: r for r in results["targets"]}
    assert {"recon_tracked", "tracked", "in_sync", "colour_match"} <= set(rows)
    assert rows["tracked"]["target"] == "≥ 6/8" and rows["tracked"]["measured"].endswith("/3")
    assert rows["in_sync"]["shuffled"].endswith("/3") and rows["gravity_ok"]["met"] is None
    assert "## Targets" in report and ("**met**" in report or "**not met**" in report)


def test_presets_compose_into_stage_configs_that_pass_the_checks():
    """`preset=long` / `preset=gpu`: every stage's overrides compose with its experiment into a config that
    passes sora-train's checks (no file reads), and the DiT's VAE block matches the VAE stage's."""
    from hydra import compose, initialize_config_dir

    from sora.cli.demo import CONFIGS
    from sora.training.config_checks import check

    for preset in ("long", "gpu"):
        with initialize_config_dir(CONFIGS, version_base="1.3"):
            demo = compose("demo", overrides=[f"preset={preset}"])
            stages = {name: compose("train", overrides=[f"experiment={s.experiment}", *s.overrides])
                      for name, s in demo.stages.items()}
        for cfg in stages.values():
            check(cfg, files=False)
        assert dict(stages["dit"].model.video_vae) | {"temporal_stride": 4} == {
            **{k: v for k, v in stages["video_vae"].model.vae.items()}, "temporal_stride": 4}
        assert demo.eval.num_samples == 16 and demo.targets.tracked == "15/16" and "v2a" in demo.eval.tasks
        assert stages["dit"].model.timestep_shift == 6  # the longer runs train more at high noise
        if preset == "gpu":
            assert stages["dit"].timeline.fps == 24 and stages["dit"].data.train.world.width == 64
