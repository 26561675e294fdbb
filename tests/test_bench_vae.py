"""tools/bench_vae.py on tiny clips: memory per length from fresh processes, speed against Wan's VAE."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli


def test_bench_vae_tiny_prints_consistent_json():
    pytest.importorskip("diffusers")
    proc = run_cli("tools/bench_vae.py", "--size", "16", "--fps", "8", "--seconds", "1", "2", "--rounds", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [m["frames"] for m in r["memory"]] == [9, 17]
    for m in r["memory"]:
        assert m["peak_mb"] > m["io_mb"] > 0 and m["working_mb"] == pytest.approx(m["peak_mb"] - m["io_mb"])
    s = r["speed"]
    assert s["output_shapes"] == {"ours": [1, 3, 9, 16, 16], "wan": [1, 3, 9, 16, 16]}
    assert s["speed_ratio"] == pytest.approx(s["seconds"]["wan"] / s["seconds"]["ours"])
