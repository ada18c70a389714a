#!/usr/bin/env bash
# One lent-GPU session's runs (issue 14): tests, sanitizers, benchmarks, training, in few device calls.
#
#   bash bench/h200_session.sh STAGE...      STAGE: validate | tests | isolate | sanitize | bench | train_reverse | train_minigpt | train_vit | e2e
#
# Correctness stages may run side by side (`sanitize &` beside `tests`); timed ones (bench, e2e) alone.
#
# Runs on the device machine from the repository root, where nothing can be installed:
# - .carry/_C.cpython-312-x86_64-linux-gnu.so: the extension built here for the device's Python 3.12
#   (docs/kernels.md, "Building for a machine with another Python");
# - .carry/data/tinyshakespeare.txt: the corpus of minigpt and gpt2-small ($CUTEGRAD_DATA);
# - the device's own python3, torch (the reference), numpy, pytest, pytest-xdist, compute-sanitizer.
# cutegrad is imported from the source tree (a package folder of links: frontend/ is `cutegrad`), so
# Python changes travel without rebuilding the extension.  Logs and a tarball of bench/results and
# the training runs go to $OUT (the device tool's folder that comes back).
set -u
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
ROOT=$PWD

# (copied only when it differs: stages run side by side, and rewriting a loaded library crashes its users)
cmp -s .carry/_C.cpython-312-x86_64-linux-gnu.so frontend/_C.cpython-312-x86_64-linux-gnu.so ||
    cp .carry/_C.cpython-312-x86_64-linux-gnu.so frontend/
ln -sfn ../allocator frontend/allocator
ln -sfn ../graphs frontend/graphs
mkdir -p /tmp/site /tmp/bin
ln -sfn "$ROOT/frontend" /tmp/site/cutegrad
printf '#!/bin/sh\nexec python3 -m cutegrad.cli "$@"\n' > /tmp/bin/cutegrad
chmod +x /tmp/bin/cutegrad
export PATH=/tmp/bin:$PATH PYTHONPATH=/tmp/site:$ROOT PYTHONUNBUFFERED=1
export CUTEGRAD_DATA=$ROOT/.carry/data NCCL_NVLS_ENABLE=0

log() { echo "== $(date +%T) $*" | tee -a "$OUT/session.log"; }
# run NAME SECONDS CMD...: the command's output to $OUT/NAME.log, its exit status to the session log
run() {
    local name=$1 secs=$2; shift 2
    log "$name: $*"
    timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    log "$name: exit $rc ($(tail -n 1 "$OUT/$name.log" | cut -c1-200))"
}

environment() {
    log "environment"
    { nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv
      python3 -c "import sys, torch, numpy; print(sys.version); print('torch', torch.__version__, 'numpy', numpy.__version__)"
      python3 -c "import cutegrad, cutegrad.cuda as c; from cutegrad import _C; print('cutegrad', cutegrad.__version__, 'cuda', c.is_available())"
      compute-sanitizer --version | tail -n 1; } >> "$OUT/session.log" 2>&1
    python3 -c "import cutegrad._C" || { log "cutegrad._C does not load: nothing run"; exit 1; }
}

stage_sanitize() {
    # Kernels of the attention, norm, dropout, column-sum and cross-entropy families under memcheck;
    # the attention and norm kernels (shared memory, barriers) under racecheck too.
    local cs="compute-sanitizer --error-exitcode 9 --print-limit 30 --target-processes all"
    run memcheck 400 $cs --tool memcheck python3 -m pytest -q -p no:cacheprovider -x \
        "tests/test_attention_gpu.py::test_short_sequence_kernel" \
        "tests/test_attention_gpu.py::test_capture_and_replay_with_new_inputs" \
        "tests/test_attention_gpu.py::test_qkv_read_in_place_from_the_fused_projection" \
        "tests/test_attention_backward_gpu.py::test_every_specialization_against_float64" \
        "tests/test_attention_backward_gpu.py::test_strided_views_of_a_fused_qkv_projection" \
        "tests/test_fused_norms_gpu.py::test_capture_and_replay" \
        "tests/test_fused_norms_gpu.py::test_fallback_shapes_and_dtypes_match_the_cpu" \
        "tests/test_fused_dropout.py::test_gpu_kernel_matches_the_model" \
        "tests/test_column_sum.py::test_gpu_matches_float64" \
        "tests/test_cross_entropy_gpu.py::test_fused_frontend_edge_cases" &
    run racecheck 400 $cs --tool racecheck --racecheck-report hazard python3 -m pytest -q -p no:cacheprovider -x \
        "tests/test_attention_gpu.py::test_short_sequence_kernel" \
        "tests/test_attention_backward_gpu.py::test_every_specialization_against_float64" \
        "tests/test_fused_norms_gpu.py::test_capture_and_replay" \
        "tests/test_fused_norms_gpu.py::test_specialized_call_runs_the_cute_kernel"
    wait
}

