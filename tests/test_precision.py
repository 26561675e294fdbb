"""Precision under every strategy: bf16-mixed runs of the DiT stage (frozen VAEs and vocoder) and both
autoencoder stages, one CPU process each, through the real ``sora-train`` CLI.

DeepSpeed's bf16 casts the whole LightningModule, frozen VAEs included, while batches and noise stay
float32: the DiT stage used to crash at its first step ("Input type (float) and bias type
(c10::BFloat16) should be the same" in the video VAE's first conv3d). Models now take float inputs
of any dtype and compute in their weights' dtype (:mod:`sora.models.dtypes`); ddp and FSDP2 run
bf16-mixed under autocast with float32 weights. fp32 under every strategy: ``tests/test_strategies.py``.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys

import pytest
import torch

from sora.models.audio_vae import AudioVAE, Vocoder
from sora.models.dit import AVDiT
from sora.models.video_vae import VideoVAE
from tests.test_strategies import REPO, TINY

AE = ["data.num_workers=0", "data.train.batch_size=2", "data.val.batch_size=2", "trainer.max_steps=2",
      "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
      "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1"]
CASES = {  # id: (overrides, strategy)
    "dit-deepspeed_stage_2": (TINY, "deepspeed_stage_2"),
    "dit-deepspeed_stage_3": (TINY, "deepspeed_stage_3"),
    "dit-deepspeed_stage_3_offload": (TINY, "deepspeed_stage_3_offload"),
    "dit-fsdp": (TINY, "fsdp"),
    "dit-ddp": (TINY, "ddp"),
    "video_vae-deepspeed_stage_2": (["experiment=quickstart/video_vae_gan", "model.gan_start_step=1", *AE],
                                    "deepspeed_stage_2"),
    "audio_vae-deepspeed_stage_2": (["experiment=quickstart/audio_vae_gan", "model.gan_start_step=1", *AE],
                                    "deepspeed_stage_2"),
}
SLOW = {"dit-deepspeed_stage_3"}  # ZeRO-3 without offload: the offload case (10 s) covers its path; `make test-all`


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in CASES])
def test_bf16_mixed_trains_under_every_strategy(case, tmp_path):
    overrides, strategy = CASES[case]
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONWARNINGS="ignore", DS_ACCELERATOR="cpu")
    proc = subprocess.run([sys.executable, "-m", "sora.cli.train", f"hydra.run.dir={tmp_path}", *overrides,
                           "trainer.devices=1", f"strategy={strategy}", "trainer.precision=bf16-mixed"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert losses and all(math.isfinite(v) for v in losses), losses
    if case.startswith("dit"):  # in-training samples decode through the (cast) frozen VAE and vocoder
        assert list((tmp_path / "samples").glob("*.mp4")), "no sample written"


def test_models_cast_float_inputs_to_their_weights_dtype():
    """A model cast to bf16 takes float32 inputs and gives what it gives on bf16 inputs; posteriors are float32."""
    torch.manual_seed(0)
    vae = VideoVAE(latent_channels=4, base_channels=8, channel_mult=(1, 2), spatial_stride=4, time_fold=1,
                   norm="none").to(torch.bfloat16)
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    post = vae.encode(video)
    assert post.mean.dtype == torch.float32
    torch.testing.assert_close(post.mean, vae.encode(video.bfloat16()).mean, rtol=0, atol=0)
    assert vae.decode(post.mode()).dtype == torch.bfloat16
    audio_vae, vocoder = AudioVAE(n_mels=16, latent_channels=4, channels=16, num_blocks=1, n_fft=256).to(
        torch.bfloat16), Vocoder(n_mels=16, channels=16).to(torch.bfloat16)
    z = audio_vae.encode_audio(torch.randn(1, 160 * 8) * 0.1).mode()
    assert z.dtype == torch.float32 and vocoder(audio_vae.decode(z)).dtype == torch.bfloat16
    dit = AVDiT(video_channels=4, audio_channels=4, text_dim=8, dim=32, depth=1, heads=2).to(torch.bfloat16)
    args = (torch.randn(1, 4, 2, 4, 4), torch.randn(1, 4, 3), torch.randn(1, 5, 8), torch.ones(1, 5, dtype=torch.bool),
            torch.rand(1), torch.rand(1), torch.arange(2.0), torch.arange(3.0))
    out = dit(*args)
    ref = dit(*(a.bfloat16() if i < 3 else a for i, a in enumerate(args)))
    for o, r in zip(out, ref):
        assert o.dtype == torch.bfloat16
        torch.testing.assert_close(o, r, rtol=0, atol=0)
