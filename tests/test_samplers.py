"""Samplers (sora.diffusion.samplers) and guidance (sora.diffusion.guidance)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sora.diffusion.flow import shift_timesteps
from sora.diffusion.guidance import cfg, replace_cond
from sora.diffusion.samplers import SAMPLERS, make_schedule, sample_euler, sample_heun


def g(seed=0):
    return torch.Generator().manual_seed(seed)


def _bt(t, x):
    return t.view(-1, *([1] * (x.ndim - 1))) if t.ndim == 1 else t.view(t.shape[0], 1, t.shape[1], *([1] * (x.ndim - 3)))


def exact_field(x0):
    """The exact velocity for a single data point: v(x, t) = (x - x0) / t."""
    return lambda x, t, cond: (x - x0) / _bt(t, x)


def mixture_field(points):
    """Posterior-mean velocity for data = uniform over ``points`` [K, D], Gaussian noise."""

    def fn(x, t, cond):
        tb = t[:, None]
        d2 = ((x[:, None, :] - (1 - tb[:, :, None]) * points[None]) ** 2).sum(-1)  # [B, K]
        w = torch.softmax(-d2 / (2 * tb**2), dim=1)
        x0_hat = w @ points
        return (x - x0_hat) / tb

    return fn


def test_make_schedule():
    s = make_schedule(10)
    assert s.shape == (11,) and s[0] == 1 and s[-1] == 0 and (s[1:] < s[:-1]).all()
    torch.testing.assert_close(make_schedule(10, shift=3.0), shift_timesteps(torch.linspace(1, 0, 11), 3.0))


@settings(max_examples=15, deadline=None)
@given(steps=st.integers(1, 12), shift=st.floats(0.3, 6.0), sampler=st.sampled_from(["euler", "heun"]),
       seed=st.integers(0, 1000))
def test_exact_field_reaches_x0_for_any_schedule(steps, shift, sampler, seed):
    x0 = torch.randn(3, 4, 5, generator=g(seed))
    noise = torch.randn(3, 4, 5, generator=g(seed + 1))
    out = SAMPLERS[sampler](exact_field(x0), noise, make_schedule(steps, shift))
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)


def test_exact_field_random_schedule_and_dict_noise():
    x0 = {"video": torch.randn(2, 3, 4, 2, 2), "audio": torch.randn(2, 3, 7)}
    noise = {k: torch.randn_like(v) for k, v in x0.items()}
    sched = torch.cat([torch.tensor([1.0]), torch.rand(6, generator=g(2)).sort(descending=True).values,
                       torch.tensor([0.0])])

    def model_fn(x, t, cond):
        assert isinstance(x, dict) and isinstance(t, dict) and t["video"].shape == (2,)
        return {k: exact_field(x0[k])(x[k], t[k], cond) for k in x}

    for sampler in (sample_euler, sample_heun):
        out = sampler(model_fn, noise, sched)
        assert set(out) == {"video", "audio"}
        for k in x0:
            torch.testing.assert_close(out[k], x0[k], atol=1e-4, rtol=0)


def test_heun_beats_euler_on_curved_field():
    points = torch.tensor([[-1.0, 0.5], [1.0, -0.5], [0.2, 1.2]])
    field = mixture_field(points)
    noise = torch.randn(256, 2, generator=g(3))
    ref = sample_heun(field, noise, make_schedule(400))
    for steps in (6, 12):
        sched = make_schedule(steps)
        err_euler = (sample_euler(field, noise, sched) - ref).norm(dim=1).mean()
        err_heun = (sample_heun(field, noise, sched) - ref).norm(dim=1).mean()
        assert err_heun < 0.5 * err_euler, (steps, err_heun, err_euler)


@pytest.mark.parametrize("sampler", [sample_euler, sample_heun])
def test_callback_once_per_step_with_decreasing_t(sampler):
    x0 = torch.randn(2, 3)
    calls = []
    sched = make_schedule(7, shift=2.0)
    sampler(exact_field(x0), torch.randn(2, 3), sched, callback=calls.append)
    assert [c["i"] for c in calls] == list(range(7))
    ts = [c["t"] for c in calls]
    assert all(a > b for a, b in zip(ts, ts[1:])) and ts[0] == 1.0
    assert all(set(c) >= {"i", "t", "x", "denoised"} for c in calls)
    for c in calls:  # the exact field's denoised estimate is x0 at every step
        torch.testing.assert_close(c["denoised"], x0, atol=1e-5, rtol=0)


@pytest.mark.parametrize("sampler", [sample_euler, sample_heun])
def test_clean_modality_is_returned_unchanged(sampler):
    video = torch.randn(2, 3, 4, 2, 2)
    x0_audio = torch.randn(2, 3, 7)
    seen = []

    def model_fn(x, t, cond):
        seen.append(t["video"])
        assert torch.equal(x["video"], video)
        # garbage velocity for the clean modality: must be ignored
        return {"video": torch.full_like(x["video"], 1e3), "audio": exact_field(x0_audio)(x["audio"], t["audio"], cond)}

    noise = {"video": torch.randn_like(video), "audio": torch.randn_like(x0_audio)}
    out = sampler(model_fn, noise, make_schedule(5), cond={"clean": {"video": video}})
    assert torch.equal(out["video"], video)
    torch.testing.assert_close(out["audio"], x0_audio, atol=1e-4, rtol=0)
    assert all((t == 0).all() and t.shape == (2,) for t in seen)


def test_clean_prefix_continuation():
    x0 = torch.randn(2, 3, 6, 2, 2)
    noise = torch.randn_like(x0)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, :2] = True
    ts = []

    def model_fn(x, t, cond):
        ts.append(t)
        assert torch.equal(x[:, :, :2], x0[:, :, :2])
        return exact_field(x0)(x, t.clamp(min=1e-6), cond)

    cond = {"clean": {"x": x0}, "clean_mask": {"x": mask}}
    out = sample_heun(model_fn, noise, make_schedule(4), cond)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)
    assert all(t.shape == (2, 6) and (t[:, :2] == 0).all() and (t[:, 2:] > 0).all() for t in ts)


def test_bad_schedule_and_unknown_clean():
    with pytest.raises(ValueError):
        sample_euler(exact_field(torch.zeros(1)), torch.zeros(1), torch.tensor([0.0, 1.0]))
    with pytest.raises(KeyError):
        sample_euler(lambda x, t, c: x, {"audio": torch.zeros(1, 1, 2)}, make_schedule(2),
                     {"clean": {"video": torch.zeros(1)}})


# ----------------------------------------------------------------------------- guidance


class Counting:
    """A toy conditional model: v = x * t + text; counts calls and batch sizes."""

    def __init__(self):
        self.calls, self.batches = 0, []

    def __call__(self, x, t, cond):
        self.calls += 1
        xs = x if isinstance(x, dict) else {"x": x}
        self.batches.append(next(iter(xs.values())).shape[0])
        ts = t if isinstance(t, dict) else {"x": t}
        out = {}
        for k, v in xs.items():
            extra = cond["text"].view(-1, *([1] * (v.ndim - 1)))
            if k == "video" and "audio" in ts:  # the audio condition matters where it is given
                extra = extra + 10.0 * (ts["audio"] == 0).float().view(-1, *([1] * (v.ndim - 1)))
            out[k] = v * _bt(ts[k], v) + extra
        return out if isinstance(x, dict) else out["x"]


def _inputs():
    x = torch.randn(3, 4, 5)
    return x, torch.full((3,), 0.5), {"text": torch.tensor([1.0, 2.0, 3.0])}


def test_cfg_scale_one_and_zero():
    model = Counting()
    x, t, cond = _inputs()
    uncond = replace_cond(text=torch.zeros(1))
    torch.testing.assert_close(cfg(model, 1.0, uncond)(x, t, cond), model(x, t, cond))
    torch.testing.assert_close(cfg(model, 0.0, uncond)(x, t, cond), model(x, t, uncond(cond)))


def test_cfg_batches_cond_and_uncond_in_one_call():
    model = Counting()
    x, t, cond = _inputs()
    uncond = replace_cond(text=torch.zeros(1))
    out = cfg(model, 4.0, uncond)(x, t, cond)
    assert model.calls == 1 and model.batches == [6]
    v_c, v_u = Counting()(x, t, cond), Counting()(x, t, uncond(cond))
    torch.testing.assert_close(out, v_u + 4.0 * (v_c - v_u))
    # unbatchable conds (different shapes) fall back to two calls, same result
    model2 = Counting()
    out2 = cfg(model2, 4.0, replace_cond(text=torch.zeros(3)), batch=False)(x, t, cond)
    assert model2.calls == 2
    torch.testing.assert_close(out2, out)


def test_cfg_per_modality_scales_and_sampler():
    model = Counting()
    x = {"video": torch.randn(2, 3, 4, 2, 2), "audio": torch.randn(2, 3, 5)}
    t = {k: torch.full((2,), 0.5) for k in x}
    cond = {"text": torch.tensor([1.0, 2.0])}
    uncond = replace_cond(text=torch.zeros(1))
    out = cfg(model, {"video": 3.0, "audio": 1.0}, uncond)(x, t, cond)
    v_c, v_u = model(x, t, cond), model(x, t, uncond(cond))
    torch.testing.assert_close(out["video"], v_u["video"] + 3.0 * (v_c["video"] - v_u["video"]))
    torch.testing.assert_close(out["audio"], v_c["audio"])
    # guidance composes with any sampler
    res = sample_heun(cfg(model, 2.0, uncond), {k: torch.randn_like(v) for k, v in x.items()}, make_schedule(3), cond)
    assert res["video"].shape == x["video"].shape
