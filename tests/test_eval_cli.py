"""`sora-eval` through its command line, on the tiny demo's checkpoints and held-out shards:
known answers in samples= mode (the references themselves, their sound delayed), a folder of
checkpoints, the autoencoders' reconstruction metrics, FVD through an I3D weights file, the
reference-feature cache, and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from sora.evaluation.evaluator import reference_clips
from sora.evaluation.i3d import InceptionI3d
from sora.media import write_av
from sora.timeline import Timeline
from tests.conftest import run_cli

TL = Timeline(seconds=1.0, fps=16, sample_rate=16000)  # 1 s windows of the demo's held-out clips (2 s, 16 fps)
SAMPLES_TL = ["timeline.seconds=1", "timeline.fps=16"]


def _eval(*args, cache):
    return run_cli("-m", "sora.cli.eval", f"cache_dir={cache}", *args)


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _write(clips, folder, shift_s: float = 0.0):
    folder.mkdir(parents=True, exist_ok=True)
    for i, c in enumerate(clips):
        n = int(round(shift_s * TL.sample_rate))
        audio = np.concatenate([np.zeros(n, np.float32), c.audio[: len(c.audio) - n]]) if n else c.audio
        write_av(folder / f"{i:03d}.mp4", c.frames, audio[None], fps=TL.fps, sample_rate=TL.sample_rate)
    return folder


def test_samples_mode_known_answers_and_cache(demo, tmp_path):
    """The references themselves score near zero Frechet distance and in sync; with their sound 250 ms
    late the sync offset says +250 ms; the second run reads the reference features from the cache."""
    run, _ = demo
    refs = reference_clips(run / "heldout", TL, (32, 32), 3)
    cache = tmp_path / "cache"
    same = _ok(_eval(f"samples={_write(refs, tmp_path / 'same')}", f"data={run / 'heldout'}", f"out={tmp_path / 'a'}",
                     "num_samples=3", *SAMPLES_TL, cache=cache))
    result = json.loads((tmp_path / "a" / "metrics.json").read_text())
    m, real = result["metrics"], result["baselines"]["real"]
    assert m["fd_mel"] < 0.2 * real["fd_mel"], (m["fd_mel"], real["fd_mel"])  # mp4/AAC round trip only
    assert abs(m["sync/offset_ms_mean"]) < 1000 / 8 and m["sync/clips"] == 3
    assert result["protocol"]["frames"] == 17 and result["protocol"]["size"] == [32, 32]
    assert result["protocol"]["reference_features"].startswith("computed")
    assert "sora-eval: samples=" in same.stdout and (tmp_path / "a" / "report.md").is_file()
    assert (tmp_path / "a" / "evaluated.png").read_bytes()[:4] == b"\x89PNG"

    _ok(_eval(f"samples={_write(refs, tmp_path / 'late', shift_s=0.25)}", f"data={run / 'heldout'}",
              f"out={tmp_path / 'b'}", "num_samples=3", *SAMPLES_TL, cache=cache))
    late = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert late["protocol"]["reference_features"].startswith("cache")
    assert abs(late["metrics"]["sync/offset_ms_mean"] - 250) < 1000 / 8, late["metrics"]
    assert late["metrics"]["sync/offset_ms_mean"] - m["sync/offset_ms_mean"] > 125


def test_dit_checkpoint_folder_gives_a_table_over_steps(demo, tmp_path):
    run, _ = demo
    out = tmp_path / "eval"
    proc = _ok(_eval(f"ckpt={run / 'dit' / 'checkpoints'}", f"data={run / 'heldout'}", f"out={out}", "num_samples=2",
                     "steps=2", "task=v2a", "shift=3", cache=tmp_path / "cache"))
    result = json.loads((out / "metrics.json").read_text())
    assert [r["step"] for r in result["checkpoints"]] == [3]  # last.ckpt and step=3.ckpt are one step
    assert {"fd_mel", "val/loss_video", "val/loss_audio", "sync/clips"} <= set(result["metrics"])
    assert result["protocol"]["task"] == "v2a" and result["protocol"]["sampler"]["shift"] == 3
    report = (out / "report.md").read_text()
    assert "## Over training steps" in report and (out / "plots" / "val_loss.png").is_file()
    assert "checkpoints in" in proc.stdout


@pytest.mark.parametrize("stage, keys", [("video_vae", {"recon/psnr", "recon/ssim"}),
                                         ("audio_vae", {"recon/mel_distance", "recon/si_sdr_db", "fd_mel"})])
def test_autoencoder_checkpoints_get_reconstruction_metrics(demo, tmp_path, stage, keys):
    run, _ = demo
    _ok(_eval(f"ckpt={run / stage / 'checkpoints' / 'last.ckpt'}", f"data={run / 'heldout'}", f"out={tmp_path}",
              "num_samples=2", cache=tmp_path / "cache"))
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert keys <= set(metrics), metrics
    assert all(np.isfinite(metrics[k]) for k in keys)
    if stage == "video_vae":
        assert 0 < metrics["recon/psnr"] < 60 and -1 <= metrics["recon/ssim"] <= 1


def test_fvd_and_kvd_through_an_i3d_weights_file(demo, tmp_path):
    """The FVD path end to end with a randomly initialised I3D in the converter's file format (the real
    weights' parity is tests/test_i3d.py's): samples = references give ~0, the real baseline more."""
    run, _ = demo
    torch.manual_seed(0)
    weights = tmp_path / "i3d.safetensors"
    save_file({k: v.contiguous() for k, v in InceptionI3d().state_dict().items()}, str(weights))
    refs = reference_clips(run / "heldout", TL, (32, 32), 3)
    _ok(_eval(f"samples={_write(refs, tmp_path / 'same')}", f"data={run / 'heldout'}", f"out={tmp_path / 'out'}",
              "num_samples=3", f"i3d_weights={weights}", *SAMPLES_TL, cache=tmp_path / "cache"))
    result = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert {"fvd", "kvd", "kvd_std"} <= set(result["metrics"]) and "fvd" in result["baselines"]["real"]
    assert result["metrics"]["fvd"] < result["baselines"]["real"]["fvd"]
    assert len(result["protocol"]["extractors"]["video"]["weights_sha256"]) == 64


def test_bad_inputs_fail_in_one_line(demo, tmp_path):
    run, _ = demo
    cases = [((f"data={run / 'heldout'}",), "give ckpt=PATH"),
             ((f"ckpt={tmp_path / 'nope.ckpt'}", f"data={run / 'heldout'}"), "no such file or folder"),
             ((f"ckpt={run / 'dit' / 'checkpoints' / 'last.ckpt'}", f"data={tmp_path / 'nothing'}"), "data="),
             ((f"samples={tmp_path}", f"data={run / 'heldout'}"), "no video files"),
             ((f"ckpt={run / 'preview.json'}", f"data={run / 'heldout'}"), "preview.json: truncated, corrupt or not a torch checkpoint")]
    for args, message in cases:
        proc = _eval(*args, f"out={tmp_path / 'out'}", cache=tmp_path / "cache")
        assert proc.returncode != 0
        lines = proc.stderr.strip().splitlines()
        assert lines and message in lines[-1] and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_real_baseline_is_other_clips_never_the_references_again(demo, tmp_path):
    """With fewer held-out clips than 2 x num_samples the real baseline is the clips that remain (labelled),
    never the references' own windows again (they were byte-identical: fd_mel 0 against 0)."""
    from sora.evaluation.evaluator import Extractors
    from sora.evaluation.protocol import Evaluation

    run, _ = demo
    evaluation = Evaluation(str(run / "heldout"), TL, (32, 32), Extractors(), num_samples=5,
                            progress=False)  # 8 clips: 5 references, 3 real
    assert len(evaluation.refs) == 5 and len(evaluation.real) == 3
    assert not {c.key for c in evaluation.refs} & {c.key for c in evaluation.real}
    assert not any(np.array_equal(r.frames, c.frames) for r in evaluation.refs for c in evaluation.real)
    assert "only 3" in evaluation.protocol["real_baseline_source"]
    proc = _eval(f"samples={_write(evaluation.refs, tmp_path / 'refs')}", f"data={run / 'heldout'}",
                 f"out={tmp_path / 'out'}", "num_samples=7", *SAMPLES_TL, cache=tmp_path / "cache")
    assert proc.returncode != 0 and "give at least 9 clips" in proc.stderr.strip().splitlines()[-1], proc.stderr


