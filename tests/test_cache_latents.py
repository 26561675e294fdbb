"""Latent caching (sora-cache-latents, sora/data/latents.py): a cached run sees exactly what a raw
run sees; caches are split over ranks, refused when stale, and the latent stream resumes exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from sora.cli.train import CONFIGS, build
from sora.data.latents import LatentBatch, LatentClipStream, StaleLatentCache
from sora.cli import cache_latents
from tests.conftest import SMALL_DIT

REPO = Path(__file__).resolve().parents[1]
# the tiny quickstart DiT on random frozen VAEs, 8 world clips, in order, in the main process
TINY = ["experiment=quickstart/dit", "model.video_vae_ckpt=null", "model.audio_vae_ckpt=null", *SMALL_DIT,
        "data.train.clips=8", "data.num_workers=0"]
FROZEN_TEXT = [*TINY, "model.train_text_encoder=false"]
TRAIN = ["++data.train.shuffle=false", "trainer.max_steps=2", "trainer.num_sanity_val_steps=0",
         "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
         "trainer.log_every_n_steps=1"]


def _cli(*args) -> subprocess.Popen:
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def _losses(run: Path) -> list[tuple[float, float, float]]:
    import csv

    with open(run / "csv" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    return [(float(r["train/loss"]), float(r["train/loss_video"]), float(r["train/loss_audio"])) for r in rows]


@pytest.fixture(scope="module")
def frozen_cache(tmp_path_factory):
    """A cache with text embeddings (frozen text encoder), written by two ranks in this process."""
    out = tmp_path_factory.mktemp("latents") / "frozen"
    for rank in (0, 1):
        assert cache_latents.main([str(out), *FROZEN_TEXT, "--rank", str(rank), "--world-size", "2"]) == 0
    return out


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(CONFIGS, version_base="1.3"):
        return compose("train", overrides=overrides)


def _built(overrides):
    stream, module = cache_latents.build(cache_latents.compose(overrides))
    stream.shuffle, stream.infinite = False, False
    return stream, module


def test_cli_cached_run_equals_raw_run(tmp_path):
    """Through the real CLIs: cache, then a raw and a cached DiT run with the same seed and clip order give
    the same losses at both steps and measure the same latent normalisation on their first batch."""
    cache = tmp_path / "cache"
    caching = _cli("-m", "sora.cli.cache_latents", cache, *TINY)
    raw = _cli("-m", "sora.cli.train", f"hydra.run.dir={tmp_path / 'raw'}", *TINY, *TRAIN)  # meanwhile
    code, out, err = _wait(caching)
    assert code == 0, err[-3000:]
    cached = _cli("-m", "sora.cli.train", f"hydra.run.dir={tmp_path / 'cached'}", *TINY, *TRAIN, "data=latents",
                  f"data.train.urls={cache}/latents-*.tar")
    assert "rank 0/1: 8 clips (0 skipped) in 1 shard(s)" in out
    assert "text: captions only (the run trains its text encoder)" in out
    assert "data=latents data.train.urls=" in out and "clip/s" in err  # the command to train; the progress bar
    manifest = json.loads((cache / "manifest.json").read_text())
    assert set(manifest["hashes"]) == {"format", "video_vae", "audio_vae", "timeline"} and not manifest["text"]
    with tarfile.open(cache / "latents-r000-000000.tar") as tar:
        names = tar.getnames()
    assert len(names) == 8 * 4 and not any(n.endswith((".pickle", ".pth", ".pt")) for n in names)
    assert "world-0-0000000.video.npy" in names and "world-0-0000000.txt" in names
    for proc in (raw, cached):
        code, out, err = _wait(proc)
        assert code == 0, err[-3000:]
    losses = {name: _losses(tmp_path / name) for name in ("raw", "cached")}
    assert len(losses["raw"]) == 2
    assert sum(losses["cached"], ()) == pytest.approx(sum(losses["raw"], ()), rel=1e-5, abs=1e-6)
    stats = {name: {k: v for k, v in torch.load(tmp_path / name / "checkpoints" / "last.ckpt", map_location="cpu",
                                                 weights_only=True)["state_dict"].items() if "latent_stats" in k}
             for name in ("raw", "cached")}
    assert set(stats["raw"]) == {"video_latent_stats", "audio_latent_stats"}
    for k, v in stats["raw"].items():
        assert not torch.isnan(v).any()
        torch.testing.assert_close(stats["cached"][k], v)

    # a cache made on another timeline is refused when sora-train builds the data: one line naming the field
    cfg = _compose([*TINY, "data=latents", f"data.train.urls={cache}/latents-*.tar", "timeline.fps=4"])
    with pytest.raises(SystemExit) as e:
        build(cfg.data, "data")
    assert str(e.value).startswith(f"sora-train: error in data: StaleLatentCache: the latent cache {cache} is stale")
    assert "fps=8 (this run 4)" in str(e.value) and "\n" not in str(e.value)


def test_ranks_split_the_clips_and_text_is_cached(frozen_cache):
    keys = {}
    for rank in (0, 1):
        with tarfile.open(frozen_cache / f"latents-r00{rank}-000000.tar") as tar:
            keys[rank] = {n.split(".")[0] for n in tar.getnames()}
        stats = json.loads((frozen_cache / f"rank-00{rank}.json").read_text())
        assert stats["clips"] == 4 and stats["world_size"] == 2 and stats["clips_per_s"] > 0
    assert not keys[0] & keys[1]
    assert keys[0] | keys[1] == {f"world-0-{i:07d}" for i in range(8)}
    manifest = json.loads((frozen_cache / "manifest.json").read_text())
    assert manifest["text"] and "text_encoder" in manifest["hashes"]
    assert (frozen_cache / "text_empty.npy").is_file()
    with pytest.raises(SystemExit, match="already has rank 0's shards"):
        cache_latents.main([str(frozen_cache), *FROZEN_TEXT, "--rank", "0", "--world-size", "2"])


def test_cached_batch_is_what_the_dit_sees_from_raw_clips(frozen_cache):
    """Same seed, same clips, same order: latents, text (with caption dropout swapping in the cached
    embedding of "") and the training loss are equal to the raw path's."""
    raw_stream, raw_module = _built(FROZEN_TEXT)
    raw_stream.rank, raw_stream.world_size = 0, 2  # rank 0's clips: the order of its shard
    _, cached_module = _built(FROZEN_TEXT)
    cached_stream = LatentClipStream(str(frozen_cache / "latents-r000-*.tar"), raw_stream.timeline, 4, shuffle=False)
    raw, cached = next(iter(raw_stream)).normalize(), next(iter(cached_stream)).normalize()
    assert isinstance(cached, LatentBatch) and cached.keys == raw.keys and cached.captions == raw.captions
    assert cached.video.shape[-2:] == raw.video.shape[-2:]  # the frame size, for callbacks

    z_raw, z_cached = raw_module.encode(raw), cached_module.encode(cached)
    for m in ("video", "audio"):
        assert z_raw[m].abs().max() > 0
        torch.testing.assert_close(z_cached[m], z_raw[m], rtol=1e-5, atol=1e-6)
    assert cached_module.cached_text(cached) and not raw_module.cached_text(raw)
    drop = torch.tensor([True, False, False, True])
    for d in (None, drop):
        (t_raw, m_raw), (t_cached, m_cached) = raw_module.encode_text(raw, d), cached_module.encode_text(cached, d)
        assert torch.equal(m_cached, m_raw)
        torch.testing.assert_close(t_cached, t_raw, rtol=1e-5, atol=1e-5)

    for module in (raw_module, cached_module):
        module.text_drop_prob = 0.5
    losses = []
    for module, batch in ((raw_module, raw), (cached_module, cached)):
        torch.manual_seed(123)
        losses.append(module.training_step(batch, 0))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cached_module.video_latent_stats, raw_module.video_latent_stats)


