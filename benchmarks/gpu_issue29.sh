#!/usr/bin/env bash
# Issue 29's GPU checks in one short run, for a session lent a GPU (the device tool runs it in the repository root):
#   1. pytest -m cuda: the CUDA rules, the comparison against the CPU, and issue 29's tests (every scheme's layer
#      errors computed on the device and equal to the CPU's, no weight read to the host; the recommender on CUDA);
#   2. bench_compare on CUDA: the standard comparison with its seconds by phase and (total - load) / forwards,
#      whose target is at most 2;
#   3. bench_recommend on CUDA: the default model's sensitivity measurement (target: at most 10 s).
# Everything it prints goes to $OUT (or ./gpu_issue29 when $OUT is unset) as well.
set -uo pipefail
out="${OUT:-gpu_issue29}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"
timeout 240 python -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py 2>&1 | tail -25 | tee "$out/pytest_cuda.txt"
timeout 180 python benchmarks/bench_compare.py --device cuda --phases gemm plain cold cached \
  --json "$out/bench_compare_cuda.json" 2>&1 | tail -20 | tee "$out/bench_compare_cuda.txt"
timeout 120 python benchmarks/bench_recommend.py --device cuda --families bitsandbytes --skip-verify \
  --json "$out/bench_recommend_cuda.json" 2>&1 | tail -5 | tee "$out/bench_recommend_cuda.txt"
