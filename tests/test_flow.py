import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sora.diffusion.flow import (
    DEFAULT_TASK_PROBS,
    TASKS,
    drop_captions,
    drop_text,
    flow_loss,
    interpolate,
    logit_normal_timesteps,
    sample_task,
    shift_timesteps,
    task_ids,
    timesteps_for_tasks,
    velocity_target,
)


def g(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", [(3, 4, 5, 6, 7), (3, 8, 11)])
def test_interpolation_endpoints_and_velocity(shape):
    x0, noise = torch.randn(shape, generator=g(0)), torch.randn(shape, generator=g(1))
    b = shape[0]
    assert torch.equal(interpolate(x0, noise, torch.zeros(b)), x0)
    assert torch.equal(interpolate(x0, noise, torch.ones(b)), noise)
    t = torch.rand(b, generator=g(2))
    xt = interpolate(x0, noise, t)
    v = velocity_target(x0, noise)
    tb = t.view(b, *([1] * (len(shape) - 1)))
    torch.testing.assert_close(xt - tb * v, x0)
    torch.testing.assert_close(xt + (1 - tb) * v, noise)
    # scalar t and per-token t agree with [B] t
    torch.testing.assert_close(interpolate(x0, noise, 0.3), interpolate(x0, noise, torch.full((b,), 0.3)))
    per_token = t[:, None].expand(b, shape[2])
    torch.testing.assert_close(interpolate(x0, noise, per_token), xt)


def test_interpolate_clean_mask_keeps_x0():
    x0, noise = torch.randn(2, 3, 5, 4, 4), torch.randn(2, 3, 5, 4, 4)
    clean = torch.zeros(2, 5, dtype=torch.bool)
    clean[0, :2] = True
    xt = interpolate(x0, noise, torch.tensor([0.7, 0.7]), clean)
    assert torch.equal(xt[0, :, :2], x0[0, :, :2])
    assert not torch.allclose(xt[0, :, 2:], x0[0, :, 2:])
    assert not torch.allclose(xt[1], x0[1])


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (0.5, 0.8), (-1.0, 1.5)])
def test_logit_normal_moments(mean, std):
    t = logit_normal_timesteps(20_000, mean, std, generator=g(3))
    assert t.shape == (20_000,) and ((t > 0) & (t < 1)).all()
    z = torch.logit(t.double())
    assert abs(z.mean().item() - mean) < 0.05
    assert abs(z.std().item() - std) < 0.05


@settings(max_examples=50, deadline=None)
@given(shift=st.floats(0.1, 10.0))
def test_shift_monotone_and_fixes_endpoints(shift):
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    s = shift_timesteps(t, shift)
    assert s[0] == 0 and abs(s[-1].item() - 1) < 1e-12
    assert (s[1:] > s[:-1]).all()
    if shift > 1:
        assert (s[1:-1] > t[1:-1]).all()


def test_shift_one_is_identity():
    t = torch.rand(100, generator=g(4))
    torch.testing.assert_close(shift_timesteps(t, 1.0), t)



def test_sample_task_frequencies():
    n = 40_000
    tasks = sample_task(n, generator=g(5))
    assert tasks.shape == (n,) and tasks.dtype == torch.long
    for name, p in DEFAULT_TASK_PROBS.items():
        freq = (tasks == TASKS.index(name)).float().mean().item()
        assert abs(freq - p) < 0.01, (name, freq)
    only = sample_task(100, {"v2a": 1.0}, generator=g(6))
    assert (only == TASKS.index("v2a")).all()
    with pytest.raises(ValueError):
        sample_task(4, {"nope": 1.0})