def test_checkpoint_files_a_run_writes_pass_unquoted_to_every_cli(demo, tmp_path):
    """``step=3.ckpt`` (as the run names it) typed unquoted to sora-eval, sora-sample and ``ckpt_path=``, and a
    prompt with a comma unquoted: Hydra's grammar refuses both ('=' and ', ' in a value) unless quoted."""
    run, _ = demo
    step3 = run / "dit" / "checkpoints" / "step=3.ckpt"
    assert step3.is_file()
    _ok(_eval(f"ckpt={step3}", f"data={run / 'heldout'}", f"out={tmp_path / 'eval'}", "num_samples=2", "steps=2",
              "task=v2a", cache=tmp_path / "cache"))
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["what"].endswith("step=3.ckpt (step 3)")
    out = tmp_path / "two_balls.mp4"
    _ok(run_cli("-m", "sora.cli.sample", f"ckpt={step3}", "prompt=two balls, a blue one and a yellow one",
                "seconds=1", "steps=2", f"out={out}"))
    assert out.stat().st_size > 0
    overrides = [o for o in yaml.safe_load((run / "dit" / ".hydra" / "overrides.yaml").read_text())
                 if not o.startswith(("trainer.max_steps=", "ckpt_path="))]
    resumed = tmp_path / "resumed"
    _ok(run_cli("-m", "sora.cli.train", *overrides, f"hydra.run.dir={resumed}", "trainer.max_steps=4",
                f"ckpt_path={step3}"))
    assert torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 4
