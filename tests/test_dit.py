import pytest
import torch

from sora.models.attention import shot_attention_mask
from sora.models.dit import AVDiT
from sora.timeline import Timeline

FUSIONS = ["joint", "dual_stream"]
B, CV, T, H, W, CA, L, LT, TEXT_DIM = 2, 16, 3, 4, 4, 8, 12, 5, 24


def make(fusion="joint", seed=0, **kw):
    torch.manual_seed(seed)
    kw = dict(video_channels=CV, audio_channels=CA, text_dim=TEXT_DIM, dim=32, depth=2, heads=2,
              patch_size=2, fusion=fusion) | kw
    return AVDiT(**kw)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    tl = Timeline(seconds=0.48, fps=25, vae_time_stride=6, sample_rate=16000, mel_hop=160, audio_latent_stride=4)
    assert (tl.video_latent_steps, tl.audio_latent_steps) == (T, L)
    vt = torch.tensor(tl.video_token_times(), dtype=torch.float32)
    at = torch.tensor(tl.audio_token_times(), dtype=torch.float32)
    return dict(
        video=torch.randn(B, CV, T, H, W, generator=g),
        audio=torch.randn(B, CA, L, generator=g),
        text=torch.randn(B, LT, TEXT_DIM, generator=g),
        text_mask=torch.tensor([[True, True, True, False, False], [True] * LT]),
        t_video=torch.rand(B, generator=g),
        t_audio=torch.rand(B, generator=g),
        video_times=vt,
        audio_times=at,
    )


