"""
Muon and the recipe options against AdamW on one GPU (issue #34; figures in docs/BENCHMARKS.md and
docs/RECIPES.md). Three parts, each printed as it ends and once more in a summary at the end:

  ttl         Tiny Shakespeare, character level, to val loss 1.45 (the time-to-loss config,
              config/shakespeare_char_*.json, which ships Muon): AdamW as that config had it before
              (--ttl-adamw) and Muon as shipped, runs alternating, --runs of each; the median step
              and seconds to the crossing eval, from process start and from torch's import.
  bpe124      the 124M config (config/model_gpt2_124m.json) on the built-in Bible with GPT-2 BPE:
              AdamW (--bpe-steps steps) and Muon (its schedule and weight decay from --bpe-muon),
              --bpe-runs of each, alternating, eval every --bpe-eval; each arm's median best val loss
              and the median steps to a fixed val loss (--bpe-target, else AdamW's median best).
  throughput  tokens/s of the 124M b32 fp8=all line (bench.py, compiled, CUDA graph) with AdamW and Muon.
  cpustep     (not in the default parts) ms per step of the README's default run (config/model.json,
              batch 16, on the CPU) with each arm: bench.py, --runs of each, alternating.

    python bench/bench_recipe.py --shakespeare out/tinyshakespeare.txt             # all three, ~12 min on an H200
    python bench/bench_recipe.py --shakespeare ../shared/data/tinyshakespeare.txt --parts ttl --runs 3
    python bench/bench_recipe.py --parts bpe124 --bpe-runs 1 --muon "optimizer=muon max_iters=330"

--adamw and --muon are the train-config overrides of the arms (train.py --set; the ttl part adds
--ttl-adamw to the AdamW arm, the settings the time-to-loss config had with AdamW; the bpe124 part adds
--bpe-muon to the Muon arms before their own overrides, so --muon can change it); --muon again adds
another Muon arm (a sweep against one AdamW run); --model-set adds model-config keys to the Muon arms
through a copy of the model config (e.g. "qk_norm=true activation=relu2").
Runs write into --out (default /tmp/nano_recipe) and overwrite what an earlier run left there.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
REACHED = re.compile(r"reached target val loss [\d.]+ at step (\d+), ([\d.]+) s after process start "
                     r"\(([\d.]+) s after torch's import\)")
EVAL = re.compile(r"^eval step (\d+) \| val loss ([\d.]+)")


def run(cmd, timeout=900):
    """Run a command in the repository; its output (stdout and stderr), and the seconds it took."""
    start = time.time()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    out = r.stdout + r.stderr
    if r.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} exited {r.returncode}:\n{out[-3000:]}")
    return out, time.time() - start


def model_config(base, model_set, out_dir, name):
    """base, or a copy of it with the model-config keys of model_set ("key=value ...") in out_dir."""
    if not model_set:
        return base
    with open(os.path.join(ROOT, base)) as f:
        cfg = json.load(f)
    for item in model_set.split():
        key, _, value = item.partition("=")
        try:
            cfg[key] = json.loads(value)
        except json.JSONDecodeError:
            cfg[key] = value
    path = os.path.join(out_dir, f"{name}_model.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def arms(args):
    """{arm name: (train-config overrides, model-config keys)}: adamw, then muon, muon2, ... (one per --muon)."""
    muon = args.muon or ["optimizer=muon"]
    return {"adamw": (args.adamw.split(), None),
            **{"muon" + (str(i + 1) if i else ""): (m.split(), args.model_set) for i, m in enumerate(muon)}}


def ttl(args):
    """Tiny Shakespeare to 1.45, the arms alternating: {arm: [(step, seconds from process start, seconds
    from torch's import) or None, ...]}: the second clock is the one of the figures before 2026-12-05."""
    run([PY, "data.py", "--input", args.shakespeare, "--vocab-size", "0", "--val-tail", "0.1",
         "--out", "dataset/shakespeare_char"])
    results = {arm: [] for arm in arms(args)}
    for i in range(args.runs):
        for arm, (train_set, model_set) in arms(args).items():
            model = model_config("config/shakespeare_char_model.json", model_set, args.out, f"ttl_{arm}")
            extra = args.ttl_adamw.split() if arm == "adamw" else []
            out, _ = run([PY, "train.py", "-m", model, "-t", "config/shakespeare_char_train.json", "--overwrite",
                          "--set", f"out_dir={args.out}/ttl_{arm}", *extra, *train_set])
            m = REACHED.search(out)
            results[arm].append((int(m.group(1)), float(m.group(2)), float(m.group(3))) if m else None)
            best = min((v for _, v in curve(out)), default=None)
            said = f"step {m.group(1)}, {m.group(2)} s ({m.group(3)} s after import)" if m else f"missed (best {best})"
            print(f"ttl run {i + 1} {arm}: {said}", flush=True)
    return results


def curve(out):
    return [(int(s), float(v)) for s, v in (EVAL.match(line).groups() for line in out.splitlines() if EVAL.match(line))]


def first_at(points, target):
    return next((s for s, v in points if v <= target), None)


def bpe124(args):
    """--bpe-runs runs of each arm on the Bible with GPT-2 BPE, alternating: {arm: [[(step, val loss), ...], ...]}."""
    run([PY, "data.py", "--tokenizer", "bpe", "--out", "dataset/pretrain_bpe"])
    curves = {arm: [] for arm in arms(args)}
    for i in range(args.bpe_runs):
        for arm, (train_set, model_set) in arms(args).items():
            model = model_config("config/model_gpt2_124m.json", model_set, args.out, f"bpe_{arm}")
            extra = args.bpe_muon.split() if arm != "adamw" else []
            out, seconds = run([PY, "train.py", "-m", model, "--overwrite", "--set", "data_dir=dataset/pretrain_bpe",
                                f"out_dir={args.out}/bpe_{arm}", "batch_size=16", f"max_iters={args.bpe_steps}",
                                "learning_rate=6e-4", "min_lr=6e-5", "warmup_iters=30", "weight_decay=0.1",
                                f"eval_interval={args.bpe_eval}", "eval_iters=8", "log_interval=50", "cuda_graph=true",
                                "save_on_eval=false", "tensorboard=false", *extra, *train_set])
            curves[arm].append(curve(out))
            print(f"bpe124 run {i + 1} {arm}: {seconds:.0f} s; val "
                  + ", ".join(f"{s}:{v:.3f}" for s, v in curves[arm][-1]), flush=True)
    return curves


def bpe_summary(curves, target=None):
    """The bpe124 summary lines from {arm: [curve of each run]}: each arm's median best val loss (and the
    median step of the runs' bests), and the median steps to one fixed val loss: target, else AdamW's
    median best, so that "fewer steps to the same loss" compares both arms at a loss AdamW reaches."""
    bests = {arm: [min(c, key=lambda sv: sv[1]) for c in runs] for arm, runs in curves.items()}
    if target is None:
        target = statistics.median(v for _, v in bests["adamw"])
    steps = {arm: [first_at(c, target) for c in runs] for arm, runs in curves.items()}
    lines = []
    for arm, runs in curves.items():
        reached = [s for s in steps[arm] if s is not None]
        to_target = (f"median {statistics.median(reached):.0f} steps to val <= {target:.3f}" if len(reached) == len(runs)
                     else f"{len(runs) - len(reached)} of {len(runs)} runs never reached val <= {target:.3f}")
        ratio = ""
        if arm != "adamw" and len(reached) == len(runs) and None not in steps["adamw"]:
            ratio = f" ({statistics.median(steps['adamw']) / statistics.median(reached):.2f}x fewer than adamw)"
        lines.append(f"124M BPE Bible, {arm}: {to_target}{ratio}; median best {statistics.median(v for _, v in bests[arm]):.3f}"
                     f" at step {statistics.median(s for s, _ in bests[arm]):.0f} (runs: "
                     + ", ".join(f"{v:.3f}@{s}/{t if t is not None else '-'}" for (s, v), t in zip(bests[arm], steps[arm]))
                     + ": best@step/steps to the target)")
    return lines


def throughput(args):
    """bench.py's median tokens/s of the 124M b32 fp8=all line, per arm."""
    result = {}
    for arm, (train_set, model_set) in arms(args).items():
        model = model_config("config/model_gpt2_124m.json", model_set, args.out, f"tput_{arm}")
        out, _ = run([PY, "bench.py", "-m", model, "-b", "32", "--compile", "--steps", "30", "--warmup", "15",
                      "--repeat", str(args.tput_repeat), "--train-set", "cuda_graph=true", "fp8=all", *train_set])
        line = next(line for line in out.splitlines() if line.startswith("median"))
        result[arm] = float(re.search(r"([\d,]+) tok/s", line).group(1).replace(",", ""))
        print(f"throughput {arm}: {line}", flush=True)
    return result


def cpustep(args):
    """bench.py's median ms/step of the default model on the CPU, the arms alternating: {arm: [ms, ...]}."""
    result = {arm: [] for arm in arms(args)}
    for i in range(args.runs):
        for arm, (train_set, model_set) in arms(args).items():
            model = model_config("config/model.json", model_set, args.out, f"cpu_{arm}")
            out, _ = run([PY, "bench.py", "-m", model, "-b", "16", "--device", "cpu", "--steps", "10", "--warmup", "3",
                          "--train-set", *train_set])
            line = next(line for line in out.splitlines() if line.startswith("median"))
            result[arm].append(float(re.search(r"([\d.]+) ms/step", line).group(1)))
            print(f"cpustep run {i + 1} {arm}: {result[arm][-1]:.1f} ms/step", flush=True)
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shakespeare", default="../shared/data/tinyshakespeare.txt", help="Tiny Shakespeare text (ttl)")
    p.add_argument("--parts", default="ttl,bpe124,throughput", help="comma-separated: ttl, bpe124, throughput, cpustep")
    p.add_argument("--runs", type=int, default=3, help="ttl runs of each arm (alternating)")
    p.add_argument("--adamw", default="optimizer=adamw", help="train-config overrides of the AdamW arm")
    p.add_argument("--muon", action="append",
                   help="train-config overrides of a Muon arm (default \"optimizer=muon\"); again for more arms")
    p.add_argument("--ttl-adamw", default="max_iters=1400 weight_decay=0.3",
                   help="ttl: what the AdamW arm sets besides --adamw (the config's AdamW settings before Muon)")
    p.add_argument("--model-set", default="", help="model-config keys of the Muon arm, e.g. \"qk_norm=true\"")
    p.add_argument("--bpe-steps", type=int, default=600)
    p.add_argument("--bpe-eval", type=int, default=25)
    p.add_argument("--bpe-runs", type=int, default=3, help="bpe124 runs of each arm (alternating)")
    p.add_argument("--bpe-muon", default="max_iters=400 weight_decay=0.2",
                   help="bpe124: what the Muon arms set besides --muon (a cosine that ends before Muon overfits)")
    p.add_argument("--bpe-target", type=float, help="bpe124's fixed val loss (default: AdamW's median best)")
    p.add_argument("--tput-repeat", type=int, default=1)
    p.add_argument("--out", default="/tmp/nano_recipe")
    args = p.parse_args()
    if args.runs < 1 or args.bpe_runs < 1:
        p.error("--runs and --bpe-runs must be at least 1")
    parts = args.parts.split(",")
    unknown = set(parts) - {"ttl", "bpe124", "throughput", "cpustep"}
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}: choose from ttl, bpe124, throughput, cpustep")
    if "ttl" in parts and not os.path.isfile(args.shakespeare):
        sys.exit(f"error: {args.shakespeare}: no such file (Tiny Shakespeare; give --shakespeare PATH)")
    os.makedirs(args.out, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print(f"commit {commit or '?'} | arms: " + ", ".join(f"{a} [{' '.join(t)}]" for a, (t, _) in arms(args).items())
          + (f" model [{args.model_set}]" if args.model_set else ""), flush=True)
    start = time.time()
    summary = []
    if "ttl" in parts:
        for arm, runs in ttl(args).items():
            done = [r for r in runs if r]
            med = (f"median step {statistics.median(r[0] for r in done):.0f}, {statistics.median(r[1] for r in done):.1f} s "
                   f"from process start, {statistics.median(r[2] for r in done):.1f} s from torch's import"
                   if len(done) == len(runs) else f"{len(runs) - len(done)} of {len(runs)} missed 1.45")
            each = ", ".join(f"{r[0]}/{r[1]:.1f}s/{r[2]:.1f}s" if r else "missed" for r in runs)
            summary.append(f"Tiny Shakespeare to 1.45, {arm}: {med} (step/seconds/seconds from import: {each})")
    if "bpe124" in parts:
        summary += bpe_summary(bpe124(args), args.bpe_target)
    if "throughput" in parts:
        tput = throughput(args)
        summary.append("124M b32 fp8=all tokens/s: " + ", ".join(f"{arm} {v:,.0f}" for arm, v in tput.items())
                       + "".join(f" ({arm}/adamw {v / tput['adamw']:.3f})" for arm, v in tput.items() if arm != "adamw"))
    if "cpustep" in parts:
        for arm, ms in cpustep(args).items():
            summary.append(f"default model on the CPU, {arm}: median {statistics.median(ms):.0f} ms/step "
                           f"(runs: {', '.join(f'{m:.0f}' for m in ms)})")
    print(f"\n== summary ({time.time() - start:.0f} s)")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