def test_stale_cache_is_refused(frozen_cache):
    stream = LatentClipStream(str(frozen_cache / "latents-*.tar"), _built(FROZEN_TEXT)[0].timeline, 4)
    batch = next(iter(stream))
    _, other = _built([*FROZEN_TEXT, "seed=1"])  # other random VAE and text weights
    with pytest.raises(StaleLatentCache) as e:
        other.encode(batch)
    message = str(e.value)
    assert "\n" not in message and "video_vae (cache" in message and "audio_vae" in message
    assert "text_encoder" in message and "sora-cache-latents" in message
    # a raw setting the cache recorded must match the run's
    with pytest.raises(StaleLatentCache, match=r"data.train.clips=16, but .* from clips=8"):
        LatentClipStream(str(frozen_cache / "latents-*.tar"), stream.timeline, 4, clips=16)


def test_latent_stream_resumes_exactly(frozen_cache):
    """Three batches (the third from the next epoch) against two, a saved state, and the rest."""
    timeline = _built(FROZEN_TEXT)[0].timeline

    def loader():
        stream = LatentClipStream(str(frozen_cache / "latents-*.tar"), timeline, 4, shuffle_buffer=4, seed=3)
        return StatefulDataLoader(stream, batch_size=None, num_workers=0)

    straight = loader()
    it = iter(straight)
    first = [next(it) for _ in range(3)]
    assert sorted(first[0].keys + first[1].keys) == [f"world-0-{i:07d}" for i in range(8)]
    partial = loader()
    it = iter(partial)
    for _ in range(2):
        next(it)
    state = partial.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    batch = next(iter(resumed))
    assert batch.keys == first[2].keys
    torch.testing.assert_close(batch.latents["video"], first[2].latents["video"])


