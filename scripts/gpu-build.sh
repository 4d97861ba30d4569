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
# The source (the llama-cpp-python sdist, ~77 MB) is downloaded once into
# $INNKEEPER_CACHE/sdist (default ~/.cache/innkeeper/sdist) and reused by every later try.
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
    local release root
    release="$("$nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')"
    root="$(cuda_root "$nvcc")"
    echo "CUDA toolkit: $nvcc ($release)"
    # What CMake would only report after ~160 lines: say it in one line each, with the fix.
    local failed=0
    if ! has_cublas "$root"; then
        echo "error: nvcc (CUDA $release) is installed but cuBLAS is not (no cublas_v2.h and" \
            "libcublas.so in $root): install it, e.g. sudo apt install" \
            "libcublas-dev-${release//./-} from NVIDIA's CUDA repository, then run" \
            "make serve GPU=cuda again" >&2
        failed=1
    fi
    # Without a named architecture llama.cpp builds for the GPUs it sees ("native").
    if [[ " ${CMAKE_ARGS:-} " != *CMAKE_CUDA_ARCHITECTURES* ]] &&
        [[ " ${CMAKE_ARGS:-} " != *GGML_NATIVE=[Oo][Ff][Ff]* ]] && ! gpu_seen; then
        echo "error: nvcc is installed but no NVIDIA GPU is visible ($gpu_why), so the" \
            "build cannot tell which GPU to compile for: install the card's driver, or name" \
            "the card: make serve GPU=cuda CMAKE_ARGS=-DCMAKE_CUDA_ARCHITECTURES=86" \
            "(RTX 30xx: 86, RTX 40xx: 89, RTX 50xx: 120)" >&2
        failed=1
    fi
    [ "$failed" = 0 ] || exit 1
}

# The toolkit folder nvcc belongs to, as nvcc itself reports it (CMake asks it the same way);
# nvcc may be a wrapper script on PATH, so its own location is only the fallback.
cuda_root() {
    local top
    top="$("$1" --dryrun -c innkeeper-probe.cu 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n1)"
    if [ -n "$top" ] && [ -d "$top" ]; then
        (cd "$top" && pwd)
    else
        (cd "$(dirname "$1")/.." && pwd)
    fi
}

has_cublas() {
    local root="$1" header="" lib="" dir
    for dir in "$root/include" "$root"/targets/*/include /usr/include; do
        [ -f "$dir/cublas_v2.h" ] && header="$dir"
    done
    for dir in "$root/lib64" "$root/lib" "$root"/targets/*/lib /usr/lib/x86_64-linux-gnu \
        /usr/lib/aarch64-linux-gnu /usr/lib64; do
        compgen -G "$dir/libcublas.so*" >/dev/null && lib="$dir"
    done
    [ -n "$header" ] && [ -n "$lib" ]
}

gpu_why=""
gpu_seen() {
    if ! command -v nvidia-smi >/dev/null; then
        gpu_why="nvidia-smi is not installed: no NVIDIA driver"
        return 1
    fi
    if ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
        gpu_why="nvidia-smi lists no GPU"
        return 1
    fi
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
# `innkeeper doctor --json` names the backends compiled into the installed llama.cpp
# (RPC among them when it was built with -DGGML_RPC=ON).
if [ -x "$bin/innkeeper" ] && report="$("$bin/innkeeper" doctor --json 2>/dev/null)"; then
    if printf '%s' "$report" | "$bin/python" -c '
import json, sys
r = json.load(sys.stdin)
have = [b.lower() for b in r["backends"]]
ok = sys.argv[1].lower() in have and "rpc" in have and r["llama_cpp_python"] == sys.argv[2]
sys.exit(0 if ok else 1)' "$name" "$version"; then
        echo "llama-cpp-python $version is already built with $name and RPC: nothing to do"
        exit 0
    fi
fi

# --- the source, downloaded once -------------------------------------------------------------
cache="${INNKEEPER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/innkeeper}/sdist"
sdist="$cache/llama_cpp_python-$version.tar.gz"
fetch=("$bin/pip" download --quiet --no-deps --no-binary :all: -d "$cache"
    "llama-cpp-python==$version")
# --no-cache-dir: pip would otherwise reuse the CPU wheel it built from the same sdist.
cmd=("$bin/pip" install --force-reinstall --no-deps --no-cache-dir "$sdist")
# RPC too: `innkeeper worker` and `serve --rpc` need it on every build (CPU ones: make install).
args="$flag -DGGML_RPC=ON${CMAKE_ARGS:+ $CMAKE_ARGS}"
if [ "$mode" = "--dry-run" ]; then
    [ -f "$sdist" ] || echo "${fetch[*]}"
    echo "CMAKE_ARGS=\"$args\" ${cmd[*]}"
    exit 0
fi
if [ -f "$sdist" ]; then
    echo "llama-cpp-python $version source: $sdist (downloaded before)"
else
    echo "downloading the llama-cpp-python $version source (~77 MB) into $cache, once"
    mkdir -p "$cache"
    "${fetch[@]}" || die "could not download llama-cpp-python==$version's source (offline?)"
    [ -f "$sdist" ] || die "pip download left no $sdist"
fi

# --- the build ---------------------------------------------------------------------------------
log="$cache/build-$backend.log"
echo "building llama-cpp-python $version with $name (CMAKE_ARGS=\"$args\"): this takes" \
    "minutes and prints nothing until it ends; to watch it: tail -f $log"
if ! CMAKE_ARGS="$args" FORCE_CMAKE=1 "${cmd[@]}" >"$log" 2>&1; then
    echo "error: the $name build of llama-cpp-python failed; the first errors from $log:" >&2
    grep -m 8 -E "CMake Error|error:|Error [0-9]" "$log" >&2 || tail -n 15 "$log" >&2
    exit 1
fi
"$bin/innkeeper" doctor
