"""The CUDA tier: marked ``cuda``, skipped on machines without a GPU; ``tools/gpu_check.sh`` runs it.

* every strategy x precision (fp32, bf16-mixed) trains the DiT stage 3 steps on one GPU through the
  real ``sora-train`` (frozen VAEs in whatever dtype the strategy leaves them), with in-training samples;
* a resume from the step-2 checkpoint on the GPU reaches the step-3 weights;
* the exported checkpoint samples on the GPU (``sora-sample device=cuda``);
* the attention paths agree in bf16: SDPA with a key mask, the varlen kernels (PyTorch's, flash-attn's
  where installed) and the whole DiT under ``attn_backend=auto`` against ``sdpa``.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sora.checkpoints.export import read_training_checkpoint
from tests.test_strategies import REPO, TINY, ckpt_arg

pytestmark = pytest.mark.cuda
STRATEGIES = ["ddp", "deepspeed_stage_2", "deepspeed_stage_3", "fsdp"]
PRECISIONS = ["32-true", "bf16-mixed"]


def run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def train(run_dir: Path, *overrides: str) -> None:
    run(["-m", "sora.cli.train", f"hydra.run.dir={run_dir}", *TINY, "trainer.accelerator=gpu", "trainer.devices=1",
         *overrides])


def losses(run_dir: Path) -> list[float]:
    with open(run_dir / "csv" / "version_0" / "metrics.csv") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_and_precision_train_on_cuda(strategy, precision, tmp_path):
    train(tmp_path, f"strategy={strategy}", f"trainer.precision={precision}")
    values = losses(tmp_path)
    assert len(values) == 3 and all(math.isfinite(v) for v in values), values
    assert (tmp_path / "samples" / "step=3-0.mp4").is_file()


def test_resume_export_and_sample_on_cuda(tmp_path):
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    train(first, "trainer.precision=bf16-mixed")
    train(resumed, "trainer.precision=bf16-mixed", ckpt_arg(first / "checkpoints" / "step=2.ckpt"))
    a = read_training_checkpoint(first / "checkpoints" / "last.ckpt")
    b = read_training_checkpoint(resumed / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 3
    for k in a["state_dict"]:  # cuDNN / atomics may reorder float sums: close, not bit-equal
        torch.testing.assert_close(b["state_dict"][k].float(), a["state_dict"][k].float(), rtol=1e-3, atol=1e-4,
                                   msg=k)
    out, mp4 = tmp_path / "model.safetensors", tmp_path / "sample.mp4"
    run(["tools/export_checkpoint.py", str(first / "checkpoints" / "last.ckpt"), str(out)])
    run(["-m", "sora.cli.sample", f"ckpt={out}", "prompt=a ball", "seconds=1", "steps=2", "device=cuda", f"out={mp4}"])
    assert mp4.is_file() and mp4.stat().st_size > 0


def _padded(lengths, lq=40, heads=4, dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    lk = max(lengths) + 3
    q, k, v = (torch.randn(len(lengths), heads, n, dim, generator=g) for n in (lq, lk, lk))
    mask = torch.arange(lk)[None] < torch.tensor(lengths)[:, None]
    return [t.cuda().bfloat16() for t in (q, k, v)], mask.cuda()


def test_attention_paths_agree_in_bf16():
    from sora.models import attention as A

    (q, k, v), mask = _padded([37, 12, 50])
    ref = A.attention(q.float(), k.float(), v.float(), mask, backend="sdpa")  # fp32 reference
    outs = {"sdpa": A.attention(q, k, v, mask, backend="sdpa")}
    if A._torch_varlen_attn is not None:
        outs["varlen"] = A.attention(q, k, v, mask, backend="varlen")
    if A.flash_attn_varlen_func is not None:
        outs["flash"] = A.attention(q, k, v, mask, backend="flash")
    outs["auto"] = A.attention(q, k, v, mask, backend="auto")
    for name, out in outs.items():
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2, msg=name)


def test_dit_backends_agree_in_bf16():
    from tests.test_dit import inputs, make, unzero

    x = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in inputs().items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = unzero(make(attn_backend="sdpa")).cuda()(**x)
        out = unzero(make(attn_backend="auto")).cuda()(**x)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o.float(), r.float(), rtol=3e-2, atol=3e-2)


def test_dit_steps_hold_no_cuda_sync_between_logging_steps(tmp_path):
    """torch.cuda.set_sync_debug_mode("warn") over each step's span (sora.training.host_syncs.SyncAudit): the quickstart
    DiT's steps between the logger's steps neither read a device value nor copy to the device blocking."""
    from tests.test_host_syncs import STAGES, _audit

    steps, logging_steps = _audit(tmp_path, *STAGES["dit"], "trainer.accelerator=gpu", "trainer.devices=1",
                                  "trainer.precision=bf16-mixed")
    between = {s: dict(c) for s, c in steps.items() if s and s not in logging_steps}
    assert len(between) == 7 and all(not c for c in between.values()), between
