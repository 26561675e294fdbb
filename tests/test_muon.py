"""Muon on the DiT's hidden matrices + AdamW on the rest as one optimizer (sora.training.muon)."""

import io

import pytest
import torch

from sora.models.dit import AVDiT
from sora.training.muon import MuonAdamW, hidden_matrices, muon_with_schedule, orthogonalize


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (32, 32)])
def test_orthogonalize_flattens_the_spectrum_in_float32_on_cpu(shape):
    gen, k = torch.Generator().manual_seed(0), min(shape)
    u = torch.linalg.qr(torch.randn(shape[0], k, generator=gen))[0]
    v = torch.linalg.qr(torch.randn(shape[1], k, generator=gen))[0]
    g = u @ torch.diag(torch.logspace(-1, 1, k)) @ v.T  # singular values 0.1 ... 10
    o = orthogonalize(g)
    assert o.shape == g.shape and o.dtype == torch.float32
    s = torch.linalg.svdvals(o)
    assert float(s.min()) > 0.5 and float(s.max()) < 1.3  # Muon's quintic: near 1, not exactly 1
    stack = torch.stack([g, 3 * g.flip(0), -g])  # a stack: each matrix as alone
    for one, alone in zip(orthogonalize(stack), (o, orthogonalize(3 * g.flip(0)), -o)):
        torch.testing.assert_close(one, alone, rtol=1e-4, atol=1e-5)


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(24, 8, generator=g)), torch.nn.Parameter(torch.randn(8, 24, generator=g)),
            torch.nn.Parameter(torch.randn(8, generator=g))]


def _grads(step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(24, 8, generator=g), torch.randn(8, 24, generator=g), torch.randn(8, generator=g)]


def test_updates_equal_torch_muon_and_adamw():
    """The same trajectory as torch.optim.Muon (match_rms_adamw, bf16 Newton-Schulz) on the matrices and
    torch.optim.AdamW on the vector, over steps with a decaying lr and weight decay."""
    ours, ref = _params(), _params()
    opt = MuonAdamW([{"params": ours[:2], "muon": True, "lr": 0.02, "weight_decay": 0.1},
                     {"params": ours[2:], "lr": 1e-3}], lr=1e-3, betas=(0.9, 0.95), ns_dtype=torch.bfloat16)
    muon = torch.optim.Muon(ref[:2], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    adam = torch.optim.AdamW(ref[2:], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (1 + s)) for o in (opt, muon, adam)]
    for step in range(4):
        for ps in (ours, ref):
            for p, g in zip(ps, _grads(step)):
                p.grad = g.clone()
        opt.step(), muon.step(), adam.step()
        for s in scheds:
            s.step()
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.02 / 5) and opt.adamw.param_groups[0]["lr"] == pytest.approx(
        1e-3 / 5)


def test_state_dict_resumes_exactly_and_loads_weights_only():
    def run(steps, opt, ps):
        for step in steps:
            for p, g in zip(ps, _grads(step)):
                p.grad = g
            opt.step()

    def make(ps):
        return MuonAdamW([{"params": ps[:2], "muon": True, "lr": 0.02}, {"params": ps[2:]}], lr=1e-3)

    whole = _params()
    run(range(5), make(whole), whole)
    first = _params()
    opt = make(first)
    run(range(3), opt, first)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # plain tensors and data only
    again = [torch.nn.Parameter(p.detach().clone()) for p in first]
    resumed = make(again)
    resumed.load_state_dict(state)
    for g in resumed.param_groups:  # one set of group dicts: a scheduler's lr change reaches AdamW
        g["lr"] = g["lr"] * 1.0
    assert resumed.adamw.param_groups[0] is resumed.param_groups[1]
    run(range(3, 5), resumed, again)
    for a, b in zip(again, whole):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_hidden_matrices_are_the_block_projections_only():
    dit = AVDiT(video_channels=4, audio_channels=4, text_dim=8, dim=32, depth=2, heads=2)
    muon, adam = hidden_matrices(dit.named_parameters(), prefix="blocks.")
    names = {id(p): n for n, p in dit.named_parameters()}
    assert muon and all(p.ndim == 2 and names[id(p)].startswith("blocks.") for p in muon)
    assert not any("adaLN" in names[id(p)] for p in muon)
    assert {names[id(p)] for p in adam} >= {"video_embed.weight", "final_video.linear.weight"}
    assert len(muon) + len(adam) == len(list(dit.parameters()))
    out = muon_with_schedule(dit.named_parameters(), lr=1e-3, muon_lr=1e-2, weight_decay=0.1, warmup_steps=2,
                             prefix="blocks.")
    groups = out["optimizer"].param_groups
    assert [g["muon"] for g in groups] == [True, False, False] and groups[0]["lr"] == pytest.approx(1e-2 / 2)
    assert groups[2]["weight_decay"] == 0.0 and all(p.ndim < 2 for p in groups[2]["params"])
    with pytest.raises(ValueError, match="2-D"):
        MuonAdamW([{"params": [torch.nn.Parameter(torch.zeros(3))], "muon": True}], lr=1e-3)


def test_a_device_flag_skips_the_step_without_a_host_read():
    """``found_inf`` = 1 (the non-finite guard's device flag): weights, Muon's momentum and AdamW's state untouched,
    NaN gradients included; 0: the same step as without a flag."""
    plain, flagged = _params(), _params()
    a = MuonAdamW([{"params": plain[:2], "muon": True, "lr": 0.02}, {"params": plain[2:]}], lr=1e-3, fused=True)
    b = MuonAdamW([{"params": flagged[:2], "muon": True, "lr": 0.02}, {"params": flagged[2:]}], lr=1e-3, fused=True)
    assert b.defaults["fused"] and b._step_supports_amp_scaling
    for ps, opt in ((plain, a), (flagged, b)):
        for p, g in zip(ps, _grads(0)):
            p.grad = g.clone()
    a.step()
    b.found_inf = torch.tensor(0.0)
    b.step()
    before = [p.detach().clone() for p in flagged]
    state = {k: v.clone() for k, v in b.state[flagged[0]].items()}
    adam_state = {k: v.clone() for k, v in b.adamw.state[flagged[2]].items()}
    for p, q in zip(plain, flagged):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    for p, g in zip(flagged, _grads(1)):
        p.grad = torch.full_like(g, float("nan"))
    b.found_inf = torch.tensor(1.0)
    b.step()
    for p, q in zip(flagged, before):
        assert torch.equal(p, q)
    assert all(torch.equal(v, b.state[flagged[0]][k]) for k, v in state.items())
    assert all(torch.equal(v, b.adamw.state[flagged[2]][k]) for k, v in adam_state.items())
