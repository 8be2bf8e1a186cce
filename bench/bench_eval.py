"""
bench_eval.py: how long eval.py takes over the task sets, start-up included, and transformers beside it.

    python bench/bench_eval.py                                    # config/model_gpt2_124m.json, random weights, all sets
    python bench/bench_eval.py --limit 2 --device cpu             # a smoke test on the CPU
    python bench/bench_eval.py --config config/model.json --tokenizer dataset/pretrain/tokenizer.json --no-hf
    python bench/bench_eval.py --checkpoint checkpoint/pretrain/best.pt --device cpu

One process, timed from its first line:
  1. start-up: import torch, build the model (random weights of --config, on the device; or load
     --checkpoint), read and check the task files, tokenize every request;
  2. Nano: eval.py's scoring of every request, as `python eval.py` scores them: on the CPU a
     multiple-choice item's query forwarded once into the KV cache and its choices from it, on a GPU
     every request in its own row (--shared-prefix / --no-shared-prefix choose), padded batches through
     model.py's forward, bf16 autocast on a GPU; then the per-task tables; "total" is from the
     process's first line to here;
  3. with --both: the same again the other way (shared prefixes if step 2 had none, else none), for
     comparison;
  4. with --compile: the same with torch.compile(dynamic=True), compile time included;
  5. transformers (unless --no-hf): the same weights exported to a Hugging Face directory (hf.export_hf)
     and loaded as a LlamaForCausalLM, every request in its own row through eval.py's scorer (the
     padded batches an lm-eval-style script would run); the largest difference between the two models'
     summed log-likelihoods is printed (float32 on the CPU: ~1e-5; bf16 on a GPU: bf16 noise).
Items/s counts task items (HellaSwag's 10,042, not its 40,168 endings); requests are the scored
(context, continuation) pairs; "request tokens" are the tokens the requests hold (one row each,
padding excluded), "forwarded" what the forwards were actually given: rows, tokens and slots (rows x
width: tokens + padding), which the shared prefixes cut.
"""

import time

T_START = time.perf_counter()  # start-up counts: before torch is imported

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections import Counter  # noqa: E402
from contextlib import nullcontext  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import eval as evaluation  # noqa: E402
from files import load_json, read_json  # noqa: E402
from hf import export_hf, load_checkpoint  # noqa: E402
from model import ModelConfig, Transformer, model_from_checkpoint  # noqa: E402
from tokenizer import BPETokenizer, tokenizer_from_dict  # noqa: E402


def build(args, device):
    """(model on the device, tokenizer, checkpoint dict for the export)."""
    if args.checkpoint:
        ck = load_checkpoint(args.checkpoint)
        return model_from_checkpoint(ck, args.checkpoint, device).eval(), tokenizer_from_dict(ck["tokenizer"]), ck
    cfg = load_json(args.config, ModelConfig)
    if args.tokenizer:
        tok = tokenizer_from_dict(read_json(args.tokenizer))
    elif cfg.vocab_size >= 50263:
        tok = BPETokenizer()
    else:
        raise SystemExit(f"{args.config}: vocab_size {cfg.vocab_size} is below GPT-2 BPE's: give --tokenizer "
                         "(e.g. dataset/pretrain/tokenizer.json from python data.py)")
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = Transformer(cfg).eval()
    return model, tok, {"model_config": cfg.to_dict(), "tokenizer": tok.to_dict()}


