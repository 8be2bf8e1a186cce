"""
bench/bench_bpe_c.py: byte-level BPE in the C engine (infer_c/nano.c), two figures.

    python bench/bench_bpe_c.py [--runs 5] [--what encode,decode] [--shapes bpe16m,124m] [--threads 1,2]
                                [--tokens 256] [--out out/bench_bpe_c]

1. Encoding speed on one core: nano_encode (infer_c/libnano.so through infer_c/nanolib.py, one call
   over the whole text, so only the encoder is timed) against tiktoken's encode
   (tokenizer.BPETokenizer: GPT-2's encoding, special tokens allowed, as data.py uses it) on the same
   text: the default corpus (the World English Bible, 1,189 chapters joined, 4.0 MB) and the same
   text's first 200 KB repeated with non-English text (CJK, Cyrillic, emoji) in between. MB/s of
   UTF-8 input, median of --runs runs, timed in process CPU seconds (a per-core figure that other
   jobs on a shared machine inflate less than wall-clock time). The ids are checked equal first.
2. Decoding speed of a GPT-2-vocabulary model (50,304-row embedding, also the output head) against
   a trie model of the same shape and weights: greedy tok/s of --tokens tokens, median of --runs
   runs, the two files' runs alternating (the machine is shared, and its speed swings within
   minutes), fp32 and Q8, 1 and 2 threads; plus the weight bytes each token reads and the read rate
   that makes (bench_c.py measures the machine's bandwidth bound). The shapes: bpe16m is
   config/model_bpe.json (the default model with GPT-2's vocabulary: the head is 81% of the
   weights), 124m is config/model_gpt2_124m.json.
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
sys.path.insert(0, str(ROOT / "infer_c"))

import torch  # noqa: E402

import corpus  # noqa: E402
import export  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from nanolib import NanoLib  # noqa: E402
from tokenizer import SPECIAL_TOKENS, BPETokenizer  # noqa: E402

SHAPES = {"bpe16m": ROOT / "config" / "model_bpe.json", "124m": ROOT / "config" / "model_gpt2_124m.json"}
MIXED = " 你好，世界！我们在测试分词器。 Привет, мир! Emoji: 😀🎉👍🏽 こんにちは、世界。 "


def median_cpu_seconds(fn, runs):
    """Median process CPU seconds of fn() over `runs` calls, after one to warm up."""
    def once():
        t0 = time.process_time()
        fn()
        return time.process_time() - t0

    once()
    return statistics.median(once() for _ in range(runs))


def bench_encode(out, runs):
    tok = BPETokenizer()
    path = out / "encode.bpe.bin"
    if not path.exists():
        cfg = ModelConfig(block_size=16, vocab_size=50304, n_layer=1, n_embd=8, n_head=1, n_kv_head=1, n_hidden=8)
        torch.manual_seed(0)
        export.write_model(str(path), {"model_config": cfg.to_dict(), "model": Transformer(cfg).state_dict(),
                                       "tokenizer": tok.to_dict()})
    lib = NanoLib()
    m = lib.load(path)
    english = "".join(corpus.default_corpus_documents())
    mixed = "".join(english[i:i + 2000] + MIXED for i in range(0, 200_000, 2000)) * 5
    rows = []
    for name, text in (("English (default corpus)", english), ("English + CJK/Cyrillic/emoji", mixed)):
        raw = text.encode("utf-8")
        want = tok.encode(text)
        ids = lib.id_buffer(len(want))
        assert ids[:lib.encode_into(m, raw, ids)] == want, "the C ids differ from tiktoken's"
        c = median_cpu_seconds(lambda: lib.encode_into(m, raw, ids), runs)
        t = median_cpu_seconds(lambda: tok.encode(text), runs)
        rows.append((name, len(raw) / 1e6, len(want), len(raw) / 1e6 / c, len(raw) / 1e6 / t))
        print(f"encode {name}: C {rows[-1][3]:.1f} MB/s, tiktoken {rows[-1][4]:.1f} MB/s", file=sys.stderr)
    lib.free(m)
    print("\n| text | MB | tokens | C engine MB/s | tiktoken MB/s | C / tiktoken |")
    print("|---|---|---|---|---|---|")
    for name, mb, n, c, t in rows:
        print(f"| {name} | {mb:.2f} | {n:,} | {c:.1f} | {t:.1f} | {c / t:.2f}× |")


def decode_files(out, shape):
    """Random weights of the shape (seed 0), exported with GPT-2's BPE and with a trie tokenizer of as
    many tokens, fp32 and Q8: {(tokenizer, quant): path}."""
    paths = {(t, q): out / f"{shape}.{t}.{q}.bin" for t in ("bpe", "trie") for q in ("fp32", "q8")}
    if all(p.exists() for p in paths.values()):
        return paths
    conf = {k: v for k, v in json.loads(SHAPES[shape].read_text()).items() if not k.startswith("_")}
    cfg = ModelConfig.from_dict(conf)
    torch.manual_seed(0)
    sd = Transformer(cfg).state_dict()
    trie = SPECIAL_TOKENS + [f"t{i}" for i in range(cfg.vocab_size - len(SPECIAL_TOKENS))]
    specs = {"bpe": {"type": "bpe", "name": "gpt2"}, "trie": {"type": "trie", "tokens": trie}}
    for (t, q), p in paths.items():
        print(f"exporting {p} ...", file=sys.stderr)
        export.write_model(str(p), {"model_config": cfg.to_dict(), "model": sd, "tokenizer": specs[t]}, q)
    return paths


def decode_once(engine, path, bos, threads, tokens):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_PROC_BIND="true")
    r = subprocess.run([engine, str(path), "--ids", str(bos), "-n", str(tokens), "-t", "0", "--ignore-eos",
                        "--no-verify", "--print-ids", "-j", str(threads)],
                       capture_output=True, text=True, check=True, env=env)
    m = re.search(r"generated: (\d+) tokens, ([\d.]+) tok/s", r.stderr)
    assert m and int(m.group(1)) == tokens, r.stderr
    return float(m.group(2))


def bench_decode(out, shapes, threads, tokens, runs):
    r = subprocess.run(["make", "-C", str(ROOT / "infer_c"), "infer"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    engine = str(ROOT / "infer_c" / "infer")
    bos = {"bpe": BPETokenizer().bos_id, "trie": SPECIAL_TOKENS.index("<|bos|>")}
    rows = []
    for shape in shapes:
        paths = decode_files(out, shape)
        for quant in ("fp32", "q8"):
            wbytes = export.read_header(paths[("bpe", quant)].read_bytes()[:256])["params_size"]
            for t in threads:
                speeds = {"bpe": [], "trie": []}
                for kind in speeds:  # warm-up: the page cache
                    decode_once(engine, paths[(kind, quant)], bos[kind], t, tokens)
                for _ in range(runs):
                    for kind in speeds:
                        speeds[kind].append(decode_once(engine, paths[(kind, quant)], bos[kind], t, tokens))
                b, tr = statistics.median(speeds["bpe"]), statistics.median(speeds["trie"])
                rows.append((shape, quant, t, b, tr, wbytes))
                print(f"decode {shape} {quant} {t} thread(s): BPE {b:.1f} tok/s, trie {tr:.1f} tok/s", file=sys.stderr)
    print("\n| shape | quant | threads | BPE model tok/s | trie model tok/s | BPE / trie | weight MB/token | "
          "read GB/s (BPE) |")
    print("|---|---|---|---|---|---|---|---|")
    for shape, quant, t, b, tr, wbytes in rows:
        print(f"| {shape} | {quant} | {t} | {b:.1f} | {tr:.1f} | {b / tr:.3f} | {wbytes / 1e6:.1f} | "
              f"{b * wbytes / 1e9:.1f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--what", default="encode,decode")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--shapes", default="bpe16m,124m")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--out", default=str(ROOT / "out" / "bench_bpe_c"), help="where the .bin files go (git-ignored)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print("command: python bench/bench_bpe_c.py " + " ".join(sys.argv[1:]))
    what = args.what.split(",")
    if "encode" in what:
        bench_encode(out, args.runs)
    if "decode" in what:
        bench_decode(out, args.shapes.split(","), [int(t) for t in args.threads.split(",")], args.tokens, args.runs)


if __name__ == "__main__":
    main()
