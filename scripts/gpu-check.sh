#!/usr/bin/env bash
# The GPU check: DeepSpeed MoE inference, the DeepSpeed engine, the ONNX edge on CUDA, NCCL; one JSON.
#
#   scripts/gpu-check.sh --fetch-wheels     # on a host with PyPI access: what a bare GPU host lacks → .whl/
#   scripts/gpu-check.sh [gpu_check.py args] # on the GPU host (under 10 minutes on one H200)
#
# On the GPU host, wheels found in .whl/ are installed into /tmp/dsnode-site first, and dsnode itself
# from this tree into /tmp/dsnode-pkg, unless `import dsnode.central` already works. The summary goes
# to stdout and to $OUT/gpu-check.json ($OUT, else /tmp). See docs/central.md ("GPU check").
#
# onnxruntime-gpu (for the edge section) is a 255 MB wheel: --fetch-wheels also saves it cut into
# 60 MB parts under .whl-ort/ (ORT_GPU_VERSION, default 1.31.1: built for CUDA 13) for hosts that take
# files in pieces; on the GPU host, the parts found in $ORT_GPU_PARTS (default .whl-ort/) are joined
# and installed with the other wheels.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
WHEELS="$ROOT/.whl"

fetch_wheels() {
    # Versions are the ones this checkout's .venv runs (constraints-cpu.txt), for the GPU host's Python.
    local venv_py="$ROOT/.venv/bin/python" target_py="${TARGET_PYTHON:-3.12}"
    version() { "$venv_py" -c "import importlib.metadata as m; print(m.version('$1'))"; }
    mkdir -p "$WHEELS"
    grep -qxF '/.whl/' "$ROOT/.git/info/exclude" 2>/dev/null || echo '/.whl/' >>"$ROOT/.git/info/exclude"
    local names=()
    for name in transformers pydantic pydantic-core annotated-types typing-inspection typing-extensions \
        structlog hjson llguidance; do
        names+=("$name==$(version "$name")")
    done
    "$venv_py" -m pip download --no-deps --only-binary=:all: --python-version "$target_py" --implementation cp \
        --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 \
        -d "$WHEELS" "${names[@]}"
    # DeepSpeed ships as a source archive; built here without its C++ ops it is a pure-Python wheel
    DS_BUILD_OPS=0 "$venv_py" -m pip wheel --no-deps --no-build-isolation -w "$WHEELS" "deepspeed==$(version deepspeed)"
    du -sh "$WHEELS"
    local ort="$ROOT/.whl-ort" download
    download="$(mktemp -d)"
    grep -qxF '/.whl-ort/' "$ROOT/.git/info/exclude" || echo '/.whl-ort/' >>"$ROOT/.git/info/exclude"
    "$venv_py" -m pip download --no-deps --only-binary=:all: --python-version "$target_py" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$download" \
        "onnxruntime-gpu==${ORT_GPU_VERSION:-1.31.1}"
    rm -rf "$ort" && mkdir -p "$ort"
    for wheel in "$download"/*.whl; do
        split -b 60000000 -d -a 1 "$wheel" "$ort/$(basename "$wheel").part-"
    done
    rm -rf "$download"
    ls -l "$ort"
}

join_ort_parts() {
    # the parts of one wheel, joined under its own name (pip reads the version from it)
    local parts="${ORT_GPU_PARTS:-$ROOT/.whl-ort}" first
    first="$(compgen -G "$parts/*.whl.part-0" | head -1)" || return 0
    [[ -n "$first" ]] || return 0
    cat "${first%.part-0}".part-* >"/tmp/$(basename "${first%.part-0}")"
    echo "/tmp/$(basename "${first%.part-0}")"
}

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    fetch_wheels
    exit 0
fi

ORT_WHEEL="$(join_ort_parts)"
if compgen -G "$WHEELS/*.whl" >/dev/null || [[ -n "$ORT_WHEEL" ]]; then
    # shellcheck disable=SC2086  # ORT_WHEEL: empty or one path
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dsnode-site \
        $(compgen -G "$WHEELS/*.whl") $ORT_WHEEL
    export PYTHONPATH="/tmp/dsnode-site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "import dsnode.central" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/dsnode-pkg "$ROOT"
    export PYTHONPATH="/tmp/dsnode-pkg${PYTHONPATH:+:$PYTHONPATH}"
fi

export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}"
cd /tmp  # not the tree: `import dsnode` must find the installed package, not ./daemon
exec timeout 570 "$PY" "$ROOT/scripts/gpu_check.py" --out "${OUT:-/tmp}/gpu-check.json" "$@"
