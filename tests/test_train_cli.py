"""`sora-train` end to end in subprocesses: the quickstart experiments train, write last.ckpt and CSV
metrics, resume exactly from ``ckpt_path=last``; the DiT trains on the VAEs' checkpoints; bad configs
fail in one line."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sora.cli.overrides import check_overrides, quote_values
from tests.conftest import once

REPO = Path(__file__).resolve().parents[1]
FAST = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1"]


def _train(run_dir: Path, *overrides, env=None):
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONWARNINGS="ignore", **(env or {}))
    return subprocess.run([sys.executable, "-m", "sora.cli.train", f"hydra.run.dir={run_dir}", *FAST, *overrides],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _metrics(run_dir: Path, version: int = 0) -> list[dict]:
    with open(run_dir / "csv" / f"version_{version}" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _ckpt(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def _stream_batches(ckpt: dict) -> int:
    """Batches the train stream has handed out, over all its workers, at this checkpoint."""
    rank = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["ranks"][0]
    workers = rank.get("_snapshot", {}).get("_worker_snapshots")
    states = [w["dataset_state"] for w in workers.values()] if workers else [rank["dataset_state"]]
    return sum(s["batches"] for s in states)


@pytest.fixture(scope="module")
def vae_runs(tmp_path_factory):
    """3 steps of each quickstart autoencoder (validation after step 2; its checkpoint kept as step3.ckpt), then
    resumed to step 5. Made once per session, shared by pytest-xdist's workers."""

    def make(root: Path) -> dict:
        stdout = {}
        for name in ("video_vae", "audio_vae"):
            run, workers = root / name, "data.num_workers=2" if name == "video_vae" else "data.num_workers=0"
            stdout[name] = _ok(_train(run, f"experiment=quickstart/{name}", "trainer.max_steps=3",
                                      "trainer.val_check_interval=2", workers)).stdout
            shutil.copy(run / "checkpoints" / "last.ckpt", root / f"{name}-step3.ckpt")
            _ok(_train(run, f"experiment=quickstart/{name}", "trainer.max_steps=5", "ckpt_path=last", workers))
        return stdout

    root, stdout = once(tmp_path_factory, "train-cli-vaes", make)
    first = {name: (out, torch.load(root / f"{name}-step3.ckpt", map_location="cpu", weights_only=True))
             for name, out in stdout.items()}
    return {name: root / name for name in stdout}, first


@pytest.mark.parametrize("name, val_metric", [("video_vae", "val/psnr"), ("audio_vae", "val/mel_l1")])
def test_quickstart_autoencoder_trains_and_resumes(vae_runs, name, val_metric):
    runs, first = vae_runs
    run, (stdout, ckpt3) = runs[name], first[name]
    assert "sora-train: step 3" in stdout
    assert ckpt3["global_step"] == 3 and _stream_batches(ckpt3) == 3
    rows = _metrics(run, 0)
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 3 and all(l > 0 for l in losses)
    assert any(r.get(val_metric) for r in rows), f"no {val_metric} in {list(rows[0])}"
    assert any(r.get("perf/samples_per_s") for r in rows)

    ckpt5 = _ckpt(run)
    assert ckpt5["global_step"] == 5
    assert _stream_batches(ckpt5) == 5  # the stream went on from where the first run stopped
    assert ckpt5["callbacks"]["EMA"]["num_updates"] == 5
    assert ckpt5["lr_schedulers"][0]["last_epoch"] == 5
    assert ckpt5["sora_config"]["model"]["_target_"].endswith("VAEModule")
    resumed = [r for r in _metrics(run, 1) if r.get("train/loss")]
    assert [int(r["step"]) for r in resumed] == [3, 4]
    changed = [k for k, v in ckpt5["state_dict"].items() if not torch.equal(v, ckpt3["state_dict"][k])]
    assert changed  # the resumed run kept training the same weights


def test_dit_trains_on_the_vae_checkpoints_and_resumes(vae_runs, tmp_path):
    runs, _ = vae_runs
    args = ["experiment=quickstart/dit", "data.num_workers=0", "trainer.val_check_interval=2",
            "callbacks.samples.every_n_steps=2", "callbacks.samples.steps=2",
            f"model.video_vae_ckpt={runs['video_vae'] / 'checkpoints' / 'last.ckpt'}",
            f"model.audio_vae_ckpt={runs['audio_vae'] / 'checkpoints' / 'last.ckpt'}"]
    run = tmp_path / "dit"
    _ok(_train(run, *args, "trainer.max_steps=3"))
    rows = _metrics(run, 0)
    for key in ("train/loss_video", "train/loss_audio", "val/loss_video", "val/loss_audio_t0.50"):
        assert any(r.get(key) for r in rows), f"no {key} in {list(rows[0])}"
    samples = sorted(p.name for p in (run / "samples").glob("*.mp4"))
    assert samples == ["step=2-0.mp4", "step=2-1.mp4"]  # validation at step 2 wrote one per prompt
    ckpt3 = _ckpt(run)
    vae = _ckpt(runs["video_vae"])
    # the frozen VAE inside the DiT checkpoint is the EMA of the VAE run
    assert torch.equal(ckpt3["state_dict"]["video_vae.encoder.stem.weight"],
                       vae["callbacks"]["EMA"]["shadow"]["vae.encoder.stem.weight"])
    stats = ckpt3["state_dict"]["audio_latent_stats"]
    assert torch.isfinite(stats).all() and stats[1] > 0
    _ok(_train(run, *args, "trainer.max_steps=5", "ckpt_path=last"))
    ckpt5 = _ckpt(run)
    assert ckpt5["global_step"] == 5 and _stream_batches(ckpt5) == 5
    assert torch.equal(ckpt5["state_dict"]["audio_latent_stats"], stats)  # measured once, kept on resume
    # exact resume: 3 + 2 steps give the weights of 5 steps in one go (data, RNG, optimizer, EMA)
    straight = tmp_path / "straight"
    _ok(_train(straight, *args, "trainer.max_steps=5"))
    once = _ckpt(straight)
    for key, value in once["state_dict"].items():
        assert torch.equal(value, ckpt5["state_dict"][key]), key
    for key, value in once["callbacks"]["EMA"]["shadow"].items():
        assert torch.equal(value, ckpt5["callbacks"]["EMA"]["shadow"][key]), key


