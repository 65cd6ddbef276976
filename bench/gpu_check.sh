#!/usr/bin/env bash
# What the CPU cannot show, on one CUDA GPU in at most ~10 minutes:
#   bench/gpu_check.sh [OUT_DIR]        (default runs/gpu_check; needs `make install TORCH_SPEC=torch` first)
# 1. the whole pipeline with preset=gpu (bf16 autocast, CUDA-event latency, allocator peak memory);
# 2. bf16 KD throughput (top-k cache, live teacher, TRL's GKDTrainer), MFU against the measured peak, a profiled step;
# 3. from the run's retrain records: each candidate's allocator peak against its analytic weight bytes,
#    its measured decode speed-up against the FLOPs ratio, and the CUDA-event p50 latency.
set -euo pipefail
OUT=${1:-runs/gpu_check}
PY=${PYTHON:-.venv/bin/python}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this check needs a GPU')"
mkdir -p "$OUT"
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
echo "== 1. pipeline preset=gpu"
/usr/bin/time -f "pipeline wall %e s" "$PY" -m slimnas.cli pipeline preset=gpu run_dir="$OUT/pipeline"
echo "== 2. KD throughput against TRL and the GPU's peak, bf16"
"$PY" -m slimnas.bench.peers kd --batch 16 --seq-len 512 --tokens 163840 --repeats 3 --out "$OUT/peers_kd.json"
echo "== 3. measured against analytic, per retrained candidate"
"$PY" - "$OUT/pipeline" <<'PYEOF'
import json, sys
from pathlib import Path

run = Path(sys.argv[1])
teacher = json.loads((run / "retrain" / "teacher" / "record.json").read_text())
print(f"{'candidate':<28}{'peak MiB':>10}{'weights MiB':>13}{'peak/weights':>14}{'speed-up':>10}{'FLOPs ratio':>13}{'p50 ms':>9}")
for path in sorted((run / "retrain").glob("*/record.json")):
    r = json.loads(path.read_text())
    peak, weights = r["memory"].get("peak_bytes", 0) / 2**20, r["memory"].get("weight_bytes", 0) / 2**20
    flops = teacher["flops_per_token"] / r["flops_per_token"]
    speedup = r["speed"].get("decode_speedup") or 1.0
    timed = r["speed"]["model"] if isinstance(r["speed"].get("model"), dict) else r["speed"]  # the teacher's: itself
    p50 = timed.get("latency_p50_ms", float("nan"))
    ratio = peak / weights if weights else float("nan")
    print(f"{r['label']:<28}{peak:>10.0f}{weights:>13.0f}{ratio:>14.2f}{speedup:>10.2f}{flops:>13.2f}{p50:>9.2f}")
PYEOF
