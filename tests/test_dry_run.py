"""The dry run (sora/training/dry_run.py): its memory accounting against the same step on real tensors,
known answers, sharding, the largest batch, and ``sora-train ... dry_run=...`` end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from sora.cli.overrides import CONFIGS
from sora.training import dry_run as D
from sora.training.callbacks import EMA

REPO = Path(__file__).resolve().parents[1]
MIB = 2 ** 20


def config(*overrides):
    with initialize_config_dir(CONFIGS, version_base="1.3"):
        return compose("train", overrides=list(overrides))


def seeded_builder(cfg):
    def build():
        torch.manual_seed(0)
        return instantiate(D.model_config(cfg))
    return build


class Square(L.LightningModule):
    """One bias-free linear layer, loss mean(y^2): every byte of its step can be counted by hand."""

    def __init__(self, n: int = 512):
        super().__init__()
        self.lin = torch.nn.Linear(n, n, bias=False)

    def training_step(self, batch, batch_idx):
        return self.lin(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def square_step(plan, batch=64, n=512):
    with D.simulation(lambda: Square(n), plan, fake=False) as (module, tracker):
        return D.simulate_step(module, torch.randn(batch, n), plan, tracker)


def test_known_answer_single_device_and_sharded():
    """Weights, gradients, EMA: n*n*4 bytes each; AdamW's states twice that and its float32 step. The
    peak is AdamW's update, where ``exp_avg_sq.sqrt() / bias_correction2_sqrt`` holds two temporaries
    of a weight's size while the batch is alive. FSDP on 4 ranks: a quarter of the first four, plus
    two gathered blocks (here the whole layer)."""
    n, batch = 512, 64
    weight = n * n * 4
    got = square_step(D.Plan(ema=EMA), batch, n)
    at = got["at_peak"]
    assert at["weights"] == at["gradients"] == at["ema"] == weight and at["optimizer"] == 2 * weight + 4
    assert at["activations"] == 2 * weight + batch * n * 4 and got["peak"] == sum(at.values())
    factors, gathered = D.sharding("fsdp", 4)
    sharded = square_step(D.Plan(ema=EMA, factors=factors, gathered_blocks=gathered), batch, n)
    expected = sum(v * factors.get(k, 1.0) for k, v in at.items()) + 2 * weight
    assert sharded["peak"] == pytest.approx(expected) and sharded["peak"] < 0.8 * got["peak"]


def test_sharding_rules():
    assert D.sharding("single", 8) == ({}, 0)
    assert D.sharding("ddp", 8) == ({"gradients": 2.0}, 0)
    assert D.sharding("ddp", 1) == ({}, 0)
    assert D.sharding("deepspeed", 4, stage=2) == ({"optimizer": 0.25, "gradients": 0.25}, 0)
    f, gathered = D.sharding("deepspeed", 4, stage=3, offload_optimizer=True)
    assert f == {"optimizer": 0.0, "gradients": 0.25, "weights": 0.25, "frozen": 0.25, "ema": 0.25} and gathered == 2
    assert D.sharding("fsdp", 8)[0] == dict.fromkeys(("weights", "gradients", "optimizer", "ema"), 0.125)


def test_config_reading():
    assert D.strategy_of(config("strategy=fsdp", "trainer.devices=8"))[:2] == ("fsdp", 8)
    assert D.strategy_of(config("strategy=deepspeed_stage_3", "trainer.devices=2", "trainer.num_nodes=2")) == (
        "deepspeed", 4, {"stage": 3, "offload_optimizer": False, "offload_parameters": False})
    assert D.strategy_of(config())[:2] == ("single", 1)
    assert D.options(config().dry_run) is None and D.options(True) == D.Options()
    opts = D.options(config("dry_run.memory_gb=40", "dry_run.sizes=[[64,96]]").dry_run)
    assert (opts.memory_gb, opts.sizes, opts.headroom) == (40, [[64, 96]], 0.1)
    with pytest.raises(ValueError, match="trainer.precision=64"):
        D.plan_of(config("trainer.precision=64"))
    assert D.frame_sizes(config("data=shards", "data.train.size=null", "+data.train.buckets={area: 4096, "
                                "ratios: ['16:9', '1:1'], multiple: 16}").data) == [(48, 80), (64, 64)]


def test_largest_batch_search():
    calls = []

    def linear(b):
        calls.append(b)
        return 10 + 3 * b

    assert D.largest_batch(linear, 100) == 30 and len(set(calls)) <= 4  # the line is found at once
    assert D.largest_batch(lambda b: 10 + b * b, 100) == 9               # not linear: checked and bisected
    assert D.largest_batch(lambda b: 200 + b, 100) == 0
    assert D.largest_batch(lambda b: 1.0, 100, cap=64) == 64


def test_dit_step_on_fake_tensors_counts_what_real_tensors_hold():
    """The same seeded DiT step on fake and on real tensors: the same bytes, category by category,
    at the peak; bf16 autocast shrinks the activations and nothing else; FLOPs counted on fake tensors."""
    cfg = config("experiment=quickstart/dit")
    plan, timeline = D.plan_of(cfg), instantiate(cfg.timeline)
    results = {}
    for fake in (True, False):
        with D.simulation(seeded_builder(cfg), plan, fake=fake) as (module, tracker):
            results[fake] = D.simulate_step(module, D.clip_batch(timeline, 64, 64, 2), plan, tracker, count_flops=fake)
            if fake:
                analytic = 2 * D.analytic_flops(cfg, module._tokens, timeline, 64, 64)
                bf16 = D.simulate_step(module, D.clip_batch(timeline, 64, 64, 2), replace(plan, precision="bf16-mixed"),
                                       tracker)
    assert results[True]["at_peak"] == results[False]["at_peak"] and results[True]["peak"] > 10 * MIB
    # the counted step (DiT, text encoder, frozen encoders; CPU attention kernels included) against
    # sora.models.flops' DiT and video encoder: a few percent more, never less
    assert analytic <= results[True]["flops"] <= 1.15 * analytic
    fp32 = results[True]["at_peak"]
    assert bf16["at_peak"]["activations"] < 0.9 * fp32["activations"]
    assert {k: v for k, v in bf16["at_peak"].items() if k != "activations"} == {
        k: v for k, v in fp32.items() if k != "activations"}


def test_sora_train_dry_run(tmp_path):
    """``sora-train ... dry_run.memory_gb=..``: a row per bucket, the real parameter count, exit 0 and
    no training (no checkpoint); the largest batch fits the budget and one more does not."""
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "sora.cli.train", "experiment=quickstart/video_vae",
                           "dry_run.memory_gb=0.05", "dry_run.headroom=0", "dry_run.sizes=[[32,48]]",
                           f"hydra.run.dir={run}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    cfg = config("experiment=quickstart/video_vae")
    params = sum(p.numel() for p in instantiate(D.model_config(cfg)).parameters())
    assert f"parameters {params:,} ({params:,} trainable, 0 frozen)" in proc.stdout
    row = next(line.split() for line in proc.stdout.splitlines() if line.strip().startswith("32x48"))
    largest = int(row[-1])
    assert largest > 1 and not (run / "checkpoints").exists()
    plan, timeline = D.plan_of(cfg), instantiate(cfg.timeline)
    with D.simulation(seeded_builder(cfg), plan) as (module, tracker):
        peaks = [D.simulate_step(module, D.clip_batch(timeline, 32, 48, b), plan, tracker)["peak"]
                 for b in (largest, largest + 1)]
    assert peaks[0] <= 0.05 * 2 ** 30 < peaks[1]
