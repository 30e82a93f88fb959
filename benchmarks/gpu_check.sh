#!/usr/bin/env bash
# GPU check of steer's attention kernels: the parity tests compiled for the GPU (no TRITON_INTERPRET), then
# benchmarks/group_kernels.py on CUDA, then benchmarks/baselines.py on CUDA (VCD / PAI / M3ID per-token decode vs
# greedy with the batched and the sequential branch, OPERA vs beam 5; goal: VCD and PAI <= 1.3x greedy per token
# with the batched branch). Writes everything into OUTDIR; about 2-5 minutes on one H100 (hard limits: 180 s
# tests + 150 s kernel benchmark + 200 s baselines + a few s of probes, so < 9 min in every case).
#
#   benchmarks/gpu_check.sh OUTDIR
#
# OUTDIR/env.txt        GPU, python, torch, triton versions
# OUTDIR/pytest.log     pytest tests/test_triton_kernels.py tests/test_kernels.py (skip/failure reasons)
# OUTDIR/pytest.xml     the same as JUnit XML
# OUTDIR/bench.log      the benchmark table (prefill 1k/4k/16k, decode with a 4k cache; bf16, H=32, D=128), then
#                       the tile sweep (the Triton kernel alone at other tiles / warps / KV splits, 4k first)
# OUTDIR/bench.jsonl    its rows as JSON
# OUTDIR/baselines.log  the baselines table (bf16, 1057-token prompt, 32 new tokens, median of 5 runs)
# OUTDIR/baselines.json its rows as JSON
# OUTDIR/summary.txt    exit codes, the pytest result line, the benchmark tables
# Python: $PYTHON, else .venv/bin/python, else python3. Exit status: 0 iff tests and both benchmarks passed.
set -uo pipefail

OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
unset TRITON_INTERPRET
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1
t0=$(date +%s)

{
    echo "date: $(date -u +%FT%TZ)"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?') (working tree may differ)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "nvidia-smi: not found"
    timeout 60 "$PY" - <<'EOF' 2>&1
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
try:
    import triton
    print("triton", triton.__version__)
except ImportError as exc:
    print("triton: NOT INSTALLED -", exc)
EOF
} > "$OUT/env.txt"
cat "$OUT/env.txt"

timeout 180 "$PY" -m pytest tests/test_triton_kernels.py tests/test_kernels.py -rfEs -p no:cacheprovider \
    --durations=10 --junitxml="$OUT/pytest.xml" > "$OUT/pytest.log" 2>&1
rc_tests=$?
t1=$(date +%s)
tail -n 3 "$OUT/pytest.log"

timeout 150 "$PY" benchmarks/group_kernels.py --device cuda --lengths 1024,4096,16384 --decode-cache 4096 \
    --heads 32 --head-dim 128 --dtype bf16 --repeats 10 --sweep --json "$OUT/bench.jsonl" > "$OUT/bench.log" 2>&1
rc_bench=$?
t2=$(date +%s)

timeout 200 "$PY" benchmarks/baselines.py --device cuda --new-tokens 32 --repeats 5 --json "$OUT/baselines.json" \
    > "$OUT/baselines.log" 2>&1
rc_base=$?
t3=$(date +%s)

{
    echo "tests: exit $rc_tests ($((t1 - t0)) s; 124 = timed out)"
    grep -E "[0-9]+ (passed|failed|errors?)" "$OUT/pytest.log" | tail -n 1
    grep -E "^(SKIPPED|FAILED|ERROR)" "$OUT/pytest.log" | head -n 30
    echo
    echo "benchmark: exit $rc_bench ($((t2 - t1)) s)"
    cat "$OUT/bench.log"
    echo
    echo "baselines: exit $rc_base ($((t3 - t2)) s)"
    cat "$OUT/baselines.log"
    echo
    echo "total $((t3 - t0)) s"
} > "$OUT/summary.txt"
cat "$OUT/summary.txt"

[ "$rc_tests" -eq 0 ] && [ "$rc_bench" -eq 0 ] && [ "$rc_base" -eq 0 ]