def test_timesteps_for_tasks_and_clean_masks():
    tasks = task_ids(["t2av", "v2a", "a2v", "continuation"] * 25)
    b, tv, la = tasks.shape[0], 8, 50
    t = torch.rand(b, generator=g(7)) * 0.9 + 0.05
    out = timesteps_for_tasks(tasks, t, t.clone(), video_len=tv, audio_len=la, generator=g(8))
    is_ = {name: tasks == TASKS.index(name) for name in TASKS}
    assert out.clean_video.shape == (b, tv) and out.clean_audio.shape == (b, la)
    # t2av: nothing clean, t unchanged
    assert not out.clean_video[is_["t2av"]].any() and not out.clean_audio[is_["t2av"]].any()
    assert torch.equal(out.t_video[is_["t2av"]], t[is_["t2av"]])
    # v2a: video clean with t=0, audio noised
    assert out.clean_video[is_["v2a"]].all() and (out.t_video[is_["v2a"]] == 0).all()
    assert not out.clean_audio[is_["v2a"]].any() and torch.equal(out.t_audio[is_["v2a"]], t[is_["v2a"]])
    # a2v: the reverse
    assert out.clean_audio[is_["a2v"]].all() and (out.t_audio[is_["a2v"]] == 0).all()
    assert not out.clean_video[is_["a2v"]].any()
    # continuation: a clean prefix in both, aligned in time, never the whole clip
    cv, ca = out.clean_video[is_["continuation"]], out.clean_audio[is_["continuation"]]
    kv, ka = cv.sum(1), ca.sum(1)
    assert (kv >= 1).all() and (kv <= tv // 2).all()
    assert torch.equal(cv, torch.arange(tv)[None] < kv[:, None])  # a prefix
    assert torch.equal(ca, torch.arange(la)[None] < ka[:, None])
    assert ((ka.float() / la - kv.float() / tv).abs() <= 0.5 / la + 1e-6).all()
    assert len(set(kv.tolist())) > 1  # k is sampled
    # per-token t: 0 on clean tokens, t elsewhere
    vt = out.video_token_t
    assert (vt[out.clean_video] == 0).all()
    assert torch.equal(vt[~out.clean_video], out.t_video[:, None].expand(b, tv)[~out.clean_video])


def _runs(mask_row) -> list[tuple[int, int]]:
    """[(start, end)] of the True runs of a 1-D bool tensor."""
    padded = torch.cat([torch.tensor([False]), mask_row, torch.tensor([False])]).int()
    edges = torch.nonzero(padded.diff()).flatten()
    return [(int(a), int(b)) for a, b in zip(edges[0::2], edges[1::2])]


@settings(max_examples=60, deadline=None)
@given(video_len=st.integers(1, 12), per_step=st.integers(1, 9), seed=st.integers(0, 10**6))
def test_retake_and_first_last_masks(video_len, per_step, seed):
    """A retake regenerates one window, the same seconds on both streams (or one stream, the other
    kept whole); first_last keeps the first and last steps. Property test over clip lengths."""
    audio_len = video_len * per_step + seed % 3  # audio steps need not be a multiple of video steps
    tasks = task_ids(["retake", "first_last"] * 16)
    t = torch.full((32,), 0.7)
    out = timesteps_for_tasks(tasks, t, t.clone(), video_len, audio_len, generator=g(seed))
    for i, name in enumerate(["retake", "first_last"] * 16):
        cv, ca = out.clean_video[i], out.clean_audio[i]
        gen_v, gen_a = _runs(~cv), _runs(~ca)
        if name == "retake":
            assert len(gen_v) <= 1 and len(gen_a) <= 1 and (gen_v or gen_a)  # one window, somewhere
            if gen_v and gen_a:  # both streams: the same seconds
                (lv, hv), (la, ha) = gen_v[0], gen_a[0]
                assert abs(lv / video_len - la / audio_len) <= 0.5 / audio_len + 1e-9
                assert abs(hv / video_len - ha / audio_len) <= 0.5 / audio_len + 1e-9
            if not gen_v:
                assert out.t_video[i] == 0 and cv.all()  # the video is kept whole
            if not gen_a:
                assert out.t_audio[i] == 0 and ca.all()
            if gen_v:
                assert gen_v[0][1] - gen_v[0][0] <= max(1, round(0.5 * video_len))
        else:
            if cv.any():
                assert cv[0] and cv[-1] and cv.sum() == min(2, video_len)
            if ca.any() and video_len > 2:
                assert ca[0] and ca[-1] and not ca.all()
            assert cv.any() or ca.any()
            assert out.t_video[i] == (0.0 if cv.all() else 0.7) and out.t_audio[i] == (0.0 if ca.all() else 0.7)


def test_drop_text():
    d = drop_text(20_000, p=0.1, generator=g(9))
    assert d.dtype == torch.bool and abs(d.float().mean().item() - 0.1) < 0.01
    mask = torch.ones(8, 5, dtype=torch.bool)
    assert drop_text(mask, p=1.0).all() and not drop_text(mask, p=0.0).any()
    allowed = torch.tensor([True, False] * 4)
    assert torch.equal(drop_text(allowed, p=1.0), allowed)
    assert drop_captions(["a", "b", "c"], torch.tensor([False, True, False])) == ["a", "", "c"]


@pytest.mark.parametrize("shape", [(3, 4, 6, 2, 2), (3, 4, 6)])
def test_flow_loss_ignores_masked_tokens(shape):
    x0, noise = torch.randn(shape, generator=g(10)), torch.randn(shape, generator=g(11))
    v = torch.randn(shape, generator=g(12), requires_grad=True)
    clean = torch.zeros(shape[0], shape[2], dtype=torch.bool)
    clean[0, :3] = True
    clean[1] = True
    weight = ~clean
    loss = flow_loss(v, x0, noise, weight)
    v2 = v.detach().clone()
    v2[:, :, :][clean.view(shape[0], 1, shape[2], *([1] * (len(shape) - 3))).expand(shape)] = 1e3
    torch.testing.assert_close(flow_loss(v2, x0, noise, weight), loss)
    torch.testing.assert_close(flow_loss(v2, x0, noise, clean_mask=clean), loss)
    # equals the plain mean over kept tokens
    se = ((v - (noise - x0)) ** 2).movedim(2, 1)  # [B, T, C, ...]
    torch.testing.assert_close(loss, se[weight].mean())
    loss.backward()
    assert v.grad[1].abs().sum() == 0 and v.grad[2].abs().sum() > 0
    # no mask: plain MSE; everything masked: zero that still backpropagates
    torch.testing.assert_close(flow_loss(v, x0, noise), ((v - (noise - x0)) ** 2).mean())
    zero = flow_loss(v, x0, noise, torch.zeros(shape[0], shape[2]))
    assert zero.item() == 0 and zero.requires_grad
