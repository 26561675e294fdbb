"""Unit tests of the training layer: EMA math and checkpointing, LR schedules, metrics, the DiT step."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sora.data.pipeline import ClipBatch
from sora.models.audio_vae import AudioVAE
from sora.models.dit import AVDiT
from sora.models.text import ByteTextEncoder
from sora.models.video_vae import TINY_CONFIG, VideoVAE
from sora.timeline import Timeline
from sora.training.autoencoders import psnr
from sora.training.callbacks import EMA, RNGState
from sora.checkpoints.export import load_frozen, stage_weights
from sora.training.dit import DiTModule
from sora.training.optim import adamw_with_schedule, lr_factor


# ----------------------------------------------------------------------------- EMA
def _model(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    m[1].bias.requires_grad_(False)  # frozen weights are not averaged
    return m


def test_ema_update_is_the_exponential_average():
    model = _model()
    ema = EMA(decay=0.9, warmup=False)
    ema.setup_shadow(model)
    assert set(ema.shadow) == {"0.weight", "0.bias", "1.weight"}
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for n in ema.shadow:
        torch.testing.assert_close(ema.shadow[n], 0.9 * start[n] + 0.1 * (start[n] + 1.0))
    ema.update(model)  # second step towards the same weights: 0.9^2 of the gap left
    for n in ema.shadow:
        torch.testing.assert_close(ema.shadow[n], start[n] + 1.0 - 0.81)
    assert ema.num_updates == 2


def test_ema_updates_once_per_optimizer_step_under_accumulation():
    from types import SimpleNamespace

    model, ema = _model(), EMA(decay=0.5, warmup=False, every_n_steps=2)
    ema.setup_shadow(model)
    for step in (1, 2, 2, 2, 3, 4, 4):  # trainer.global_step seen after each micro-batch
        ema.on_train_batch_end(SimpleNamespace(global_step=step), model, None, None, 0)
    assert ema.num_updates == 2  # steps 2 and 4, once each


def test_ema_warmup_decay_ramps_to_the_configured_decay():
    ema = EMA(decay=0.999, warmup=True)
    decays = []
    for n in (0, 1, 10, 10_000):
        ema.num_updates = n
        decays.append(ema.current_decay())
    assert decays[:3] == pytest.approx([0.1, 2 / 11, 11 / 20]) and decays[3] == 0.999
    with pytest.raises(ValueError, match="decay"):
        EMA(decay=1.0)


def test_ema_state_dict_restores_the_average_and_swap_round_trips():
    model = _model()
    ema = EMA(decay=0.5, warmup=False)
    ema.setup_shadow(model)
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    ema.update(model)
    state = ema.state_dict()
    assert state["num_updates"] == 1

    restored = EMA(decay=0.5, warmup=False)
    restored.load_state_dict(state)
    other = _model(seed=1)  # different live weights: the average must come from the state, not the model
    restored.setup_shadow(other)
    assert restored.num_updates == 1
    for n in ema.shadow:
        torch.testing.assert_close(restored.shadow[n], ema.shadow[n])

    live = other[0].weight.detach().clone()
    restored.swap(other)
    torch.testing.assert_close(other[0].weight, ema.shadow["0.weight"])
    with pytest.raises(RuntimeError, match="swapped"):
        restored.state_dict()
    restored.swap(other)
    torch.testing.assert_close(other[0].weight, live)

    bad = EMA()
    bad.load_state_dict({**state, "shadow": {"x.weight": torch.zeros(1)}})
    with pytest.raises(RuntimeError, match="do not match"):
        bad.setup_shadow(model)


def test_rng_state_survives_a_weights_only_checkpoint_and_is_restored_at_the_first_batch(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    saved = RNGState()
    torch.save({"rng": saved.state_dict()}, tmp_path / "c.ckpt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    cb = RNGState()
    cb.load_state_dict(torch.load(tmp_path / "c.ckpt", weights_only=True)["rng"])
    torch.rand(5), np.random.rand(5)  # start-up draws of a resumed run
    cb.on_train_batch_start(None, None, None, 0)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]
    cb.on_train_batch_start(None, None, None, 1)  # only once
    assert not torch.equal(torch.rand(3), expected[0])


# ----------------------------------------------------------------------------- LR schedule
def test_lr_factor_warmup_then_cosine_or_constant():
    f = lambda s, **kw: lr_factor(s, warmup_steps=10, total_steps=110, min_lr_ratio=0.1, **kw)  # noqa: E731
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))
    assert f(60, schedule="constant") == 1.0 and f(3, schedule="constant") == pytest.approx(0.4)
    assert lr_factor(5, warmup_steps=0, total_steps=None) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, schedule="linear")


def test_lambdalr_steps_follow_the_schedule_and_skip_decay_on_gains():
    model = _model()
    conf = adamw_with_schedule(model.parameters(), lr=1e-3, weight_decay=0.1, warmup_steps=4, total_steps=20,
                               schedule="cosine", min_lr_ratio=0.0)
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert conf["lr_scheduler"]["interval"] == "step"
    decays = {p.ndim: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays == {2: 0.1, 1: 0.0}
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters() if p.requires_grad)
    lrs = []
    for _ in range(21):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [1e-3 * lr_factor(s, 4, 20, "cosine", 0.0) for s in range(21)]
    assert lrs == pytest.approx(expected)
    assert lrs[3] == pytest.approx(1e-3) and lrs[20] == pytest.approx(0.0, abs=1e-12)


def test_adamw_is_fused_where_torch_has_the_kernel_and_not_under_a_grad_scaler():
    from types import SimpleNamespace

    from sora.training.optim import fused_for

    assert adamw_with_schedule(_model().parameters(), lr=1e-3)["optimizer"].defaults["fused"]  # a CPU kernel exists
    assert fused_for(SimpleNamespace(precision_plugin=SimpleNamespace(scaler=None))) is None  # auto
    scaled = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=object()))  # 16-mixed: clipping needs unscaled grads
    assert not adamw_with_schedule(_model().parameters(), lr=1e-3, fused=fused_for(scaled))["optimizer"].defaults["fused"]


def test_psnr():
    x = torch.zeros(2, 3, 5, 8, 8)
    assert psnr(x, x + 0.2).tolist() == pytest.approx([10 * math.log10(4 / 0.04)] * 2, rel=1e-5)
    assert (psnr(x, x) > 90).all()


# ----------------------------------------------------------------------------- the DiT stage
TL = Timeline(seconds=1.0, fps=8, sample_rate=16000)


def _batch(b=2):
    g = torch.Generator().manual_seed(0)
    return ClipBatch(video=torch.rand(b, 3, TL.num_frames, 32, 32, generator=g) * 2 - 1,
                     audio=torch.randn(b, 1, TL.num_samples, generator=g) * 0.1,
                     audio_mask=torch.ones(b, TL.num_samples, dtype=torch.bool), has_audio=torch.ones(b, dtype=bool),
                     captions=["a red ball bounces", "two balls"][:b], keys=[str(i) for i in range(b)],
                     start=torch.zeros(b, dtype=torch.float64), fps=8.0, sample_rate=16000)


def _dit_module(video_vae_ckpt=None, **kw):
    torch.manual_seed(0)
    vvae, avae = VideoVAE(**TINY_CONFIG), AudioVAE(channels=32, num_blocks=1)
    text = ByteTextEncoder(dim=32, layers=1)
    dit = AVDiT(video_channels=16, audio_channels=8, text_dim=32, dim=64, depth=2, heads=4)
    return DiTModule(dit, text, vvae, avae, TL, video_vae_ckpt=video_vae_ckpt, **kw)


def test_dit_step_trains_the_dit_only_and_masks_clean_modalities():
    module = _dit_module(task_probs={"v2a": 1.0}, text_drop_prob=0.0)
    assert torch.isnan(module.video_latent_stats).all()
    batch, logged = _batch(), {}
    module.log_dict = lambda d, **kw: logged.update(d)
    module.log = lambda k, v, **kw: logged.__setitem__(k, v)
    loss = module.training_step(batch, 0)
    # v2a: every video token is a clean condition, so the video loss is exactly zero
    assert logged["train/loss_video"] == 0 and logged["train/loss_audio"] > 0
    assert torch.isfinite(loss) and loss > 0
    assert not torch.isnan(module.video_latent_stats).any() and module.video_latent_stats[1] > 0
    loss.backward()
    assert all(p.grad is None for p in module.video_vae.parameters())
    assert not any(p.requires_grad for p in (*module.audio_vae.parameters(), *module.video_vae.parameters()))
    assert module.dit.final_audio.linear.weight.grad.abs().sum() > 0
    z = module.normalize(module.encode(batch))
    assert z["video"].shape == (2, 16, TL.video_latent_steps, 4, 4) and z["audio"].shape[2] == TL.audio_latent_steps
    module.train()
    assert not module.video_vae.training and module.dit.training


def test_dit_optimizer_muon_on_one_device_or_ddp_and_adamw_where_matrices_are_sharded(caplog):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, SingleDeviceStrategy

    from sora.training.muon import MuonAdamW

    module = _dit_module(optimizer="muon", muon_lr=0.02, warmup_steps=0)
    for cls in (SingleDeviceStrategy, DDPStrategy):
        module._trainer = SimpleNamespace(strategy=cls.__new__(cls), max_steps=10)
        opt = module.configure_optimizers()["optimizer"]
        assert isinstance(opt, MuonAdamW) and opt.param_groups[0]["muon"] and opt.param_groups[0]["lr"] == 0.02
        assert all(n.startswith("dit.blocks.") for n, p in module.named_parameters()
                   if any(p is q for q in opt.param_groups[0]["params"]))
    from sora.training.strategies import FSDP2, DeepSpeed

    for cls in (DeepSpeed, FSDP2, DeepSpeedStrategy, FSDPStrategy):  # documented `strategy=` commands keep working
        module._trainer = SimpleNamespace(strategy=cls.__new__(cls), max_steps=10)
        caplog.clear()
        assert type(module.configure_optimizers()["optimizer"]) is torch.optim.AdamW
        assert f"which {cls.__name__} shards: training with AdamW" in caplog.text
    with pytest.raises(ValueError, match="model.optimizer='sgd': choose adamw or muon"):
        _dit_module(optimizer="sgd")


def test_dit_loads_vae_weights_preferring_ema(tmp_path):
    vae = VideoVAE(**TINY_CONFIG)
    state = {f"vae.{k}": v for k, v in vae.state_dict().items()}
    shadow = {k: torch.full_like(v, 0.5) for k, v in state.items() if k.endswith("conv_out.conv.bias")}
    torch.save({"state_dict": state, "callbacks": {"EMA": {"shadow": shadow, "num_updates": 3}}}, tmp_path / "a.ckpt")
    weights = stage_weights(str(tmp_path / "a.ckpt"), "vae.")
    assert (weights["encoder.conv_out.conv.bias"] == 0.5).all()
    assert torch.equal(weights["encoder.stem.weight"], vae.encoder.stem.weight)
    assert (stage_weights(str(tmp_path / "a.ckpt"), "vae.", use_ema=False)["encoder.conv_out.conv.bias"] == 0).all()
    module = _dit_module(video_vae_ckpt=str(tmp_path / "a.ckpt"))
    assert (module.video_vae.encoder.conv_out.conv.bias == 0.5).all()
    with pytest.raises(ValueError, match="no weights under"):
        stage_weights(str(tmp_path / "a.ckpt"), "vocoder.")
    with pytest.raises(ValueError, match="does not fit"):
        load_frozen(VideoVAE(**{**TINY_CONFIG, "base_channels": 4}), str(tmp_path / "a.ckpt"), "vae.", "video_vae")


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_outside_transforms_keep_the_dit_function_and_keys(backend):
    """Activation checkpointing and per-block torch.compile. ``aot_eager`` traces and decomposes the blocks as
    inductor does, without its C++ build; inductor itself (a cold compile of 30-100 s on 2 CPU cores) runs in
    ``make test-all``."""
    from sora.models.dit import AVDiT
    from sora.training.strategies import parallelize_dit

    torch.manual_seed(0)
    dit = AVDiT(video_channels=4, audio_channels=2, text_dim=8, dim=32, depth=2, heads=2)
    for p in dit.parameters():
        torch.nn.init.normal_(p, std=0.02)  # un-zero the final layers so outputs carry signal
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    args = (torch.randn(2, 4, 3, 4, 4), torch.randn(2, 2, 6), torch.randn(2, 5, 8), mask, torch.rand(2),
            torch.rand(2), torch.linspace(0, 1, 3), torch.linspace(0, 1, 6))
    with torch.no_grad():
        ref = dit(*args)
    keys = list(dit.state_dict())
    parallelize_dit(dit, activation_checkpointing=True, compile=True, compile_backend=backend)
    assert dit.checkpoint_activations and list(dit.state_dict()) == keys
    with torch.no_grad():
        out = dit(*args)
    for r, o in zip(ref, out):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-4)
        assert r.abs().max() > 1e-3


@pytest.mark.parametrize("task", ["retake", "first_last", "continuation"])
def test_dit_step_gives_the_dit_per_token_timesteps(task):
    """Partly clean streams reach the DiT as per-token timesteps, 0 exactly at the clean tokens; those
    tokens are kept at their latents in the input and carry no loss."""
    module = _dit_module(task_probs={task: 1.0}, text_drop_prob=0.0)
    seen = {}
    forward = module.dit.forward

    def spy(video, audio, text, text_mask, t_video, t_audio, video_times, audio_times):
        seen.update(video=video, t_video=t_video, t_audio=t_audio)
        return forward(video, audio, text, text_mask, t_video, t_audio, video_times, audio_times)

    module.dit.forward = spy
    module.log_dict = module.log = lambda *a, **kw: None
    torch.manual_seed(3)
    loss = module.training_step(_batch(), 0)
    assert torch.isfinite(loss)
    tv, ta = seen["t_video"], seen["t_audio"]
    assert tv.shape == (2, TL.video_latent_steps) or ta.shape == (2, TL.audio_latent_steps)
    z = module.normalize(module.encode(_batch()))
    if tv.dim() == 2:
        clean = tv == 0
        assert clean.any() and (tv[~clean] > 0).all()
        kept = clean[:, None, :, None, None].expand_as(z["video"])
        assert torch.equal(seen["video"][kept], z["video"][kept])  # clean tokens enter as their latents


def test_dit_step_on_multishot_clips_gives_the_dit_its_shots():
    """A sample with shots in its meta: every shot's caption is encoded, its tokens carry the shot id, and the video /
    audio latent steps the shot holding them; a plain sample's caption is global (-1) and its steps shot 0."""
    module = _dit_module(task_probs={"t2av": 1.0}, text_drop_prob=0.0)
    batch = _batch()
    batch.meta = [{"shots": [{"start": 0.0, "end": 0.5, "caption": "a red ball"},
                             {"start": 0.5, "end": 1.0, "caption": "two blue balls roll"}]}, {}]
    seen = {}
    forward = module.dit.forward

    def spy(*args, shots=None):
        seen["shots"], seen["text_mask"] = shots, args[3]
        return forward(*args, shots=shots)

    module.dit.forward = spy
    module.log_dict = module.log = lambda *a, **kw: None
    loss = module.training_step(batch, 0)
    assert torch.isfinite(loss)
    shots, mask = seen["shots"], seen["text_mask"]
    real = shots["text"][0][mask[0]]
    lengths = [int(m.sum()) for m in module.text_encoder(["a red ball", "two blue balls roll"])[1]]
    assert real.tolist() == [0] * lengths[0] + [1] * lengths[1]
    assert (shots["text"][1][mask[1]] == -1).all()
    assert shots["video"][0].tolist() == [0, 0, 1]  # steps (0], (0, .5] | (.5, 1] at 8 fps, stride 4
    assert shots["audio"][0].tolist() == [0] * 12 + [1] * 13 and (shots["video"][1] == 0).all()


def test_world_stream_makes_multishot_clips_with_cuts_on_latent_steps():
    from sora.data.streams import WorldClipStream

    tl = Timeline(seconds=2.0, fps=8, sample_rate=16000)
    stream = WorldClipStream({"width": 32, "height": 32, "fps": 8, "seconds": 2.0}, tl, batch_size=2, clips=12,
                             shots={"prob": 1.0, "max": 3}, shuffle=False, infinite=False)
    stream.rank, stream.world_size = 0, 1
    metas = [m for batch in stream for m in batch.meta]
    assert len(metas) == 12 and all("shots" in m for m in metas)
    assert any(len(m["shots"]) > 1 for m in metas)
    for m in metas:
        bounds = [s["start"] for s in m["shots"]] + [m["shots"][-1]["end"]]
        assert bounds[0] == 0.0 and bounds[-1] == 2.0 and bounds == sorted(bounds)
        assert all(abs(b / 0.5 - round(b / 0.5)) < 1e-9 for b in bounds)  # on video latent steps
