#!/usr/bin/env bash
# One-GPU benchmarks behind docs/BENCHMARKS.md (training throughput and Tiny Shakespeare
# time-to-loss). Run from the repo root on the GPU machine:
#   bash bench_gpu.sh [tests|profile|throughput|ttl|all]
# Tiny Shakespeare is read from $SHAKESPEARE (default ../shared/data/tinyshakespeare.txt).
# REPEAT (default 3) sets the runs per throughput figure (the median is reported).
set -u
export PYTHONUNBUFFERED=1
what=${1:-all}
out=${OUT:-/tmp/nano_bench}
mkdir -p "$out"
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c "import torch; print('torch', torch.__version__)"
git rev-parse --short HEAD 2>/dev/null || true

if [ "$what" = tests ] || [ "$what" = all ]; then
  echo "== GPU-only tests (CUDA graph step vs eager step, resume)"
  $py -m pytest -q -x tests/test_train.py tests/test_model.py 2>&1 | tail -3
fi

if [ "$what" = profile ] || [ "$what" = all ]; then
  for args in "-m config/model_gpt2_124m.json -b 32" "-m config/model_56m.json -b 128"; do
    echo "== kernel profile: bench.py $args --compile --train-set cuda_graph=true"
    $py bench.py $args --compile --train-set cuda_graph=true --steps 10 --warmup 10 --profile 22 2>&1 \
      | grep -vE "^(run|median)|^-+$|^\s*$" | cut -c1-150
  done
fi

if [ "$what" = throughput ] || [ "$what" = all ]; then
  for args in \
      "-m config/model_gpt2_124m.json -b 32 --compile" \
      "-m config/model_gpt2_124m.json -b 32 --compile --train-set cuda_graph=true" \
      "-m config/model_56m.json -b 128 --compile" \
      "-m config/model_56m.json -b 128 --compile --train-set cuda_graph=true" \
      "-m config/model_168m.json -b 128 --compile --train-set cuda_graph=true"; do
    echo "== bench.py $args"
    $py bench.py $args --steps 30 --warmup 15 --repeat "${REPEAT:-3}" --json "$out/throughput.jsonl" 2>&1 \
      | grep -E "^(run|median)|Error"
  done
fi

if [ "$what" = ttl ] || [ "$what" = sweep ] || [ "$what" = all ]; then
  src=${SHAKESPEARE:-../shared/data/tinyshakespeare.txt}
  $py data.py --input "$src" --vocab-size 0 --val-tail 0.1 --out dataset/shakespeare_char 2>&1 | tail -1
fi

if [ "$what" = sweep ]; then
  # one run per line of stdin (train config overrides), e.g. echo "batch_size=128" | bash bench_gpu.sh sweep
  # (MODEL=path picks another model config)
  while read -r v; do
    [ -z "$v" ] && continue
    echo "#### $v"
    $py train.py -m "${MODEL:-config/shakespeare_char_model.json}" -t config/shakespeare_char_train.json \
        --set out_dir="$out/sweep" $v 2>&1 | grep -E "^(eval|reached)|rror" | tail -4
  done
fi

if [ "$what" = ttl ] || [ "$what" = all ]; then
  for i in 1 2 3; do
    echo "== time to loss, run $i: ${TTL_SET:-shipped config}"
    /usr/bin/time -f "wall %e s" $py train.py -m config/shakespeare_char_model.json -t config/shakespeare_char_train.json \
        --set out_dir="$out/ttl$i" ${TTL_SET:-} 2>&1 | grep -E "^(eval|reached|mode|wall)|rror"
  done
fi
