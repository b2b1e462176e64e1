#!/usr/bin/env bash
# The checks that need a GPU, in one go (CI has none; run this where a CUDA GPU and a CUDA torch
# exist). Runs the GPU cases of the tests (device regions, pinned cpu pool, vLLM KV blocks, the
# VRAM transfer sweep), then a same-run tcp sweep of VRAM against DRAM buffers (the cost of
# staging GPU memory through pinned host buffers).
#
#   benchmarks/gpu_check.sh [OUT_DIR]      # logs and JSON land in OUT_DIR (default: artifacts/gpu)
#
# kvferry must be importable (pip install -e ., or PYTHONPATH=<checkout> with its dependencies).
set -uo pipefail
out=${1:-artifacts/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

nvidia-smi -L 2>&1 | tee "$out/gpu.txt"
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0))" 2>&1 | tee -a "$out/gpu.txt"

# -m "not redis": those tests need a redis-server binary and touch no GPU path
$py -m pytest -q -p no:cacheprovider -rs -m "not redis" \
  tests/transfer tests/backends/test_cpu.py tests/bench/test_transfer_bench.py \
  tests/serving/test_kv_blocks.py \
  2>&1 | tee "$out/pytest.log"
tests_rc=${PIPESTATUS[0]}

sweep() {  # seg_type name block_args...
  local seg=$1 name=$2
  shift 2
  $py -m kvferry bench transfer --local --transport tcp --seg-type "$seg" --quiet \
    --total-buffer-size 512MiB --max-threads 1 --duration 2 --warmup 0.5 --check-consistency \
    --json "$out/$name.json" "$@" 2>&1 | tee -a "$out/sweeps.txt"
}
for seg in DRAM VRAM; do
  sweep $seg "small-$seg" --start-block-size 4KiB --max-block-size 4KiB --start-batch-size 1 --max-batch-size 128
  sweep $seg "large-$seg" --start-block-size 1MiB --max-block-size 16MiB --start-batch-size 16 --max-batch-size 16
done
# coarser slices to the GPU region (transfer.device_slice_size, default 1MiB)
sweep VRAM large-VRAM-4MiB --start-block-size 1MiB --max-block-size 16MiB --start-batch-size 16 \
  --max-batch-size 16 --set transfer.device_slice_size=4MiB
echo "tests exit code: $tests_rc"
exit "$tests_rc"
