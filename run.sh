#!/usr/bin/env bash
# One entry point for a fresh machine with only Python:
#
#   ./run.sh demo          set up, then train on real data: SASSHA vs AdamW, every backend's speed
#   ./run.sh test [args]   set up, then run the whole test suite (extra args go to pytest); it
#                          runs every README/docs block and mkdocs build --strict (tests/test_docs.py);
#                          without args it then compiles the kernels with the GPU machines' triton too
#                          and runs the benchmarks in smoke mode
#   ./run.sh bench [args]  set up, then run the benchmark suite (pytest-benchmark)
#   ./run.sh setup         only set up
#
# Setup makes a virtual environment in .venv (override: SASSHA_VENV) that can see the
# system's packages, so a torch already installed there (a GPU machine's CUDA build)
# is kept. Only when no torch is importable does it install one: $SASSHA_TORCH_SPEC,
# default "torch==2.13.0". On a CPU machine make sure that resolves to a CPU build
# (for example through pip's --index-url or --find-links configuration): installing
# a CUDA build onto a machine without a GPU only wastes gigabytes. Every later pip
# install is constrained to the installed torch (torch==<its version>).
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
VENV=${SASSHA_VENV:-.venv}
VPY="$VENV/bin/python"
# the triton of the lent GPU machines (torch 2.11 + cu130, triton 3.6); see setup()
GPU_TRITON=3.6.0
GPU_TRITON_DIR="$VENV/gpu-triton"

venv_triton() {
    "$VPY" -c "import triton; print(triton.__version__)" 2>/dev/null || true
}

gpu_triton_installed() {
    [ -d "$GPU_TRITON_DIR/triton-$GPU_TRITON.dist-info" ]
}

setup() {
    if [ ! -x "$VPY" ]; then
        echo "[setup] creating $VENV"
        "$PY" -m venv --system-site-packages "$VENV"
    fi
    # Redo the install only when what it depends on changed.
    local want stamp="$VENV/.sassha-setup"
    want=$( (cat setup.py requirements-dev.txt $(find csrc -type f 2>/dev/null | sort); echo "$GPU_TRITON") | sha256sum | cut -d' ' -f1)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return
    fi
    if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
        echo "[setup] installing ${SASSHA_TORCH_SPEC:-torch==2.13.0}"
        "$VPY" -m pip install -q "${SASSHA_TORCH_SPEC:-torch==2.13.0}"
    fi
    # Every install below is constrained to the torch now installed, so no dependency
    # (timm's torchvision, for one) can replace it with another build; one that
    # needs another torch fails instead.
    local constraints="$VENV/.sassha-constraints.txt"
    echo "torch==$("$VPY" -c 'import torch; print(torch.__version__)')" > "$constraints"
    echo "[setup] installing test, demo, benchmark and integration packages ($(cat "$constraints"))"
    "$VPY" -m pip install -q -r requirements-dev.txt -c "$constraints"
    # timm needs torchvision, and the registry's torchvision wheels are CUDA builds
    # that do not load with a CPU torch ("operator torchvision::nms does not exist")
    # and then break importing transformers and lightning too: timm is installed
    # only where torchvision already works (a GPU machine's torch stack).
    if "$VPY" -c "import torchvision" >/dev/null 2>&1; then
        "$VPY" -m pip install -q timm -c "$constraints" \
            || echo "[setup] timm did not install; the timm tests skip"
    else
        echo "[setup] not installing timm: it needs torchvision, which is not importable here; the timm tests skip"
    fi
    # The GPU machines run triton $GPU_TRITON: where another triton is installed, the test
    # command also compiles every kernel for sm_90 with that one (tests/test_triton_compile.py:
    # registers, spills, 16-byte accesses), from a folder of its own put first on PYTHONPATH.
    # Not fatal (the GPU machines have no network, and need none: they run it already);
    # the test command fails instead if it is needed and missing.
    if ! gpu_triton_installed && [ "$(venv_triton)" != "$GPU_TRITON" ]; then
        echo "[setup] installing triton==$GPU_TRITON into $GPU_TRITON_DIR (the GPU machines' triton, for the sm_90 compile checks)"
        rm -rf "$GPU_TRITON_DIR"
        "$VPY" -m pip install -q --no-deps --target "$GPU_TRITON_DIR" "triton==$GPU_TRITON" \
            || echo "[setup] triton==$GPU_TRITON did not install; ./run.sh test will fail its second compile pass"
    fi
    echo "[setup] installing sassha_fused (builds the C++ extension; a failed build is recorded, not fatal)"
    "$VPY" -m pip install -q --no-deps --no-build-isolation -e . -c "$constraints"
    echo "$want" > "$stamp"
}

cmd=${1:-help}
[ $# -gt 0 ] && shift
case "$cmd" in
    setup)
        setup
        ;;
    demo)
        setup
        exec "$VPY" -m sassha_fused.demo "$@"
        ;;
    test)
        setup
        # Without a GPU, Triton kernels run under Triton's CPU interpreter; it must be
        # on before triton is imported (tests/conftest.py sets it too). With a GPU
        # the same tests run the compiled kernels on it.
        if ! "$VPY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
            export TRITON_INTERPRET=1
        fi
        # Setup installed the docs packages: tests/test_docs.py then builds the site with
        # mkdocs build --strict and fails (instead of skipping) if they are missing.
        export SASSHA_DOCS_REQUIRED=1
        set +e
        "$VPY" -m pytest tests -q -p no:cacheprovider "$@"
        rc=$?
        if [ $rc -eq 0 ] && [ $# -eq 0 ]; then
            # The sm_90 compile checks again with the GPU machines' triton (the test
            # fails if another triton answers), unless that is the triton already tested.
            if [ "$(venv_triton)" = "$GPU_TRITON" ]; then
                echo "run.sh: the tests above compiled with triton $GPU_TRITON, the GPU machines' version"
            elif ! gpu_triton_installed; then
                echo "run.sh: triton $GPU_TRITON (the GPU machines') is not in $GPU_TRITON_DIR, so the" \
                     "kernels were not compiled with it; rerun ./run.sh setup with network access" >&2
                rc=1
            else
                PYTHONPATH="$GPU_TRITON_DIR${PYTHONPATH:+:$PYTHONPATH}" SASSHA_EXPECT_TRITON="$GPU_TRITON" \
                    "$VPY" -m pytest tests/test_triton_compile.py -q -p no:cacheprovider
                rc=$?
            fi
        fi
        if [ $rc -eq 0 ] && [ $# -eq 0 ]; then
            # The benchmark suite in smoke mode (tiny sizes, each case once), so it cannot rot.
            "$VPY" -m pytest bench -q -p no:cacheprovider --benchmark-disable
            rc=$?
        fi
        set -e
        if [ $rc -eq 5 ]; then
            echo "run.sh: pytest collected no tests; failing on purpose" >&2
            exit 1
        fi
        exit $rc
        ;;
    bench)
        setup
        exec "$VPY" -m pytest bench -q -p no:cacheprovider "$@"
        ;;
    *)
        sed -n '2,10p' "$0"
        exit 2
        ;;
esac
