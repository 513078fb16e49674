#!/usr/bin/env bash
# Builds the native CPU kernels with AddressSanitizer into a scratch folder and runs their tests against
# that build (`make asan`). torch itself is not instrumented, but ASan's allocator (preloaded) puts red
# zones around every tensor torch allocates, so an out-of-bounds read or write by our code is caught.
# valgrind cannot be used instead: it does not decode AVX-512.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=$(mktemp -d /tmp/mixsparse-asan.XXXXXX)
trap 'rm -rf "$OUT"' EXIT
read -r TORCH_INC TORCH_LIB PY_INC EXT < <("$PY" - <<'PY'
import sysconfig, torch.utils.cpp_extension as c
print(" ".join(["-I" + p for p in c.include_paths()]).replace(" ", ","), c.library_paths()[0],
      sysconfig.get_paths()["include"], sysconfig.get_config_var("EXT_SUFFIX"))
PY
)
SAN="-fsanitize=address -fno-omit-frame-pointer -g -O1 -fno-wrapv"
g++ $SAN -fPIC -std=c++17 -Icsrc/cpu -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16 -mavx512vbmi2 -mfma \
    -c csrc/cpu/sparse_kernels_avx512.cpp -o "$OUT/avx512.o"
g++ $SAN -fPIC -std=c++20 -Icsrc/cpu ${TORCH_INC//,/ } -I"$PY_INC" -DMIXSPARSE_HAS_AVX512=1 \
    -DTORCH_EXTENSION_NAME=_cpu_sparse -DTORCH_API_INCLUDE_EXTENSION_H -w \
    -c csrc/cpu/sparse_linear.cpp -o "$OUT/op.o"
g++ $SAN -shared "$OUT/op.o" "$OUT/avx512.o" -L"$TORCH_LIB" -lc10 -ltorch -ltorch_cpu -ltorch_python \
    -o "$OUT/_cpu_sparse$EXT"
echo "ASan build: $OUT/_cpu_sparse$EXT"
export LD_PRELOAD="$(g++ -print-file-name=libasan.so)" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1
"$PY" - "$OUT/_cpu_sparse$EXT" <<'PY'
import importlib.util, sys
import torch  # noqa: F401  (loads libtorch before the extension)
spec = importlib.util.spec_from_file_location("mixsparse.runtime._cpu_sparse", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
sys.modules["mixsparse.runtime._cpu_sparse"] = module
import pytest
# the fallback tests run fresh interpreters (not this build); the bad-argument test aborts under the preloaded
# ASan runtime when c10::Error crosses into libtorch (no ASan report; it passes in the normal build)
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "tests/unit/test_cpu_kernels.py", "-k",
                      "not fallback and not bad_arguments"]))
PY
