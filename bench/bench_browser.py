"""
bench_browser.py: decode speed of the browser engine (infer/nano.wasm in headless Chromium,
through the chat page and its worker) against the native C engine on one thread.

    python bench/bench_browser.py [--shapes 56m] [--quants fp32,q8] [--tokens 128] [--runs 5] [--out out/bench_c]

Both run the same random-weight model files (bench_c.py's shapes and files, exported into --out
when missing) and the same work: greedy decoding of --tokens tokens after <|bos|>. Native:
`infer_c/infer model --ids 2 -n N -t 0 --ignore-eos -j 1` with OMP_NUM_THREADS=1, its "generated:
... tok/s". Browser: the page in continue mode with an empty prompt (so <|bos|> alone), temperature
0, max new tokens N; the figure is the worker's decode rate (the same span the CLI times: the
first sample to the last feed). The model's greedy output never hits <|eos|>, which the script
checks (the page has no --ignore-eos). Runs alternate native / browser so that both see the same
conditions on a shared machine; the first pair is a warm-up (page cache; V8 tiering up from its
baseline compiler); the median of the others is reported.
"""

import argparse
import functools
import http.server
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository
sys.path.insert(0, str(ROOT))

from bench_c import SHAPES, build_engine, make_files  # noqa: E402

CHROMIUM = os.environ.get("NANO_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def native_speed(engine, path, tokens):
    r = subprocess.run([engine, str(path), "--ids", "2", "-n", str(tokens), "-t", "0", "--ignore-eos", "--no-verify",
                        "--print-ids", "-j", "1"], capture_output=True, text=True, check=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    m = re.search(r"generated: (\d+) tokens, ([\d.]+) tok/s \| 1 threads, (\S+) kernels", r.stderr)
    assert m and int(m.group(1)) == tokens, r.stderr
    return float(m.group(2)), m.group(3)


def browser_speed(page, tokens):
    n = page.locator(".msg.model").count()
    page.click("#send")
    page.wait_for_function(f"() => document.querySelectorAll('.msg.model[data-reason]').length > {n}",
                           timeout=600_000)
    box = page.locator(".msg.model").last
    assert box.get_attribute("data-reason") == "max", box.inner_text()
    speed = float(box.get_attribute("data-tok-s"))
    page.click("#clear")
    return speed


def serve(directory):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="56m")
    ap.add_argument("--quants", default="fp32,q8")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "out" / "bench_c"), help="where the .bin files go (git-ignored)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    engine = build_engine()
    from playwright.sync_api import sync_playwright

    httpd = serve(ROOT / "infer")
    url = f"http://127.0.0.1:{httpd.server_address[1]}/index.html"
    rows = []
    with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        ctx = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True,
                                                   args=CHROMIUM_ARGS)
        version = ctx.browser.version if ctx.browser else "?"
        page = ctx.new_page()
        page.set_default_timeout(600_000)
        page.goto(url)
        page.wait_for_function("() => document.getElementById('status').textContent.startsWith('Engine ready')")
        kernels = page.evaluate("() => state.kernels")
        for shape in args.shapes.split(","):
            paths = make_files(out, shape)
            for quant in args.quants.split(","):
                path = paths[quant]
                page.set_input_files("#model-file", str(path))
                page.wait_for_function("(n) => document.getElementById('model-name').textContent === n", arg=path.name)
                page.wait_for_function("() => !document.getElementById('send').disabled")
                page.check("input[name=mode][value=continue]")
                for sel, v in (("#temperature", 0), ("#top-k", 0), ("#top-p", 1), ("#rep-penalty", 1),
                               ("#max-new", args.tokens), ("#seed", 0)):
                    page.fill(sel, str(v))
                nat, web = [], []
                for i in range(args.runs + 1):
                    speed, native_kernels = native_speed(engine, path, args.tokens)
                    wspeed = browser_speed(page, args.tokens)
                    print(f"{shape} {quant} run {i}{' (warm-up)' if i == 0 else ''}: native {speed:.1f} tok/s, "
                          f"browser {wspeed:.1f} tok/s", file=sys.stderr)
                    if i:
                        nat.append(speed)
                        web.append(wspeed)
                rows.append((shape, quant, statistics.median(nat), native_kernels, statistics.median(web), nat, web))
        ctx.close()
    httpd.shutdown()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nChromium {version}, wasm kernels: {kernels}; {args.tokens} tokens, median of {args.runs} runs; "
          f"load average at the end {load} ({os.cpu_count()} CPUs)\n")
    print("| shape | quant | native 1 thread tok/s | browser tok/s | browser / native |")
    print("|---|---|---|---|---|")
    for shape, quant, nat, nk, web, nats, webs in rows:
        print(f"| {shape} | {quant} | {nat:.1f} ({nk}) | {web:.1f} | {100 * web / nat:.0f}% |")
    print("\nall runs (native / browser):")
    for shape, quant, _, _, _, nats, webs in rows:
        print(f"  {shape} {quant}: " + ", ".join(f"{a:.1f}/{b:.1f}" for a, b in zip(nats, webs)))


if __name__ == "__main__":
    main()
