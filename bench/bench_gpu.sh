#!/usr/bin/env bash
# One-GPU benchmarks behind docs/BENCHMARKS.md (training throughput and Tiny Shakespeare
# time-to-loss). Run on the GPU machine (from anywhere: it works in the repository it is in):
#   bash bench/bench_gpu.sh [tests|profile|throughput|floors|kernels|trials|ttl|sweep|bench|compare|serve|all]
# Tiny Shakespeare is read from $SHAKESPEARE (default ../shared/data/tinyshakespeare.txt).
# REPEAT (default 3) sets the runs per throughput figure (the median is reported).
set -u
cd "$(dirname "$0")/.."  # the repository: configs, data and scripts are named from there
export PYTHONUNBUFFERED=1
# The GPU machine's torch is installed read-only and without bytecode, so every Python process there
# compiled torch's ~1,800 source files again: 6.1 s of each run's start-up (cProfile, 2026-12-04),
# which a pip install pays once. A writable bytecode cache gives the start-up a normal install has.
export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-/tmp/nano_pycache}
what=${1:-all}
out=${OUT:-/tmp/nano_bench}
mkdir -p "$out"
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c "import torch; print('torch', torch.__version__)"
git rev-parse --short HEAD 2>/dev/null || true

if [ "$what" = tests ] || [ "$what" = all ]; then
  # the tests that run on CUDA when it is there (the rest run on the CPU, as in CI): the CUDA-graph step
  # against the eager one (AdamW and Muon, eager and compiled), resume, an edit to model.py trained with
  # fp8 + compile + CUDA graph, float8 blocks without a cuBLASLt workspace, the float8 curve against bf16
  echo "== GPU tests"
  timeout "${TEST_TIMEOUT:-600}" $py -m pytest -q -o addopts="" -p no:cacheprovider -rfEs tests/test_train.py \
    tests/test_muon.py -k "cuda or fp8_blocks" 2>&1 | grep --line-buffered -vE "^\.+ *(\[ *[0-9]+%\])?$"
  # speed_kernels.py's Triton kernels compiled for the GPU (on the CPU they run in Triton's interpreter) against
  # their references and autograd, and the swaps that bring them in
  timeout "${TEST_TIMEOUT:-600}" $py -m pytest -q -o addopts="" -p no:cacheprovider -rfEs tests/test_speed_kernels.py \
    2>&1 | grep --line-buffered -vE "^\.+ *(\[ *[0-9]+%\])?$"
fi

if [ "$what" = profile ] || [ "$what" = all ]; then
  for args in "-m config/model_gpt2_124m.json -b 32" "-m config/model_56m.json -b 128"; do
    echo "== kernel profile: bench.py $args --compile --train-set cuda_graph=true compile_tuning=true"
    $py bench.py $args --compile --train-set cuda_graph=true compile_tuning=true --steps 10 --warmup 10 --profile 22 2>&1 \
      | grep -vE "^(run|median)|^-+$|^\s*$" | cut -c1-150
  done
fi

if [ "$what" = throughput ] || [ "$what" = all ]; then
  # each config as it ships and with the float8 products that pay for it (docs/BENCHMARKS.md; the
  # 168M lines without compile_tuning: its float8 compilation with tuning takes over 4.5 minutes; the
  # 124M fp8=all line without it too: its tuned block sizes now make that step 0.4-1.4% slower);
  # ONLY=pattern runs the lines that match it
  for args in \
      "-m config/model_gpt2_124m.json -b 32 --compile --train-set cuda_graph=true compile_tuning=true" \
      "-m config/model_gpt2_124m.json -b 32 --compile --train-set cuda_graph=true fp8=all" \
      "-m config/model_56m.json -b 128 --compile --train-set cuda_graph=true compile_tuning=true" \
      "-m config/model_56m.json -b 128 --compile --train-set cuda_graph=true fp8=head" \
      "-m config/model_168m.json -b 128 --compile --train-set cuda_graph=true" \
      "-m config/model_168m.json -b 128 --compile --train-set cuda_graph=true fp8=all"; do
    [[ "$args" == *${ONLY:-}* ]] || continue
    echo "== bench.py $args"
    $py bench.py $args --steps 30 --warmup 15 --repeat "${REPEAT:-3}" --json "$out/throughput.jsonl" 2>&1 \
      | grep -E "^(run|median)|Error"
  done
fi

