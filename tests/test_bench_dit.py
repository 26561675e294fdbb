"""tools/bench_dit.py on a tiny config: one JSON line, both models stepped, ratios and bounds consistent."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli


def test_bench_dit_tiny_config_prints_consistent_json():
    pytest.importorskip("diffusers")
    proc = run_cli("tools/bench_dit.py", "--width", "64", "--heads", "4", "--depth", "1", "--frames", "2", "--hw", "8",
                   "--audio-steps", "13", "--text-tokens", "8", "--rounds", "2", "--batch", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["tokens"] == {"video": 2 * 16, "audio": 13, "text": 8}
    for side in ("ours", "peer"):
        assert r[side]["step_s"] > 0 and r[side]["peak_mb"] > 0 and r[side]["params"] > 0
        assert r[side]["tokens_per_s"] == pytest.approx(2 * (32 + 13) / r[side]["step_s"])
    assert r["tokens_per_s_ratio"] == pytest.approx(r["ours"]["tokens_per_s"] / r["peer"]["tokens_per_s"])
    assert r["memory_ratio"] == pytest.approx(r["ours"]["peak_mb"] / r["peer"]["peak_mb"])
    assert 0 < r["ours_fraction_of_matmul"] < 2 and r["matmul_flops_per_s"] > 1e9
