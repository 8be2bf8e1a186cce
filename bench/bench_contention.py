"""
bench_contention.py: the C engine's decode speed on a shared machine, beside busy competitors.

    python bench/bench_contention.py [--tokens 256] [--runs 5] [--competitors 2] [--quant fp32|q8]
                                     [--out out/bench_contention]

The engine's OpenMP threads meet at the end of every parallel loop (five per layer per token). By
libgomp's default a thread that arrives first spins on its core for about 300,000 turns before it
sleeps; when other processes want the same cores, the spinning steals the core its partner needs,
and decoding collapsed (issue #22: 12-72 tokens/s with 2 threads against 1,232 with -j 1 on a
busy 2-core machine). The engine's answer (nano.c, ThreadTuner): keep the spinning, which is fastest on a quiet machine,
and time a few tokens on one thread now and then, using one thread while that is faster.

For the default model shape (config/model.json, random weights: speed does not depend on them)
it decodes --tokens tokens greedily in three ways of running the threads,
  * fixed: the thread count fixed, libgomp's default waiting (the engine before; NANO_TUNE_THREADS=0),
  * passive: the same with OMP_WAIT_POLICY=passive (threads sleep at once instead of spinning),
  * tuned: the engine's default now,
each with the default thread count (all cores) and with -j 1, on the machine as it is ("quiet")
and beside --competitors busy processes (each a Python loop that never sleeps). The
configurations are interleaved run by run, so that the machine's own drift hits all alike; it
prints the median and the lowest tokens/s of --runs runs of each.

With --torch it measures torch's training step instead (the default model and batch, 16 x 256
tokens, forward + backward + AdamW, in a fresh process per run) with torch's default thread count
(every core) and with train.py's choice (train.cpu_threads: the cores less those busy now, from
/proc/stat sampled over 0.25 s; figures recorded before 2026-12-04 used the 1-minute load average),
quiet and busy. The busy phase first waits until the load average shows the competitors (at most
90 s), so that they are running before a run starts.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ENGINE = ROOT / "infer_c" / "infer"
RATE = re.compile(r"generated: (\d+) tokens, ([\d.]+) tok/s \| (\d+) threads")
# how the engine runs its threads (the environment it is started with)
MODES = {
    "fixed": {"NANO_TUNE_THREADS": "0"},  # before: the thread count fixed, libgomp's spinning waits
    "passive": {"NANO_TUNE_THREADS": "0", "OMP_WAIT_POLICY": "passive"},  # the suggestion
    "tuned": {},  # now: one thread while that is faster (nano.c, ThreadTuner)
}


def build_engine():
    r = subprocess.run(["make", "-C", str(ENGINE.parent), "infer"], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"bench_contention.py: make -C infer_c failed:\n{r.stdout}{r.stderr}")


def export_model(out, quant):
    """The default config (config/model.json) with random weights, exported once into out/."""
    path = out / f"model_default.{quant}.bin"
    if path.exists():
        return path
    import torch
    import export
    from files import read_json
    from model import ModelConfig, Transformer
    from tokenizer import SPECIAL_TOKENS
    cfg = ModelConfig.from_dict(read_json(str(ROOT / "config" / "model.json"), "model config"))
    torch.manual_seed(0)
    tokens = SPECIAL_TOKENS + [chr(c) for c in range(32, 127)]
    ck = {"model_config": cfg.to_dict(), "model": Transformer(cfg).state_dict(),
          "tokenizer": {"type": "trie", "tokens": tokens}}
    out.mkdir(parents=True, exist_ok=True)
    export.write_model(str(path), ck, quant)
    return path


def decode_rate(model, tokens, mode, threads):
    """(tokens/s, thread count) of one greedy decode of `tokens` tokens."""
    unset = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "NANO_TUNE_THREADS")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(MODES[mode])
    args = [str(ENGINE), str(model), "--ids", "2", "-n", str(tokens), "-t", "0", "--ignore-eos", "--no-verify"]
    if threads:
        args += ["-j", str(threads)]
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    m = RATE.search(r.stderr)
    if r.returncode or not m:
        sys.exit(f"bench_contention.py: the engine failed: {r.stderr}")
    return float(m.group(2)), int(m.group(3))


BUSY = "while True:\n    pass\n"


def start_competitors(n):
    procs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(n)]
    time.sleep(0.5)  # let them reach their loop
    return procs


def stop_competitors(procs):
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def measure(model, tokens, runs, competitors):
    """{(load, mode, threads): [tok/s per run]} and the thread count the default gave."""
    configs = [(mode, t) for mode in MODES for t in (0, 1)]
    rates, default_threads = {}, None
    for load in ("quiet", "busy"):
        procs = start_competitors(competitors) if load == "busy" else []
        try:
            for _ in range(runs):
                for mode, threads in configs:
                    rate, used = decode_rate(model, tokens, mode, threads)
                    rates.setdefault((load, mode, threads), []).append(rate)
                    if not threads:
                        default_threads = used
        finally:
            stop_competitors(procs)
    return rates, default_threads


TORCH_STEP = """
import statistics, sys, time, torch
sys.path.insert(0, {root!r})
import train
from files import read_json
from model import ModelConfig, Transformer
threads = {threads} or train.cpu_threads()
torch.set_num_threads(threads)
torch.manual_seed(0)
cfg = ModelConfig.from_dict(read_json({root!r} + "/config/model.json", "model config"))
model = Transformer(cfg)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randint(0, cfg.vocab_size, (16, cfg.block_size))
times = []
for _ in range({steps}):
    t0 = time.perf_counter()
    _, loss = model(x, targets=x)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t0)
