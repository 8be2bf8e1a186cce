"""
bench_serve_stall.py: how long one hostile request can hold up another client of serve.py.

    python bench/bench_serve_stall.py [-m CHECKPOINT] [--runs 5]

serve.py decodes every running request in one scheduler thread, so work that one request makes it
do per token (checking stop strings, say) delays every other client. This starts serve.py (as
bench_serve.py does: the checkpoint, else random weights of config/model.json's shape), then per
run: sends a "hostile" /v1/completions request with the most stop strings the API takes, each as
long as it takes (serve.MAX_STOP_CHARS characters, none of which can occur), and `max_tokens` 64;
after 0.2 s a normal 5-token greedy request; and times both. Then the same with a plain 64-token
request in the hostile one's place (what any second client costs), and the normal request alone.
It prints the median latencies: what the stop strings add is the difference between the two
"beside" figures.
"""

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_serve import ROOT, random_checkpoint, start_server  # noqa: E402
from serve import MAX_STOP, MAX_STOP_CHARS  # noqa: E402

NORMAL = {"model": "any", "prompt": "In the beginning", "max_tokens": 5, "temperature": 0, "ignore_eos": True}


def timed(url, body, out):
    t = time.perf_counter()
    r = httpx.post(url + "/v1/completions", json=body, timeout=300)
    r.raise_for_status()
    out.append(time.perf_counter() - t)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", help="checkpoint (default: checkpoint/pretrain/best.pt, else random weights)")
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.model or ROOT / "checkpoint" / "pretrain" / "best.pt"
        if args.model is None and not Path(checkpoint).exists():
            checkpoint = Path(tmp) / "random.pt"
            random_checkpoint(checkpoint)
        proc, url = start_server(checkpoint, "cpu", 8)
        try:
            name = httpx.get(url + "/v1/models").json()["data"][0]["id"]
            normal = {**NORMAL, "model": name}
            hostile = {**normal, "max_tokens": 64, "stop": ["\x00" * MAX_STOP_CHARS] * MAX_STOP}
            timed(url, normal, [])  # warm-up
            alone, beside = [], {"plain": [], "hostile": []}
            other_times = {"plain": [], "hostile": []}
            for _ in range(args.runs):  # interleaved: the machine's drift hits every condition alike
                timed(url, normal, alone)
                for kind, other in (("plain", {**normal, "max_tokens": 64}), ("hostile", hostile)):
                    t = threading.Thread(target=timed, args=(url, other, other_times[kind]))
                    t.start()
                    time.sleep(0.2)
                    timed(url, normal, beside[kind])
                    t.join()
        finally:
            proc.terminate()
            proc.wait()
    med = statistics.median
    ms = lambda xs: f"{1000 * med(xs):.0f} ms"  # noqa: E731
    print(f"normal 5-token request alone: {ms(alone)}; beside a plain 64-token request: {ms(beside['plain'])}; "
          f"beside a 64-token request with {MAX_STOP} stop strings of {MAX_STOP_CHARS:,} characters: "
          f"{ms(beside['hostile'])} (medians of {args.runs}); the 64-token requests themselves: plain "
          f"{ms(other_times['plain'])}, with the stop strings {ms(other_times['hostile'])}")


if __name__ == "__main__":
    main()
