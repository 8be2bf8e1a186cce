#!/usr/bin/env bash
# Multi-GPU runs behind docs/BENCHMARKS.md (2 GPUs): DDP scaling 1 -> 2 GPUs, and the largest
# model that trains under plain DDP, ZeRO-3 and ZeRO-3 with CPU offload.
#   bash bench_multi_gpu.sh [scaling|zero|all]        (deepspeed must be importable)
set -u
export PYTHONUNBUFFERED=1
what=${1:-all}
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
run2() { $py -m torch.distributed.run --standalone --nproc_per_node 2 "$@"; }

if [ "$what" = scaling ] || [ "$what" = all ]; then
  echo "== DDP scaling, GPT-2-124M-class, 32 x 1024 tokens per GPU per step, torch.compile"
  $py bench.py -m config/model_gpt2_124m.json -b 32 --grad-accum 1 --compile --steps 20 --warmup 10 --repeat 2 2>&1 | grep -E "^median|Error"
  run2 bench.py -m config/model_gpt2_124m.json -b 32 --grad-accum 2 --compile --steps 20 --warmup 10 --repeat 2 2>&1 | grep -E "^median|Error"
fi

if [ "$what" = zero ] || [ "$what" = all ]; then
  echo "== largest model: 2 GPUs, micro-batch 4 x 1024, 3 timed steps (OOM = does not fit)"
  for spec in "ddp 2p7b" "ddp 6p7b" "zero 6p7b" "zero 13b" "offload 13b"; do
    set -- $spec
    case $1 in ddp) ds=();; zero) ds=(--deepspeed_config ds_config.json);; offload) ds=(--deepspeed_config ds_config_offload.json);; esac
    echo "-- $1 $2"
    timeout 600 $py -m torch.distributed.run --standalone --nproc_per_node 2 bench.py -m config/model_$2.json -b 4 \
      --grad-accum 2 --steps 3 --warmup 2 --log-interval 1 "${ds[@]}" 2>&1 | grep -E "^median|OutOfMemory|out of memory|Error" | head -3
  done
fi
