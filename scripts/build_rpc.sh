#!/usr/bin/env bash
# Builds what `--rpc` needs, from the llama.cpp source vendored in the installed llama-cpp-python's
# source release (the same llama.cpp version the project runs: client and servers must speak the
# same RPC protocol):
#   DIR/bin/rpc-server  - run one on each worker machine (or several on one, for a test)
#   DIR/lib/            - llama.cpp's libraries with the RPC backend; point the project at them with
#                         LLAMA_CPP_LIB_PATH=DIR/lib (llama-cpp-python reads it when it is imported)
# The prebuilt wheel's CPU kernels (libggml-cpu) replace the freshly built ones in both places, so a
# layer computes the same numbers on a worker as it does locally, and a -march=native build cannot
# fault on CPU features a VM does not enable.
# About 10-15 minutes on 2 cores; run it in the background. Safe to run again (it reuses the build).
# usage: scripts/build_rpc.sh [DIR]        (default: ~/.cache/alignez-local/rpc)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DIR=$(mkdir -p "${1:-$HOME/.cache/alignez-local/rpc}" && cd "${1:-$HOME/.cache/alignez-local/rpc}" && pwd)
V=$("$PY" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))' 2>/dev/null) || {
    echo "error: $PY has no llama-cpp-python; run ./scripts/install.sh first (or set PYTHON=...)" >&2; exit 1; }
WHEEL_LIB=$("$PY" -c 'import importlib.util, pathlib; s = importlib.util.find_spec("llama_cpp"); print(pathlib.Path(s.origin).parent / "lib")')
SRC="$DIR/llama.cpp-$V"
if [ ! -d "$SRC" ]; then
    mkdir -p "$DIR/dl"
    [ -f "$DIR/dl/llama_cpp_python-$V.tar.gz" ] || \
        "$PY" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: -d "$DIR/dl" "llama-cpp-python==$V"
    tar xzf "$DIR/dl/llama_cpp_python-$V.tar.gz" -C "$DIR"
    mv "$DIR/llama_cpp_python-$V/vendor/llama.cpp" "$SRC" && rm -rf "$DIR/llama_cpp_python-$V"
fi
GEN=(); command -v ninja >/dev/null && GEN=(-G Ninja)
echo "configuring llama.cpp $V (from llama-cpp-python $V) with the RPC backend in $SRC/build-rpc" >&2
cmake -S "$SRC" -B "$SRC/build-rpc" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
    -DGGML_RPC=ON -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF > "$DIR/cmake.log" 2>&1 || {
    echo "error: cmake could not configure llama.cpp (needs cmake and a C++17 compiler); see $DIR/cmake.log" >&2; exit 1; }
echo "building rpc-server and libllama (log: $DIR/build.log)" >&2
cmake --build "$SRC/build-rpc" -j "$(nproc)" --target ggml-rpc-server llama > "$DIR/build.log" 2>&1 || {
    echo "error: the build failed; see the end of $DIR/build.log" >&2; exit 1; }
BIN="$SRC/build-rpc/bin"
# A changed file is written beside its old one and renamed over it: a running rpc-server or alignez
# keeps the old library mapped (copying over it in place crashes them).
put() { if ! cmp -s "$1" "$2/$(basename "$1")"; then cp -P "$1" "$2/.new.$(basename "$1")" && mv -f "$2/.new.$(basename "$1")" "$2/$(basename "$1")"; fi; }
for f in "$WHEEL_LIB"/libggml-cpu.so*; do put "$f" "$BIN"; done
mkdir -p "$DIR/lib" "$DIR/bin"
for f in "$BIN"/lib*.so*; do put "$f" "$DIR/lib"; done
ln -sf "$BIN/ggml-rpc-server" "$DIR/bin/rpc-server"
LLAMA_CPP_LIB_PATH="$DIR/lib" "$PY" -c 'import llama_cpp.llama_cpp as C, sys; C.llama_backend_init(); sys.exit(not C.llama_supports_rpc())' || {
    echo "error: the library built in $DIR/lib has no RPC backend; see $DIR/build.log" >&2; exit 1; }
echo "built. Start a worker:   $DIR/bin/rpc-server --host 127.0.0.1 --port 50052 --threads 1"
echo "then run with:           export LLAMA_CPP_LIB_PATH=$DIR/lib"
echo "                         and add --rpc 127.0.0.1:50052 to an alignez command"
