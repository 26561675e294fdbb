"""Sequence packing: block-diagonal attention, the packed DiT equal to per-sample runs (outputs and
gradients), the data-side packing plan, and 2 training steps of packed batches through the CLI."""

from __future__ import annotations

import pytest
import torch

from sora.cli.overrides import CONFIGS
from sora.models import attention as A
from sora.models.dit import AVDiT
from sora.timeline import Timeline
from tests.conftest import SMALL_DIT

CV, CA, TEXT_DIM, LT = 16, 8, 24, 7
# three samples: (seconds, video latent h x w, real text tokens); 25 fps, VAE time stride 6
SAMPLES = [(0.48, (4, 4), 5), (0.24, (2, 6), 2), (0.72, (6, 4), 7)]


def timeline(seconds):
    return Timeline(seconds=seconds, fps=25, vae_time_stride=6, sample_rate=16000, mel_hop=160, audio_latent_stride=4)


def packed_inputs(seed=0):
    """Leaf tensors of 3 samples with different durations, latent sizes and text lengths."""
    g = torch.Generator().manual_seed(seed)
    x = {"video": [], "audio": [], "video_times": [], "audio_times": []}
    for seconds, (h, w), _ in SAMPLES:
        tl = timeline(seconds)
        x["video"].append(torch.randn(CV, tl.video_latent_steps, h, w, generator=g).requires_grad_())
        x["audio"].append(torch.randn(CA, tl.audio_latent_steps, generator=g).requires_grad_())
        x["video_times"].append(torch.from_numpy(tl.video_token_times()))
        x["audio_times"].append(torch.from_numpy(tl.audio_token_times()))
    x["text"] = torch.randn(len(SAMPLES), LT, TEXT_DIM, generator=g).requires_grad_()
    x["text_mask"] = torch.arange(LT)[None] < torch.tensor([n for *_, n in SAMPLES])[:, None]
    x["t_video"], x["t_audio"] = torch.rand(len(SAMPLES), generator=g), torch.rand(len(SAMPLES), generator=g)
    return x


