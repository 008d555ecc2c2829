#!/usr/bin/env bash
# One call on a lent H100/H200 that produces every speed number of the kernels (K1-K4 and more).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh      # GPU: at most ~8 minutes (GPU_CHECK_BUDGET_S=450)
#   bash benchmarks/gpu_check.sh --smoke             # CPU, TRITON_INTERPRET=1, tiny shapes (CI)
#
# Uses only python3, torch, triton, numpy and pytest (what the lent machines have; nothing is
# installed), run from the repository root with PYTHONPATH=. Every step runs under its own
# `timeout`, clipped to what is left of the budget; a step that fails or times out is recorded and
# the next one runs. Files written to $OUT (a temporary directory when OUT is unset), at most 8:
#   gpu_check.json   summary, rewritten after every step: env, ceilings, graph check, step status,
#                    and at the end the K1-K4 / variants / tests / rounds summary
#   gpu_check.log    everything printed
#   kernels.json     headline case (bench_kernels.py; per-kernel profile and launch list inside)
#   variants.json    contiguous, zipf1, zipf2 routings of the headline sizes
#   variants_n1.json one client (N = 1) at the headline sizes
#   pytest.log       the kernel tests on the GPU (never under TRITON_INTERPRET there), the csrc CUDA
#                    extension's among them when its background build (step ext_build) is done
#   rounds.json      bench_rounds.py --random-weights --preset gpu-check
#   qlora.json       bench_rounds.py --patterns: federated QLoRA on a 7B-shaped random 4-bit base,
#                    fedhello batched vs the PEFT loop (needs bitsandbytes: its wheel in .whl/)
set -u
cd "$(dirname "$0")/.."

SMOKE=0
case "${1:-}" in
  --smoke) SMOKE=1 ;;
  "") ;;
  *) echo "usage: [OUT=dir] bash benchmarks/gpu_check.sh [--smoke]" >&2; exit 2 ;;