print(threads, statistics.median(times[1:]))
"""


def torch_step(threads, steps):
    """(seconds per training step, threads used) in a fresh process; threads 0 = train.py's choice."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    code = TORCH_STEP.format(root=str(ROOT), threads=threads, steps=steps)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1200)
    if r.returncode:
        sys.exit(f"bench_contention.py: the torch step failed: {r.stderr}")
    used, seconds = r.stdout.split()
    return float(seconds), int(used)


def wait_for_load(competitors, limit=90):
    """Wait until the 1-minute load average shows the competitors (it lags by tens of seconds)."""
    start, base = time.time(), os.getloadavg()[0]
    while os.getloadavg()[0] < min(base + 0.8 * competitors, os.cpu_count()) and time.time() - start < limit:
        time.sleep(2)


def measure_torch(runs, competitors, steps):
    """{(load, choice): [(s/step, threads)]}: torch's default (every core) against train.py's choice."""
    choices = {"torch default": os.cpu_count(), "train.py's choice": 0}
    results = {}
    for load in ("quiet", "busy"):
        procs = start_competitors(competitors) if load == "busy" else []
        try:
            if procs:
                wait_for_load(competitors)
            for _ in range(runs):
                for name, threads in choices.items():
                    results.setdefault((load, name), []).append(torch_step(threads, steps))
        finally:
            stop_competitors(procs)
    return results


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return re.search(r"Model name:\s*(.+)", out).group(1).strip()
    except (OSError, AttributeError):
        return "unknown CPU"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--competitors", type=int, default=2, help="busy processes beside the engine (default 2)")
    p.add_argument("--quant", choices=("fp32", "q8"), default="fp32")
    p.add_argument("--out", default=str(ROOT / "out" / "bench_contention"))
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--torch", action="store_true", help="torch's training step instead of the C engine")
    p.add_argument("--steps", type=int, default=6, help="--torch: training steps per run (the first is not timed)")
    args = p.parse_args(argv)
    if args.torch:
        return main_torch(args)
    build_engine()
    model = export_model(Path(args.out), args.quant)
    rates, default_threads = measure(model, args.tokens, args.runs, args.competitors)
    print(f"{cpu_model()}, {os.cpu_count()} CPUs; load average before: {os.getloadavg()[0]:.2f}; "
          f"{args.tokens} tokens, {args.runs} runs, {args.competitors} busy competitor(s); default model {args.quant}")
    print("| load | threads run | threads | median tok/s | lowest tok/s |")
    print("|---|---|---|---|---|")
    rows = []
    for (load, mode, threads), r in rates.items():
        shown = f"{default_threads} (default)" if not threads else "1 (-j 1)"
        print(f"| {load} | {mode} | {shown} | {statistics.median(r):,.0f} | {min(r):,.0f} |")
        rows.append({"load": load, "mode": mode, "threads": threads or default_threads, "default_threads": not threads,
                     "median": statistics.median(r), "lowest": min(r), "runs": r})
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


def main_torch(args):
    results = measure_torch(args.runs, args.competitors, args.steps)
    print(f"{cpu_model()}, {os.cpu_count()} CPUs; load average now: {os.getloadavg()[0]:.2f}; default model, "
          f"16 x 256 tokens per step, {args.steps - 1} timed steps, {args.runs} runs, {args.competitors} busy competitor(s)")
    print("| load | threads | threads used | median s/step | slowest s/step |")
    print("|---|---|---|---|---|")
    rows = []
    for (load, name), r in results.items():
        seconds, used = [s for s, _ in r], sorted({u for _, u in r})
        print(f"| {load} | {name} | {'/'.join(map(str, used))} | {statistics.median(seconds):.2f} | {max(seconds):.2f} |")
        rows.append({"load": load, "threads": name, "used": used, "median_s": statistics.median(seconds), "runs": r})
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
