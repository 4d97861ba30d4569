#!/usr/bin/env bash
# Rebuild the pinned llama-cpp-python with a GPU backend: `make serve GPU=cuda|vulkan|metal`.
#
#   scripts/gpu-build.sh BACKEND [VENV_BIN]     check the toolkit, then build (skipped when the
#                                                installed build already has BACKEND)
#   scripts/gpu-build.sh BACKEND [VENV_BIN] --check     only check the toolkit; build nothing
#   scripts/gpu-build.sh BACKEND [VENV_BIN] --dry-run   check, then print the pip command
#
# The version comes from pyproject.toml, so the GPU build is the same llama.cpp the CPU wheel
# is. Extra CMake flags pass through CMAKE_ARGS (e.g. CMAKE_ARGS=-DCMAKE_CUDA_ARCHITECTURES=86).
set -euo pipefail

backend="${1:-}"
bin="${2:-.venv/bin}"
mode="${3:-build}"
here="$(cd "$(dirname "$0")/.." && pwd)"

die() {
    echo "error: $*" >&2
    exit 1
}

case "$backend" in
cuda) flag="-DGGML_CUDA=on" name="CUDA" ;;
vulkan) flag="-DGGML_VULKAN=on" name="Vulkan" ;;
metal) flag="-DGGML_METAL=on" name="Metal" ;;
*) die "GPU must be cuda, vulkan or metal (got '${backend}'): e.g. make serve GPU=cuda" ;;
esac

version="$(sed -n 's/.*"llama-cpp-python==\([^"]*\)".*/\1/p' "$here/pyproject.toml" | head -n1)"
[ -n "$version" ] || die "no pinned llama-cpp-python==VERSION in $here/pyproject.toml"

# --- the toolkit ------------------------------------------------------------------------------
check_cuda() {
    local nvcc="${CUDACXX:-}"
    if [ -z "$nvcc" ] || [ ! -x "$nvcc" ]; then
        nvcc="$(command -v nvcc || true)"
    fi
    local home="${CUDA_HOME:-/usr/local/cuda}"
    if [ -z "$nvcc" ] && [ -x "$home/bin/nvcc" ]; then
        nvcc="$home/bin/nvcc"
    fi
    if [ -z "$nvcc" ]; then
        cat >&2 <<'EOF'
error: the CUDA compiler (nvcc) was not found, so llama.cpp cannot be built for an NVIDIA GPU.
  Install the NVIDIA CUDA toolkit (the driver alone is not enough):
    Debian/Ubuntu:  sudo apt install nvidia-cuda-toolkit
    or NVIDIA's:    https://developer.nvidia.com/cuda-downloads  (installs /usr/local/cuda)
  Then put nvcc on PATH (export PATH=/usr/local/cuda/bin:$PATH) or name it:
    export CUDACXX=/usr/local/cuda/bin/nvcc
  and run `make serve GPU=cuda` again.
EOF
        exit 1
    fi
    export CUDACXX="$nvcc"
    echo "CUDA toolkit: $nvcc ($("$nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'))"
}

check_vulkan() {
    local missing=()
    command -v glslc >/dev/null || missing+=("glslc (the shader compiler)")
    local sdk="${VULKAN_SDK:-/usr}"
    [ -f "$sdk/include/vulkan/vulkan.h" ] || missing+=("the Vulkan headers ($sdk/include/vulkan)")
    if [ "${#missing[@]}" -gt 0 ]; then
        local list
        list="$(printf '%s and ' "${missing[@]}")"
        echo "error: cannot build llama.cpp for Vulkan: missing ${list% and }." >&2
        echo "  Install the Vulkan SDK (https://vulkan.lunarg.com, then set VULKAN_SDK)" >&2
        echo "  or on Debian/Ubuntu: sudo apt install libvulkan-dev glslc" >&2
        exit 1
    fi
    echo "Vulkan toolkit: $(command -v glslc), headers in $sdk/include/vulkan"
}

check_metal() {
    [ "$(uname -s)" = Darwin ] || die "Metal is Apple's GPU API: GPU=metal works on macOS only"
    xcrun --find metal >/dev/null 2>&1 ||
        die "the Metal compiler was not found: install Xcode's command line tools (xcode-select --install)"
    echo "Metal: $(xcrun --find metal)"
}

"check_$backend"
[ "$mode" = "--check" ] && exit 0

# --- already built? ---------------------------------------------------------------------------
# `innkeeper doctor --json` names the backends compiled into the installed llama.cpp.
if [ -x "$bin/innkeeper" ] && report="$("$bin/innkeeper" doctor --json 2>/dev/null)"; then
    if printf '%s' "$report" | "$bin/python" -c '
import json, sys
r = json.load(sys.stdin)
ok = sys.argv[1].lower() in [b.lower() for b in r["backends"]] and r["llama_cpp_python"] == sys.argv[2]
sys.exit(0 if ok else 1)' "$name" "$version"; then
        echo "llama-cpp-python $version is already built with $name: nothing to do"
        exit 0
    fi
fi

# --no-cache-dir: pip would otherwise reuse the CPU wheel it built from the same sdist.
cmd=("$bin/pip" install --force-reinstall --no-deps --no-cache-dir
    --no-binary llama-cpp-python "llama-cpp-python==$version")
args="$flag${CMAKE_ARGS:+ $CMAKE_ARGS}"
if [ "$mode" = "--dry-run" ]; then
    echo "CMAKE_ARGS=\"$args\" ${cmd[*]}"
    exit 0
fi
echo "building llama-cpp-python $version with $name (CMAKE_ARGS=\"$args\"): this takes minutes"
CMAKE_ARGS="$args" FORCE_CMAKE=1 "${cmd[@]}"
"$bin/innkeeper" doctor
