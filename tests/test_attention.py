import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sora.models import attention as A
from sora.timeline import Timeline


def _padded(batch, lengths, heads=2, lq=None, lk=None, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    lk = lk or max(lengths)
    lq = lq or lk
    q = torch.randn(batch, heads, lq, dim, generator=g)
    k = torch.randn(batch, heads, lk, dim, generator=g)
    v = torch.randn(batch, heads, lk, dim, generator=g)
    mask = torch.arange(lk)[None] < torch.tensor(lengths)[:, None]
    return q, k, v, mask


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(1, 9), min_size=1, max_size=4), extra=st.integers(0, 3),
       seed=st.integers(0, 1000))
def test_packed_varlen_matches_sdpa_with_padding_mask(lengths, extra, seed):
    q, k, v, mask = _padded(len(lengths), lengths, lk=max(lengths) + extra, seed=seed)
    ref = A.attention(q, k, v, mask, backend="sdpa")
    # self-attention: queries packed with the same mask; padded rows come back as zeros
    out = A.varlen_attention(q, k, v, mask, q_mask=mask, kernel=A.varlen_attention_reference)
    keep = mask[:, None, :, None].expand_as(ref)
    torch.testing.assert_close(out[keep], ref[keep], atol=1e-5, rtol=1e-5)
    assert (out[~keep] == 0).all()
    # all queries kept: equal everywhere
    out_all = A.varlen_attention(q, k, v, mask, kernel=A.varlen_attention_reference)
    torch.testing.assert_close(out_all, ref, atol=1e-5, rtol=1e-5)


def test_cross_attention_varlen_different_lengths():
    q, k, v, mask = _padded(3, [2, 7, 5], lq=4, lk=7, seed=3)
    ref = A.attention(q, k, v, mask, backend="sdpa")
    out = A.varlen_attention(q, k, v, mask, kernel=A.varlen_attention_reference)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_pack_unpack_roundtrip():
    x = torch.randn(3, 6, 4)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 1, 0, 1, 0]]).bool()
    packed, cu, max_len, idx = A.pack(x, mask)
    assert packed.shape == (11, 4) and cu.tolist() == [0, 2, 8, 11] and cu.dtype == torch.int32
    assert max_len == 6
    back = A.unpack(packed, idx, 3, 6)
    torch.testing.assert_close(back[mask], x[mask])
    assert (back[~mask] == 0).all()


@settings(max_examples=20, deadline=None)
@given(lengths=st.lists(st.integers(0, 9), min_size=1, max_size=4), extra=st.integers(0, 3), lq=st.integers(1, 6),
       seed=st.integers(0, 1000))
