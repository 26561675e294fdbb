#!/usr/bin/env bash
# One command on a CUDA machine (fits 8 minutes on one H100/H200): the CUDA test tier
# (tests/test_cuda.py: every strategy x precision, resume, export + sample, attention paths in bf16),
# then tools/bench_dit.py at issue 13's two sizes in bf16 (against diffusers' LTX-2 transformer
# when diffusers imports), then a short table. Results: gpu_check/ (or $GPU_CHECK_OUT).
#   PYTHON=python3 tools/gpu_check.sh
# On a machine without an index, bring the wheels the image lacks (hydra-core, omegaconf, antlr4,
# webdataset, braceexpand, av, deepspeed, diffusers; see README "GPU check") and install them with
# `pip install --no-index --find-links WHEELS ...` first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${GPU_CHECK_OUT:-gpu_check}
mkdir -p "$OUT"
export WANDB_MODE=disabled PYTHONWARNINGS=ignore PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import torch; assert torch.cuda.is_available(), 'gpu_check: no CUDA GPU here'; \
print('torch', torch.__version__, '|', torch.cuda.get_device_name())" | tee "$OUT/device.txt"

set +e
timeout 330 $PY -m pytest -q -p no:randomly -p no:cacheprovider -m cuda tests/test_cuda.py -rA 2>&1 \
    | tail -25 | tee "$OUT/tests.txt"
set -e

PEER=$($PY -c "import diffusers" 2>/dev/null && echo "" || echo "--no-peer")
i=0
for case in "--width 1024 --heads 16 --depth 8 --frames 8 --hw 64 --audio-steps 200 --text-tokens 128 --batch 2" \
            "--width 2048 --heads 16 --depth 8 --frames 16 --hw 64 --audio-steps 500 --text-tokens 256 --batch 1"; do
    i=$((i + 1))
    timeout 150 $PY tools/bench_dit.py $case --precision bf16-mixed --device cuda --rounds 5 --warmup 2 $PEER \
        | tail -1 > "$OUT/bench_dit_$i.json" || echo "bench_dit case $i failed" | tee -a "$OUT/tests.txt"
done

$PY - "$OUT" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
print("\n| case | ours tok/s | peer tok/s | ratio | ours GB | peer GB | mem ratio | % of bf16 matmul |")
print("|---|---|---|---|---|---|---|---|")
for f in sorted(out.glob("bench_dit_*.json")):
    try:
        r = json.loads(f.read_text())
    except ValueError:
        continue
    c, o, p = r["config"], r["ours"], r.get("peer", {})
    fmt = lambda v, s="{:.0f}": s.format(v) if v is not None else "-"  # noqa: E731
    print(f"| W{c['width']} {r['tokens']['video']}v+{r['tokens']['audio']}a b{c['batch']} | {fmt(o['tokens_per_s'])} | "
          f"{fmt(p.get('tokens_per_s'))} | {fmt(r.get('tokens_per_s_ratio'), '{:.2f}x')} | {o['peak_mb'] / 1024:.1f} | "
          f"{fmt(p['peak_mb'] / 1024 if p else None, '{:.1f}')} | {fmt(r.get('memory_ratio'), '{:.2f}x')} | "
          f"{100 * r['ours_fraction_of_matmul']:.0f}% of {r['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s |")
PY
