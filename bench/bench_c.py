"""
bench_c.py: decode speed of the C engine (infer_c/) against the memory-bandwidth bound.

    python bench/bench_c.py [--shapes 56m,110m] [--threads 1,2] [--tokens 256] [--runs 3] [--hugepages off|on|both]
                            [--out out/bench_c]

For each shape (random weights: speed does not depend on their values) it exports fp32 and Q8 files
into --out (git-ignored), runs greedy decoding of --tokens tokens with 1 and 2 threads (median of
--runs runs), measures the machine's memory read bandwidth with a small STREAM-like C kernel with the same
number of threads before every run and after the last, and prints a table:

    bound tok/s = measured read bandwidth / weight bytes per token

The machine is shared, and its bandwidth swings within minutes. The bandwidth of a run is the higher
of the measurements right before and right after it, and the table's bound uses the median of those
over the runs (the median tok/s over the runs is set against it); the last column uses instead the
highest bandwidth seen during the configuration's runs: the strictest bound.

Each configuration starts with the file evicted from the page cache and a warm-up run that reads it
back through the engine's mmap (see drop_page_cache), like a first run after a reboot.

Decoding one token streams every weight matrix once (the tied embedding matrix as the output
head), so weight bytes per token is the size of the parameter region of the .bin file. The
KV cache adds a little on top (reported separately).

--hugepages on runs the engine with NANO_HUGEPAGES=1 (weights read into 2 MiB transparent huge pages
instead of mmapped; rows marked "+hp"), both runs each configuration both ways.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent  # the repository
sys.path.insert(0, str(ROOT))

import export  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from tokenizer import SPECIAL_TOKENS  # noqa: E402

SHAPES = {
    # the seed's 56M model
    "56m": dict(block_size=512, vocab_size=16384, n_layer=16, n_embd=512, n_head=16, n_kv_head=8, n_hidden=1408),
    # llama2.c's stories110M shape
    "110m": dict(block_size=1024, vocab_size=32000, n_layer=12, n_embd=768, n_head=12, n_kv_head=12, n_hidden=2048),
}

BANDWIDTH_C = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <omp.h>
/* read bandwidth: sum 64-bit words of a buffer far larger than the caches; best of several passes */
int main(int argc, char **argv) {
    size_t n = (size_t)atoll(argv[1]) / 8;
    uint64_t *a = aligned_alloc(64, n * 8), total = 0;
    #pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) a[i] = i;
    double best = 1e30;
    for (int r = 0; r < 10; r++) {
        double t0 = omp_get_wtime();
        uint64_t s = 0;
        #pragma omp parallel for reduction(+ : s) schedule(static)
        for (size_t i = 0; i < n; i++) s += a[i];
        double t = omp_get_wtime() - t0;
        if (t < best) best = t;
        total += s;
    }
    printf("%.3f\n", n * 8 / best / 1e9);
    fprintf(stderr, "checksum %llu\n", (unsigned long long)total);
    return 0;
}
"""


def build_engine():
    subprocess.run(["make", "-C", str(ROOT / "infer_c"), "infer"], check=True, capture_output=True)
    return str(ROOT / "infer_c" / "infer")


def measure_bandwidth(out, threads, nbytes=1 << 30):
    src, exe = out / "bandwidth.c", out / "bandwidth"
    if not exe.exists() or not src.exists() or src.read_text() != BANDWIDTH_C:
        src.write_text(BANDWIDTH_C)
        subprocess.run(["cc", "-O3", "-march=native", "-fopenmp", "-o", str(exe), str(src)], check=True)
    r = subprocess.run([str(exe), str(nbytes)], capture_output=True, text=True, check=True,
                       env=dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_PROC_BIND="true"))
    return float(r.stdout)


def make_files(out, name):
    """Random-weight checkpoint of the shape, exported fp32 and Q8 (reused when present)."""
    paths = {q: out / f"{name}.{q}.bin" for q in ("fp32", "q8")}
    if all(p.exists() for p in paths.values()):
        return paths
    cfg = ModelConfig(**SHAPES[name])
    torch.manual_seed(0)
    model = Transformer(cfg)
    tokens = SPECIAL_TOKENS + [f"t{i}" for i in range(cfg.vocab_size - len(SPECIAL_TOKENS))]
    ck = {"model_config": cfg.to_dict(), "model": model.state_dict(), "tokenizer": {"type": "trie", "tokens": tokens}}
    for q, p in paths.items():
        print(f"exporting {p} ...", file=sys.stderr)
        export.write_model(str(p), ck, q)
    return paths


