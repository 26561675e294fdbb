"""tools/bench_overhead.py end to end on the tiny DiT: both sides run the same config and report step times."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import SMALL_DIT
from tests.test_strategies import REPO


def test_bench_overhead_times_both_loops():
    proc = subprocess.run([sys.executable, "tools/bench_overhead.py", "--steps", "4", "--warmup", "2", "--rounds", "1", "--",
                           *SMALL_DIT, "data.num_workers=0", "data.train.batch_size=2"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(r["rounds"]) == 1  # each round starts sora-train anew (~15 s): one here, 3 by default
    for rnd in r["rounds"]:
        assert rnd["bare"]["steps"] == 4 and rnd["sora_train"]["steps"] == 4
        assert 0 < rnd["bare"]["median_s"] < 10 and 0 < rnd["sora_train"]["median_s"] < 10
        assert rnd["overhead"] == rnd["sora_train"]["median_s"] / rnd["bare"]["median_s"] - 1
    assert r["overhead"] == r["rounds"][0]["overhead"] and r["overhead_range"] == [r["overhead"]] * 2