def make(fusion, backend, seed=0):
    torch.manual_seed(seed)
    model = AVDiT(video_channels=CV, audio_channels=CA, text_dim=TEXT_DIM, dim=32, depth=2, heads=2, patch_size=2,
                  fusion=fusion, attn_backend=backend)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # perturb the zero-initialised gates and final layers, so every path matters
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or name.startswith("final_"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def probe_loss(v_video, v_audio, seed=2):
    """A fixed random linear functional of every output, so every output element has a gradient."""
    g = torch.Generator().manual_seed(seed)
    return sum((v * torch.randn(v.shape, generator=g)).sum() + (a * torch.randn(a.shape, generator=g)).sum()
               for v, a in zip(v_video, v_audio))


def leaves(x):
    return [*x["video"], *x["audio"], x["text"]]


# --------------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("backend", ["sdpa", "flash"])
def test_segment_attention_is_block_diagonal(backend, monkeypatch):
    """Interleaved (non-contiguous) segments and a dropped key (-1): each query sees only its segment."""
    monkeypatch.setattr(A, "flash_attn_varlen_func", A.varlen_attention_reference)
    g = torch.Generator().manual_seed(0)
    q_seg = torch.tensor([[0, 2, 1, 0, 2, 2, 1, 0, 1]])
    k_seg = torch.tensor([[2, 0, -1, 1, 0, 1, 2, 2, 0, 1, 0]])
    q, k, v = (torch.randn(1, 2, n, 8, generator=g) for n in (9, 11, 11))
    out = A.attention(q, k, v, k_seg, backend=backend, q_mask=q_seg)
    for s in range(3):
        qi, ki = (q_seg[0] == s).nonzero().flatten(), (k_seg[0] == s).nonzero().flatten()
        alone = torch.nn.functional.scaled_dot_product_attention(q[:, :, qi], k[:, :, ki], v[:, :, ki])
        torch.testing.assert_close(out[:, :, qi], alone, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="q_mask"):
        A.attention(q, k, v, k_seg, backend=backend)


# --------------------------------------------------------------------------------------------- the model
@pytest.mark.parametrize("backend", ["sdpa", "flash"])
@pytest.mark.parametrize("fusion", ["joint", "dual_stream"])
def test_packed_forward_and_backward_equal_per_sample_runs(fusion, backend, monkeypatch):
    monkeypatch.setattr(A, "flash_attn_varlen_func", A.varlen_attention_reference)  # flash: its CPU twin
    model, x = make(fusion, backend), packed_inputs()
    v_video, v_audio = model.forward_packed(**x)
    assert [v.shape for v in v_video] == [v.shape for v in x["video"]]
    assert [a.shape for a in v_audio] == [a.shape for a in x["audio"]]
    probe_loss(v_video, v_audio).backward()
    packed_in = [t.grad.clone() for t in leaves(x)]
    packed_w = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    for t in leaves(x):
        t.grad = None
    alone_video, alone_audio = [], []
    for i, (*_, n_text) in enumerate(SAMPLES):  # each sample alone through the dense forward
        v, a = model(x["video"][i][None], x["audio"][i][None], x["text"][i:i + 1, :n_text],
                     torch.ones(1, n_text, dtype=torch.bool), x["t_video"][i:i + 1], x["t_audio"][i:i + 1],
                     x["video_times"][i], x["audio_times"][i])
        alone_video.append(v[0])
        alone_audio.append(a[0])
    probe_loss(alone_video, alone_audio).backward()

    for packed, alone in zip(v_video + v_audio, alone_video + alone_audio):
        assert packed.abs().max() > 0.01  # not trivially zero
        torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    for got, t in zip(packed_in, leaves(x)):  # gradients w.r.t. every input ...
        assert got.abs().max() > 1e-4
        torch.testing.assert_close(got, t.grad, atol=1e-5, rtol=1e-5)
    assert (packed_in[-1][~x["text_mask"]] == 0).all()  # padded text tokens are not packed
    for name, p in model.named_parameters():  # ... and every weight
        assert packed_w[name].abs().max() > 0, name
        torch.testing.assert_close(packed_w[name], p.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_packed_forward_validates_its_inputs():
    model, x = make("joint", "sdpa"), packed_inputs()
    with pytest.raises(ValueError, match="one of each per sample"):
        model.forward_packed(**dict(x, audio=x["audio"][:2]))
    with pytest.raises(ValueError, match="do not match"):
        model.forward_packed(**dict(x, audio_times=[t[:-1] for t in x["audio_times"]]))


# --------------------------------------------------------------------------------------------- the plan
def world_stream(seed=0, pack=None, clips=24, **kw):
    from sora.data.streams import WorldClipStream

    tl = Timeline(seconds=1.0, fps=8)
    return WorldClipStream({"width": 32, "height": 32, "seconds": 1.0, "fps": 8}, tl, batch_size=4, clips=clips,
                           seed=seed, buckets={"area": 1536, "ratios": ["3:2", "2:3", "1:1"], "multiple": 16},
                           pack={"max_tokens": 160} if pack is None else pack, **kw)


def test_packer_plan_keeps_clips_whole_within_the_budget():
    from sora.data.buckets import Bucket
    from sora.data.packing import Packer

    tl = Timeline(seconds=1.0, fps=8)  # 3 video latent steps, 25 audio steps
    buckets = [Bucket(32, 48), Bucket(32, 32), Bucket(64, 64)]
    packer = Packer(buckets, tl, max_tokens=200, patch=16, open_packs=2)
    assert packer.costs == [3 * 6 + 25, 3 * 4 + 25, 3 * 16 + 25]  # 43, 37, 73
    g = torch.Generator().manual_seed(0)
    items = [({"__key__": str(i)}, int(torch.randint(3, (1,), generator=g))) for i in range(50)]
    packs = list(packer.plan(items))
    keys = [it["__key__"] for _, members in packs for it in members]
    assert sorted(keys, key=int) == [str(i) for i in range(50)]  # every clip exactly once, none split
    by_key = dict((it["__key__"], b) for it, b in items)
    for buckets_of, members in packs:
        assert [by_key[it["__key__"]] for it in members] == buckets_of
        assert sum(packer.costs[b] for b in buckets_of) <= 200
    assert any(len(set(b)) > 1 for b, _ in packs)  # clips of different buckets share packs
    fill = sum(packer.costs[b] for _, b in items) / (200 * len(packs))
    assert fill > 0.9, fill  # first-fit over 2 open packs; one open pack (sequential) fills 0.87 here
    with pytest.raises(ValueError, match=r"pack.max_tokens=60: smaller than one clip of bucket 64x64 \(73 tokens\)"):
        Packer(buckets, tl, max_tokens=60)
    with pytest.raises(ValueError, match="pack.patch=32"):
        Packer(buckets, tl, max_tokens=200, patch=32)


def test_packed_stream_is_deterministic_and_resumes_exactly():
    from sora.data.packing import PackedBatch

    stream = world_stream()
    plan = list(stream.plan(0, 0, 1))
    assert plan == list(world_stream().plan(0, 0, 1))  # same seed, same plan
    assert [b for b, _ in plan] != [b for b, _ in world_stream(seed=1).plan(0, 0, 1)]
    it = iter(stream)
    first = [next(it) for _ in range(3)]
    state = stream.state_dict()
    assert set(state) == {"epoch", "batches", "skipped", "seed"} and state["batches"] == 3  # as without packing
    rest = [next(it) for _ in range(3)]
    for batch, (buckets_of, items) in zip(first + rest, plan):
        assert isinstance(batch, PackedBatch) and len(batch) == len(items)
        assert sorted(batch.keys) == sorted(i["__key__"] for i in items)
        assert len(batch.parts) == len(set(buckets_of))  # one ClipBatch per bucket, each of one shape
        for part in batch.parts:
            h, w = part.video.shape[-2:]
            assert part.video.dtype == torch.uint8 and (h, w) in {(32, 48), (48, 32), (32, 32)}
            assert all(m["world"] for m in part.meta) and part.audio.shape[-1] == 16000
    resumed = world_stream()
    resumed.load_state_dict(state)
    again = iter(resumed)
    for expected in rest:  # the exact next packs, decoded identically
        got = next(again)
        assert got.keys == expected.keys
        for a, b in zip(got.parts, expected.parts):
            assert torch.equal(a.video, b.video) and torch.equal(a.audio, b.audio)
    whole_epoch = [k for _, items in plan for k in (i["__key__"] for i in items)]
    assert sorted(whole_epoch) == sorted(f"world-0-{i:07d}" for i in range(24))  # the epoch's leftovers too


# --------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def dit_module():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(CONFIGS, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=quickstart/dit", "model.video_vae_ckpt=null",
                                          "model.audio_vae_ckpt=null", *SMALL_DIT])
    module = instantiate(cfg.model)
    with torch.no_grad():  # perturb the zero-initialised gates and final layers
        for name, p in module.dit.named_parameters():
            if "adaLN_modulation" in name or name.startswith("final_"):
                p.add_(0.1 * torch.randn_like(p))
    return module


