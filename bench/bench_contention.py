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
    from model import ModelConfig, Transformer, read_json
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
    args = p.parse_args(argv)
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


if __name__ == "__main__":
    main()