def test_weights_hash_is_the_same_for_a_sharded_module(tmp_path):
    """Under FSDP2 the text encoder's parameters are DTensors and its class is renamed: a cache made
    unsharded must still match (a one-rank gloo group, in this process)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from sora.data.latents import weights_hash
    from sora.models.text import ByteTextEncoder

    torch.manual_seed(0)
    encoder = ByteTextEncoder(dim=32, max_len=16, layers=1, heads=4)
    before = weights_hash(encoder)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        fully_shard(encoder, mesh=init_device_mesh("cpu", (1,)))
        assert type(encoder).__name__.startswith("FSDP") and type(encoder.pos).__name__ == "DTensor"
        assert weights_hash(encoder) == before
        with torch.no_grad():
            encoder.norm.weight.add_(1e-3)  # and it still sees a change
        assert weights_hash(encoder) != before
    finally:
        dist.destroy_process_group()


def test_rank_and_world_size_come_from_torchrun_or_slurm(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert (cache_latents.parse(["out"]).rank, cache_latents.parse(["out"]).world_size) == (0, 1)
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_NTASKS", "3")
    assert (cache_latents.parse(["out"]).rank, cache_latents.parse(["out"]).world_size) == (2, 3)
    monkeypatch.setenv("RANK", "1")  # torchrun's wins
    monkeypatch.setenv("WORLD_SIZE", "4")
    args = cache_latents.parse(["out", "--world-size", "2"])
    assert (args.rank, args.world_size) == (1, 2)
    with pytest.raises(SystemExit, match=r"--rank 5 is not in \[0, --world-size 4\)"):
        cache_latents.parse(["out", "--rank", "5"])


def test_default_workers_auto_as_sora_train_counts_them(tmp_path):
    """data.num_workers defaults to "auto" (from the cores): the cache's loader resolves it as the data module does
    (a DataLoader given the string failed: `make demo` stopped at its latents stage)."""
    overrides = [o for o in TINY if not o.startswith("data.num_workers=")]
    assert cache_latents.main([str(tmp_path / "auto"), *overrides, "--max-clips", "2"]) == 0
    assert list((tmp_path / "auto").glob("latents-*.tar"))


def test_multishot_clips_cache_their_shot_captions(tmp_path):
    """Multi-shot world clips (timed captions) with a frozen text encoder: the cache holds each shot's caption
    tokens one after the other, and training on it gives the raw run's text, shot ids and loss."""
    shots = [*FROZEN_TEXT, "data.train.shots={prob: 1.0, max: 3, continue_prob: 0.3}"]
    out = tmp_path / "shots"
    assert cache_latents.main([str(out), *shots]) == 0
    raw_stream, raw_module = _built(shots)
    raw_stream.batch_size = 4
    _, cached_module = _built(shots)
    cached_stream = LatentClipStream(str(out / "latents-*.tar"), raw_stream.timeline, 4, shuffle=False)
    raw, cached = next(iter(raw_stream)).normalize(), next(iter(cached_stream)).normalize()
    assert cached.keys == raw.keys and cached_module.cached_text(cached)
    assert any(len(m["shots"]) > 1 for m in raw.meta)  # some clip has a cut
    for m in cached.meta:
        assert all(r["text_tokens"] > 0 for r in m["shots"])
    drop = torch.tensor([False, True, False, False])
    for d in (None, drop):
        (t_raw, m_raw, s_raw), (t_c, m_c, s_c) = (raw_module.encode_script_text(raw, d),
                                                  cached_module.encode_script_text(cached, d))
        assert torch.equal(m_c, m_raw) and s_c.keys() == s_raw.keys()
        for k in s_raw:
            assert torch.equal(s_c[k], s_raw[k]), k
        torch.testing.assert_close(t_c, t_raw, rtol=1e-5, atol=1e-5)
    assert set(s_raw["text"][0][m_raw[0]].tolist()) == set(range(len(raw.meta[0]["shots"])))
    for module in (raw_module, cached_module):
        module.text_drop_prob = 0.5
    losses = []
    for module, batch in ((raw_module, raw), (cached_module, cached)):
        torch.manual_seed(7)
        losses.append(module.training_step(batch, 0))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
