"""
bench_prefill.py: prompt processing (pp) and generation (tg) speed of the C engine, llama-bench style,
optionally interleaved with llama.cpp's own llama-bench on the same shapes.

    python bench/bench_prefill.py [--shapes 15m,110m] [--quants fp32,q8] [--threads 1,2] [--pp 128] [--tg 128]
                                  [--runs 5] [--engine infer_c/infer ...] [--llama-bench PATH --gguf-dir DIR]
                                  [--out out/bench_prefill]

Shapes are llama2.c's stories15M and stories110M, with random weights (speed does not depend on their
values), exported by export.py into --out (git-ignored) from a random checkpoint.

  pp N: the engine forwards an N-token prompt (nano_prefill; `infer --ids ... -n 1`), tok/s = N / prompt time
        as main.c reports it (the prompt alone, not the load or the one sampled token);
  tg N: N tokens generated greedily after a one-token prompt (`--ids 2 -n N --ignore-eos`), as llama-bench's
        tg (which starts from an empty context).

Every engine (each --engine, and llama-bench when given) runs once per round, in turn, for --runs rounds
(interleaved: the machine is shared and its speed drifts within minutes); the table gives the median per
configuration and the 1-minute load average before and after. --engine may be given several times (a build
before a change against one after); each is labelled by its path.

llama-bench: --gguf-dir holds {shape}.{f32,q8_0}.gguf of the same shapes (export.py --format gguf, or the
llama.cpp helper's files); it runs `llama-bench -m F -p N -n 0 -t T -r 1` and `-p 0 -n N`, one repetition per
round, so that it interleaves with Nano's runs like them.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import export  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from tokenizer import SPECIAL_TOKENS  # noqa: E402

SHAPES = {  # llama2.c's stories15M / stories110M dimensions
    "15m": dict(block_size=256, vocab_size=32000, n_layer=6, n_embd=288, n_head=6, n_kv_head=6, n_hidden=768),
    "110m": dict(block_size=1024, vocab_size=32000, n_layer=12, n_embd=768, n_head=12, n_kv_head=12, n_hidden=2048),
}
GGUF_QUANT = {"fp32": "f32", "q8": "q8_0"}


def make_file(out, shape, quant):
    path = out / f"{shape}.{quant}.bin"
    if path.exists():
        return path
    cfg = ModelConfig(**SHAPES[shape])
    torch.manual_seed(0)
    model = Transformer(cfg)
    tokens = SPECIAL_TOKENS + [f"t{i}" for i in range(cfg.vocab_size - len(SPECIAL_TOKENS))]
    ck = {"model_config": cfg.to_dict(), "model": model.state_dict(), "tokenizer": {"type": "trie", "tokens": tokens}}
    print(f"exporting {path} ...", file=sys.stderr)
    export.write_model(str(path), ck, quant)
    return path


def nano_speed(engine, path, threads, n, mode):
    """tok/s of one run: mode 'pp' (an n-token prompt) or 'tg' (n generated tokens)."""
    ids = ",".join(str(6 + (i * 7919) % 31000) for i in range(n)) if mode == "pp" else "2"
    new = "1" if mode == "pp" else str(n)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_PROC_BIND="true")
    r = subprocess.run([engine, str(path), "--ids", ids, "-n", new, "-t", "0", "--ignore-eos", "--no-verify",
                        "--print-ids", "-j", str(threads)], capture_output=True, text=True, check=True, env=env)
    m = re.search(r"prompt: (\d+) tokens, ([\d.]+) tok/s \| generated: (\d+) tokens, ([\d.]+) tok/s", r.stderr)
    assert m, r.stderr
    if mode == "pp":
        assert int(m.group(1)) == n, r.stderr
        return float(m.group(2))
    assert int(m.group(3)) == n, r.stderr
    return float(m.group(4))


def llama_speed(bench, gguf, threads, n, mode):
    args = ["-p", str(n), "-n", "0"] if mode == "pp" else ["-p", "0", "-n", str(n)]
    r = subprocess.run([bench, "-m", str(gguf), *args, "-t", str(threads), "-r", "1", "-o", "json"],
                       capture_output=True, text=True, check=True)
    rows = json.loads(r.stdout)
    assert len(rows) == 1, r.stdout
    return float(rows[0]["avg_ts"])


def label(name):
    """an engine's column: the last two parts of its path (a build before a change against one after)"""
    return name if name == "llama-bench" else "/".join(Path(name).parts[-2:])[-22:]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="15m,110m")
    ap.add_argument("--quants", default="fp32,q8")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--pp", type=int, default=128)
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--engine", action="append", help="infer binary (default infer_c/infer, built); repeatable")
    ap.add_argument("--llama-bench", help="llama.cpp's llama-bench binary")
    ap.add_argument("--gguf-dir", help="directory of {shape}.{f32,q8_0}.gguf for llama-bench")
    ap.add_argument("--out", default=str(ROOT / "out" / "bench_prefill"))
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    engines = a.engine
    if not engines:
        subprocess.run(["make", "-C", str(ROOT / "infer_c"), "infer"], check=True, capture_output=True)
        engines = [str(ROOT / "infer_c" / "infer")]
    if a.llama_bench and not a.gguf_dir:
        ap.error("--llama-bench needs --gguf-dir")
    unknown = [x for x in a.shapes.split(",") if x not in SHAPES] + \
        [x for x in a.quants.split(",") if x not in GGUF_QUANT]
    if unknown:
        ap.error(f"unknown shape or quant {unknown[0]!r} (shapes: {', '.join(SHAPES)}; quants: fp32, q8)")
    missing = [e for e in engines + ([a.llama_bench] if a.llama_bench else []) if not os.access(e, os.X_OK)]
    missing += [str(Path(a.gguf_dir) / f"{s}.{GGUF_QUANT[q]}.gguf") for s in a.shapes.split(",")
                for q in a.quants.split(",") if a.llama_bench and not (Path(a.gguf_dir) / f"{s}.{GGUF_QUANT[q]}.gguf").exists()]
    if missing:
        ap.error(f"not found (or not executable): {missing[0]}")
    configs = [(s, q, int(t), mode, n) for s in a.shapes.split(",") for q in a.quants.split(",")
               for t in a.threads.split(",") for mode, n in (("pp", a.pp), ("tg", a.tg)) if n > 0]
    files = {(s, q): make_file(out, s, q) for s, q in {(c[0], c[1]) for c in configs}}
    runners = [(e, lambda e, s, q, t, mode, n: nano_speed(e, files[s, q], t, n, mode)) for e in engines]
    if a.llama_bench:
        def run_llama(_, s, q, t, mode, n):
            return llama_speed(a.llama_bench, Path(a.gguf_dir) / f"{s}.{GGUF_QUANT[q]}.gguf", t, n, mode)
        runners.append(("llama-bench", run_llama))
    load_before = os.getloadavg()[0]
    speeds = {}
    for r in range(a.runs + 1):  # round 0 warms the page cache and is not counted
        for cfg in configs:
            for name, fn in runners:
                v = fn(name, *cfg)
                if r:
                    speeds.setdefault((name, cfg), []).append(v)
        print(f"round {r} done, load {os.getloadavg()[0]:.2f}", file=sys.stderr)
    load_after = os.getloadavg()[0]
    print(f"load average (1 min): {load_before:.2f} before, {load_after:.2f} after; {a.runs} interleaved runs, medians")
    print(f"{'shape':6} {'quant':5} {'thr':>3} {'test':>6} " + " ".join(f"{label(n):>22}" for n, _ in runners))
    for cfg in configs:
        s, q, t, mode, n = cfg
        cells = [f"{statistics.median(speeds[name, cfg]):22.1f}" for name, _ in runners]
        print(f"{s:6} {q:5} {t:3d} {mode + str(n):>6} " + " ".join(cells))


if __name__ == "__main__":
    main()
