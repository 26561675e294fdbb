"""The training step holds no host-device synchronisation between the logger's steps (issue 13).

:class:`sora.training.host_syncs.HostSyncs` (the CPU twin of ``torch.cuda.set_sync_debug_mode``) must see the
reads that synchronise on a GPU and nothing else; then ``sora-train`` of each quickstart stage (the DiT on
world clips and on a latent cache, with multi-shot clips; both autoencoders) runs under
:class:`SyncAudit`: the steps between two logging steps hold none, except reads of tensors that a GPU run
keeps on the host (listed below with the reason). ``tests/test_cuda.py`` checks the same on a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sora.data.pipeline import ClipBatch
from sora.models.text import ByteTextEncoder, WordTextEncoder, token_counts
from sora.training.host_syncs import HostSyncs

REPO = Path(__file__).resolve().parents[1]
# reads of host tensors in a GPU run too (where: qualname prefix -> why it is no device sync)
ON_THE_HOST = {
    "sora/diffusion/flow.py timesteps_for_tasks": "the clean masks are made on the host, read before they move",
    "sora/models/dit.py AVDiT.forward": "drops an all-true text mask on a CPU only (`not text_mask.is_cuda`)",
}


def test_host_syncs_sees_value_reads_and_data_dependent_sizes_only():
    x = torch.arange(6.0)
    with HostSyncs() as mode:
        y = (x * 2 + 1).softmax(0) @ x  # plain device work: nothing
        assert mode.seen == {}
        float(y), bool(x[0] > 0), int(x.sum()), x.max().item()
        x[x > 2], x.nonzero(), torch.masked_select(x, x > 1)
    ops = {k.split(":")[0]: n for k, n in mode.seen.items()}
    assert ops == {"_local_scalar_dense.default": 4, "index.Tensor": 1, "nonzero.default": 1,
                   "masked_select.default": 1}, mode.seen
    assert all("tests/test_host_syncs.py" in k for k in mode.seen), mode.seen  # named where they were asked for


@pytest.mark.parametrize("encoder", [ByteTextEncoder, WordTextEncoder])
def test_text_encoders_count_their_tokens_on_the_host(encoder):
    enc = encoder(dim=16, max_len=8, layers=1)
    captions = ["a red ball bounces on a gray floor, twice", "", "two balls", "x" * 40]
    _, mask = enc(captions)
    assert enc.token_counts(captions) == mask.sum(1).tolist() == token_counts(enc, captions, mask)


def test_audio_vae_leaves_silent_clips_out_on_the_host():
    from sora.models.audio_vae import AudioVAE
    from sora.training.autoencoders import AudioVAEModule

    b, n = 3, 1600
    batch = ClipBatch(video=torch.zeros(b, 3, 2, 8, 8), audio=torch.arange(b * n, dtype=torch.float32).reshape(b, 1, n),
                      audio_mask=torch.ones(b, n, dtype=torch.bool), has_audio=torch.tensor([True, False, True]),
                      captions=["a", "b", "c"], keys=["0", "1", "2"], start=torch.zeros(b, dtype=torch.float64),
                      fps=8.0, sample_rate=16000, meta=[{"i": 0}, {"i": 1}, {"i": 2}])
    module = AudioVAEModule(AudioVAE(channels=8, num_blocks=1))
    kept = module.on_before_batch_transfer(batch, 0)
    assert kept.keys == ["0", "2"] and kept.captions == ["a", "c"] and kept.meta == [{"i": 0}, {"i": 2}]
    assert torch.equal(kept.audio, batch.audio[[0, 2]]) and kept.video.shape[0] == 2 and kept.has_audio.all()
    silent = ClipBatch(**{**batch.__dict__, "has_audio": torch.zeros(b, dtype=torch.bool)})
    assert module.on_before_batch_transfer(silent, 0) is silent  # none with sound: the batch stays whole


def _audit(tmp_path: Path, *overrides: str) -> tuple[dict, set[int]]:
    out = tmp_path / "syncs.json"
    cmd = [sys.executable, "-m", "sora.cli.train", *overrides, "trainer.max_steps=10", "trainer.log_every_n_steps=4",
           "trainer.val_check_interval=1000", "trainer.enable_progress_bar=true",
           f"+callbacks.audit={{_target_: sora.training.host_syncs.SyncAudit, path: {out}}}",
           f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    steps = {int(s): c for s, c in report["steps"].items()}
    return steps, set(report["logging_steps"])


def _device_syncs(seen: dict) -> dict:
    def host(where):
        path, _, qualname = where.split(": ", 1)[1].partition(" ")
        return any(f"{path.split(':')[0]} {qualname}".startswith(k) for k in ON_THE_HOST)
    return {k: n for k, n in seen.items() if not host(k)}


STAGES = {
    "dit": ["experiment=quickstart/dit", "model.video_vae_ckpt=null", "model.audio_vae_ckpt=null",
            "data.train.clips=32", "data.num_workers=0"],
    "video_vae": ["experiment=quickstart/video_vae", "data.train.clips=32", "data.num_workers=0"],
    "audio_vae": ["experiment=quickstart/audio_vae", "data.train.clips=32", "data.num_workers=0"],
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_quickstart_training_steps_hold_no_device_sync_between_logging_steps(tmp_path, stage):
    steps, logging_steps = _audit(tmp_path, *STAGES[stage])
    assert sorted(steps) == list(range(10)) and logging_steps == {3, 7}
    between = {s: _device_syncs(c) for s, c in steps.items() if s and s not in logging_steps}  # step 0: first batch
    assert all(not c for c in between.values()), between
    if stage == "dit":
        assert any(steps[s] for s in logging_steps)  # the audit does see the logger's reads


def test_dit_on_a_latent_cache_with_cached_shot_captions_holds_no_device_sync(tmp_path):
    from sora.cli import cache_latents

    model = ["experiment=quickstart/dit", "model.video_vae_ckpt=null", "model.audio_vae_ckpt=null",
             "model.train_text_encoder=false"]  # a frozen text encoder: the cache holds the captions' tokens
    data = ["data.train.clips=24", "data.num_workers=0", "data.train.shots={prob: 0.5, max: 3, continue_prob: 0.3}"]
    assert cache_latents.main([str(tmp_path / "cache"), *model, *data]) == 0
    steps, logging_steps = _audit(tmp_path, *model, *data, "data=latents",
                                  f"data.train.urls={tmp_path}/cache/latents-*.tar")
    between = {s: _device_syncs(c) for s, c in steps.items() if s and s not in logging_steps}
    assert len(between) == 7 and all(not c for c in between.values()), between


def test_progress_bar_shows_the_loss_read_at_the_logging_steps_only():
    from types import SimpleNamespace

    from sora.training.callbacks import ProgressBar

    trainer = SimpleNamespace(training=True, global_step=4, log_every_n_steps=4, loggers=[], progress_bar_metrics={},
                              callback_metrics={"train/loss": torch.tensor(2.5)})
    bar = ProgressBar()
    assert bar.get_metrics(trainer, None)["train/loss"] == 2.5
    trainer.callback_metrics = {"train/loss": torch.tensor(1.0)}
    for step in (5, 6, 7):  # between logging steps: the value shown at step 4, nothing read
        trainer.global_step = step
        assert bar.get_metrics(trainer, None)["train/loss"] == 2.5
    trainer.global_step = 8
    assert bar.get_metrics(trainer, None)["train/loss"] == 1.0
