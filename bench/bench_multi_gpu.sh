#!/usr/bin/env bash
# Multi-GPU runs behind docs/BENCHMARKS.md (2 GPUs): DDP scaling 1 -> 2 GPUs, and the largest
# model that trains under plain DDP, ZeRO-3 and ZeRO-3 with CPU offload.
#   bash bench/bench_multi_gpu.sh [scaling|zero|all]        (deepspeed must be importable)
set -u
cd "$(dirname "$0")/.."  # the repository: configs, data and scripts are named from there
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
  # PROBES: MODE:SIZE list (mode ddp | zero | offload, each optionally with -ac for activation
  # checkpointing; size names config/model_SIZE.json), tried in
  # order within BUDGET_S seconds in all; logs go to $OUT (or /tmp) as probe_MODE_SIZE.log
  echo "== largest model: 2 GPUs, micro-batch 4 x 1024, 3 timed steps (OOM = does not fit)"
  logs=${OUT:-/tmp}
  deadline=$((SECONDS + ${BUDGET_S:-540}))
  for spec in ${PROBES:-ddp:2p7b zero:6p7b zero:13b offload:6p7b offload:13b}; do
    mode=${spec%%:*}; size=${spec#*:}
    case ${mode%-ac} in ddp) ds=();; zero) ds=(--deepspeed_config ds_config.json);; offload) ds=(--deepspeed_config ds_config_offload.json);; esac
    # MODE-ac: with activation checkpointing (each layer recomputed in the backward pass)
    [ "${mode%-ac}" != "$mode" ] && ds+=(--train-set activation_checkpointing=true)
    # torchrun gives each rank OMP_NUM_THREADS=1; the offloaded optimizer step runs on the CPU cores
    [ "${mode%-ac}" = offload ] && export OMP_NUM_THREADS=$(( $(nproc) / 2 )) || unset OMP_NUM_THREADS
    left=$((deadline - SECONDS))
    if [ $left -lt 30 ]; then echo "-- $mode $size: not run (time budget spent)"; continue; fi
    echo "-- $mode $size (at most ${left} s)"
    t0=$SECONDS
    timeout $left $py -m torch.distributed.run --standalone --nproc_per_node 2 bench.py -m config/model_$size.json -b 4 \
      --grad-accum 2 --steps 3 --warmup 2 --log-interval 1 "${ds[@]}" > "$logs/probe_${mode}_$size.log" 2>&1
    echo "   exit $? after $((SECONDS - t0)) s"
    grep -E "^median|OutOfMemory|out of memory|Error" "$logs/probe_${mode}_$size.log" | cut -c1-300 | head -3
  done
fi
