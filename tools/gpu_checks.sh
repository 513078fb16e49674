#!/usr/bin/env bash
# The checks a session with a CUDA machine runs: the GPU kernel tests, the GPU GEMM table and the
# end-to-end Llama-shaped table (benchmarks/gemm.py, benchmarks/e2e_gpu.py). Meant for a machine that has
# torch with CUDA but not this project installed: the three packages are linked into a temporary
# site folder instead of building the CPU extension there. Results land in benchmarks/results/ and, when
# $OUT is set, are copied there too.
#
#     bash tools/gpu_checks.sh            # everything (~5 min on an H100)
set -uo pipefail
cd "$(dirname "$0")/.."
site=$(mktemp -d)
mkdir -p "$site/mixsparse"
for package in pruner runtime serve; do ln -s "$PWD/$package" "$site/mixsparse/$package"; done
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MIXSPARSE_CPU_KERNELS=0
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
keep() {  # copy each step's results out at once, so a later step running out of time loses nothing
    if [ -n "${OUT:-}" ]; then for f in "$@"; do [ -f "$f" ] && cp "$f" "$OUT"/; done; fi
}
status=0
python3 -m pytest tests/gpu -q -p no:cacheprovider || status=1
python3 benchmarks/gemm.py ${GEMM_ARGS:-} || status=1
keep benchmarks/results/gemm-gpu.json benchmarks/results/gemm-gpu.csv benchmarks/results/gemm-gpu.png
[ -n "${SKIP_E2E:-}" ] || python3 benchmarks/e2e_gpu.py || status=1
keep benchmarks/results/e2e-gpu.json
exit $status
