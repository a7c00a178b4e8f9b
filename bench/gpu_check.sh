#!/usr/bin/env bash
# One prepared device check of the GPU path, writing one results file.
#
#   bench/gpu_check.sh [--dry-run] [--wheels DIR] [RESULTS_FILE]
#
# Steps (each with its own time limit; the whole check is sized for < 8 minutes on an H100):
#   1. the device: nvidia-smi's GPU name, driver and CUDA version (its major picks the CuPy wheel);
#   2. packages: whatever the Python lacks is installed from the package index (cupy-cudaNNx for
#      the driver's CUDA major, torch + torchvision for the baseline, mpi4py + mpich, the
#      project's own dependencies), or with --wheels DIR from wheels in DIR (machines without a
#      network). For a machine whose image has CuPy and PyTorch but no network, fetch the rest
#      here first (Python 3.12 there):
#        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#          --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#          --platform manylinux2014_x86_64 -d .whl mpich lmdb graphviz 'protobuf>=5.29,<8'
#      and run bench/gpu_check.sh --wheels .whl there (15 MB);
#   3. the GPU parity tests (tests/gpu: every layer case, the solver rules, CIFAR10-Quick);
#   4. bench/bench_gpu.py: CIFAR10-Quick (batch 100, 350), NiN (128), ResNet-50 (32) against
#      PyTorch on the same device;
#   5. the main job, 3 MPI ranks on GPU 0 (solvers/cifar10_mcl.prototxt cut to 200 iterations),
#      on real CIFAR-10 (data/cifar10, made by tools/get_cifar10.py when missing); where it
#      cannot be had (no network, no tarball) the same job runs on synthetic data, and says so.
#
# RESULTS_FILE defaults to $OUT/gpu_results.txt (or ./gpu_results.txt without $OUT).
# --dry-run runs every step that needs no device (packages are only listed, the tests skip their
# GPU cases, the benchmark and the MPI job run a step or two on the CPU) and fails nowhere else.
# Exit status: 0 when every step passed, 1 when a step failed (see the results file).
set -u

DRY=0
WHEELS=""
RESULTS=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --wheels) WHEELS="$2"; shift ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) RESULTS="$1" ;;
    esac
    shift
done
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT" || exit 1
RESULTS="${RESULTS:-${OUT:-.}/gpu_results.txt}"
case "$RESULTS" in /*) ;; *) RESULTS="$ROOT/$RESULTS" ;; esac
mkdir -p "$(dirname "$RESULTS")"
: > "$RESULTS"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"
else PY="python3"; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
WORK="$(mktemp -d)"
FAILED=0
T0=$(date +%s)

say() { echo "$*" | tee -a "$RESULTS"; }
step() { say ""; say "== $* ($(( $(date +%s) - T0 )) s)"; }
fail() { say "FAILED: $*"; FAILED=1; }
BUDGET="${GPU_CHECK_BUDGET:-450}"  # seconds for the whole check (an H100 run must stay < 8 min)
# run LIMIT NAME CMD...: the command's output to the log, its tail to the results; LIMIT is cut
# to what is left of the budget
run() {
    local limit="$1" name="$2"; shift 2
    local log="$WORK/$name.log" rc left
    left=$(( BUDGET - ($(date +%s) - T0) ))
    [ "$left" -lt "$limit" ] && limit="$left"
    if [ "$limit" -lt 5 ]; then say "(no time left in the ${BUDGET} s budget for $name)"; return 124; fi
    timeout "$limit" "$@" > "$log" 2>&1; rc=$?
    tail -n 40 "$log" >> "$RESULTS"
    [ $rc -eq 124 ] && say "(stopped after ${limit} s)"
    return $rc
}

say "pycaffe-mpi GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
[ $DRY -eq 1 ] && say "DRY RUN: device steps are skipped or run on the CPU; no GPU numbers here"

# -- 1. the device -------------------------------------------------------------------------------
step "1. device"
CUDA_MAJOR=""
if command -v nvidia-smi > /dev/null 2>&1; then
    say "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)"
    CUDA_MAJOR="$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9]*\)\..*/\1/p' | head -n 1)"
    say "CUDA (driver) version major: ${CUDA_MAJOR:-unknown}"
elif [ $DRY -eq 1 ]; then
    say "no NVIDIA device: nvidia-smi not found (dry run: going on)"
else
    fail "no NVIDIA device: nvidia-smi not found"
    say "results: $RESULTS"
    exit 1
fi

# -- 2. packages ---------------------------------------------------------------------------------
step "2. packages ($PY: $("$PY" --version 2>&1))"
missing() {  # import name -> pip name, for each import that fails
    "$PY" - "$CUDA_MAJOR" <<'EOF'
import importlib, sys
major = sys.argv[1] or "12"
wants = {"numpy": "numpy", "google.protobuf": "protobuf", "lmdb": "lmdb", "h5py": "h5py",
         "PIL": "pillow", "matplotlib": "matplotlib", "graphviz": "graphviz",
         "pytest": "pytest", "mpi4py": "mpi4py", "cupy": f"cupy-cuda{major}x",
         "torch": "torch", "torchvision": "torchvision"}  # lmdb: only real CIFAR-10 needs it
out = []
for mod, pkg in wants.items():
    try:
        importlib.import_module(mod)
    except Exception:
        out.append(pkg)
try:  # the generated schema refuses a protobuf runtime older than its gencode
    importlib.import_module("pycaffe_mpi.proto.caffe_pb2")
except Exception:
    out = [p for p in out if p != "protobuf"] + ["protobuf>=5.29,<8"]
print(" ".join(out))
EOF
}
MISSING="$(missing)"
case " $MISSING " in *" mpi4py "*) MISSING="$MISSING mpich" ;; esac
MPIEXEC="$(dirname "$(command -v "$PY")")/mpiexec"
[ -x "$MPIEXEC" ] || MPIEXEC="$(command -v mpiexec || true)"
if [ -z "$MPIEXEC" ]; then case " $MISSING " in *" mpich "*) ;; *) MISSING="$MISSING mpich" ;; esac; fi
if [ -z "${MISSING// /}" ]; then
    say "all present"
