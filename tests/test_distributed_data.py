"""2-process DDP on CPU: every rank's stream position is checkpointed and resumed exactly."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import webdataset as wds

from sora.data.world import WorldConfig, make_clip
from sora.media import write_av

SCRIPT = Path(__file__).parent / "distributed" / "ddp_resume.py"


def _run(*args):
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_ranks_resume_their_own_streams(tmp_path):
    with wds.ShardWriter(str(tmp_path / "shard-%02d.tar"), maxcount=4, verbose=0) as sink:
        for i in range(12):
            clip = make_clip(i, WorldConfig(width=32, height=32, seconds=1.0))
            buf = io.BytesIO()
            write_av(buf, clip.frames, clip.audio, fps=24, sample_rate=16000)
            sink.write({"__key__": f"c{i:02d}", "mp4": buf.getvalue()})
    shards = str(tmp_path / "shard-*.tar")
    _run(shards, tmp_path / "full", 7)
    full = [json.loads((tmp_path / "full" / f"rank{r}.json").read_text()) for r in range(2)]
    assert not {k for b in full[0][:2] for k in b} & {k for b in full[1][:2] for k in b}
    ckpt = next((tmp_path / "full" / "ckpt").glob("*step=3.ckpt"))
    state = torch.load(ckpt, weights_only=True)["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert state["world_size"] == 2
    positions = [s["_snapshot"]["_worker_snapshots"]["worker_0"]["dataset_state"] for s in state["ranks"]]
    assert positions[0] != positions[1]  # 8 clips vs 4 clips an epoch: the ranks are at different places
    _run(shards, tmp_path / "resumed", 7, ckpt)
    for r in range(2):
        resumed = json.loads((tmp_path / "resumed" / f"rank{r}.json").read_text())
        assert resumed == full[r][3:], f"rank {r}"
