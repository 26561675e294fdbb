"""Retake, extension and remix through the inference pipeline (issue 16): what each keeps is kept exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sora.inference import AVPipeline, PipelineError
from sora.models.audio_vae import AudioVAE
from sora.models.dit import AVDiT
from sora.models.text import ByteTextEncoder
from sora.models.video_vae import TINY_CONFIG, VideoVAE
from sora.timeline import Timeline
from sora.training.dit import DiTModule

TL = Timeline(seconds=2.0, fps=8, sample_rate=16000)  # 17 frames, 5 video / 50 audio latent steps, quantum 1 s
OPTS = dict(steps=3, guidance=2.0, seed=0)


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    dit = AVDiT(video_channels=16, audio_channels=8, text_dim=32, dim=64, depth=2, heads=4)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # an untrained DiT whose output depends on its inputs (no zero-initialised gates)
        for name, p in dit.named_parameters():
            if "adaLN_modulation" in name or name.startswith("final_"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    module = DiTModule(dit, ByteTextEncoder(dim=32, layers=1), VideoVAE(**TINY_CONFIG),
                       AudioVAE(channels=32, num_blocks=1), TL, latent_shift={"video": 0.0, "audio": 0.0},
                       latent_scale={"video": 1.0, "audio": 1.0})
    return AVPipeline(module.eval(), TL, (32, 32))


@pytest.fixture(scope="module")
def clip():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (TL.num_frames, 32, 32, 3), dtype=np.uint8)
    audio = (0.3 * np.sin(np.arange(TL.num_samples) / 7.0))[None].astype(np.float32)
    return frames, audio


def kept_equal(pipe, out, given, masks):
    """Latent tokens kept by ``masks`` {stream: bool [T]} equal the input's encoding bit for bit; the rest differ."""
    for m, keep in masks.items():
        a, b = out.latents[m][:, :, keep], given[m][:, :, keep]
        assert torch.equal(a, b), m
        if (~keep).any():
            assert not torch.equal(out.latents[m][:, :, ~keep], given[m][:, :, ~keep]), m


def test_retake_regenerates_only_the_window(pipe, clip):
    frames, audio = clip
    given = pipe.module.denormalize(pipe.encode(frames, audio))
    out = pipe.retake("a blue ball", frames, audio, 0.5, 1.25, **OPTS)
    spans_v, spans_a = TL.video_token_spans(), TL.audio_token_spans()
    keep_v = torch.from_numpy(~((spans_v[:, 0] < 1.25) & (spans_v[:, 1] > 0.5)))
    keep_a = torch.from_numpy(~((spans_a[:, 0] < 1.25) & (spans_a[:, 1] > 0.5)))
    assert keep_v.tolist() == [True, True, False, False, True]  # steps (0], (0, .5], (.5, 1], (1, 1.5], (1.5, 2]
    kept_equal(pipe, out, given, {"video": keep_v, "audio": keep_a})
    assert out.frames.shape == frames.shape and out.audio.shape == audio.shape and out.task == "retake"
    video_only = pipe.retake("a blue ball", frames, audio, 0.5, 1.25, streams=("video",), **OPTS)
    kept_equal(pipe, video_only, given, {"video": keep_v, "audio": torch.ones(TL.audio_latent_steps, dtype=bool)})
    with pytest.raises(PipelineError, match=r"retake=\[1.5, 3.0\]: need 0 <= start < end <= 2"):
        pipe.retake("x", frames, audio, 1.5, 3.0)


def test_extend_keeps_the_context_and_continues(pipe, clip):
    frames, audio = clip
    ctx_frames, ctx_samples = 9, 16000  # 1 s of context at 8 fps (1 + 8 frames), 1 s of sound
    out = pipe.extend("a ball keeps bouncing", frames[:ctx_frames], audio[:, :ctx_samples], 1.0, **OPTS)
    assert out.frames.shape == frames.shape and out.audio.shape == audio.shape and out.task == "extend"
    assert np.array_equal(out.frames[:ctx_frames], frames[:ctx_frames])  # the input, as given
    assert np.array_equal(out.audio[:, :ctx_samples], audio[:, :ctx_samples])
    padded_v = np.concatenate([frames[:ctx_frames], np.repeat(frames[ctx_frames - 1:ctx_frames], 8, 0)])
    padded_a = np.pad(audio[:, :ctx_samples], ((0, 0), (0, TL.num_samples - ctx_samples)))
    given = pipe.module.denormalize(pipe.encode(padded_v, padded_a))
    keep_v = torch.tensor([True, True, True, False, False])  # steps ending by 1 s
    keep_a = torch.arange(TL.audio_latent_steps) < 25
    kept_equal(pipe, out, given, {"video": keep_v, "audio": keep_a})
    with pytest.raises(PipelineError, match=r"extend=0.5: the context .* must be a positive multiple of 1 s"):
        pipe.extend("x", frames[:13], audio[:, :24000], 0.5)


def test_remix_strength_and_streams(pipe, clip):
    frames, audio = clip
    given = pipe.module.denormalize(pipe.encode(frames, audio))
    dist = {s: float((pipe.remix("a green ball", frames, audio, s, **OPTS).latents["video"] - given["video"]).abs()
                     .mean()) for s in (0.1, 1.0)}
    assert dist[0.1] < 0.5 * dist[1.0]  # a light remix stays near its input
    video_only = pipe.remix("a green ball", frames, audio, 0.6, streams=("video",), **OPTS)
    assert torch.equal(video_only.latents["audio"], given["audio"])
    assert not torch.equal(video_only.latents["video"], given["video"])
    with pytest.raises(PipelineError, match="strength=0: need 0 < strength <= 1"):
        pipe.remix("x", frames, audio, 0)