else
    if [ -n "$WHEELS" ]; then PIP=("$PY" -m pip install -q --no-index --find-links "$WHEELS")
    else PIP=("$PY" -m pip install -q); fi
    MISSING="${MISSING# }"
    say "missing: $MISSING"
    if [ $DRY -eq 1 ]; then
        say "would run: ${PIP[*]} $MISSING"
    else
        # shellcheck disable=SC2086
        # one at a time: a package the index (or DIR) lacks must not stop the others
        for pkg in $MISSING; do
            run 60 "pip-$pkg" "${PIP[@]}" "$pkg" || say "could not install $pkg"
        done
        LEFT="$(missing)"
        say "still missing: ${LEFT:-nothing}"
        for pkg in $LEFT; do  # lmdb, graphviz, matplotlib are not needed by the steps below
            case "$pkg" in lmdb|graphviz|matplotlib) ;;
                *) fail "installing $pkg (no network here? use --wheels DIR)" ;; esac
        done
        MPIEXEC="$(dirname "$(command -v "$PY")")/mpiexec"
        [ -x "$MPIEXEC" ] || MPIEXEC="$(command -v mpiexec || true)"
    fi
fi
say "mpiexec: ${MPIEXEC:-none}"

# -- 3. parity tests -----------------------------------------------------------------------------
step "3. GPU parity tests"
XDIST=()
"$PY" -c "import xdist" > /dev/null 2>&1 && XDIST=(-n 8)  # CuPy compiles kernels in parallel
run 150 parity "$PY" -m pytest tests/gpu -q -rs -p no:cacheprovider "${XDIST[@]}" \
    || fail "GPU parity tests"

# -- 4. benchmark --------------------------------------------------------------------------------
step "4. benchmark against PyTorch"
if [ $DRY -eq 1 ]; then
    run 150 bench "$PY" bench/bench_gpu.py --dry-run || fail "benchmark (dry run)"
else
    run 150 bench "$PY" bench/bench_gpu.py --steps 20 || fail "benchmark"
fi

# -- 5. the main job: 3 ranks on one GPU ---------------------------------------------------------
step "5. main job: mpiexec -n 3, solvers/cifar10_mcl.prototxt, 200 iterations, --gpu 0,0,0"
DATA_OK=1
if ! "$PY" -c "import lmdb" > /dev/null 2>&1; then
    DATA_OK=0
elif [ ! -d data/cifar10/cifar10_train_lmdb ] || [ ! -d data/cifar10/cifar10_test_lmdb ]; then
    run 45 get_cifar10 "$PY" tools/get_cifar10.py || DATA_OK=0
fi
[ -d data/cifar10/cifar10_train_lmdb ] || DATA_OK=0
if [ $DATA_OK -eq 1 ]; then say "data: real CIFAR-10 (data/cifar10)"
else say "data: SYNTHETIC (real CIFAR-10 could not be had here: no network and no tarball; put data/cifar10 or run tools/get_cifar10.py --tarball FILE first)"; fi
ITERS=200
GPU_FLAG=(--gpu 0,0,0)
if [ $DRY -eq 1 ]; then ITERS=2; GPU_FLAG=(); say "(dry run: $ITERS iterations on the CPU)"; fi
"$PY" - "$WORK" "$ITERS" "$DATA_OK" <<'EOF' || fail "writing the shortened solver"
import os, sys
sys.path.insert(0, "bench")
from google.protobuf import text_format
import _nets
from pycaffe_mpi.proto import caffe_pb2
work, iters, real = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
sp = caffe_pb2.SolverParameter()
text_format.Merge(open("solvers/cifar10_mcl.prototxt").read(), sp)
sp.max_iter, sp.display, sp.snapshot = iters, max(1, iters // 10), 0
sp.snapshot_prefix = os.path.join(work, "mcl")
sp.ClearField("stepvalue")
sp.lr_policy = "fixed"
if real:
    sp.net = os.path.abspath(sp.net)
    sp.test_interval, sp.test_initialization = iters, False
    del sp.test_iter[:]
    sp.test_iter.append(20)
else:  # same ranks and layers, DummyData of CIFAR's shape instead of the LMDB
    path = os.path.join(work, "net.prototxt")
    open(path, "w").write(text_format.MessageToString(_nets.with_dummy_data(sp.net, 100)))
    sp.net = path
    del sp.test_iter[:]
    sp.ClearField("test_interval")
open(os.path.join(work, "solver.prototxt"), "w").write(text_format.MessageToString(sp))
EOF
if [ -z "$MPIEXEC" ]; then
    fail "no mpiexec: install mpi4py and mpich (pip install mpi4py mpich)"
else
    START=$(date +%s)
    if run 150 mcl "$MPIEXEC" -n 3 "$PY" -m pycaffe_mpi.cli train \
            --solver "$WORK/solver.prototxt" "${GPU_FLAG[@]}"; then
        SECS=$(( $(date +%s) - START ))
        say "main job: $ITERS iterations on 3 ranks in ${SECS} s (start-up included); last display:"
        say "  $(grep 'iter/s' "$WORK/mcl.log" | tail -n 1)"
    else
        fail "main job (3 MPI ranks)"
    fi
fi

step "done"
[ $FAILED -eq 0 ] && say "ALL STEPS PASSED" || say "SOME STEPS FAILED (see above)"
say "results: $RESULTS"
rm -rf "$WORK"
exit $FAILED
