#!/usr/bin/env bash
# Builds llama.cpp's CPU tools from the llama-cpp-python source package (which vendors llama.cpp)
# into out/llama.cpp/, git-ignored. bench/bench_llama_cpp.py compares Nano with what it builds.
#
#   bash bench/build_llama_cpp.sh            # native: the AVX-512/VNNI kernels this CPU has
#   PORTABLE=1 bash bench/build_llama_cpp.sh # AVX2 only, for a binary other x86-64 machines run
#   JOBS=2 nice -n 10 bash bench/build_llama_cpp.sh
#
# Native is the default because Nano's C engine picks its AVX-512-VNNI kernels at run time: a
# speed comparison against an AVX2-only llama.cpp would flatter Nano.
#
# What it leaves:
#   out/llama.cpp/bin/      llama-completion (the classic one-shot CLI), llama-tokenize, llama-bench,
#                           llama-eval-callback, llama-simple, and libllama.so / libggml*.so
#   out/llama.cpp/python/   the package's own Python bindings (llama_cpp/), which load
#                           out/llama.cpp/bin/libllama.so through LLAMA_CPP_LIB_PATH: no second build
#   out/llama.cpp/VERSION   the package version and llama.cpp's build number
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="$ROOT/out/llama.cpp"
JOBS="${JOBS:-2}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT/src"

# the source package: pip fetches it from the registry like any other dependency
if ! ls "$OUT"/src/llama_cpp_python-*.tar.gz >/dev/null 2>&1; then
    "$PYTHON" -m pip download --no-binary :all: --no-deps --dest "$OUT/src" \
        "llama-cpp-python${LLAMA_CPP_PYTHON_VERSION:+==$LLAMA_CPP_PYTHON_VERSION}"
fi
SDIST="$(ls "$OUT"/src/llama_cpp_python-*.tar.gz | sort -V | tail -n 1)"
NAME="$(basename "$SDIST" .tar.gz)"
if [ ! -d "$OUT/src/$NAME" ]; then
    tar -xzf "$SDIST" -C "$OUT/src"
fi
LLAMA="$OUT/src/$NAME/vendor/llama.cpp"

command -v cmake >/dev/null || "$PYTHON" -m pip install cmake

if [ -n "${PORTABLE:-}" ]; then
    CPU_FLAGS=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON)
else
    CPU_FLAGS=(-DGGML_NATIVE=ON)
fi

# shared libraries so that the Python bindings can load the very same libllama the tools use;
# no server, tests, curl or OpenSSL: nothing here reaches the network
cmake -S "$LLAMA" -B "$OUT/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
    "${CPU_FLAGS[@]}" -DGGML_OPENMP=ON -DGGML_BLAS=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_EXAMPLES=ON
cmake --build "$OUT/build" --config Release -j "$JOBS" --target \
    llama-completion llama-tokenize llama-bench llama-eval-callback llama-simple

# llama.cpp puts every binary and library in build/bin
ln -sfn build/bin "$OUT/bin"
rm -rf "$OUT/python"
mkdir -p "$OUT/python"
cp -r "$OUT/src/$NAME/llama_cpp" "$OUT/python/"
"$PYTHON" -m pip install diskcache  # the bindings' one dependency that Nano's requirements lack
echo "$NAME $([ -n "${PORTABLE:-}" ] && echo portable-avx2 || echo native)" > "$OUT/VERSION"
echo "llama.cpp built: $OUT/bin"
