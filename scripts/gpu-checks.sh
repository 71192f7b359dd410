#!/usr/bin/env bash
# Everything that needs the GPU, in one pass, logs under $OUT (default ./gpu-out).
# Usage on a CUDA machine, from the repository root:
#   bash scripts/gpu-checks.sh [tests|parity|selftest|bench|overhead|tune|profile|all]...
# Where the tree was copied without .git, set DISPATCH_COMMIT so the reports name the commit.
# JOBS=N runs the tests and the parity matrix in N processes (pytest-xdist; the parity report is merged).
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
steps=${*:-all}
parallel=()
if [[ -n "${JOBS:-}" ]]; then parallel=(-n "$JOBS"); fi
has() { [[ " $steps " == *" $1 "* || " $steps " == *" all "* ]]; }
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  python3 -c "import importlib.metadata as m; print('flash-attn-4', m.version('flash-attn-4'))" 2>/dev/null || echo "flash-attn-4 not installed"
  echo "commit ${DISPATCH_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if has tests; then
  python3 -m pytest -m gpu tests --ignore=tests/parity -q -p no:cacheprovider -x "${parallel[@]}" 2>&1 | tee "$OUT/gpu-tests.log" | tail -25
fi
if has parity; then
  python3 -m tests.parity --device cuda --report "$OUT/RESULTS-gpu.md" -p no:cacheprovider "${parallel[@]}" 2>&1 | tail -8 > "$OUT/parity.log"
  cat "$OUT/parity.log"
fi
if has selftest; then
  python3 -m dispatch selftest --device cuda 2>&1 | tee "$OUT/selftest.txt" | tail -4
  python3 -m dispatch explain examples/fp8-deployment.yaml --profile default --device cuda > "$OUT/explain.txt" 2>&1
  python3 -m dispatch list > "$OUT/list.txt" 2>&1
fi
if has overhead; then
  python3 -m benchmarks.overhead --device cuda 2>&1 | tee "$OUT/overhead.md"
fi
# 8 compile jobs: each builds the case's inputs on the GPU (~12 GB for decode 64 x 8k); 12 ran out of memory on an H200.
if [[ " $steps " == *" tune "* ]]; then  # not part of "all": evidence for choose_tiles when the kernel changes
    python3 -m benchmarks.tune_tiles --case decode-64x8k --tile-n 64 128 --warps 4 8 --stages 2 3 --jobs 8 \
      2>&1 | tee "$OUT/tune-decode-64x8k.md" | tail -45
    python3 -m benchmarks.tune_tiles --case prefill-4x4k --dtypes bf16 fp8q-fp8kv --block-m 64 128 --tile-n 64 128 \
      --warps 4 8 --stages 2 3 --jobs 12 2>&1 | tee "$OUT/tune-prefill-4x4k.md" | tail -40
fi
if has bench; then
  python3 -m benchmarks.attention ${BENCH_ARGS:---quick} --out "$OUT/bench" 2>&1 | tail -40
fi
# Nsight Compute on the kernel of each PROFILE_CASES entry ("case dtypes [profile_case options]", one per
# line): the details page (throughput, occupancy, warp stall reasons) and the per-SASS-instruction source
# page (where the stalls sit), then one archive of all of it (the machine returns few files).
if [[ " $steps " == *" profile "* ]]; then  # not part of "all"
  NCU=${NCU:-$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -1)}
  mkdir -p "$OUT/profile"
  PROFILE_CASES=${PROFILE_CASES:-"decode-64x8k bf16
decode-64x8k bf16q-fp8kv
decode-64x8k fp8q-fp8kv
decode-64x8k bf16q-fp8kv-pth
decode-64x8k bf16q-int8kv-pth
prefill-4x4k bf16
prefill-4x4k fp8q-fp8kv"}
  while read -r case dtypes extra; do
    [[ -z "$case" ]] && continue
    name="$case-$dtypes${extra:+-$(echo "$extra" | tr -c 'a-zA-Z0-9\n' '_')}"
    "$NCU" --clock-control none --set full --import-source no -k regex:unified_attention_kernel \
      --launch-skip 2 --launch-count 1 -f -o "$OUT/profile/$name" \
      python3 -m benchmarks.profile_case "$case" "$dtypes" $extra > "$OUT/profile/$name.log" 2>&1
    "$NCU" --import "$OUT/profile/$name.ncu-rep" --page details > "$OUT/profile/$name-details.txt" 2>&1
    "$NCU" --import "$OUT/profile/$name.ncu-rep" --page source --print-source sass --csv \
      > "$OUT/profile/$name-sass.csv" 2>&1
    echo "== $name"; grep -E "Duration|Memory Throughput|DRAM Throughput|Registers Per|Achieved Occupancy|Theoretical Occ|Issue Slots Busy|No Eligible" \
      "$OUT/profile/$name-details.txt" | head -12
  done <<< "$PROFILE_CASES"
  tar -C "$OUT" -czf "$OUT/profile.tar.gz" profile && rm -rf "$OUT/profile"
fi