def test_packed_losses_equal_dense_losses(dit_module):
    """The training module's packed path: one part = the dense batch; several buckets = the
    element-weighted mean of each bucket's dense losses (per-sample conditioning kept in the pack)."""
    module = dit_module
    stream = world_stream(pack={"max_tokens": 400})
    batch = next(iter(stream)).normalize()
    assert len(batch.parts) >= 2
    torch.manual_seed(0)
    zs = [module.normalize(module.encode(part)) for part in batch.parts]
    b = len(batch)
    text, mask = module.encode_text(batch)
    tt = module.sample_timesteps(b, zs[0]["video"].shape[2], zs[0]["audio"].shape[2], "cpu")
    tt.clean_video[0] = True  # a sample given its video (v2a-like) and
    tt.clean_audio[1, :5] = True  # one with an audio prefix: counted elements differ per sample
    noise = [{m: torch.randn_like(x) for m, x in z.items()} for z in zs]
    packed = module.losses(zs, noise, tt, text, mask)

    from sora.diffusion.flow import TaskTimesteps

    start, dense, counts = 0, [], []
    for z, n in zip(zs, noise):
        s = slice(start, start + len(z["video"]))
        start = s.stop
        sub = TaskTimesteps(tt.t_video[s], tt.t_audio[s], tt.clean_video[s], tt.clean_audio[s])
        dense.append(module.losses(z, n, sub, text[s], mask[s]))
        counts.append({m: int((~c).sum()) * z[m][0, :, 0].numel()
                       for m, c in (("video", sub.clean_video), ("audio", sub.clean_audio))})
    for m in ("video", "audio"):
        expected = sum(d[f"loss_{m}"] * c[m] for d, c in zip(dense, counts)) / sum(c[m] for c in counts)
        torch.testing.assert_close(packed[f"loss_{m}"], expected, atol=1e-5, rtol=1e-5)
    n = len(zs[0]["video"])  # a pack of one bucket is the dense batch
    first = TaskTimesteps(tt.t_video[:n], tt.t_audio[:n], tt.clean_video[:n], tt.clean_audio[:n])
    one = module.losses(zs[:1], noise[:1], first, text[:n], mask[:n])  # a list: the packed forward
    torch.testing.assert_close(one["loss"], dense[0]["loss"], atol=1e-5, rtol=1e-5)


PACK_OVERRIDES = ["experiment=quickstart/dit", "model.video_vae_ckpt=null", "model.audio_vae_ckpt=null", *SMALL_DIT,
                  "data.train.buckets={area:1536,ratios:['3:2','2:3','1:1'],multiple:16}",
                  "data.train.pack={max_tokens:320,patch:8}", "data.num_workers=0",
                  "data.train.shots=null"]  # packs take single-shot clips only


def test_two_packed_training_steps_through_the_cli(tmp_path):
    """`sora-train` with aspect-ratio buckets and packing: each step trains on one planned pack."""
    import csv
    import os
    import subprocess
    import sys
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    repo = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "sora.cli.train", f"hydra.run.dir={run}", *PACK_OVERRIDES,
                           "trainer.max_steps=2", "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false",
                           "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(run / "csv" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(rows) == 2 and all(float(r["train/loss"]) > 0 for r in rows)

    with initialize_config_dir(CONFIGS, version_base="1.3"):
        cfg = compose("train", overrides=PACK_OVERRIDES)
    stream = instantiate(cfg.data.train)
    plan = list(stream.plan(0, 0, 1))[:2]  # what the run's one worker trained on
    costs = stream.packer.costs
    assert [float(r["train/pack_samples"]) for r in rows] == [len(items) for _, items in plan]
    assert [float(r["train/pack_tokens"]) for r in rows] == [sum(costs[b] for b in bs) for bs, _ in plan]
    assert all(float(r["train/pack_tokens"]) <= 320 for r in rows)
    assert any(len(set(bs)) > 1 for bs, _ in plan)  # mixed buckets in one step
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["ranks"][0]["dataset_state"]
    assert ckpt["global_step"] == 2 and state["batches"] == 2
