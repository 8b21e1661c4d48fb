#!/usr/bin/env bash
# One lent GPU's worth of checks, in the order a short device budget wants them: correctness
# first (every fast path against its twin), then the benchmark rows against their floors and
# peers, then where a decode step's and a prefill's GPU time goes (bf16 and fp8). Each part has
# its own time limit (seconds, overridable), so one slow part cannot eat the others; name parts
# to run only those (a device call runs at most 10 minutes: all three take ~9-11).
#
#     bash benchmarks/gpu_session.sh                 # check, bench, profile
#     bash benchmarks/gpu_session.sh check bench     # ~8-9.5 minutes on an H200 (first-use
#     bash benchmarks/gpu_session.sh profile         # compiles and autotuning; the checks took 230 s
#                                                    # on 2026-11-28, before the kernels added since)
set -u
cd "$(dirname "$0")/.."
parts=" ${*:-check bench profile} "
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader 2>/dev/null || true
python -c "import torch; print('torch', torch.__version__)"
if [[ $parts == *" check "* ]]; then  # rows also stream to stderr
    timeout "${CHECK_S:-330}" python -m benchmarks.gpu_check --no-seed-demo
fi
if [[ $parts == *" bench "* ]]; then
    timeout "${BENCH_S:-240}" python -m benchmarks.run --only gpu
fi
if [[ $parts == *" profile "* ]]; then
    timeout "${PROFILE_S:-150}" python -m benchmarks.gpu_profile --layers 8 --dtypes bf16,fp8
fi
