"""
bench_serve.py: serve.py's aggregate decode speed and time to first token with several clients at once.

    python bench/bench_serve.py [-m CHECKPOINT] [--clients 1 4 8] [--tokens 128] [--runs 3] [--device cpu]

It starts serve.py (a subprocess, on a free port of 127.0.0.1) on the checkpoint (default:
checkpoint/pretrain/best.pt if there is one, else a model of config/model.json's shape with random
weights and a character tokenizer: speed does not depend on the weights), then for each client count
runs that many streaming clients at once, each asking /v1/completions for
--tokens tokens with Nano's default sampling (-t 0.8 -p 0.95, its own seed; -t 0: greedy) and `ignore_eos` (every
answer is exactly --tokens long). Per run: aggregate tokens/s = all clients' tokens over the time
from the first request sent to the last answer done; time to first token (TTFT) = from a client's
request to its first text chunk. The client counts take turns, run by run. It prints, per client
count, the median aggregate tokens/s of --runs runs, the median and 90th percentile of all the runs'
TTFTs, and the speedup over the first count (1 client).
The clients share the machine with the server, as a local chat front end would. They are one asyncio
thread speaking plain HTTP/1.1 (chunked server-sent events, a JSON parse only for the first text and
the usage), so that measuring takes little of the cores the server runs on: eight httpx clients in
threads took ~40% of a core on a 2-core machine, which the server's figures then lacked.
"""

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = "In the beginning God created the heavens and the earth. And God said,"


def random_checkpoint(path):
    """config/model.json's shape with random weights, and a character tokenizer (printable ASCII)."""
    import torch
    from files import read_json
    from model import ModelConfig, Transformer
    from tokenizer import SPECIAL_TOKENS
    cfg = ModelConfig.from_dict(read_json(str(ROOT / "config" / "model.json"), "model config"))
    torch.manual_seed(0)
    tokens = SPECIAL_TOKENS + [chr(c) for c in range(32, 127)]
    torch.save({"model_config": cfg.to_dict(), "model": Transformer(cfg).state_dict(),
                "tokenizer": {"type": "trie", "tokens": tokens}}, path)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint, device, max_batch):
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "-m", str(checkpoint), "--port", str(port),
                             "--device", device, "--max-batch", str(max_batch), "--model-name", "bench"], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            sys.exit("bench_serve.py: serve.py exited")
        try:
            httpx.get(url + "/health", timeout=1)
            return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    sys.exit("bench_serve.py: serve.py did not start within 60 s")


async def one_client(host, port, body, start_together):
    """Stream one answer over a plain HTTP/1.1 connection; returns (start, first text chunk, end,
    completion tokens). The connection is made before the clock starts (start_together)."""
    reader, writer = await asyncio.open_connection(host, port)
    payload = json.dumps(body).encode()
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload
    await start_together.wait()
    start, first, count = time.perf_counter(), None, 0
    writer.write(request)
    status = await reader.readline()
    if b" 200 " not in status:
        sys.exit(f"bench_serve.py: the server answered {status.decode().strip()}")
    while (await reader.readline()).strip():  # the headers (Transfer-Encoding: chunked)
        pass
    pending = b""
    while True:  # chunks: a size line in hex, the bytes, CRLF; size 0 ends the answer
        size = int((await reader.readline()).strip(), 16)
        if size == 0:
            break
        pending += (await reader.readexactly(size + 2))[:-2]
        *events, pending = pending.split(b"\n\n")
        for event in events:
            if not event.startswith(b"data: {"):
                continue
            if first is None or b'"usage"' in event:  # parse only what is measured
                chunk = json.loads(event[6:])
                if first is None and chunk["choices"][0]["text"]:
                    first = time.perf_counter()
                if "usage" in chunk:
                    count = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    writer.close()
    return start, first, end, count


def run(url, clients, tokens, temperature, seed):
    """One run of `clients` clients at once: (aggregate tokens/s, their TTFTs in seconds)."""
    host, port = url.removeprefix("http://").split(":")

    async def together():
        start_together = asyncio.Event()
        tasks = [asyncio.create_task(one_client(host, int(port), {
            "model": "bench", "prompt": PROMPT, "max_tokens": tokens, "temperature": temperature, "seed": seed + i,
            "ignore_eos": True, "stream": True}, start_together)) for i in range(clients)]
        await asyncio.sleep(0.05)  # every connection made
        start_together.set()
        return await asyncio.gather(*tasks)

    results = asyncio.run(together())
    if any(r[3] != tokens or r[1] is None for r in results):
        sys.exit(f"bench_serve.py: a client got no complete answer: {results}")
    span = max(r[2] for r in results) - min(r[0] for r in results)
    return sum(r[3] for r in results) / span, [r[1] - r[0] for r in results]


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def main(argv=None):
    p = argparse.ArgumentParser(description="serve.py with several streaming clients at once")
    p.add_argument("-m", "--model", help="checkpoint (default: checkpoint/pretrain/best.pt, else a random model)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("-t", "--temperature", type=float, default=0.8, help="0 = greedy (default: Nano's 0.8)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.model or ROOT / "checkpoint" / "pretrain" / "best.pt"
        if args.model is None and not checkpoint.exists():
            checkpoint = Path(tmp) / "random.pt"
            random_checkpoint(checkpoint)
        print(f"model: {checkpoint}; load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        proc, url = start_server(checkpoint, args.device, max(args.clients))
        try:
            run(url, 1, 16, args.temperature, 0)  # warm-up
            rates, ttfts = {n: [] for n in args.clients}, {n: [] for n in args.clients}
            for i in range(args.runs):  # interleaved, so that the machine's drift hits every client count alike
                for clients in args.clients:
                    rate, ttft = run(url, clients, args.tokens, args.temperature, 1000 * i)
                    rates[clients].append(rate)
                    ttfts[clients] += ttft
            base = statistics.median(rates[args.clients[0]])
            rows = [(n, statistics.median(rates[n]), statistics.median(ttfts[n]), percentile(ttfts[n], 0.9),
                     statistics.median(rates[n]) / base) for n in args.clients]
        finally:
            proc.kill()
            proc.wait()
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"\n{args.tokens} tokens per client, temperature {args.temperature:g}, median of {args.runs} runs\n")
    print(f"| clients | aggregate tokens/s | median TTFT | p90 TTFT | speedup vs {args.clients[0]} client(s) |")
    print("|---|---|---|---|---|")
    for clients, rate, ttft, p90, speedup in rows:
        print(f"| {clients} | {rate:,.0f} | {1000 * ttft:.0f} ms | {1000 * p90:.0f} ms | {speedup:.2f}x |")
    return rows


if __name__ == "__main__":
    main()