def unzero(model, std=0.1, seed=1):
    """Perturb every zero-initialised weight (AdaLN gates and final layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or name.startswith("final_"):
                p.add_(std * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("fusion", FUSIONS)
def test_shapes_and_zero_init(fusion):
    model, x = make(fusion), inputs()
    v, a = model(**x)
    assert v.shape == x["video"].shape and a.shape == x["audio"].shape
    assert (v == 0).all() and (a == 0).all()
    unzero(model)
    v, a = model(**x)
    assert v.abs().sum() > 0 and a.abs().sum() > 0
    assert torch.isfinite(v).all() and torch.isfinite(a).all()


@pytest.mark.parametrize("fusion", FUSIONS)
def test_padded_text_tokens_do_not_matter(fusion):
    model, x = unzero(make(fusion)), inputs()
    model.eval()
    v, a = model(**x)
    x2 = dict(x)
    text = x["text"].clone()
    text[0, 3:] = 100.0 * torch.randn(2, TEXT_DIM)  # padded positions of sample 0
    x2["text"] = text
    v2, a2 = model(**x2)
    torch.testing.assert_close(v2, v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a2, a, atol=1e-5, rtol=1e-5)
    # shuffle valid and padded tokens consistently with their mask: text has no positions
    perm = torch.tensor([4, 0, 3, 2, 1])
    x3 = dict(x2, text=text[:, perm], text_mask=x["text_mask"][:, perm])
    v3, a3 = model(**x3)
    torch.testing.assert_close(v3, v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a3, a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_gradients_reach_every_parameter_and_training_reduces_loss(fusion):
    model, x = unzero(make(fusion)), inputs()
    target_v, target_a = torch.randn_like(x["video"]) * 0.1, torch.randn_like(x["audio"]) * 0.1
    v, a = model(**x)
    loss = (v - target_v).pow(2).mean() + (a - target_a).pow(2).mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing
    model = make(fusion)  # from the real (zero) init
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        v, a = model(**x)
        loss = (v - target_v).pow(2).mean() + (a - target_a).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("fusion", FUSIONS)
def test_checkpoint_activations_same_outputs_and_gradients(fusion):
    x = inputs()
    outs, grads = [], []
    for ckpt in (False, True):
        model = unzero(make(fusion, checkpoint_activations=ckpt))
        v, a = model(**x)
        (v.pow(2).mean() + a.sin().mean()).backward()
        outs.append((v.detach(), a.detach()))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(outs[0], outs[1])
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], msg=n)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_outputs_depend_on_per_modality_time_and_token_times(fusion):
    model, x = unzero(make(fusion)), inputs()
    model.eval()
    v, a = model(**x)
    v2, a2 = model(**dict(x, t_audio=1.0 - x["t_audio"]))
    assert not torch.allclose(a2, a)
    v3, a3 = model(**dict(x, audio_times=x["audio_times"] + 0.1))  # shifting audio against video
    assert not torch.allclose(v3, v) and not torch.allclose(a3, a)
    # without text (all padded; text tokens sit at rotary position 0, so with text the absolute
    # time counts), shifting both streams together changes nothing: only relative time matters
    x0 = dict(x, text_mask=torch.zeros(B, LT, dtype=torch.bool))
    v, a = model(**x0)
    v4, a4 = model(**dict(x0, audio_times=x["audio_times"] + 7.0, video_times=x["video_times"] + 7.0))
    torch.testing.assert_close(v4, v, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a4, a, atol=1e-4, rtol=1e-4)


def test_all_padded_text_is_finite():
    model, x = unzero(make("joint")), inputs()
    v, a = model(**dict(x, text_mask=torch.zeros(B, LT, dtype=torch.bool)))
    assert torch.isfinite(v).all() and torch.isfinite(a).all()


def test_accounting_and_validation():
    joint, dual = make("joint"), make("dual_stream")
    assert joint.num_params() == sum(p.numel() for p in joint.parameters()) > 0
    assert dual.num_params() > joint.num_params()
    f = joint.estimate_flops_per_token(48, 12, 5)
    assert f > 6 * 0.2 * joint.num_params() / 3
    assert isinstance(joint.blocks, torch.nn.ModuleList) and len(joint.blocks) == 2
    with pytest.raises(ValueError):
        make("late_fusion")
    with pytest.raises(ValueError):
        joint(**dict(inputs(), audio_times=torch.zeros(L + 1)))


@pytest.mark.parametrize("backend", ["flash", "varlen"])
@pytest.mark.parametrize("fusion", FUSIONS)
def test_flash_code_path_matches_sdpa(fusion, backend, monkeypatch):
    """The model's varlen paths (keys packed without a host sync -> varlen kernel), run with the CPU twin
    kernel: flash-attn's ``flash_attn_varlen_func`` and PyTorch's ``varlen_attn`` (CUDA-only kernels)."""
    from sora.models import attention as A

    monkeypatch.setattr(A, "flash_attn_varlen_func", A.varlen_attention_reference)
    monkeypatch.setattr(A, "_torch_varlen_attn", lambda q, k, v, cq, ck, mq, mk, scale=None:
                        A.varlen_attention_reference(q, k, v, cq, ck, mq, mk, softmax_scale=scale))
    x = inputs()
    ref = unzero(make(fusion, attn_backend="sdpa"))(**x)
    out = unzero(make(fusion, attn_backend=backend))(**x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_unpadded_text_sends_no_mask_to_sdpa(fusion, monkeypatch):
    """Nothing padded: no boolean mask reaches SDPA (which would rule out its flash kernel), with the same
    outputs as the same captions plus a masked pad token; a padded caption still gets its mask."""
    from sora.models import attention as A

    seen = []
    sdpa = A.F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append(attn_mask)
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(A.F, "scaled_dot_product_attention", spy)
    model, x = unzero(make(fusion)), inputs()
    x["text_mask"] = torch.ones(B, LT, dtype=torch.bool)
    out = model(**x)
    assert seen and all(m is None for m in seen)
    seen.clear()
    padded = dict(x, text=torch.cat([x["text"], 50 * torch.randn(B, 1, TEXT_DIM)], 1),
                  text_mask=torch.cat([x["text_mask"], torch.zeros(B, 1, dtype=torch.bool)], 1))
    ref = model(**padded)
    assert any(m is not None for m in seen)  # (dual_stream: the video<->audio cross-attention has none)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_per_token_timesteps(fusion):
    """A timestep per latent step: equal steps give the per-sample result; a clean (t = 0) step changes the
    outputs, most at its own tokens; the shapes are checked."""
    model = unzero(make(fusion)).eval()
    x = inputs()
    with torch.no_grad():
        ref_v, ref_a = model(**x)
        same_v, same_a = model(**{**x, "t_video": x["t_video"][:, None].expand(B, T).clone(),
                                  "t_audio": x["t_audio"][:, None].expand(B, L).clone()})
        torch.testing.assert_close(same_v, ref_v, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(same_a, ref_a, atol=1e-5, rtol=1e-5)
        tv = x["t_video"][:, None].expand(B, T).clone()
        tv[:, 0] = 0.0  # the first latent step is a clean condition
        v, a = model(**{**x, "t_video": tv})
    moved = (v - ref_v).abs().mean(dim=(0, 1, 3, 4))  # per latent step
    assert moved[0] > 0 and (a - ref_a).abs().max() > 0  # the step itself and, through attention, the rest
    assert moved[0] > moved[1:].max()
    with pytest.raises(ValueError, match=r"t_video has shape \(2, 5\): need \[2\] or per token \[2, 3\]"):
        model(**{**x, "t_video": torch.zeros(B, 5)})


@pytest.mark.parametrize("fusion", FUSIONS)
def test_script_shots_confine_each_step_to_its_own_caption(fusion):
    """A timed script: video/audio tokens read only their own shot's caption (and the global one). Shot 1's caption
    then reaches shot 0 only through shot 1's picture and sound tokens (attention across shots stays open): a
    small effect, measured 20-50x below its effect on shot 1, where without a script both are alike. A script whose
    tokens are all global equals no script."""
    model = unzero(make(fusion, depth=1)).eval()
    x = inputs()
    x["text_mask"] = torch.ones(B, LT, dtype=torch.bool)
    every = {"text": torch.full((B, LT), -1), "video": torch.zeros(B, T, dtype=torch.long),
             "audio": torch.zeros(B, L, dtype=torch.long)}
    with torch.no_grad():
        ref = model(**x)
        same = model(**x, shots=every)
    for a, b in zip(same, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    shots = {"text": torch.tensor([[-1, 0, 0, 1, 1]] * B),  # a global token, then two tokens per shot
             "video": torch.tensor([[0, 0, 1]] * B), "audio": torch.tensor([[0] * 6 + [1] * 6] * B)}
    other = x["text"].clone()
    other[:, 3:] += 1.0  # shot 1's caption changes
    effect = {}
    with torch.no_grad():
        for name, sh in (("script", shots), ("none", None)):
            (v0, a0), (v1, a1) = model(**x, shots=sh), model(**{**x, "text": other}, shots=sh)
            dv, da = (v0 - v1).abs().mean(dim=(0, 1, 3, 4)), (a0 - a1).abs().mean(dim=(0, 1))
            effect[name] = (float(dv[:2].mean() + da[:6].mean()), float(dv[2] + da[6:].mean()))  # (shot 0, shot 1)
    assert effect["script"][0] < 0.15 * effect["script"][1], effect
    assert effect["none"][0] > 0.5 * effect["none"][1], effect
    mask = shot_attention_mask({"video": torch.tensor([[0, 1]]), "audio": torch.tensor([[1]]),
                                "text": torch.tensor([[-1, 0, 1]])}, ["video", "audio", "text"],
                               ["video", "audio", "text"])
    assert mask.shape == (1, 1, 6, 6)
    assert mask[0, 0, :3, 3:].tolist() == [[True, True, False], [True, False, True], [True, False, True]]
    assert mask[0, 0, 3:].all() and mask[0, 0, :, :3].all()  # text queries and video/audio keys: open