def timed(score_all, device):
    """(seconds, what score_all() returns: {task: (loglik, greedy) arrays}), the GPU's queue drained."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = score_all()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def nano_scoring(model, tok, device, autocast, batch_tokens, shared_prefix, compile=False):
    """An eval.Evaluator of the model, its forwards compiled as eval.py --compile compiles them."""
    ev = evaluation.Evaluator(evaluation.nano_forward(model), tok, model.cfg.block_size, device, autocast,
                              batch_tokens, progress=False, model=model, shared_prefix=shared_prefix)
    if compile:
        ev.forward = torch.compile(ev.forward, dynamic=True)
        ev.cached_forward = torch.compile(ev.cached_forward, dynamic=True)
    return ev


def forwarded_text(c):
    return f"{c['rows']:,} rows, {c['tokens']:,} tokens, {c['slots']:,} slots in {c['forwards']:,} forwards"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(ROOT, "config", "model_gpt2_124m.json"))
    p.add_argument("--checkpoint", help="a model to load instead of random weights of --config")
    p.add_argument("--tokenizer", help="tokenizer .json for a --config below GPT-2 BPE's vocabulary")
    p.add_argument("--tasks", default="all")
    p.add_argument("--tasks-dir", default=evaluation.DEFAULT_TASKS_DIR)
    p.add_argument("--limit", type=int, help="the first N items of each task (smoke test)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-tokens", type=int)
    p.add_argument("--compile", action="store_true", help="also time Nano's forward under torch.compile")
    sharing = p.add_mutually_exclusive_group()  # as eval.py's: by default shared on the CPU only
    sharing.add_argument("--shared-prefix", dest="shared_prefix", action="store_true", default=None,
                         help="Nano: a multiple-choice query once, its choices from its KV cache")
    sharing.add_argument("--no-shared-prefix", dest="shared_prefix", action="store_false",
                         help="Nano: every request in its own row")
    p.add_argument("--both", action="store_true", help="also time Nano's scoring the other way (shared prefixes or not)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    gpu = device.startswith("cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if gpu else nullcontext()
    batch_tokens = args.batch_tokens or (32768 if gpu else 4096)

    model, tok, ck = build(args, device)
    tasks = evaluation.load_tasks(args.tasks, args.tasks_dir, args.limit)
    ev = nano_scoring(model, tok, device, autocast, batch_tokens, args.shared_prefix)
    t_tok = time.perf_counter()
    requests = {t.name: ev.requests(t) for t in tasks}
    tokenize_s = time.perf_counter() - t_tok
    startup_s = time.perf_counter() - T_START
    n_items = sum(len(t.items) for t in tasks)
    n_requests = sum(len(r.seqs) for r in requests.values())
    n_tokens = sum(min(len(s), model.cfg.block_size + 1) - 1 for r in requests.values() for s in r.seqs)
    n_shared = sum(len(r.groups) for r in requests.values())

    nano_s, nano_out = timed(lambda: {name: ev.score_requests(r) for name, r in requests.items()}, device)
    result = {"tasks": {t.name: evaluation.summarize(t, evaluation.item_results(t, *nano_out[t.name], requests[t.name].chars))
                        for t in tasks}}
    result["centred"] = evaluation.centred_mean(result["tasks"])
    total_s = time.perf_counter() - T_START
    cpu_s = time.process_time()  # on a shared machine the wall time depends on the others; this less so
    print(evaluation.format_table(result))
    figures = {"device": torch.cuda.get_device_name(device) if gpu else f"cpu ({torch.get_num_threads()} threads)",
               "model": args.checkpoint or args.config, "params": model.num_params(), "items": n_items,
               "requests": n_requests, "request_tokens": n_tokens, "shared_prefix": ev.model is not None,
               "items_sharing_a_prefix": n_shared, "forwarded": dict(ev.forwarded), "startup_s": startup_s,
               "tokenize_s": tokenize_s, "nano_score_s": nano_s, "nano_total_s": total_s,
               "nano_items_per_s": n_items / total_s, "nano_forwarded_tokens_per_s_scoring": ev.forwarded["tokens"] / nano_s,
               "nano_process_cpu_s": cpu_s, "load_average": os.getloadavg(), "torch": torch.__version__,
               "tasks": result["tasks"], "centred": result["centred"]}
    print(f"\n{n_items:,} items, {n_requests:,} requests, {n_tokens:,} request tokens, on {figures['device']}")
    print(f"Nano forwarded ({'a multiple-choice query once for its choices: ' + format(n_shared, ',') + ' items' if ev.model is not None else 'every request in its own row'}): "
          f"{forwarded_text(ev.forwarded)}")
    print(f"start-up (imports, model, task files, tokenizing {tokenize_s:.1f} s): {startup_s:.1f} s")
    print(f"Nano scoring: {nano_s:.1f} s ({ev.forwarded['tokens'] / nano_s:,.0f} forwarded tokens/s); total from process "
          f"start {total_s:.1f} s = {n_items / total_s:,.1f} items/s; process CPU time {cpu_s:.1f} s; load average "
          f"{os.getloadavg()[0]:.1f}")

    if args.both:
        shared = ev.model is None  # the other way
        other = nano_scoring(model, tok, device, autocast, batch_tokens, shared)
        other_requests = {t.name: other.requests(t) for t in tasks} if shared else requests  # with groups
        s, out = timed(lambda: {name: other.score_requests(r) for name, r in other_requests.items()}, device)
        diff = max(float(np.abs(nano_out[k][0] - out[k][0]).max()) for k in nano_out)
        way = "shared prefixes" if shared else "every request in its own row"
        figures.update(other_way=way, other_score_s=s, other_forwarded=dict(other.forwarded),
                       shared_vs_unshared_max_difference=diff)
        print(f"Nano, {way}: scoring {s:.1f} s; {forwarded_text(other.forwarded)}; largest difference of a summed "
              f"log-likelihood from the first scoring: {diff:.2e}")

    if args.compile:
        compiled = nano_scoring(model, tok, device, autocast, batch_tokens, args.shared_prefix, compile=True)
        s, _ = timed(lambda: {name: compiled.score_requests(r) for name, r in requests.items()}, device)
        s2, _ = timed(lambda: {name: compiled.score_requests(r) for name, r in requests.items()}, device)
        figures.update(compiled_first_s=s, compiled_second_s=s2)
        print(f"Nano compiled: {s:.1f} s the first time (compiling included), {s2:.1f} s the second")

    if not args.no_hf:
        import transformers
        with tempfile.TemporaryDirectory() as folder:
            export_hf({**ck, "model": {k: v.cpu() for k, v in model.state_dict().items()}}, folder)
            hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
        hf_forward = lambda x: hf_model(input_ids=x).logits  # noqa: E731
        hf_stats = Counter()
        hf_s, hf_out = timed(lambda: {name: evaluation.score(hf_forward, r.seqs, r.n_scored, model.cfg.block_size, device,
                                                             autocast, batch_tokens, stats=hf_stats)
                                      for name, r in requests.items()}, device)
        diff = max(float(np.abs(nano_out[k][0] - hf_out[k][0]).max()) for k in nano_out)
        hf_rate = n_items / (tokenize_s + hf_s)
        figures.update(hf_score_s=hf_s, hf_items_per_s=hf_rate, hf_forwarded=dict(hf_stats),
                       hf_tokens_per_s_scoring=hf_stats["tokens"] / hf_s, max_loglik_difference=diff,
                       transformers=transformers.__version__)
        print(f"transformers {transformers.__version__} LlamaForCausalLM, every request in its own row: scoring {hf_s:.1f} s "
              f"({forwarded_text(hf_stats)}; {hf_stats['tokens'] / hf_s:,.0f} tokens/s); with the same tokenizing "
              f"{n_items / (tokenize_s + hf_s):,.1f} items/s "
              f"(Nano's scoring + tokenizing: {n_items / (tokenize_s + nano_s):,.1f} items/s); largest difference of "
              f"summed log-likelihoods: {diff:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
