"""
Single pieces of a training step on a GPU, for a model config's shapes (docs/BENCHMARKS.md):

    python bench/bench_kernels.py attention -m config/model_56m.json -b 128
    python bench/bench_kernels.py attention -m config/model_56m.json -b 128 --flex-options '{"BLOCK_M": 64}'
    python bench/bench_kernels.py loss -m config/model_gpt2_124m.json -b 32 --configs 8192,16 4096,8
    python bench/bench_kernels.py norm -m config/model_gpt2_124m.json -b 32 --configs 4,8,8 1,32,4

attention: causal attention of one layer, forward + backward, in the layout the fast path gives it (q, k,
v made as [B, T, H, D] and viewed as [B, H, T, D]), through each SDPA backend and through torch's
FlexAttention (Triton kernels made by torch.compile; one run per --flex-options JSON, with
--flex-mode as its compile mode). TFLOP/s counts the causal half of 4·B·H·T²·D forward, 2.5× that
backward.

loss: what fast.HeadCrossEntropy does with the logits ([B·T, vocab] bf16) under fp8 training: the
per-row loss and the float8 gradient in both layouts. "inductor" is that arithmetic
(kernels.cross_entropy_grad_reference) compiled by torch.compile; the others are kernels.py's
kernel (one row per program) with COLS,WARPS[,STAGES] as given (",sw": its float8 rounding in
integer arithmetic rather than by the GPU's conversion instruction), followed by the transpose kernel
for the transposed copy (also timed alone). GB/s counts two reads of the logits and two float8
writes.

norm: the backward of fast.ResidualNorm's norm under float8 training ([B·T, n_embd] bf16): the
residual stream's gradient (the one from above plus the norm's), its float8 rows and the norm
weight's gradient. "inductor" is that arithmetic (kernels.residual_norm_backward_reference, then
fast.to_fp8) compiled by torch.compile; the others are kernels.py's kernel with TILE,TILES,WARPS[,STAGES]
(rows per tile, tiles per program, warps, pipeline stages of the loop over tiles). GB/s counts three bf16 reads, one bf16 and one float8 write.
Each runs 20 times in a CUDA graph (as in training): launching a kernel from Python takes longer than
the kernel.

Every figure is the median of --iters timed runs after one warm-up run.
"""

import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
import kernels  # noqa: E402
from fast import FP8_GRADS  # noqa: E402
from files import load_json  # noqa: E402
from model import ModelConfig  # noqa: E402


