"""
bench_data_memory.py: peak memory of data.py on one long document with no newlines.

    python bench/bench_data_memory.py [--mb 60] [--tokenizer trie|bpe] [--out out/bench_data_memory]

It writes a single-line document of --mb megabytes (the default corpus's text, its newlines turned
into spaces, repeated), runs `python data.py --input doc.txt --workers 1 --force` on it in a fresh
process, and prints that process's peak resident memory (getrusage's ru_maxrss, via os.wait4) and
its wall time. data.py reads and tokenizes long documents in pieces of about a megabyte, cut where
no token can span the cut (data._cut_finder), so the peak should not grow with the document.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def write_document(path, mb):
    """A text of `mb` MB with no newline, from the default corpus (World English Bible)."""
    import corpus
    text, size = [], 0
    for doc in corpus.default_corpus_documents():
        piece = doc.replace("\n", " ")
        text.append(piece)
        size += len(piece.encode())
        if size >= 2 << 20:
            break
    unit = "".join(text).encode()
    with open(path, "wb") as f:
        for _ in range(int(mb * 2 ** 20) // len(unit)):
            f.write(unit)
        f.write(unit[:int(mb * 2 ** 20) % len(unit)].decode(errors="ignore").encode())


def peak_rss(doc, out_dir, tokenizer="trie", script=ROOT / "data.py"):
    """(peak RSS in bytes, wall seconds) of data.py on doc, in a process of its own."""
    args = [sys.executable, str(script), "--input", str(doc), "--out", str(out_dir), "--workers", "1", "--force",
            "--val-ratio", "0", "--tokenizer", tokenizer]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    t0 = time.time()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage (Popen.wait would not give it)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped: Popen must not wait for it again
        if proc.returncode:
            err.seek(0)
            raise RuntimeError(f"data.py failed: {err.read().decode(errors='replace')}")
    return usage.ru_maxrss * 1024, time.time() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=60)
    p.add_argument("--tokenizer", default="trie", help="trie or bpe")
    p.add_argument("--script", default=str(ROOT / "data.py"), help="the data.py to measure (another version)")
    p.add_argument("--out", default=str(ROOT / "out" / "bench_data_memory"))
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = out / f"doc_{args.mb:g}mb.txt"
    if not doc.exists():
        write_document(doc, args.mb)
    rss, secs = peak_rss(doc, out / "dataset", args.tokenizer, args.script)
    print(f"{doc.stat().st_size / 1e6:.1f} MB single-line document, {args.tokenizer}: peak RSS {rss / 2 ** 20:,.0f} MiB, "
          f"{secs:.1f} s ({args.script})")
    return rss


if __name__ == "__main__":
    main()
