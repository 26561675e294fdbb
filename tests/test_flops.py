"""The analytic FLOP formulas of sora.models.flops against torch's FLOP counter on the real modules."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from sora.models.dit import AVDiT
from sora.models.flops import dit_forward_flops, dit_training_flops, video_vae_flops
from sora.models.video_vae import TINY_CONFIG, VideoVAE
from sora.training.callbacks import Throughput


def _dit_inputs(b=2, t=3, hw=8, steps=25, lt=7):
    g = torch.Generator().manual_seed(0)
    return dict(video=torch.randn(b, 16, t, hw, hw, generator=g), audio=torch.randn(b, 8, steps, generator=g),
                text=torch.randn(b, lt, 32, generator=g), text_mask=torch.ones(b, lt, dtype=torch.bool),
                t_video=torch.rand(b, generator=g), t_audio=torch.rand(b, generator=g),
                video_times=torch.arange(t, dtype=torch.float64), audio_times=torch.arange(steps, dtype=torch.float64))


def _counted(fn) -> int:
    # the math SDPA backend runs attention as matmuls, which the counter sees (CPU flash kernels it does not)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("fusion", ["joint", "dual_stream"])
@pytest.mark.parametrize("depth, t, hw, steps, lt", [(2, 3, 8, 25, 7), (3, 2, 12, 13, 5)])
def test_dit_forward_flops_equal_the_counter(fusion, depth, t, hw, steps, lt):
    torch.manual_seed(0)
    dit = AVDiT(video_channels=16, audio_channels=8, text_dim=32, dim=64, depth=depth, heads=4, fusion=fusion)
    x = _dit_inputs(2, t, hw, steps, lt)
    tokens = (t * (hw // 2) ** 2, steps, lt)
    flops = dit_forward_flops(dit, *tokens)
    assert 2 * flops.total == _counted(lambda: dit(**x))  # batch of 2, exact
    assert flops.kind("attention") > 0 and flops.by_modality["video"]["mlp"] > flops.by_modality["audio"]["mlp"]
    # training: forward + backward within 2 % of 3x the forward (the inputs' own gradients are not needed)
    train = _counted(lambda: sum(o.sum() for o in dit(**x)).backward())
    assert abs(2 * dit_training_flops(dit, *tokens) / train - 1) < 0.02
    per_token = dit.estimate_flops_per_token(*tokens)
    assert per_token == pytest.approx(dit_training_flops(dit, *tokens) / (tokens[0] + tokens[1]))


def test_video_vae_flops_equal_the_counter():
    vae = VideoVAE(**TINY_CONFIG)
    x = torch.randn(1, 3, 9, 32, 32)
    flops = video_vae_flops(vae, x.shape)
    encode = _counted(lambda: vae.encode(x).mode())
    assert flops["encoder"] == encode
    assert flops["decoder"] == _counted(lambda: vae.decode(vae.encode(x).mode())) - encode
    assert next(vae.parameters()).device.type == "cpu"  # the model itself is left as it was


def test_throughput_peak_flops_from_lightning_or_given():
    import lightning as L

    assert Throughput(peak_flops=1e12).peak_flops == 1e12 and Throughput(peak_flops=None).peak_flops is None
    auto = Throughput()
    auto.setup(L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False), None, "fit")
    assert auto.peak_flops is None  # Lightning knows no CPU's peak: no MFU on a CPU
    with pytest.raises(ValueError, match="peak_flops='h100_bf16'.*FLOP/s of one device, auto or null"):
        Throughput(peak_flops="h100_bf16")