def time_ms(fn, iters):
    fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_ms_graphed(fn, iters, calls=20):
    """time_ms for kernels shorter than launching them from Python takes: `calls` calls captured in
    one CUDA graph (as training runs them), replayed; the time per call."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return time_ms(graph.replay, iters) / calls


# --triton-configs keys and the kernels.py settings they change (from these defaults)
SETTINGS = {"fwd": "ATTENTION_FORWARD", "dq": "ATTENTION_DQ", "dkdv": "ATTENTION_DKDV"}
DEFAULTS = {key: dict(getattr(kernels, name)) for key, name in SETTINGS.items()}


def bench_attention(cfg, args):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, T, H, KV, D = args.batch, cfg.block_size, cfg.n_head, cfg.n_kv_head, cfg.head_dim
    gen = torch.Generator(device="cuda").manual_seed(0)

    def make(heads):
        x = torch.randn(B, T, heads, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        return x.requires_grad_().transpose(1, 2)

    q, k, v = make(H), make(KV), make(KV)
    grad_out = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    flop = 0.5 * 4 * B * H * T * T * D * (1 + 2.5)
    block_mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, T, T, device="cuda")
    runs = []
    for backend in args.backends.split(","):
        if backend == "triton":  # kernels.py's kernels through fast.CausalAttention, [B, T, H, D] in and out
            from fast import CausalAttention
            for options in args.triton_configs or ["{}"]:
                def triton_attention(o=json.loads(options)):
                    for key, name in SETTINGS.items():
                        setattr(kernels, name, {**DEFAULTS[key], **o.get(key, {})})
                    return CausalAttention.apply(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
                runs.append((f"triton {options}", triton_attention))
        elif backend == "flex":
            for options in args.flex_options or ["{}"]:
                compiled = torch.compile(flex_attention, mode=args.flex_mode)
                runs.append((f"flex {options}", lambda o=json.loads(options) or None, f=compiled: f(
                    q, k, v, block_mask=block_mask, enable_gqa=H != KV, kernel_options=o)))
        else:
            chosen = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                      "mem_efficient": SDPBackend.EFFICIENT_ATTENTION}[backend]

            def sdpa(chosen=chosen):
                with sdpa_kernel([chosen]):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != KV)
            runs.append((backend, sdpa))

    reference, rows = None, []
    for name, attend in runs:
        def step():
            out = attend()
            q.grad = k.grad = v.grad = None
            out.backward(grad_out)
            return out
        try:
            out = step().detach().float()
            reference = out if reference is None else reference
            fwd, total = time_ms(attend, args.iters), time_ms(step, args.iters)
        except Exception as e:  # a backend that cannot take these shapes: say which and why
            rows.append(f"{name:40s} failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
            continue
        error = (out - reference).abs().max().item()
        rows.append(f"{name:40s} {fwd:8.3f} {total - fwd:8.3f} {total:8.3f} {flop / total / 1e9:8.1f} {error:9.2e}")
    print(f"attention B={B} T={T} heads={H}/{KV} head_dim={D} (one layer; x{cfg.n_layer} layers per step)")
    print(f"{'kernel':40s} {'fwd ms':>8s} {'bwd ms':>8s} {'total':>8s} {'TFLOP/s':>8s} {'max diff':>9s}")
    print("\n".join(rows))


def bench_loss(cfg, args):
    rows, vocab = args.batch * cfg.block_size, cfg.vocab_size
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(rows, vocab, device="cuda", generator=gen) * 4).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (rows,), device="cuda", generator=gen)
    top = torch.finfo(FP8_GRADS).max

    inductor = torch.compile(kernels.cross_entropy_grad_reference)

    runs = [("inductor", lambda: inductor(logits, targets, FP8_GRADS, top, True))]
    for config in args.configs:
        def kernel(config=config.split(",")):
            numbers = [int(v) for v in config if v.isdigit()]
            kernels.COLS, kernels.WARPS = numbers[:2]
            kernels.STAGES = numbers[2] if len(numbers) > 2 else 3
            kernels.HARDWARE_FLOAT8 = "sw" not in config
            return kernels.cross_entropy_grad_triton(logits, targets, FP8_GRADS, top, transposed=True)
        runs.append((f"kernel {config}", kernel))
    gigabytes = (2 * logits.numel() * 2 + 2 * logits.numel()) / 1e9
    reference = runs[0][1]()
    print(f"loss + float8 gradient in both layouts: logits {rows} x {vocab} bf16")
    print(f"{'kernel':24s} {'ms':>8s} {'GB/s':>8s} {'loss diff':>10s} {'grad diff':>10s}")
    for name, run in runs:
        loss, grad, grad_t = run()
        ms = time_ms(run, args.iters)
        # compared as bits: torch.equal of float8 CUDA tensors missed a scrambled transposed copy
        assert torch.equal(grad_t.view(torch.uint8), grad.view(torch.uint8).t()), name
        loss_diff = (loss - reference[0]).abs().max().item()
        grad_diff = (grad.float() - reference[1].float()).abs().max().item()
        print(f"{name:24s} {ms:8.3f} {gigabytes / ms * 1e3:8.0f} {loss_diff:10.2e} {grad_diff:10.2e}")
    grad = reference[1]
    for block, warps in ((64, 4), (128, 8)):  # the transpose kernel alone (part of each kernel run above)
        ms = time_ms(lambda: kernels.transpose_triton(grad, block, warps), args.iters)
        assert torch.equal(kernels.transpose_triton(grad, block, warps).view(torch.uint8), grad.view(torch.uint8).t())
        print(f"{f'transpose {block},{warps}':24s} {ms:8.3f} {2 * grad.numel() / ms / 1e6:8.0f}")


def bench_norm(cfg, args):
    from fast import to_fp8
    rows, dim = args.batch * cfg.block_size, cfg.n_embd
    gen = torch.Generator(device="cuda").manual_seed(0)
    grad_out, grad_normed, x = (torch.randn(rows, dim, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(3))
    weight = torch.rand(dim, device="cuda", generator=gen) + 0.5
    eps = cfg.norm_eps

    def inductor_path(*tensors):
        grad, grad_weight = kernels.residual_norm_backward_reference(*tensors, weight, eps)
        return (grad, *to_fp8(grad, per_row=True), grad_weight)
    inductor = torch.compile(inductor_path)
    runs = [("inductor", lambda: inductor(grad_out, grad_normed, x))]
    for config in args.configs:
        tile, tiles, warps, *stages = (int(v) for v in config.split(","))
        runs.append((f"kernel {config}", lambda t=tile, n=tiles, w=warps, s=stages: kernels.residual_norm_backward_triton(
            grad_out, grad_normed, x, weight, eps, True, t, n, w, *s)))
    gigabytes = rows * dim * (3 * 2 + 2 + 1) / 1e9
    reference = runs[0][1]()
    print(f"residual norm backward + float8 rows: {rows} x {dim} bf16")
    print(f"{'kernel':24s} {'ms':>8s} {'GB/s':>8s} {'grad diff':>10s} {'weight diff':>11s} {'fp8 same':>9s}")
    for name, run in runs:
        grad, grad8, inv_scale, grad_weight = run()
        ms = time_ms_graphed(run, args.iters)
        same = (grad8.view(torch.uint8) == reference[1].view(torch.uint8)).float().mean().item()
        print(f"{name:24s} {ms:8.3f} {gigabytes / ms * 1e3:8.0f} {(grad.float() - reference[0].float()).abs().max().item():10.2e} "
              f"{(grad_weight - reference[3]).abs().max().item():11.2e} {same:9.4f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("attention", "loss", "norm"))
    p.add_argument("-m", "--model", required=True, help="model config JSON")
    p.add_argument("-b", "--batch", type=int, required=True)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--backends", default="cudnn,flash,mem_efficient,flex,triton", help="attention: which to run")
    p.add_argument("--flex-options", action="append", default=[],
                   help="attention: JSON kernel options for FlexAttention (repeat for several runs)")
    p.add_argument("--triton-configs", nargs="*", default=[],
                   help='attention: kernels.py block settings as JSON, e.g. \'{"fwd": {"BLOCK_M": 64}, "dq": {...}, '
                        '"dkdv": {...}}\' (keys BLOCK_M, BLOCK_N, num_warps, num_stages; the rest as kernels.py has them)')
    p.add_argument("--flex-mode", default=None, help="attention: torch.compile mode for FlexAttention")
    p.add_argument("--configs", nargs="*", default=None,
                   help="loss: kernel configurations COLS,WARPS[,STAGES][,sw] (sw: float8 rounding in "
                        "integer arithmetic instead of the GPU's conversion instruction); norm: TILE,TILES,WARPS[,STAGES]")
    args = p.parse_args()
    if args.configs is None:
        args.configs = ([f"{kernels.NORM_TILE},{kernels.NORM_TILES},{kernels.NORM_WARPS}"] if args.what == "norm"
                        else [f"{kernels.COLS},{kernels.WARPS}"])
    cfg = load_json(args.model, ModelConfig)
    {"attention": bench_attention, "loss": bench_loss, "norm": bench_norm}[args.what](cfg, args)


if __name__ == "__main__":
    main()
