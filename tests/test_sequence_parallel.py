"""Sequence parallelism (Ulysses): config-time checks in this process, the 2-rank equality in a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from sora.cli.overrides import CONFIGS
from sora.data.datamodule import data_parallel_rank
from sora.models.dit import AVDiT
from sora.training.sequence_parallel import (apply_sequence_parallel, check_sequence_parallel,
                                             sequence_parallel_size, shard)
from tests.conftest import SMALL_DIT

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "distributed" / "sequence_parallel.py"


def test_head_divisibility_is_checked_with_the_key_and_the_fix():
    assert check_sequence_parallel(heads=8, size=4) == 4 and check_sequence_parallel(heads=4, size=1) == 1
    with pytest.raises(ValueError) as e:
        check_sequence_parallel(heads=4, size=3)
    msg = str(e.value)
    assert "model.sequence_parallel=3" in msg and "heads=4" in msg and "[1, 2, 4]" in msg and "\n" not in msg
    for bad in (0, -2, 2.0, True, "2"):
        with pytest.raises(ValueError, match="positive integer"):
            check_sequence_parallel(heads=4, size=bad)


def _model_cfg(*overrides):
    with initialize_config_dir(CONFIGS, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=quickstart/dit", "model.video_vae_ckpt=null",
                                          "model.audio_vae_ckpt=null", *SMALL_DIT, *overrides])
    return cfg.model


def test_config_time_check_and_refusal_when_not_applied():
    with pytest.raises(Exception, match=r"model.sequence_parallel=3: the DiT's heads=4 do not split"):
        instantiate(_model_cfg("model.sequence_parallel=3"))
    module = instantiate(_model_cfg("model.sequence_parallel=2", "model.dit.heads=4"))
    assert module.sequence_parallel == 2 and sequence_parallel_size(module.dit) == 1
    with pytest.raises(RuntimeError, match="model.sequence_parallel=2: the trainer's strategy did not apply it"):
        module.on_fit_start()
    module = instantiate(_model_cfg())
    assert module.sequence_parallel == 1
    module.on_fit_start()  # off: nothing to apply


def test_shards_pad_to_a_multiple_and_keep_global_order():
    x = torch.arange(2 * 7 * 3).reshape(2, 7, 3)
    parts = [shard(x, 1, r, 3) for r in range(3)]
    assert [p.shape[1] for p in parts] == [3, 3, 3]
    full = torch.cat(parts, dim=1)
    assert torch.equal(full[:, :7], x) and (full[:, 7:] == 0).all()
    mask = torch.ones(2, 7, dtype=torch.bool)
    padded = torch.cat([shard(mask, 1, r, 2, value=False) for r in range(2)], dim=1)
    assert padded.tolist() == [[True] * 7 + [False]] * 2
    angles = torch.rand(5, 4)  # rotary angles [L, D/2]: sharded along the tokens (dim -2)
    assert torch.equal(torch.cat([shard(angles, -2, r, 2) for r in range(2)])[:5], angles)
    assert data_parallel_rank(2, rank=5, world=8) == (2, 4)


@pytest.mark.skipif(dist.is_available() and dist.is_initialized(), reason="a process group exists in this process")
def test_apply_refuses_without_a_process_group():
    with pytest.raises(RuntimeError, match="torch.distributed initialised"):
        apply_sequence_parallel(AVDiT(dim=32, depth=1, heads=2))


def test_two_ranks_equal_one_process(tmp_path):
    out = tmp_path / "sp.json"
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out)], env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["world"] == 2 and set(report["cases"]) == {"joint_padded", "joint_even_checkpointed",
                                                               "dual_stream_padded", "joint_padded_flash_twin",
                                                               "dual_stream_per_token_t"}
    for name, r in report["cases"].items():
        for what in ("out", "grad_inputs", "grad_params"):
            assert r[what]["scaled"] < 1e-5, (name, what, r[what])
            assert r[what]["ref_max"] > 1e-2, (name, what)  # not comparing zeros
        assert r["params_with_grad"] == r["params"], name  # every weight is on a compared gradient path
        assert r["removed_out"]["abs"] == 0.0, name
        # each rank attends with heads / 2 heads over every token, padded to even counts per stream
        padded = {m: n + n % 2 for m, n in r["tokens"].items()}
        heads, q_len, k_len, mask_len = r["attention_calls"][0]
        assert heads == report["heads"] // 2, name
        if name.startswith("joint"):
            assert q_len == k_len == mask_len == sum(padded.values()), name
        else:  # dual_stream: [video, text] first
            assert k_len == mask_len == padded["video"] + padded["text"], name


def test_training_with_sequence_parallel_equals_one_process(tmp_path):
    """``strategy=ddp trainer.devices=2 model.sequence_parallel=2``: both ranks form one group and
    read the same clips, so the run trains exactly as one process does (losses, weights)."""
    from tests.test_strategies import metrics, train

    single = ("callbacks.samples=null", "data.train.shots=null")  # sequence parallelism takes no shot masks yet
    one = train(tmp_path / "one", *single, devices=1)
    two = train(tmp_path / "two", *single, "strategy=ddp", "model.sequence_parallel=2", devices=2)
    assert one.returncode == two.returncode == 0
    losses = {name: [float(r["train/loss"]) for r in metrics(tmp_path / name) if r.get("train/loss")]
              for name in ("one", "two")}
    assert len(losses["one"]) == 3
    torch.testing.assert_close(torch.tensor(losses["two"]), torch.tensor(losses["one"]), rtol=1e-4, atol=1e-5)
    a = torch.load(tmp_path / "one" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "two" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    for k, v in a["state_dict"].items():
        if k.startswith("dit."):
            torch.testing.assert_close(b["state_dict"][k], v, rtol=1e-4, atol=1e-5, msg=k)
