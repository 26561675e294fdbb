"""Every ``strategy=`` on 2 CPU processes (gloo), through the real ``sora-train`` CLI on the tiny DiT
(``experiment=quickstart/dit`` with random frozen VAEs): 3 steps with a checkpoint at every step
(Lightning updates last.ckpt only with those) and validation + in-training samples at step 3; a
resume from the step-2 checkpoint that must end on exactly the same weights, EMA and stream
positions (optimizer state, RNG and data restored); the checkpoint exported to safetensors and
sampled with ``sora-sample``. Each sharded strategy must reach the DDP run's weights, EMA and
validation loss (the EMA is averaged on ZeRO-3 / FSDP2 shards and gathered on save). Resume
across world sizes: 2 -> 1 and 1 -> 2 processes (DeepSpeed: refused in one line).

Lightning starts the second rank by re-running the command, so every run is a subprocess.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sora.cli.overrides import CONFIGS
from sora.checkpoints.export import checkpoint_kind, read_export, read_training_checkpoint
from tests.conftest import SMALL_DIT, once

REPO = Path(__file__).resolve().parents[1]
TINY = ["experiment=quickstart/dit", "model.video_vae_ckpt=null", "model.audio_vae_ckpt=null", *SMALL_DIT, "data.num_workers=0",
        "data.train.batch_size=2", "data.val.batch_size=2", "trainer.max_steps=3", "trainer.val_check_interval=3",
        "trainer.limit_val_batches=1", "callbacks.model_checkpoint.every_n_train_steps=1", "model.warmup_steps=0",
        "model.lr=5.0e-4",  # the lr these 1e-6 equalities were set at (Adam turns float-order noise into lr-sized steps)
        "model.optimizer=adamw",  # the one every strategy runs (sharded ones cannot run Muon): DDP is their reference
        "callbacks.ema.warmup=false", "callbacks.ema.decay=0.5", "callbacks.samples.every_n_steps=3",
        "callbacks.samples.steps=2", "callbacks.samples.prompts=[a ball]", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1"]
# ZeRO-3: weights under 2000 elements stay gathered (persistent), larger ones partitioned: both EMA paths
EXTRA = {"deepspeed_stage_3": ["+strategy.zero_options.stage3_param_persistence_threshold=2000"]}
# ZeRO-3 runs the DeepSpeed strategy, checkpoint folders and export that ZeRO-2 uses (and more):
# stage 2 and the offload variant are in `make test-all` only
STRATEGIES = ["ddp", pytest.param("deepspeed_stage_2", marks=pytest.mark.slow), "deepspeed_stage_3",
              pytest.param("deepspeed_stage_3_offload", marks=pytest.mark.slow), "fsdp"]


def train(run_dir: Path, *overrides: str, devices: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONWARNINGS="ignore", DS_ACCELERATOR="cpu")
    proc = subprocess.run([sys.executable, "-m", "sora.cli.train", f"hydra.run.dir={run_dir}", *TINY,
                           f"trainer.devices={devices}", *overrides], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def ckpt_arg(path: Path) -> str:
    return f"ckpt_path='{path}'"  # quoted: the file names hold '='


def metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "csv" / "version_0" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def positions(ckpt: dict) -> list[list[int]]:
    """Each rank's stream position (epoch, batches) in a checkpoint."""
    state = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    return [[r["dataset_state"]["epoch"], r["dataset_state"]["batches"]] for r in state["ranks"]]