if [ "$what" = floors ] || [ "$what" = kernels ] || [ "$what" = trials ]; then
  # nanoGPT's yardstick (bench/yardstick_nanogpt.py, b32, batches drawn from a token file as nanoGPT's bench.py
  # does: $TOKENS, else 200M random GPT-2 ids written once) before and after the lines; each line the median of
  # REPEAT runs in one process, against the mean of the two yardstick figures
  tokens=${TOKENS:-/tmp/nano_random_tokens.bin}
  [ -f "$tokens" ] || $py -c "import numpy as np, sys; np.random.default_rng(0).integers(0, 50257, 200_000_000, dtype=np.uint16).tofile(sys.argv[1])" "$tokens"
  : > "$out/floors.txt"
  yardstick() { $py bench/yardstick_nanogpt.py 32 "$tokens" 2>&1 | grep -E "yardstick|rror" | tee -a "$out/floors.txt"; }
  line() {  # bench.py's arguments: one line of the table (with $trial set, through bench/bench_trials.py)
    local r a="$*" script=bench.py
    [ -n "${trial:-}" ] && script="bench/bench_trials.py $trial"
    echo "== $script $*"
    r=$($py $script "$@" --steps 30 --warmup 15 --repeat "${REPEAT:-3}" 2>&1 | grep -E "^(run|median)|rror" | tee /dev/stderr | grep "^median")
    echo "line | ${trial:+$trial: }${a#-m config/} | ${r#*: }" >> "$out/floors.txt"
  }
  yardstick
  if [ "$what" = floors ]; then
    # issue #30's speed table (the 56M fp8=head line without compile_tuning: with it, Inductor's tuned kernels
    # gave a NaN loss at step 5 on an H200, torch 2.11, 2026-12-05; docs/BENCHMARKS.md)
    line -m config/model_gpt2_124m.json -b 32 --compile --train-set cuda_graph=true fp8=all
    line -m config/model_gpt2_124m.json -b 32 --compile --train-set cuda_graph=true compile_tuning=true
    line -m config/model_56m.json -b 128 --compile --train-set cuda_graph=true fp8=head
  elif [ "$what" = trials ]; then
    # the speed ideas measured and not adopted (bench/bench_trials.py) against the baseline, trial none:
    # TRIALS (default none maxat stack; the others and "+" joins in bench_trials.py's docstring) on the line
    # ARGS (default the 124M bf16 floor line)
    for trial in ${TRIALS:-none maxat stack}; do
      line ${ARGS:--m config/model_gpt2_124m.json -b 32 --compile --train-set cuda_graph=true compile_tuning=true}
    done
    trial=
  else
    # speed_kernels.py's Triton kernels against the same lines without them, alternating, ROUNDS times (the
    # loss kernel is on by default with the float8 head, the attention kernels in config/model_56m.json: the
    # lines without them turn them off). ONLY picks the lines among bf16, fp8 and 56m (default all three; a
    # 124M pair with compilation takes ~5 minutes, so give each its own 10-minute device call)
    only=${ONLY:-bf16 fp8 56m}
    for round in $(seq "${ROUNDS:-1}"); do
      for t in "cuda_graph=true compile_tuning=true:bf16" "cuda_graph=true fp8=all:fp8"; do
        [[ "$only" == *${t#*:}* ]] || continue
        line -m config/model_gpt2_124m.json -b 32 --compile --train-set ${t%:*} loss_kernel=false
        line -m config/model_gpt2_124m.json -b 32 --compile --train-set ${t%:*} loss_kernel=true
      done
      if [[ "$only" == *56m* ]]; then
        t="cuda_graph=true fp8=head"
        line -m config/model_56m.json -b 128 --compile --set sdpa_kernel=auto --train-set $t loss_kernel=false
        line -m config/model_56m.json -b 128 --compile --set sdpa_kernel=auto --train-set $t loss_kernel=true
        line -m config/model_56m.json -b 128 --compile --train-set $t loss_kernel=false
        line -m config/model_56m.json -b 128 --compile --train-set $t
      fi
    done
  fi
  yardstick
  $py - "$out/floors.txt" <<'PY'
import re, sys
lines = open(sys.argv[1]).read().splitlines()
yard = [float(m.group(1).replace(",", "")) for m in (re.search(r"([\d,]+) tok/s", l) for l in lines if "yardstick" in l) if m]
print(f"yardstick b32: {' / '.join(f'{v:,.0f}' for v in yard)} tok/s")
for l in lines:
    m = re.search(r"([\d,]+) tok/s", l) if l.startswith("line") else None
    if m and yard:
        v = float(m.group(1).replace(",", ""))
        print(f"{l.split(' | ')[1]:100s} {v:>11,.0f} tok/s  {v / (sum(yard) / len(yard)):.3f}x the yardstick")
PY
fi

if [ "$what" = bench ]; then
  # one bench.py run per line of stdin (its arguments), then a table of all of them, e.g.
  #   echo "-m config/model_56m.json -b 128 --compile --train-set fp8=all" | bash bench/bench_gpu.sh bench
  while read -r a; do
    [ -z "$a" ] && continue
    echo "== bench.py $a"
    timeout "${BENCH_TIMEOUT:-300}" $py bench.py $a --json "$out/bench.jsonl" 2>&1 | grep -vE "^\s*$|^-+$|USDT" | tail -"${BENCH_LINES:-40}"
  done
  $py - "$out/bench.jsonl" <<'PY'
import json, sys
print(f"{'model':28s} {'settings':50s} {'tok/s':>10s} {'ms/step':>8s} {'mfu':>6s} {'GiB':>5s}")
for line in open(sys.argv[1]):
    r = json.loads(line)
    sets = " ".join([f"{k}={v}" for k, v in r.get("train_set", {}).items()] + r.get("set", []))
    print(f"{r['model'].split('/')[-1]:28s} {sets[-50:]:50s} {r['tokens_per_sec']:10,.0f} {r['ms_per_step']:8.1f} "
          f"{100 * (r['mfu'] or 0):5.1f}% {r['peak_mem_gib']:5.1f}")
PY
fi

if [ "$what" = ttl ] || [ "$what" = sweep ] || [ "$what" = compare ] || [ "$what" = all ]; then
  src=${SHAKESPEARE:-../shared/data/tinyshakespeare.txt}
  $py data.py --input "$src" --vocab-size 0 --val-tail 0.1 --out dataset/shakespeare_char 2>&1 | tail -1
fi

if [ "$what" = sweep ]; then
  # one run per line of stdin (train config overrides), e.g. echo "batch_size=128" | bash bench/bench_gpu.sh sweep
  # (MODEL=path picks another model config)
  while read -r v; do
    [ -z "$v" ] && continue
    echo "#### $v"
    $py train.py -m "${MODEL:-config/shakespeare_char_model.json}" -t config/shakespeare_char_train.json \
        --set out_dir="$out/sweep" $v 2>&1 | grep -E "^(eval|reached)|rror" | tail -4
  done
fi

if [ "$what" = ttl ] || [ "$what" = all ]; then
  $py -c "import train"  # fills the bytecode cache (above), as any earlier run on a machine would have
  for i in $(seq "${TTL_RUNS:-3}"); do
    echo "== time to loss, run $i: ${TTL_SET:-shipped config}"
    /usr/bin/time -f "wall %e s" $py train.py -m config/shakespeare_char_model.json -t config/shakespeare_char_train.json \
        --set out_dir="$out/ttl$i" ${TTL_SET:-} --overwrite 2>&1 | grep -E "^(eval|reached|mode|wall)|rror"
  done
fi

if [ "$what" = compare ]; then
  # A/B against another checkout of the repository in $BEFORE (e.g. the commit before a change):
  # the throughput lines untuned and the time to loss, alternating between the two trees on the
  # same GPU, each throughput figure the median of REPEAT runs; a table at the end
  before=${BEFORE:?set BEFORE to the other checkout}
  mkdir -p "$before/dataset" && ln -sfn "$PWD/dataset/shakespeare_char" "$before/dataset/shakespeare_char"
  : > "$out/compare.txt"
  for args in \
      "-m config/model_gpt2_124m.json -b 32 --compile --train-set cuda_graph=true fp8=all" \
      "-m config/model_gpt2_124m.json -b 32 --compile --train-set cuda_graph=true" \
      "-m config/model_56m.json -b 128 --compile --train-set cuda_graph=true fp8=head"; do
    [[ "$args" == *${ONLY:-}* ]] || continue
    for tree in "$before" "$PWD"; do
      echo "== $tree: bench.py $args"
      line=$(cd "$tree" && $py bench.py $args --steps 30 --warmup 15 --repeat "${REPEAT:-3}" 2>&1 | tee /dev/stderr | grep "^median")
      echo "$(basename "$tree") | ${args#-m config/} | ${line#*: }" >> "$out/compare.txt"
    done
  done
  for i in $(seq "${TTL_RUNS:-3}"); do
    for tree in "$before" "$PWD"; do
      echo "== $tree: time to loss, run $i"
      line=$(cd "$tree" && $py train.py -m config/shakespeare_char_model.json -t config/shakespeare_char_train.json \
          --set out_dir="$out/cmp_ttl" --overwrite 2>&1 | grep -E "^reached|rror" | tail -1)
      echo "$(basename "$tree") | time to loss, run $i | $line" >> "$out/compare.txt"
    done
  done
  cat "$out/compare.txt"
fi

if [ "$what" = serve ]; then
  # serve.py on the GPU: 1, 4 and 8 streaming clients, default sampling and greedy (bench/bench_serve.py;
  # the web stack travels as wheels where the machine lacks it: WHEELS=dir)
  if [ -n "${WHEELS:-}" ]; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/site
  fi
  for t in 0.8 0; do
    echo "== bench_serve.py --device cuda -t $t"
    $py bench/bench_serve.py --device cuda -t "$t" --runs "${REPEAT:-3}" 2>&1 | tail -8
  done
fi