stage_tests() {
    run pytest-gpu 250 python3 -m pytest -m gpu -q -n 8 --timeout 200 -rfE tests
    # failures again, alone: a test that passes here only failed under the parallel load
    run pytest-gpu-rerun 90 python3 -m pytest -m gpu -q --lf --lfnf none --timeout 90 -rfE tests
}

stage_validate() {
    # The correctness stages side by side in one device call: the GPU suite, the sanitizers and
    # the reverse preset's training (each its own processes; timed stages never run beside them).
    stage_sanitize &
    stage_train_reverse &
    stage_tests
    wait
}

stage_isolate() {
    # Each GPU test file in its own process, launches synchronous and stopping at its first failure:
    # a kernel that faults kills its process's CUDA context, so in one shared process (or one xdist
    # worker) every later test fails too; here each file names its own first faulting test.
    log "isolate: every GPU test file alone, CUDA_LAUNCH_BLOCKING=1, -x"
    mkdir -p "$OUT/isolate"
    grep -l "mark.gpu" tests/test_*.py | xargs -P "${ISOLATE_JOBS:-12}" -I{} sh -c \
        'CUDA_LAUNCH_BLOCKING=1 timeout "$1" python3 -m pytest -x -q -p no:cacheprovider -m gpu {} \
            > "$0/isolate/$(basename {} .py).log" 2>&1' "$OUT" "${ISOLATE_TIMEOUT_S:-150}"
    for f in "$OUT"/isolate/*.log; do
        echo "$(basename "$f" .log): $(tail -n 1 "$f" | cut -c1-160)"
        grep -m 3 -E "^(FAILED|ERROR)|^E  " "$f" | cut -c1-300 | sed 's/^/    /'
    done > "$OUT/isolate.txt"
    tar czf "$OUT/isolate.tgz" -C "$OUT" isolate && rm -r "$OUT/isolate"
    log "isolate: done ($(grep -c 'failed\|error' "$OUT/isolate.txt") files with a failure)"
}

stage_bench() {
    run bench-attention 100 python3 -m bench.attention
    run bench-norms 70 python3 -m bench.norms
    run bench-gemm 140 python3 -m bench.gemm
    run bench-overhead 70 python3 -m bench.overhead --device cuda
}

stage_train_reverse() {
    run train-reverse 120 cutegrad train reverse --graphs --dtype bf16 --no-progress --out runs/reverse-graphs
}

stage_train_minigpt() {
    run train-minigpt 200 cutegrad train minigpt --graphs --dtype bf16 --no-progress --out runs/minigpt-graphs
}

stage_train_vit() {
    run train-vit 200 cutegrad train vit --graphs --dtype bf16 --no-progress --out runs/vit-graphs
}

stage_e2e() {
    # One process per workload: a kernel fault kills its process's CUDA context, and so would
    # every later workload's numbers with it.  The first writes the results file afresh, the
    # others merge into it (each keeps its own command and date); E2E_MERGE=1 merges from the first.
    local merge=${E2E_MERGE:+--merge}
    for w in ${E2E_WORKLOADS:-reverse vit minigpt gpt2-small}; do
        run "bench-e2e-$w" "${E2E_TIMEOUT_S:-150}" python3 -m bench.e2e --workloads "$w" $merge \
            --budget-s "${E2E_BUDGET_S:-110}"
        merge=--merge
    done
}

environment
for stage in "$@"; do
    "stage_$stage"
done
tar czf "$OUT/results.tgz" --exclude='*.safetensors' bench/results $(ls -d runs 2>/dev/null) 2>> "$OUT/session.log"
log "done: $*"
