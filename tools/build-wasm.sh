#!/usr/bin/env bash
# Builds the edge engine's C kernel (wasm/) in one go:
#   wasm/build/ringlinear.wasm         emcc -O3 -msimd128, standalone (no JS glue, no imports): what the worker imports
#   wasm/build/ringlinear_scalar.wasm  same without SIMD (benchmark baseline)
#   wasm/build/test_kernels.js(+.wasm) the C kernel tests compiled with SIMD128, run by node (ref vs simd128)
#   wasm/build/native/test_kernels     the same tests built natively (gcc, else clang)
#   wasm/build/native/bench_native     native baseline for bench/edge_engine.mjs (gcc -O3 -march=native)
# Usage: bash tools/build-wasm.sh [--test]   (--test also runs the wasm and native kernel tests)
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v emcc >/dev/null 2>&1; then
  echo "error: emcc not found. Install Debian's emscripten: apt-get install emscripten" >&2
  exit 1
fi

OUT=wasm/build
mkdir -p "$OUT/native"
SRC="wasm/src/matmul.c wasm/src/quant.c wasm/src/norm.c wasm/src/attention.c wasm/src/lightning.c wasm/src/moe.c wasm/src/forward.c wasm/src/api.c"
CFLAGS="-std=c11 -O3 -Wall -Wextra -Iwasm/include"
EXPORTS=_rl_error_message,_rl_malloc,_rl_free,_rl_create,_rl_destroy,_rl_model_bytes,_rl_n_linear,_rl_n_softmax,\
_rl_layer_gamma,_rl_tensor_shape,_rl_load_rows,_rl_fill_random,_rl_session_bytes,_rl_session_create,\
_rl_session_free,_rl_session_pos,_rl_session_state,_rl_forward,_rl_logits
# Debian's emscripten has a frozen prebuilt cache: never point EM_CACHE elsewhere. Its JS optimiser needs acorn
# from Debian's node path (only the test program has JS glue).
unset EM_CACHE
export NODE_PATH=/usr/share/nodejs

WASM_LINK="-sSTANDALONE_WASM --no-entry -sALLOW_MEMORY_GROWTH=1 -sMAXIMUM_MEMORY=2048MB -sEXPORTED_FUNCTIONS=$EXPORTS"
emcc $CFLAGS -msimd128 $SRC -o "$OUT/ringlinear.wasm" $WASM_LINK
emcc $CFLAGS $SRC -o "$OUT/ringlinear_scalar.wasm" $WASM_LINK

# Kernel tests under node: CommonJS glue (the repo root is "type": "module", so mark this folder commonjs).
echo '{ "type": "commonjs" }' > "$OUT/package.json"
emcc $CFLAGS -msimd128 $SRC wasm/tests/test_kernels.c -o "$OUT/test_kernels.js" -sENVIRONMENT=node \
  -sALLOW_MEMORY_GROWTH=1 -sEXIT_RUNTIME=1 -sSINGLE_FILE=1  # node 20 has fetch(): embed the wasm so the glue never fetches a path

# Native builds: gcc, or the clang that Debian's emscripten depends on.
CC=${CC:-$(command -v gcc || command -v clang-14 || command -v clang || command -v cc)}
"$CC" $CFLAGS -march=native $SRC wasm/tests/test_kernels.c -o "$OUT/native/test_kernels" -lm
"$CC" $CFLAGS -march=native $SRC wasm/bench/bench_native.c -o "$OUT/native/bench_native" -lm
# Same C with reassociation allowed, so the compiler vectorises the reference reductions (the strongest native
# baseline).
"$CC" $CFLAGS -march=native -ffast-math $SRC wasm/bench/bench_native.c -o "$OUT/native/bench_native_fastmath" -lm

echo "built: $(ls "$OUT"/*.wasm | tr '\n' ' ')"

if [[ "${1:-}" == "--test" ]]; then
  node "$OUT/test_kernels.js"
  "$OUT/native/test_kernels"
fi
