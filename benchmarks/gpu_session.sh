#!/usr/bin/env bash
# One lent GPU's worth of checks, in the order a short device budget wants them: correctness
# first (every fast path against its twin), then the benchmark rows against their floors and
# peers, then where a decode step's and a prefill's GPU time goes. Each part has its own time
# limit (seconds, overridable), so one slow part cannot eat the others.
#
#     bash benchmarks/gpu_session.sh            # ~7-8 minutes on an H200 (first-use autotuning;
#                                              # the checks alone took 230 s on 2026-11-28)
set -u
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader 2>/dev/null || true
python -c "import torch; print('torch', torch.__version__)"
timeout "${CHECK_S:-300}" python -m benchmarks.gpu_check --no-seed-demo  # rows also stream to stderr
timeout "${BENCH_S:-240}" python -m benchmarks.run --only gpu
timeout "${PROFILE_S:-90}" python -m benchmarks.gpu_profile --layers 8 --dtypes bf16