def assert_same(a: dict, b: dict, atol: float = 0.0, what: str = "") -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        if atol:
            torch.testing.assert_close(a[k].float(), b[k].float(), rtol=0, atol=atol, msg=f"{what} {k}")
        else:
            assert torch.equal(a[k], b[k]), f"{what} {k}"


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """``runs(strategy)``: the run dir of a 2-process run of that strategy, made once per test session (under
    pytest-xdist once for all workers); the tests only read it."""

    def run_of(strategy: str) -> Path:
        def make(run: Path) -> None:
            train(run, f"strategy={strategy}", *EXTRA.get(strategy, []))

        return once(tmp_path_factory, f"strategies-{strategy}", make)[0]

    return run_of


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_trains_resumes_exports_and_samples(strategy, runs, tmp_path):
    run, ddp_run = runs(strategy), runs("ddp")
    last = run / "checkpoints" / "last.ckpt"
    kind = {"ddp": "lightning", "fsdp": "distributed"}.get(strategy, "deepspeed")
    assert checkpoint_kind(last) == kind
    if kind == "deepspeed":  # per-rank shards of the optimizer (ZeRO-2) and of the weights too (ZeRO-3)
        assert len(list((last / "checkpoint").glob("*optim_states.pt"))) == 2
        assert len(list((last / "checkpoint").glob("zero_pp_rank_*_model_states.pt"))) == (
            2 if "stage_3" in strategy else 0)
    if kind == "distributed":
        assert len(list(last.glob("*.distcp"))) == 2
    full = read_training_checkpoint(last)
    assert full["global_step"] == 3 and full["callbacks"]["EMA"]["num_updates"] == 3
    assert positions(full) == [[0, 3], [0, 3]]
    assert (run / "samples" / "step=3-0.mp4").is_file()  # every rank took part in sampling sharded weights
    val = [float(r["val/loss"]) for r in metrics(run) if r.get("val/loss")]
    assert len(val) == 1

    # the same weights and EMA as DDP: sharded optimizer steps, and the EMA averaged on shards
    ref = read_training_checkpoint(ddp_run / "checkpoints" / "last.ckpt")
    assert_same(full["state_dict"], ref["state_dict"], atol=1e-6, what="weights")
    ema, weights = full["callbacks"]["EMA"]["shadow"], full["state_dict"]
    assert_same(ema, ref["callbacks"]["EMA"]["shadow"], atol=1e-6, what="EMA")
    assert max((ema[k] - weights[k]).abs().max() for k in ema) > 1e-4  # a real average, not a copy
    ref_val = [float(r["val/loss"]) for r in metrics(ddp_run) if r.get("val/loss")]
    assert val == pytest.approx(ref_val, rel=1e-5)  # validated on the EMA weights, swapped in and out

    # resume from step 2 in a new run: continues to the very same step-3 state
    resumed = tmp_path / "resumed"
    train(resumed, f"strategy={strategy}", *EXTRA.get(strategy, []), ckpt_arg(run / "checkpoints" / "step=2.ckpt"))
    assert [int(r["step"]) for r in metrics(resumed) if r.get("train/loss")] == [2]
    again = read_training_checkpoint(resumed / "checkpoints" / "last.ckpt")
    assert again["global_step"] == 3 and positions(again) == positions(full)
    assert_same(again["state_dict"], full["state_dict"], what="resumed weights")
    assert_same(again["callbacks"]["EMA"]["shadow"], ema, what="resumed EMA")

    # export -> one safetensors file -> sora-sample
    out = tmp_path / "model.safetensors"
    proc = subprocess.run([sys.executable, "tools/export_checkpoint.py", str(last), str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"({kind}, step 3)" in proc.stdout
    exported = read_export(out)
    assert_same(exported["state_dict"], weights, what="exported weights")
    assert_same(exported["callbacks"]["EMA"]["shadow"], ema, what="exported EMA")
    assert exported["sora_config"] == full["sora_config"]
    mp4 = tmp_path / "sample.mp4"
    proc = subprocess.run([sys.executable, "-m", "sora.cli.sample", f"ckpt={out}", "prompt=a ball", "seconds=1",
                           "steps=2", f"out={mp4}"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    from sora.media import probe_av

    info = probe_av(str(mp4))
    assert info.has_audio and (info.height, info.width) == (32, 32)
    # the training checkpoint itself (a file, or a DeepSpeed / FSDP2 folder), no export step: the same clip
    from sora.inference import AVPipeline

    direct, exported = (AVPipeline.from_checkpoint(str(c), seconds=1.0).generate("a ball", steps=2, seed=0)
                        for c in (last, out))
    assert np.array_equal(direct.frames, exported.frames) and np.array_equal(direct.audio, exported.audio)


def optimizer_steps(checkpoint: Path) -> set[int]:
    """Adam's step count of every weight in a checkpoint's optimizer state (any strategy's file/folder)."""
    if checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)["optimizer_states"][0]["state"]
    else:  # a distributed checkpoint folder: just its optimizer
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

        loaded: dict = {}
        _load_state_dict(loaded, storage_reader=FileSystemReader(str(checkpoint)),
                         planner=_EmptyStateDictLoadPlanner(keys={"optimizer_0"}), no_dist=True)
        state = loaded["optimizer_0"]["state"]
    return {int(s["step"]) for s in state.values()}


# ddp resumes a plain .ckpt with the same reshard and RNG paths as fsdp's folder: in `make test-all` only
@pytest.mark.parametrize("strategy", [pytest.param("ddp", marks=pytest.mark.slow), "fsdp"])
def test_resume_across_world_sizes(strategy, runs, tmp_path):
    """2 -> 1 and 1 -> 2 processes: weights, optimizer (Adam's step count goes on) and EMA come back
    at the new size, and the data stream reshards: the batches consumed so far (2 ranks x 2) are
    split over the new ranks."""
    two = runs(strategy)
    one = tmp_path / "one"
    proc = train(one, f"strategy={strategy}", ckpt_arg(two / "checkpoints" / "step=2.ckpt"), devices=1)
    assert "resharded, every worker starts at epoch 0 after 4 batches" in proc.stdout + proc.stderr
    ckpt = read_training_checkpoint(one / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 3 and ckpt["callbacks"]["EMA"]["num_updates"] == 3
    assert positions(ckpt) == [[0, 5]]  # 4 consumed by the two ranks, then one more step
    assert optimizer_steps(one / "checkpoints" / "last.ckpt") == {3}

    # 1 -> 2: that one-process run's 5 batches go on as 2 on each of 2 ranks
    back = tmp_path / "back"
    proc = train(back, f"strategy={strategy}", ckpt_arg(one / "checkpoints" / "last.ckpt"), "trainer.max_steps=4")
    assert "resharded, every worker starts at epoch 0 after 2 batches" in proc.stdout + proc.stderr
    ckpt = read_training_checkpoint(back / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4 and ckpt["callbacks"]["EMA"]["num_updates"] == 4
    assert positions(ckpt) == [[0, 3], [0, 3]]
    assert optimizer_steps(back / "checkpoints" / "last.ckpt") == {4}


def test_deepspeed_refuses_another_world_size_in_one_line(runs, tmp_path):
    two = runs("deepspeed_stage_3")  # the run the default suite makes anyway (stage 2: the same check)
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "sora.cli.train", f"hydra.run.dir={tmp_path / 'one'}", *TINY,
                           "trainer.devices=1", "strategy=deepspeed_stage_3",
                           ckpt_arg(two / "checkpoints" / "step=2.ckpt")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("sora-train: ckpt_path=") and "written by 2 ranks cannot resume on 1" in last
    assert "Traceback" not in proc.stderr


# -- fast checks of the pieces ---------------------------------------------------------------------
def test_strategy_configs_build_their_strategies():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import DDPStrategy

    from sora.training.strategies import FSDP2, DeepSpeed

    expected = {"ddp": (DDPStrategy, None), "deepspeed_stage_2": (DeepSpeed, 2), "deepspeed_stage_3": (DeepSpeed, 3),
                "deepspeed_stage_3_offload": (DeepSpeed, 3), "fsdp": (FSDP2, None)}
    with initialize_config_dir(CONFIGS, version_base="1.3"):
        assert compose("train").get("strategy") is None  # no strategy=: the trainer's own (auto)
        for name, (cls, stage) in expected.items():
            strategy = instantiate(compose("train", overrides=[f"strategy={name}"]).strategy)
            assert isinstance(strategy, cls), name
            if stage is not None:
                zero = strategy.config["zero_optimization"]
                assert zero["stage"] == stage
                assert ("offload_param" in zero) == name.endswith("offload")


def test_fsdp_refuses_a_module_that_does_not_shard_itself():
    from sora.training.autoencoders import VideoVAEModule
    from sora.training.strategies import FSDP2

    strategy = FSDP2()
    strategy._lightning_module = VideoVAEModule.__new__(VideoVAEModule)
    with pytest.raises(TypeError, match="strategy=fsdp: VideoVAEModule does not shard itself"):
        strategy.setup(None)


def test_reshard_position_splits_the_consumed_batches():
    from sora.data.datamodule import reshard_position

    assert reshard_position([(0, 2), (0, 2)], 1) == (0, 4)
    assert reshard_position([(0, 2), (0, 2)], 4) == (0, 1)
    assert reshard_position([(3, 5)], 2) == (3, 2)  # rounded down: a clip may repeat, none is skipped
    # a worker already in the next epoch counts as having consumed as much as the furthest one left
    assert reshard_position([(1, 0), (0, 5), (0, 3)], 2) == (0, 6)


def test_zero_checkpoint_of_another_world_size_is_refused(tmp_path):
    from sora.training.strategies import check_zero_world_size

    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "latest").write_text("checkpoint")
    for r in range(2):
        (tmp_path / "checkpoint" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").touch()
    check_zero_world_size(tmp_path, 2)
    check_zero_world_size(tmp_path / "not-a-deepspeed-folder", 1)
    from sora.checkpoints.io import CheckpointError

    with pytest.raises(CheckpointError, match=r"written by 2 ranks cannot resume on 4: .*trainer.devices x "):
        check_zero_world_size(tmp_path, 4)


def test_export_file_round_trip_and_clear_errors(tmp_path):
    from safetensors.torch import save_file

    from sora.cli.sample import read_checkpoint
    from sora.checkpoints.export import ExportError, write_export

    state = {"dit.w": torch.randn(3, 4), "dit.b": torch.randn(4), "video_latent_stats": torch.tensor([0.1, 2.0])}
    ema = {"dit.w": torch.randn(3, 4), "dit.b": torch.randn(4)}
    config = {"model": {"_target_": "sora.training.dit.DiTModule"}, "timeline": {"seconds": 1.0}}
    out = tmp_path / "m.safetensors"
    summary = write_export(out, {"state_dict": state, "callbacks": {"EMA": {"shadow": ema}}, "sora_config": config,
                                 "global_step": 7}, source="lightning")
    assert summary["tensors"] == 3 and summary["ema"] == 2 and summary["global_step"] == 7
    back = read_checkpoint(str(out))  # sora-sample's reader: safetensors + JSON, nothing unpickled
    assert back["sora_config"] == config and back["global_step"] == 7
    assert_same(back["state_dict"], state)
    assert_same(back["callbacks"]["EMA"]["shadow"], ema)
    from sora.cli.eval import load_checkpoint  # sora-eval's reader: the same dict

    assert_same(load_checkpoint(out)["state_dict"], state)

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(SystemExit, match="not a sora export"):
        read_checkpoint(str(tmp_path / "other.safetensors"))
    with pytest.raises(ExportError, match="no sora_config"):
        write_export(tmp_path / "x.safetensors", {"state_dict": state})
    with pytest.raises(ExportError, match="neither a DeepSpeed checkpoint"):
        checkpoint_kind(tmp_path)


def test_sample_refuses_a_folder_that_is_no_checkpoint_in_one_line(tmp_path):
    from omegaconf import OmegaConf

    from sora.cli.sample import sample

    with pytest.raises(SystemExit, match="sora-sample: .*neither a DeepSpeed checkpoint .* nor a torch distributed"):
        sample(OmegaConf.create({"ckpt": str(tmp_path), "video": None, "audio": None, "prompts": None, "prompt": "a",
                                 "out": None, "device": "cpu", "seconds": None}))
