"""
llama2.c's tokenizer (tok512.bin of stories260K): encoding speed of tokenizer.Llama2cTokenizer, word by word
with its cache (the default) and over the whole text (run.c's rule applied to all of it, through the heap),
and of the C engine's nano_encode (libnano.so, in-process).

    python bench/bench_llama2c_tokenizer.py          # needs ../shared/data/llama2c and ../shared/data/eval

Texts: LAMBADA's passages (about 1.5 MB of prose that does not repeat) and the golden story repeated to the
same size (words the cache has seen). Prints MB/s (UTF-8 bytes) per text and encoder: the best of 3 runs.
"""

import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "infer_c"))

import export  # noqa: E402
import llama2c  # noqa: E402
from tokenizer import Llama2cTokenizer  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def best_of(fn, n=3):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main():
    if not (SHARED / "llama2c" / "stories260K.bin").exists():
        sys.exit(f"error: {SHARED / 'llama2c'} is missing (see ../shared/README.md)")
    ck = llama2c.load_llama2c(SHARED / "llama2c" / "stories260K.bin")
    with open(SHARED / "eval" / "lambada_openai.jsonl", encoding="utf-8") as f:
        prose = "\n".join(json.loads(line)["context"] for line in f)
    story = (SHARED / "llama2c" / "greedy_once_upon_a_time.txt").read_text()
    repeated = story * (len(prose) // len(story))
    from nanolib import NanoLib
    lib = NanoLib()
    path = "/tmp/bench_llama2c_stories260K.bin"
    export.write_model(path, ck, "fp32")
    m = lib.load(path)
    print(f"{time.strftime('%Y-%m-%d %H:%M')} | {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
          f"| load {os.getloadavg()[0]:.1f}")
    for name, text in (("lambada prose", prose), ("story repeated", repeated)):
        data = text.encode()
        mb = len(data) / 1e6
        results = {}
        for encoder in ("python words", "python whole", "C"):
            tok = Llama2cTokenizer(ck["tokenizer"])  # a fresh cache for each run
            if encoder == "python whole":
                tok._words = None  # what encode does for a vocabulary with spaces inside tokens
            if encoder == "C":
                dt, ids = best_of(lambda: lib.encode(m, data))
            else:
                dt, ids = best_of(lambda: Llama2cTokenizer(ck["tokenizer"]).encode(text) if encoder == "python words"
                                  else tok.encode(text), n=1 if encoder == "python whole" else 3)
            results[encoder] = ids
            print(f"{name:15s} {mb:5.2f} MB  {encoder:13s} {mb / dt:7.2f} MB/s  ({len(ids):,} ids)")
        assert results["python words"] == results["python whole"] == results["C"], "the encoders disagree"
    lib.free(m)
    os.remove(path)


if __name__ == "__main__":
    main()
