"""
bench_bpe_long.py: time and peak memory of the C engine's byte-level BPE on one 20 MB line.

    python bench/bench_bpe_long.py [--mb 20]

Writes a GPT-2-BPE model file (random weights: only the tokenizer is used) and three one-line
texts of --mb megabytes: words with spaces (short pieces), random lowercase letters with no space
(one piece, with positions no merge crosses, where nano.c cuts it), and "a" repeated (one piece with
no such position: it merges whole), then runs `infer_c/infer MODEL --tokenize-file TEXT` on each
under /usr/bin/time: wall seconds and peak resident memory (the text itself is in memory too).
"""

import argparse
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import export  # noqa: E402
from bpe_models import random_bpe_checkpoint  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=20)
    args = p.parse_args(argv)
    n = int(args.mb * 1e6)
    r = subprocess.run(["make", "-C", str(ROOT / "infer_c"), "infer"], capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stdout + r.stderr)
    rng = random.Random(0)
    words = ["the", "fox", "river", "café", "42", "你好", "water,", "It's", "and", "slept"]
    texts = {"words and spaces": " ".join(rng.choice(words) for _ in range(n // 4))[:n],
             "letters, no space": "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n)),
             "'a' repeated (no cut)": "a" * n}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "bpe.bin"
        export.write_model(str(model), random_bpe_checkpoint())
        print(f"| one line of {args.mb:g} MB | wall s | peak RSS MB | ids |\n|---|---|---|---|")
        for name, text in texts.items():
            path = Path(tmp) / "line.txt"
            path.write_text(text, encoding="utf-8")
            r = subprocess.run(["/usr/bin/time", "-f", "%e %M", str(ROOT / "infer_c" / "infer"), str(model),
                                "--tokenize-file", str(path)], capture_output=True, text=True)
            wall, kb = r.stderr.split()[-2:]
            print(f"| {name} | {float(wall):.1f} | {int(kb) / 1024:.0f} | {len(r.stdout.split()):,} |")


if __name__ == "__main__":
    main()