def test_varlen_keys_matches_sdpa_forward_and_backward(lengths, extra, lq, seed):
    """Every query row against the kept keys (the DiT's dense case), through the varlen kernel's CPU twin."""
    lengths = [max(n, 1) for n in lengths]  # a sample keeps at least one key (its video tokens)
    q, k, v, mask = _padded(len(lengths), lengths, lq=lq, lk=max(lengths) + extra, seed=seed)
    grads = []
    for run in (lambda *t: A.attention(*t, mask, backend="sdpa"),
                lambda *t: A.varlen_keys(*t, mask, kernel=A.varlen_attention_reference)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = run(*leaves)
        out.square().sum().backward()
        grads.append((out.detach(), *(t.grad for t in leaves)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_varlen_keys_needs_no_host_sync():
    """On the meta device any data-dependent shape (nonzero, .item(), a mask's count) fails: the packing
    runs there, so it asks the device nothing (the kernel stands in for flash-attn's, shape only)."""
    q, k, v = (torch.empty(2, 3, n, 8, device="meta") for n in (5, 7, 7))
    mask = torch.empty(2, 7, dtype=torch.bool, device="meta")
    out = A.varlen_keys(q, k, v, mask, kernel=lambda q, *args, **kw: torch.empty_like(q))
    assert out.shape == q.shape and out.device.type == "meta"
    with pytest.raises(Exception):  # the older packing does ask (nonzero)
        A.varlen_attention(q, k, v, mask, kernel=lambda q, *args, **kw: torch.empty_like(q))


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_masked_keys_do_not_influence_outputs(backend):
    q, k, v, mask = _padded(2, [3, 5], lk=8, seed=1)

    def run(k, v):
        if backend == "sdpa":
            return A.attention(q, k, v, mask, backend="sdpa")
        return A.varlen_attention(q, k, v, mask, kernel=A.varlen_attention_reference)

    out = run(k, v)
    k2, v2 = k.clone(), v.clone()
    pad = ~mask[:, None, :, None].expand_as(k)
    k2[pad] = 1e3 * torch.randn(int(pad.sum()))
    v2[pad] = 1e3 * torch.randn(int(pad.sum()))
    torch.testing.assert_close(run(k2, v2), out)


def test_auto_picks_sdpa_on_cpu():
    q = torch.randn(1, 2, 4, 8)
    assert A.select_backend(q, "auto") == "sdpa"
    assert A.select_backend(q.half(), "auto") == "sdpa"
    with pytest.raises(ValueError):
        A.select_backend(q, "xformers")
    if A.flash_attn_varlen_func is None:
        with pytest.raises(RuntimeError):
            A.attention(q, q, q, backend="flash")


# ---- RoPE ---------------------------------------------------------------------------------
def test_rope_axes_split_and_time_frequencies():
    assert A.rope_axes_dims(64) == (32, 16, 16)
    assert A.rope_axes_dims(16) == (8, 4, 4)
    assert sum(A.rope_axes_dims(48)) == 48
    f = A.rope_frequencies(64, torch.tensor([[0.01, 0.0, 0.0]]))[0]  # angles at t = 10 ms
    time_omega = f[:16] / 0.01
    assert time_omega[0].item() == pytest.approx(100.0, rel=1e-5)  # fastest period 2*pi/100 s
    assert 2 * math.pi / time_omega[-1].item() > 100.0  # slowest period well beyond a clip
    # long clips keep their phase precision: 10 ms apart at t = 60 s is still 1 rad apart
    far = A.rope_frequencies(64, torch.tensor([[60.0, 0.0, 0.0], [60.01, 0.0, 0.0]], dtype=torch.float64))
    delta = torch.remainder(far[1, 0] - far[0, 0], 2 * math.pi)
    assert delta.item() == pytest.approx(1.0, abs=1e-5)


def test_rope_preserves_norm():
    x = torch.randn(2, 3, 10, 16)
    pos = torch.rand(10, 3) * torch.tensor([30.0, 8.0, 8.0])
    y = A.apply_rope(x, A.rope_frequencies(16, pos))
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_rope_relative_position_per_axis(axis):
    g = torch.Generator().manual_seed(axis)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)
    base = torch.tensor([0.37, 2.0, 5.0])

    def score(pq, pk):
        posq, posk = base.clone(), base.clone()
        posq[axis], posk[axis] = pq, pk
        fq = A.rope_frequencies(16, posq[None])
        fk = A.rope_frequencies(16, posk[None])
        return (A.apply_rope(q, fq) * A.apply_rope(k, fk)).sum()

    s = score(1.25, 0.5)
    for shift in (0.04, 3.0, 17.5):
        torch.testing.assert_close(score(1.25 + shift, 0.5 + shift), s, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(score(1.25, 0.5), score(1.25, 0.9))


def test_video_and_audio_tokens_at_same_instant_share_time_phase():
    tl = Timeline(seconds=2.0, fps=24, vae_time_stride=4, sample_rate=16000, mel_hop=160, audio_latent_stride=4)
    vt = torch.tensor(tl.video_token_times())
    at = torch.tensor(tl.audio_token_times())
    t = vt[2].item()  # a video token's time from the contract; an audio token at that instant
    assert at.min() <= t <= at.max()
    dims = A.rope_axes_dims(16)
    video_pos = torch.tensor([[t, 3.0, 1.0]])  # any patch row / col
    audio_pos = torch.tensor([[t, 0.0, 0.0]])
    fv, fa = A.rope_frequencies(16, video_pos), A.rope_frequencies(16, audio_pos)
    nt = dims[0] // 2
    torch.testing.assert_close(fv[..., :nt], fa[..., :nt], atol=0, rtol=0)
    x = torch.randn(1, 1, 1, 16)
    torch.testing.assert_close(A.apply_rope(x, fv)[..., : dims[0]], A.apply_rope(x, fa)[..., : dims[0]])
    # and h = w = 0: identical everywhere
    torch.testing.assert_close(A.rope_frequencies(16, torch.tensor([[t, 0.0, 0.0]])), fa)


def test_rmsnorm():
    n = A.RMSNorm(8)
    x = torch.randn(3, 8) * 5
    y = n(x)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(3), atol=1e-3, rtol=1e-3)
    # over the channels of a (B, C, T, H, W) volume (the video VAE's norm): each position's channels
    n = A.RMSNorm(6, dim=1)
    n.weight.data = torch.randn(6)
    v = torch.randn(2, 6, 3, 4, 5)
    torch.testing.assert_close(n(v), v * torch.rsqrt(v.pow(2).mean(1, keepdim=True) + 1e-6) * n.weight.view(6, 1, 1, 1))
