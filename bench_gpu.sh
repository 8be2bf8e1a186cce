#!/usr/bin/env bash
# One-GPU benchmarks behind docs/BENCHMARKS.md (training throughput and Tiny Shakespeare
# time-to-loss). Run from the repo root on the GPU machine:  bash bench_gpu.sh [throughput|ttl|all]
# Tiny Shakespeare is read from $SHAKESPEARE (default ../shared/data/tinyshakespeare.txt).
set -u
export PYTHONUNBUFFERED=1
what=${1:-all}
out=${OUT:-/tmp/nano_bench}
mkdir -p "$out"
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c "import torch; print('torch', torch.__version__)"
git rev-parse --short HEAD 2>/dev/null || true

if [ "$what" = throughput ] || [ "$what" = all ]; then
  for args in \
      "-m config/model_gpt2_124m.json -b 32 --compile" \
      "-m config/model_56m.json -b 128" \
      "-m config/model_56m.json -b 128 --compile" \
      "-m config/model_168m.json -b 64" \
      "-m config/model_168m.json -b 128 --compile"; do
    echo "== bench.py $args"
    $py bench.py $args --steps 30 --warmup 15 --repeat 3 --json "$out/throughput.jsonl" 2>&1 | grep -E "^(run|median)"
  done
fi

if [ "$what" = ttl ] || [ "$what" = all ]; then
  src=${SHAKESPEARE:-../shared/data/tinyshakespeare.txt}
  $py data.py --input "$src" --vocab-size 0 --val-tail 0.1 --out dataset/shakespeare_char 2>&1 | tail -1
  for i in 1 2 3; do
    echo "== time to loss, run $i"
    /usr/bin/time -f "wall %e s" $py train.py -m config/shakespeare_char_model.json -t config/shakespeare_char_train.json \
        --set out_dir="$out/ttl$i" 2>&1 | grep -E "^(eval|reached|mode|wall)"
  done
fi