def drop_page_cache(path):
    """Evict the file from the page cache (it is clean: nothing is lost), so that the warm-up run
    reads it back through the engine's own mmap. The engine advises MADV_HUGEPAGE, with which Linux
    6.x caches the file in 2 MiB folios and maps them with 2 MiB entries; the pages export.py's
    writes left in the cache are 4 KiB ones, and would stay so (that costs up to 10%: TLB misses)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def decode_speed(engine, path, threads, tokens, runs, hugepages, bandwidth):
    """Median tok/s of `runs` runs; the median over the runs of the read bandwidth around each
    (`bandwidth()` runs before each run and after the last); and the highest bandwidth seen."""
    speeds, bws = [], []
    drop_page_cache(path)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_PROC_BIND="true", NANO_HUGEPAGES=str(int(hugepages)))
    for i in range(runs + 1):  # the first run only warms the page cache
        if i:
            bws.append(bandwidth())
        r = subprocess.run([engine, str(path), "--ids", "2", "-n", str(tokens), "-t", "0", "--ignore-eos",
                            "--no-verify", "--print-ids", "-j", str(threads)],
                           capture_output=True, text=True, check=True, env=env)
        m = re.search(r"generated: (\d+) tokens, ([\d.]+) tok/s", r.stderr)
        assert m and int(m.group(1)) == tokens, r.stderr
        if i:
            speeds.append(float(m.group(2)))
    bws.append(bandwidth())
    # each run's bandwidth: the higher of the measurements right before and right after it
    local = [max(a, b) for a, b in zip(bws, bws[1:])]
    return statistics.median(speeds), statistics.median(local), max(bws)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="56m,110m")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--hugepages", choices=("off", "on", "both"), default="off",
                    help="NANO_HUGEPAGES=1 for the engine (weights in 2 MiB pages), or both ways")
    ap.add_argument("--out", default=str(ROOT / "out" / "bench_c"), help="where the .bin files go (git-ignored)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    engine = build_engine()
    threads = [int(t) for t in args.threads.split(",")]
    rows = []
    for name in args.shapes.split(","):
        cfg = SHAPES[name]
        for quant, path in make_files(out, name).items():
            with open(path, "rb") as f:
                header = export.read_header(f.read(export.HEADER_SIZE))
            wbytes = header["params_size"]
            # average KV cache read per token over the run: 2 (K, V) x layers x kv width x mean position
            kv = 2 * cfg["n_layer"] * cfg["n_kv_head"] * (cfg["n_embd"] // cfg["n_head"]) * 4 * (args.tokens / 2)
            for t in threads:
                for hp in {"off": [False], "on": [True], "both": [False, True]}[args.hugepages]:
                    # bandwidth between the runs, under the same conditions (the machine is shared, and
                    # its bandwidth varies within minutes)
                    speed, bw, bw_max = decode_speed(engine, path, t, args.tokens, args.runs, hp,
                                                     lambda: measure_bandwidth(out, t))
                    label = quant + ("+hp" if hp else "")
                    rows.append((name, label, t, speed, wbytes, kv, bw, bw_max))
                    print(f"{name} {label} {t} thread(s): {speed:.1f} tok/s, read bandwidth {bw:.1f} GB/s "
                          f"(highest {bw_max:.1f})", file=sys.stderr)
    print()
    print("| shape | quant | threads | tok/s (median) | weight MB/token | KV cache MB/token (mean) "
          "| read bandwidth GB/s (median; highest) | bandwidth bound tok/s | % of bound | % of the strictest bound |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, quant, t, speed, wbytes, kv, bw, bw_max in rows:
        bound = bw * 1e9 / wbytes
        print(f"| {name} | {quant} | {t} | {speed:.1f} | {wbytes / 1e6:.1f} | {kv / 1e6:.1f} | {bw:.1f}; {bw_max:.1f} "
              f"| {bound:.1f} | {100 * speed / bound:.0f}% | {100 * speed * wbytes / (bw_max * 1e9):.0f}% |")


if __name__ == "__main__":
    main()