def test_bad_config_fails_in_one_line_naming_the_key(tmp_path):
    proc = _train(tmp_path / "a", "experiment=quickstart/video_vae", "trainer.max_stepz=3")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "no key trainer.max_stepz; did you mean trainer.max_steps?" in proc.stderr
    # a key the constructor does not take: one line naming the config part and the key
    from omegaconf import OmegaConf

    from sora.cli.train import build

    with pytest.raises(SystemExit) as e:
        build(OmegaConf.create({"_target_": "sora.training.optim.lr_factor", "step": 0, "warmup_stpes": 3}), "model")
    assert str(e.value).startswith("sora-train: error in model: TypeError:") and "warmup_stpes" in str(e.value)
    assert "\n" not in str(e.value)
    proc = _train(tmp_path / "c", "experiment=quickstart/video_vae", "ckpt_path=last")
    assert proc.returncode != 0 and "no checkpoint at" in proc.stderr.strip().splitlines()[-1]


def test_tensorboard_logger_writes_events(tmp_path):
    _ok(_train(tmp_path / "tb", "experiment=quickstart/video_vae", "logger=tensorboard", "trainer.max_steps=2"))
    assert list((tmp_path / "tb" / "tensorboard").rglob("events.out.tfevents.*"))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(list("ab/._-= ,0")), min_size=1, max_size=30).map("".join))
def test_quote_values_makes_hydra_read_the_value_as_typed(value):
    """Whatever quote_values quotes, Hydra's override parser reads back as the typed text; what it leaves
    alone is unchanged (Hydra syntax, or values Hydra reads as they are)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    arg = f"ckpt={value}"
    (quoted,) = quote_values([arg])
    if quoted == arg:
        assert "=" not in value and "," not in value
        return
    assert OverridesParser.create().parse_overrides([quoted])[0].value() == value


def test_quote_values_leaves_hydra_syntax_and_sweeps_alone():
    kept = ["size=[32, 32]", "prompt='a, b'", "x=${a.b}", "model.lr=choice(1e-3, 3e-3)", "ckpt_path=last", "--cfg"]
    assert quote_values(kept) == kept
    assert quote_values(["-m", "model.lr=1e-3, 3e-3"]) == ["-m", "model.lr=1e-3, 3e-3"]  # a sweep
    assert quote_values(["prompt=two balls, a blue one", "ckpt=run/step=4.ckpt"]) == [
        "prompt='two balls, a blue one'", "ckpt='run/step=4.ckpt'"]


@pytest.mark.parametrize("args, config, says", [
    (["trainer.max_step=50"], "train", "no key trainer.max_step; did you mean trainer.max_steps? (a new key: +trainer.max_step=50)"),
    (["experiment=quickstart/video_vae", "model.lrr=3"], "train", "no key model.lrr; did you mean model.lr?"),
    (["traner.max_steps=3"], "train", "did you mean trainer.max_steps?"),
    (["foo=3"], "train", "no key foo; no existing key is close to it (a new key: +foo=3)"),
    (["promt=hi"], "sample", "no key promt; did you mean prompt or prompts?"),
    (["experiment=quickstart/dti"], "train", "no experiment 'quickstart/dti'; did you mean quickstart/dit? "
                                             "the experiment options: quickstart/audio_vae,"),
    (["strategy=deepspeed"], "train", "no strategy 'deepspeed'; did you mean deepspeed_stage_3? the strategy options: ddp,"),
])
def test_a_typo_names_the_closest_keys_or_the_options(args, config, says):
    """Hydra's own hint for an unknown key ("to append use +key") would add a useless key: the error names
    the keys that exist nearby, and an unknown group option lists the options."""
    with pytest.raises(SystemExit) as e:
        check_overrides(args, config=config, prog="sora-x")
    assert str(e.value).startswith("sora-x: error in the config: ") and says in str(e.value), str(e.value)
    assert "\n" not in str(e.value)
    assert check_overrides(["seed=1", "prompt=a, b"], config="sample") == ["seed=1", "prompt='a, b'"]


def test_help_lists_only_the_groups_each_command_composes():
    proc = subprocess.run([sys.executable, "-m", "sora.cli.train", "--help"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    groups = {line.split(":")[0] for line in proc.stdout.split("== Config (")[0].splitlines()[2:] if ":" in line}
    assert groups == {"timeline", "data", "model", "trainer", "logger", "callbacks", "strategy", "experiment",
                      "hparams_search"}, proc.stdout
    assert "strategy: ddp, deepspeed_stage_2" in proc.stdout and "\nseed: 0" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "sora.cli.demo", "--help"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0 and "preset: gpu, long" in proc.stdout and "strategy:" not in proc.stdout, proc.stdout
