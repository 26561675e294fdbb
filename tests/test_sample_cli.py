"""`sora-sample`: a DiT checkpoint (its VAEs inside) -> an mp4 with sound, end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from sora.cli.sample import load_module
from sora.data.pipeline import ClipBatch
from sora.media import probe_av, read_av
from sora.training.sampling import generate

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dit_ckpt(tmp_path_factory):
    """A checkpoint as sora-train writes it for the quickstart DiT (random VAEs, one measured batch)."""
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=quickstart/dit", "model.video_vae_ckpt=null",
                                          "model.audio_vae_ckpt=null"])
    with open_dict(cfg):  # the parts that need a Hydra run (${hydra:...}); sample reads timeline/data/model
        for key in ("trainer", "callbacks", "logger"):
            del cfg[key]
    torch.manual_seed(0)
    module = instantiate(cfg.model)
    tl = module.timeline
    batch = ClipBatch(video=torch.rand(2, 3, tl.num_frames, 32, 32) * 2 - 1,
                      audio=torch.randn(2, 1, tl.num_samples) * 0.1,
                      audio_mask=torch.ones(2, tl.num_samples, dtype=torch.bool), has_audio=torch.ones(2, dtype=bool),
                      captions=["a", "b"], keys=["0", "1"], start=torch.zeros(2), fps=8.0, sample_rate=16000)
    module.normalize(module.encode(batch))  # latent statistics, as the first training batch sets them
    with torch.no_grad():  # a DiT whose output is not zero (AdaLN-Zero starts at 0)
        for p in module.dit.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = tmp_path_factory.mktemp("dit") / "last.ckpt"
    torch.save({"state_dict": module.state_dict(), "sora_config": OmegaConf.to_container(cfg, resolve=True),
                "global_step": 1}, path)
    return path


def test_generate_is_seeded_and_follows_the_requested_length(dit_ckpt):
    module, cfg, tl = load_module(str(dit_ckpt), seconds=2.0, use_ema=True, device="cpu")
    assert tl.num_frames == 17 and module.video_times.shape == (tl.video_latent_steps,)
    run = lambda seed, **kw: generate(module, tl, "a red ball", "", (32, 32), 3, kw.get("g", 3.0),  # noqa: E731
                                      kw.get("sampler", "euler"), 1.0, seed, kw.get("dec", "vocoder"))
    frames, audio, z = run(0)
    assert frames.shape == (17, 32, 32, 3) and frames.dtype == np.uint8 and audio.shape == (1, 32000)
    assert np.array_equal(run(0)[0], frames) and not np.array_equal(run(1)[0], frames)
    assert not np.array_equal(run(0, g=1.0)[0], frames)  # guidance changes the result
    frames_h, audio_gl, _ = run(0, sampler="heun", dec="griffin_lim")
    assert audio_gl.shape == (1, 32000) and np.abs(audio_gl).max() > 0
    with pytest.raises(SystemExit, match="seconds"):
        load_module(str(dit_ckpt), seconds=1.1, use_ema=True, device="cpu")


def test_sample_cli_writes_an_mp4_with_sound(dit_ckpt, tmp_path):
    out = tmp_path / "clip.mp4"
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "sora.cli.sample", f"ckpt={dit_ckpt}", "prompt=a red ball bounces",
                           "seconds=1", f"out={out}", "steps=2", "guidance=2", "seed=3"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {out}" in proc.stdout
    info = probe_av(str(out))
    assert info.has_audio and (info.width, info.height) == (32, 32)
    clip = read_av(str(out), fps=8, sample_rate=16000)
    assert len(clip.frames) == 9 and clip.audio.shape[-1] >= 16000
    proc = subprocess.run([sys.executable, "-m", "sora.cli.sample", "ckpt=/nonexistent.ckpt"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == "sora-sample: no checkpoint at /nonexistent.ckpt"
    assert not list(tmp_path.glob("*.log"))  # no log file left in the working directory
