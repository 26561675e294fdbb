"""`sora-sample`: a DiT checkpoint (its VAEs inside) -> an mp4 with sound, end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from sora.cli.overrides import CONFIGS
from sora.data.pipeline import ClipBatch
from sora.media import probe_av, read_av
from sora.inference import AVPipeline, PipelineError
from sora.inference.pipeline import from_uint8
from tests.conftest import SMALL_DIT

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dit_ckpt(tmp_path_factory):
    """A checkpoint as sora-train writes it for the quickstart DiT (random VAEs, one measured batch)."""
    with initialize_config_dir(CONFIGS, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=quickstart/dit", "model.video_vae_ckpt=null",
                                          "model.audio_vae_ckpt=null", *SMALL_DIT])
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
    pipe = AVPipeline.from_checkpoint(str(dit_ckpt), seconds=2.0)
    module, tl = pipe.module, pipe.timeline
    assert tl.num_frames == 17 and module.video_times.shape == (tl.video_latent_steps,) and pipe.size == (32, 32)

    def run(seed, g=3.0, sampler="euler", dec="vocoder"):
        clip = pipe.generate("a red ball", steps=3, guidance=g, sampler=sampler, seed=seed, audio_decoder=dec)
        return clip.frames, clip.audio, clip.latents

    frames, audio, z = run(0)
    assert frames.shape == (17, 32, 32, 3) and frames.dtype == np.uint8 and audio.shape == (1, 32000)
    assert np.array_equal(run(0)[0], frames) and not np.array_equal(run(1)[0], frames)
    assert not np.array_equal(run(0, g=1.0)[0], frames)  # guidance changes the result
    frames_h, audio_gl, _ = run(0, sampler="heun", dec="griffin_lim")
    assert audio_gl.shape == (1, 32000) and np.abs(audio_gl).max() > 0
    with pytest.raises(PipelineError, match=r"seconds=1.1 does not fit .* use a multiple of 1 s, e.g. seconds=1$"):
        AVPipeline.from_checkpoint(str(dit_ckpt), seconds=1.1)


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


# ----------------------------------------------------------------------------- v2a / a2v / prompts= / errors
# in-process through sora.cli.sample.sample (the body of the Hydra main): one model load each, no interpreter start


def run_sample(dit_ckpt, *overrides):
    from sora.cli.sample import sample

    with initialize_config_dir(CONFIGS, version_base="1.3"):
        cfg = compose("sample", overrides=[f"ckpt={dit_ckpt}", "steps=2", "guidance=2", "device=cpu", *overrides])
    return sample(cfg)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-10)))


@pytest.fixture(scope="module")
def av_input(tmp_path_factory):
    """A 64x64 clip at 16 fps, 1.25 s (smooth moving gradients), with a 440 Hz tone + noise at 22.05 kHz stereo."""
    from sora.media import write_av

    t = np.arange(20)[:, None, None]
    y, x = np.mgrid[0:64, 0:64][:, None]
    frames = np.stack([128 + 90 * np.sin(x / 9 + t / 3), 128 + 90 * np.cos(y / 7 - t / 4),
                       np.broadcast_to(128 + 60 * np.sin((x + y) / 15), (20, 64, 64))], -1).round().astype(np.uint8)
    sr = 22050
    n = np.arange(round(1.25 * sr))
    rng = np.random.default_rng(0)
    tone = 0.3 * np.sin(2 * np.pi * 440 * n / sr) * (1 + np.sin(2 * np.pi * 3 * n / sr)) / 2
    audio = np.stack([tone, tone]) + 0.02 * rng.standard_normal((2, len(n)))
    path = tmp_path_factory.mktemp("av") / "in.mp4"
    write_av(path, frames, audio.astype(np.float32), fps=16, sample_rate=sr)
    return path


def test_v2a_keeps_the_input_video_and_generates_its_sound(dit_ckpt, av_input, tmp_path, capsys):
    out = tmp_path / "v2a.mp4"
    assert run_sample(dit_ckpt, f"video={av_input}", f"out={out}", "prompt=a ball") == [out]
    assert "v2a" in capsys.readouterr().out
    got = read_av(str(out), fps=8, sample_rate=16000)
    # default seconds: the input's 1.25 s rounded down to the timeline's 0.5 s steps -> 1.0 s, 9 frames at 8 fps
    assert got.frames.shape == (9, 32, 32, 3)
    ref = read_av(str(av_input), fps=8, size=(32, 32), duration=1.125).frames
    assert psnr(got.frames, ref) > 30
    assert got.audio.shape == (1, 18000) and got.audio_mask[:16000].all()
    assert np.abs(got.audio[0, :16000]).max() > 1e-3  # generated, not silence
    # the sound is sampled with the video as its clean condition: another video, other sound (same seed)
    pipe = AVPipeline.from_checkpoint(str(dit_ckpt), seconds=1.0)
    module = pipe.module

    def run(v):
        clip = pipe.generate(steps=2, guidance=1.0, video=v)
        return clip.frames, clip.audio, clip.latents

    frames, audio, z = run(ref)
    assert np.array_equal(frames, ref) and audio.shape == (1, 16000)
    with torch.no_grad():  # the video latent stayed the clean encoding of the input (t = 0 throughout)
        enc = module.video_vae.encode(from_uint8(ref)[None]).mode()
    assert torch.allclose(z["video"], enc, atol=1e-4)
    assert (run(255 - ref)[2]["audio"] - z["audio"]).abs().max() > 1e-3  # the random tiny DiT: a small effect


def test_a2v_keeps_the_input_audio_and_generates_the_picture(dit_ckpt, av_input, tmp_path):
    from sora.media import read_audio

    wav = tmp_path / "in.wav"  # the input's sound as a stand-alone audio file (22.05 kHz stereo pcm)
    src, _ = read_audio(str(av_input), sample_rate=22050, channels=2)
    with av.open(str(wav), "w") as f:
        s = f.add_stream("pcm_s16le", rate=22050, layout="stereo")
        frame = av.AudioFrame.from_ndarray((src.T.reshape(1, -1) * 32767).astype(np.int16), format="s16",
                                           layout="stereo")
        frame.sample_rate, frame.pts = 22050, 0
        f.mux(s.encode(frame))
        f.mux(s.encode(None))
    out = tmp_path / "a2v.mp4"
    run_sample(dit_ckpt, f"audio={wav}", f"out={out}")  # default seconds: 1.25 s rounded down to 1.0
    got = read_av(str(out), fps=8, sample_rate=16000)
    assert got.frames.shape == (9, 32, 32, 3) and got.frames.std() > 0  # 1 s at 8 fps: 1 + 8 frames
    ref, _ = read_audio(str(wav), sample_rate=16000, duration=1.0)
    assert got.audio.shape == (1, 18000)  # 9 frames / 8 fps = 1.125 s of sound track, zero after 1.0 s
    assert np.corrcoef(got.audio[0, :16000], ref[0])[0, 1] > 0.9
    assert np.abs(got.audio[0, 16200:]).max() < 1e-2
    # from the audio track of an mp4, longer than the input: zero-padded after its 1.25 s
    out2 = tmp_path / "a2v_mp4.mp4"
    run_sample(dit_ckpt, f"audio={av_input}", f"out={out2}", "seconds=2", "steps=1")
    got = read_av(str(out2), fps=8, sample_rate=16000)
    assert len(got.frames) == 17 and np.abs(got.audio[0, 18000:19500]).max() > 0.05 and \
        np.abs(got.audio[0, 20400:]).max() < 1e-2


def test_prompts_file_writes_one_mp4_per_line(dit_ckpt, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\n\n  two balls  \na blue ball\n")
    paths = run_sample(dit_ckpt, f"prompts={prompts}", f"out={tmp_path / 'clips'}", "steps=1")
    assert paths == [tmp_path / "clips" / f"{i:03d}.mp4" for i in range(3)] and all(p.is_file() for p in paths)
    text = capsys.readouterr().out
    assert "'two balls'" in text and "seed 2" in text and "3 samples" in text
    assert not np.array_equal(read_av(str(paths[0])).frames, read_av(str(paths[1])).frames)
    prompts.write_text("x\ny\n")
    paths = run_sample(dit_ckpt, f"prompts={prompts}", f"out={tmp_path}/b-%02d.mp4", "steps=1")
    assert [p.name for p in paths] == ["b-00.mp4", "b-01.mp4"] and all(p.is_file() for p in paths)


def test_sample_errors_are_one_line(dit_ckpt, av_input, tmp_path):
    def error(*overrides) -> str:
        with pytest.raises(SystemExit) as e:
            run_sample(dit_ckpt, *overrides)
        msg = str(e.value)
        assert msg.startswith("sora-sample: ") and "\n" not in msg, msg
        return msg

    assert error(f"video={tmp_path}/none.mp4") == f"sora-sample: video={tmp_path}/none.mp4: no such file"
    assert error(f"audio={tmp_path}/none.wav") == f"sora-sample: audio={tmp_path}/none.wav: no such file"
    assert error(f"prompts={tmp_path}/none.txt") == f"sora-sample: prompts={tmp_path}/none.txt: no such file"
    assert "not both" in error(f"video={av_input}", f"audio={av_input}")
    msg = error(f"video={av_input}", "seconds=0.7")
    assert "seconds=0.7" in msg and "e.g. seconds=1" in msg
    assert "e.g. seconds=2" in error(f"video={av_input}", "seconds=2.2")
    (tmp_path / "empty.txt").write_text("\n")
    assert "no prompt" in error(f"prompts={tmp_path / 'empty.txt'}")
    (tmp_path / "p.txt").write_text("a\n")
    assert "not both" in error(f"prompts={tmp_path / 'p.txt'}", "prompt=x")
    assert "folder or a pattern" in error(f"prompts={tmp_path / 'p.txt'}", "out=x.mp4")
    short = tmp_path / "short.wav"
    with av.open(str(short), "w") as f:
        s = f.add_stream("pcm_s16le", rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 4000), np.int16), format="s16", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        f.mux(s.encode(frame))
        f.mux(s.encode(None))
    assert "shorter than the shortest clip" in error(f"audio={short}") and "(seconds=1)" in error(f"audio={short}")
    not_media = tmp_path / "x.mp4"
    not_media.write_bytes(b"not a video")
    assert error(f"video={not_media}").startswith(f"sora-sample: video={not_media}: cannot open")
    other = tmp_path / "vae.ckpt"  # a checkpoint of another stage
    torch.save({"state_dict": {}, "sora_config": {"model": {"_target_": "sora.training.autoencoders.VideoVAEModule"}}},
               other)
    with pytest.raises(SystemExit, match="is not a checkpoint of a DiT run"):
        run_sample(other)
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"junk")
    with pytest.raises(SystemExit, match=r"^sora-sample: .*junk.ckpt: truncated, corrupt or not a torch checkpoint"):
        run_sample(junk)


def test_edits_from_the_command_line(dit_ckpt, av_input, tmp_path, capsys):
    """extend= continues the input (its first second kept as read), retake= and remix= write a clip of the input's
    length; mixing edits or leaving out video= is a one-line error."""
    out = tmp_path / "extended.mp4"
    assert run_sample(dit_ckpt, f"video={av_input}", "extend=1.0", "seconds=2", f"out={out}", "prompt=a ball") == [out]
    assert "extend: 17 frames, 2.00 s of sound" in capsys.readouterr().out
    got = read_av(str(out), fps=8, sample_rate=16000)
    ref = read_av(str(av_input), fps=8, size=(32, 32), duration=1.125).frames
    assert got.frames.shape == (17, 32, 32, 3) and psnr(got.frames[:9], ref) > 30  # the context, as given
    assert got.audio.shape[-1] >= 2 * 16000 - 160
    for edit, word in (("retake=[0.5,1.0]", "retake"), ("remix=a blue ball", "remix")):
        out = tmp_path / f"{word}.mp4"
        run_sample(dit_ckpt, f"video={av_input}", edit, "retake_audio=false", f"out={out}", "prompt=a ball")
        assert f"({word}: 9 frames, 1.00 s of sound)" in capsys.readouterr().out
        assert probe_av(str(out)).num_frames == 9
    with pytest.raises(SystemExit, match="extend/retake= edits a clip: give video=IN.mp4, one edit at a time"):
        run_sample(dit_ckpt, f"video={av_input}", "extend=1.0", "retake=[0,1]")
    with pytest.raises(SystemExit, match="extend= edits a clip: give video=IN.mp4"):
        run_sample(dit_ckpt, "extend=1.0")
    with pytest.raises(SystemExit, match=r"extend=0.5: the context \(seconds - extend = 0.5 s\) must be a positive "
                                         r"multiple of 1 s"):
        run_sample(dit_ckpt, f"video={av_input}", "extend=0.5", "seconds=1")


def test_script_from_the_command_line(dit_ckpt, tmp_path, capsys):
    """script= writes a clip as long as the script; its shots reach the DiT as shot ids; a bad line is named."""
    script = tmp_path / "shots.txt"
    script.write_text("global: balls\n0-1s: a red ball bounces | sound: clicks\n1-2s: a blue ball rolls\n")
    out = tmp_path / "script.mp4"
    assert run_sample(dit_ckpt, f"script={script}", f"out={out}") == [out]
    assert "(script: 2 shots, cuts at 1 s; 17 frames)" in capsys.readouterr().out
    assert probe_av(str(out)).num_frames == 17
    pipe = AVPipeline.from_checkpoint(str(dit_ckpt), seconds=2.0)
    from sora.script import read_script

    cond = pipe.script_cond(read_script(script, pipe.timeline))
    tid = cond["shots"]["text"][0]
    assert tid[0] == -1 and set(tid.tolist()) == {-1, 0, 1} and cond["text"].shape[1] == len(tid)
    assert cond["shots"]["video"][0].tolist() == [0, 0, 0, 1, 1]  # steps (0], (0,.5], (.5,1] | (1,1.5], (1.5,2]
    script.write_text("0-1s: a red ball\n1-1.3s: a cut off the latent grid\n")
    with pytest.raises(SystemExit, match=r"shots.txt:2: a cut at 1.3 s is not on a video latent step"):
        run_sample(dit_ckpt, f"script={script}")
    with pytest.raises(SystemExit, match="script= holds the captions"):
        run_sample(dit_ckpt, f"script={script}", "prompt=a ball")
