"""
Training throughput of a model config on synthetic data, through the very loop train.py runs.

    python bench.py -m config/model_gpt2_124m.json -b 32 --compile           # on a GPU
    python bench.py -m config/model.json -b 16 --steps 10 --warmup 3         # on a CPU

Random token ids are written as a dataset (the format data.py writes), then train.train() runs
warmup + steps optimizer steps with its usual data sampling, autocast, fused AdamW, clipping and
logging. The figure is the median ms/step of the log intervals after the warmup (compilation
happens there); tokens/s = batch x block x grad_accum / (ms/step); MFU against the device's dense
bf16 peak (train.PEAK_BF16_FLOPS); peak memory from torch.cuda. --repeat N runs it N times and
reports the median run; every run's figure is printed too.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext

import numpy as np
import torch

import train
import train_ds
from files import NanoError, load_json
from model import ModelConfig, Transformer
from tokenizer import SPECIAL_TOKENS, TrieTokenizer


def synthetic_dataset(folder, vocab_size, n_tokens, seed=0):
    """Random ids in data.py's layout: train.bin, val.bin, meta.json, tokenizer.json."""
    rng = np.random.default_rng(seed)
    dtype = "uint16" if vocab_size <= 1 << 16 else "uint32"
    for split, n in (("train", n_tokens), ("val", max(n_tokens // 20, 1 << 16))):
        rng.integers(0, vocab_size, n, dtype=np.int64).astype(dtype).tofile(os.path.join(folder, f"{split}.bin"))
    TrieTokenizer(SPECIAL_TOKENS + ["a"]).save(os.path.join(folder, "tokenizer.json"))
    meta = {"dtype": dtype, "vocab_size": len(SPECIAL_TOKENS) + 1, "train_tokens": n_tokens,
            "val_tokens": max(n_tokens // 20, 1 << 16), "tokenizer": "tokenizer.json", "fingerprint": "synthetic"}
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f)


def fmt_mfu(mfu):
    return "n/a" if mfu is None else f"{100 * mfu:.1f}%"


# kernel families by name, first match wins: Inductor's fused elementwise/reduction kernels (named
# after the ops they fuse, which may include a matmul's casts), attention (cuDNN, flash), matrix
# products (cuBLAS, CUTLASS, nvjet), the optimizer, and everything else
KERNEL_FAMILIES = (("fused elementwise (triton)", ("triton",)),
                   ("attention", ("flash", "fmha", "sdpa", "attention", "attn")),
                   ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "matmul", "aten::mm", "addmm", "scaled_mm")),
                   ("optimizer", ("multi_tensor", "adam", "foreach")),
                   ("copy / fill / cast", ("copy", "fill", "memcpy", "memset", "cat", "elementwise")))


def busy_and_span(intervals):
    """The time covered by the (start, end) intervals (overlaps counted once) and their span, from the
    first start to the last end."""
    if not intervals:
        return 0, 0
    intervals = sorted(intervals)
    busy, (run_start, run_end) = 0, intervals[0]
    for start, end in intervals[1:]:
        if start > run_end:  # a new run of overlapping intervals
            busy += run_end - run_start
            run_start, run_end = start, end
        else:
            run_end = max(run_end, end)
    # each run starts after the previous one ends, so the last run's end is the last end of all
    return busy + run_end - run_start, run_end - intervals[0][0]


def print_kernel_time(profiler, steps, top, gpu):
    """GPU time per step by kernel family, then the `top` kernels: each kernel counted once (its own
    time), so the shares add up to 100% of the GPU's busy time. (On a CPU: operators' own CPU time.)"""
    kind = torch.autograd.DeviceType.CUDA if gpu else torch.autograd.DeviceType.CPU
    events = [e for e in profiler.key_averages() if e.device_type == kind]
    self_us = {e.key: e.self_device_time_total if gpu else e.self_cpu_time_total for e in events}
    total = sum(self_us.values()) or 1
    families = {}
    for e in events:
        name = e.key.lower()
        family = next((f for f, words in KERNEL_FAMILIES if any(w in name for w in words)), "other")
        families[family] = families.get(family, 0) + self_us[e.key]
    print(f"{'GPU' if gpu else 'CPU'} busy time: {total / 1000 / steps:.1f} ms per step (the {steps} timed steps)")
    # where the device waits: from the first kernel of the timed steps to the last, the time no kernel
    # ran (between kernels of a step, and between steps while the host, slowed by the profiler, works)
    ranges = [(e.time_range.start, e.time_range.end) for e in profiler.events() if e.device_type == kind]
    covered, span = busy_and_span(ranges)
    print(f"{'GPU' if gpu else 'CPU'} span: {span / 1000 / steps:.1f} ms per step, {(span - covered) / 1000 / steps:.2f} "
          f"ms of it with nothing running; {len(ranges) / steps:.0f} {'kernels' if gpu else 'operators'} per step")
    for family, t in sorted(families.items(), key=lambda kv: -kv[1]):
        print(f"  {family:28s} {t / 1000 / steps:7.2f} ms/step {100 * t / total:5.1f}%")
    for e in sorted(events, key=lambda e: -self_us[e.key])[:top]:
        print(f"  {self_us[e.key] / 1000 / steps:7.2f} ms/step {100 * self_us[e.key] / total:5.1f}%"
              f"  x{e.count // steps:<4d} {e.key[:110]}")


def bench_once(model_cfg, args, data_dir, out_dir):
    settings = dict(
        data_dir=data_dir, out_dir=out_dir, batch_size=args.batch_size, grad_accum=args.grad_accum,
        max_iters=args.warmup + args.steps, warmup_iters=0, eval_interval=10 ** 9, eval_iters=1,
        log_interval=args.log_interval, device=args.device, dtype=args.dtype, compile=args.compile,
        tensorboard=False, learning_rate=3e-4, min_lr=3e-5, save_checkpoints=False)
    settings.update(args.train_set)
    cfg = train.dataclass_from_dict(train.TrainConfig, settings, "bench.py train settings")
    stats = []
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    profiler = None
    if args.profile:  # kernel times of the timed steps only (the warmup's compilation runs kernels too)
        on_gpu = train.pick_device(cfg.device).startswith("cuda")
        profiler = torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CUDA if on_gpu else torch.profiler.ProfilerActivity.CPU],
            schedule=torch.profiler.schedule(wait=args.warmup, warmup=0, active=args.steps), acc_events=True)
    t0 = time.time()
    with profiler or nullcontext():
        train.train(model_cfg, cfg, quiet=True, stats=stats, engine=args.engine, profiler=profiler)
    wall = time.time() - t0
    if args.profile and args.rank0:
        print_kernel_time(profiler, args.steps, args.profile, on_gpu)
        if args.trace:
            profiler.export_chrome_trace(args.trace)
    timed = [s for s in stats if s["step"] > args.warmup]
    ms = statistics.median(s["ms_per_step"] for s in timed)
    mfus = [s["mfu"] for s in timed if s["mfu"] is not None]
    peak_mem = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else float("nan")
    tokens = args.batch_size * args.grad_accum * model_cfg.block_size
    return {"ms_per_step": ms, "tokens_per_sec": tokens / ms * 1000, "mfu": statistics.median(mfus) if mfus else None,
            "peak_mem_gib": peak_mem, "wall_s": wall, "final_loss": stats[-1]["loss"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default="config/model.json")
    p.add_argument("-b", "--batch-size", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation, allocator)")
    p.add_argument("--log-interval", type=int, default=5)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override model config keys")
    p.add_argument("--train-set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override train config keys, e.g. cuda_graph=true")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="print the N GPU kernels that took the most time (torch.profiler)")
    p.add_argument("--trace", metavar="FILE", help="with --profile: write the profiled steps as a Chrome trace (JSON)")
    p.add_argument("--json", help="append the result as one JSON line to this file")
    p.add_argument("--deepspeed_config", help="run under DeepSpeed with this config (launch with torchrun/deepspeed)")
    args = p.parse_args(argv)
    if args.trace and not args.profile:
        p.error("--trace writes the profiled steps: give --profile N too")
    args.engine = train.TorchEngine
    if args.deepspeed_config:
        args.engine = train_ds.deepspeed_engine(train_ds.load_ds_config(args.deepspeed_config))
    rank0 = args.rank0 = int(os.environ.get("RANK", 0)) == 0
    model_cfg = load_json(args.model, ModelConfig)
    model_cfg = ModelConfig.from_dict({**model_cfg.to_dict(), **train.parse_settings(args.set)})
    args.train_set = train.parse_settings(args.train_set)
    n_tokens = max(4_000_000, 4 * args.batch_size * args.grad_accum * model_cfg.block_size * (args.warmup + args.steps))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = os.path.join(tmp, "data")
        os.makedirs(data_dir)
        synthetic_dataset(data_dir, model_cfg.vocab_size, min(n_tokens, 200_000_000))
        for i in range(args.repeat):
            r = bench_once(model_cfg, args, data_dir, os.path.join(tmp, f"out{i}"))
            runs.append(r)
            if rank0:
                print(f"run {i + 1}: {r['tokens_per_sec']:,.0f} tok/s | {r['ms_per_step']:.1f} ms/step | "
                      f"mfu {fmt_mfu(r['mfu'])} | peak mem {r['peak_mem_gib']:.1f} GiB"
                      f" | loss {r['final_loss']:.3f} | wall {r['wall_s']:.0f} s", flush=True)
    best = sorted(runs, key=lambda r: r["tokens_per_sec"])[len(runs) // 2]
    with torch.device("meta"):  # counting only: no memory, no initialisation
        n_params = sum(p.numel() for p in Transformer(model_cfg).parameters())
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", 1))
    result = {"model": args.model, "set": args.set, "train_set": args.train_set, "world": world, "deepspeed": args.deepspeed_config, "params_M": round(n_params / 1e6, 2), "batch": args.batch_size,
              "grad_accum": args.grad_accum, "block": model_cfg.block_size, "compile": args.compile,
              "device": device, "runs": len(runs), **{k: best[k] for k in ("tokens_per_sec", "ms_per_step", "mfu",
                                                                           "peak_mem_gib")}}
    if not rank0:
        return result
    print(f"median of {len(runs)}: world {world}{' deepspeed ' + args.deepspeed_config if args.deepspeed_config else ''}: {args.model} ({result['params_M']}M params) batch {args.batch_size}x"
          f"{model_cfg.block_size} compile={args.compile} on {device}: {best['tokens_per_sec']:,.0f} tok/s, "
          f"{best['ms_per_step']:.1f} ms/step, mfu {fmt_mfu(best['mfu'])}, "
          f"peak {best['peak_mem_gib']:.1f} GiB")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    # a bad setting or a diverged run is one line, as train.py prints it (exit 2, or 3 for a divergence)
    try:
        main()
    except NanoError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3 if isinstance(e, train.Diverged) else 2)