esac
OUT=${OUT:-$(mktemp -d -t gpu_check.XXXXXX)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Wheels carried in .whl/ (benchmarks/README.md): pure-Python ones (pytest-xdist, execnet) import as
# zips; bitsandbytes loads its compiled library from its package folder, so it is unpacked first.
for wheel in .whl/*.whl; do
  [ -e "$wheel" ] || continue
  case "$(basename "$wheel")" in
    bitsandbytes-*)
      SITE=$(mktemp -d -t gpu_check_site.XXXXXX)
      "$PY" -m zipfile -e "$wheel" "$SITE" && PYTHONPATH="$PYTHONPATH:$SITE" ;;
    *) PYTHONPATH="$PYTHONPATH:$PWD/$wheel" ;;
  esac
done
# With pytest-xdist the GPU tests compile their Triton kernels on 8 processes instead of one.
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
BUDGET=${GPU_CHECK_BUDGET_S:-450}
RESERVE=20  # kept back for the summary
START=$SECONDS
SUMMARY="$OUT/gpu_check.json"
rm -f "$SUMMARY"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
TEE_PID=$!

if [ "$SMOKE" = 1 ]; then
  export TRITON_INTERPRET=1
  SIZES=(--n 2 --t 64 --d 32 --r 8 --dtype fp32 --device cpu --threads 1
         --warmup 0 --min-reps 1 --max-reps 1 --rotate 1)
  SMOKE_FLAG=(--smoke)
else
  unset TRITON_INTERPRET  # the GPU path compiles the kernels for the device
  SIZES=(--n 32 --t 8k --d 4096 --r 16 --dtype bf16 --warmup 3 --min-reps 10 --max-reps 100 --target-ms 200)
  SMOKE_FLAG=()
fi
echo "[gpu_check] OUT=$OUT smoke=$SMOKE budget=${BUDGET}s python=$($PY -c 'import sys; print(sys.version.split()[0])')" \
  "pytest workers: ${XDIST[*]:-one process (no pytest-xdist)}"

# Federated QLoRA round (benchmarks/qlora_patterns.py): needs bitsandbytes, which the GPU machines lack.
QLORA=("$PY" benchmarks/bench_rounds.py --quantize nf4 --patterns fedhello,peft-loop --out "$OUT/qlora.json")
qlora_step() {  # limit-seconds options...: the qlora step, or skipped saying why
  if ! "$PY" -c "import bitsandbytes" 2>/dev/null; then
    local why="bitsandbytes is not installed: carry its wheel in .whl/ (benchmarks/README.md)"
    echo "[gpu_check] qlora: skipped, $why"
    record_step qlora 0 0 "$why"
    return
  fi
  local limit=$1
  shift
  run_step qlora "$limit" "${QLORA[@]}" "$@"
}

record_step() {  # name rc seconds [why-skipped]
  timeout 30 "$PY" benchmarks/gpu_check.py step --out "$SUMMARY" --name "$1" --rc "$2" --seconds "$3" \
    ${4:+--skipped "$4"} || echo "[gpu_check] could not record step $1"
}

run_step() {  # name limit-seconds command...
  local name=$1 limit=$2
  shift 2
  local left=$(( BUDGET - (SECONDS - START) - RESERVE ))
  if (( left < 10 )); then
    echo "[gpu_check] $name: skipped, time budget spent"
    record_step "$name" 0 0 "time budget spent"
    return
  fi
  (( limit > left )) && limit=$left
  echo "[gpu_check] === $name (timeout ${limit}s): $*"
  local t0=$SECONDS
  timeout -k 5 "$limit" "$@"
  local rc=$?
  echo "[gpu_check] $name: rc $rc after $(( SECONDS - t0 ))s"
  record_step "$name" "$rc" $(( SECONDS - t0 ))
}

# The csrc CUDA extension compiles on the CPU (nvcc, four sources, two at a time: two of the
# machine's 16 cores at nice 19, for a minute or two) while the first GPU steps run, so its kernels join the GPU tests.
# Its log stays outside $OUT (the file count) and goes into gpu_check.log when the tests start. In
# --smoke (a CPU build of torch) it stops at once, naming why.
EXT_LOG=$(mktemp -t gpu_check_ext.XXXXXX)
EXT_T0=$SECONDS
rm -f "$EXT_LOG.rc"
( MAX_JOBS=2 timeout -k 5 300 nice -n 19 "$PY" -m fedhello.kernels.extension build cuda >"$EXT_LOG" 2>&1
  echo $? >"$EXT_LOG.rc.part" && mv "$EXT_LOG.rc.part" "$EXT_LOG.rc" ) >/dev/null 2>&1 &
EXT_PID=$!

ext_build_step() {  # wait at most $1 s for the background build, then record it as a step
  local waited=0
  while [ ! -f "$EXT_LOG.rc" ] && (( waited < $1 )); do sleep 1; waited=$(( waited + 1 )); done
  if [ -f "$EXT_LOG.rc" ]; then
    local rc
    rc=$(cat "$EXT_LOG.rc")
    echo "[gpu_check] ext_build: rc $rc after $(( SECONDS - EXT_T0 ))s (python -m fedhello.kernels.extension build cuda)"
    tail -n $(( rc == 0 ? 3 : 40 )) "$EXT_LOG"
    record_step ext_build "$rc" $(( SECONDS - EXT_T0 ))
  else
    echo "[gpu_check] ext_build: still compiling after $(( SECONDS - EXT_T0 ))s: the GPU tests run without it"
    record_step ext_build 124 $(( SECONDS - EXT_T0 ))
  fi
}

BENCH=("$PY" benchmarks/bench_kernels.py "${SIZES[@]}" --variants uniform)
run_step env 30 "$PY" benchmarks/gpu_check.py env --out "$SUMMARY" "${SMOKE_FLAG[@]}"
run_step ceilings 45 "$PY" benchmarks/gpu_check.py ceilings --out "$SUMMARY" "${SMOKE_FLAG[@]}"
# K1-K3 need triton, triton_nonorm, torch and base side by side; K4 comes from triton's profile.
run_step headline 150 "${BENCH[@]}" --impls triton,triton_nonorm,torch,base --out "$OUT/kernels.json"
run_step graph 60 "$PY" benchmarks/gpu_check.py graph --out "$SUMMARY" "${SMOKE_FLAG[@]}"
if [ "$SMOKE" = 1 ]; then
  run_step variants 60 "${BENCH[@]}" --routing contiguous,zipf2 --impls triton,base --out "$OUT/variants.json"
  record_step variants_n1 0 0 "skipped in --smoke"
  ext_build_step 30
  # The kernel tests run under the interpreter in CI already: here only their collection.
  run_step gpu_tests 60 "$PY" -m pytest --collect-only -q -p no:cacheprovider -m "not slow" tests/kernels \
    -o addopts="" --rootdir . > "$OUT/pytest.log" 2>&1
  record_step rounds 0 0 "skipped in --smoke"
  # A toy Llama on the CPU: every code path of the GPU step.
  qlora_step 120 --models tiny-llama --n 2 --seq 8 --rank 4 --device cpu --threads 1
else
  # Order of value within the budget: the kernels' first run on real hardware (correctness), then
  # the round benchmark, then the routing variants. The sm_90 compile gate and the nvcc compile
  # check run on CPU in CI (ext_build compiles the CUDA sources here).
  ext_build_step 60
  run_step gpu_tests 150 env -u TRITON_INTERPRET "$PY" -m pytest -q -p no:cacheprovider -m "not slow" "${XDIST[@]}" \
    --durations=10 --ignore=tests/kernels/test_sm90_static.py --ignore=tests/kernels/test_cuda_compile.py \
    tests/kernels > "$OUT/pytest.log" 2>&1
  run_step rounds 120 "$PY" benchmarks/bench_rounds.py --random-weights --preset gpu-check --out "$OUT/rounds.json"
  # FlowerTune's LoRA (r 32, alpha 64) on a 7B-shaped 4-bit base: one 256-token sequence per client
  # and step, N = 2, 10, 20, fedhello batched against the PEFT loop; each case its own process.
  qlora_step 150 --models llama-7b --n 2,10,20 --seq 256 --rank 32 --alpha 64 --dtype bfloat16 --timeout-s 100
  run_step variants 100 "${BENCH[@]}" --routing contiguous,zipf1,zipf2 --impls triton,triton_nonorm,base \
    --out "$OUT/variants.json"
  run_step variants_n1 45 "$PY" benchmarks/bench_kernels.py --n 1 --t 8k --d 4096 --r 16 --dtype bf16 \
    --variants uniform --impls triton,base --warmup 3 --min-reps 10 --max-reps 100 --target-ms 200 \
    --out "$OUT/variants_n1.json"
fi
pkill -TERM -P "$EXT_PID" 2>/dev/null  # a build still going (its step says so) ends with the check
timeout 60 "$PY" benchmarks/gpu_check.py summary --out "$SUMMARY" --kernels "$OUT/kernels.json" \
  --variants "$OUT/variants.json" "$OUT/variants_n1.json" --pytest-log "$OUT/pytest.log" \
  --rounds "$OUT/rounds.json" || echo "[gpu_check] summary failed"
echo "[gpu_check] done in $(( SECONDS - START ))s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null  # the log is complete when the script returns
