"""
bench_trials.py: bench.py with one speed idea applied in memory, for the ideas that were measured and
not adopted (docs/BENCHMARKS.md, issue #30), so that a measured "no" can be rerun on a newer torch.

    python bench/bench_trials.py TRIAL [bench.py's arguments]
    TRIALS="none stack" bash bench/bench_gpu.sh trials     (on the GPU, between nanoGPT yardsticks)

TRIAL is one of these, or several joined with "+" (wgrad32+combo):
  none     bench.py as it is: the baseline, started the same way
  maxat    Inductor's GEMM autotuning (Triton matrix-product templates with fused epilogues, tried
           against cuBLAS) in place of compile_tuning's options
  stack    q/k/v as one product per attention block and w1/w3 as one per SwiGLU, the layout the retired
           second forward used: model.py's Attention and FeedForward get one weight each in place of
           the separate ones (initialised as model.py initialises those), the same forward otherwise
  wgrad32  every nn.Linear of the blocks swapped for one whose bf16 product writes the float32 weight
           gradient straight from its accumulators (speed.weight_grad, as Float8Linear does), instead
           of a bf16 gradient that autocast's cast then converts: a pass and a kernel less per weight
  combo    Inductor's combo kernels (independent small kernels, such as the weights' casts, launched
           as one) on top of compile_tuning's options
  ndtile   Inductor's n-dimensional tiling of pointwise kernels (reads and writes in transposed
           layouts: RoPE's backward, stack's concatenated gradient) on top of compile_tuning's options
docs/BENCHMARKS.md has what each did on an H100 and an H200.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bench  # noqa: E402
import model  # noqa: E402
import speed  # noqa: E402


def stacked(*linears):
    """One nn.Linear whose weight (and bias) are the given ones' concatenated along the outputs."""
    weight = torch.cat([m.weight for m in linears]).detach()
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=linears[0].bias is not None)
    out.weight.data.copy_(weight)
    if out.bias is not None:
        out.bias.data.copy_(torch.cat([m.bias for m in linears]).detach())
    return out


def attention_init(self, cfg, _init=model.Attention.__init__):
    _init(self, cfg)
    self.qkv_sizes = [self.wq.out_features, self.wk.out_features, self.wv.out_features]
    self.wqkv = stacked(self.wq, self.wk, self.wv)
    del self.wq, self.wk, self.wv


def attention_forward(self, x, rope, cache=None, pos=0):
    B, T, _ = x.shape
    q, k, v = self.wqkv(x).split(self.qkv_sizes, dim=-1)
    q = q.view(B, T, self.n_head, self.head_dim)
    k = k.view(B, T, self.n_kv_head, self.head_dim)
    v = v.view(B, T, self.n_kv_head, self.head_dim)
    if self.q_norm is not None:
        q, k = self.q_norm(q), self.k_norm(k)
    if rope is not None:
        q, k = model.apply_rope(q, *rope), model.apply_rope(k, *rope)
    y = self.sdpa(q, k, v, cache, pos)
    return self.resid_dropout(self.wo(y.reshape(B, T, self.n_head * self.head_dim)))


def feed_forward_init(self, cfg, _init=model.FeedForward.__init__):
    _init(self, cfg)
    if self.w3 is None:
        raise SystemExit("bench_trials.py stack: the model's activation is relu2 (one input matrix): nothing to stack")
    self.w13 = stacked(self.w1, self.w3)
    del self.w1, self.w3


def feed_forward_forward(self, x):
    gate, up = self.w13(x).chunk(2, dim=-1)
    return self.dropout(self.w2(F.silu(gate) * up))


class Bf16Matmul(torch.autograd.Function):
    """x @ weight.T in x's (autocast) dtype, the weight's gradient written in float32 by the product."""

    @staticmethod
    def forward(ctx, x, weight):
        w = weight.to(x.dtype)
        ctx.save_for_backward(x, w)
        ctx.weight_dtype = weight.dtype
        return x @ w.t()

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return grad @ w, speed.weight_grad(grad.t(), x, ctx.weight_dtype)


class Float32GradLinear(nn.Linear):
    """nn.Linear's call and Parameters (shared with the layer it replaces), through Bf16Matmul."""

    def __init__(self, linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x):
        if not torch.is_autocast_enabled(x.device.type) or self.bias is not None:
            return super().forward(x)
        x = x.to(torch.get_autocast_dtype(x.device.type))
        return Bf16Matmul.apply(x.reshape(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.out_features)


def make_fast_wgrad32(model_, fp8="off", _make_fast=speed.make_fast, **kw):
    if fp8 != "off":
        raise SystemExit("bench_trials.py wgrad32 is a bf16 trial: run it without fp8")
    model_ = _make_fast(model_, fp8, **kw)
    speed.swap_block_linears(model_, Float32GradLinear)
    return model_


def with_tuning(extra, _options=speed.compile_options):
    """compile_options replaced by compile_tuning's options (speed.py's own) plus extra."""
    return lambda compile_tuning: {**extra, **(_options(compile_tuning) or {})}


# each trial: the attributes it replaces, as (owner, name, new value)
TRIALS = {
    "none": [],
    "maxat": [(speed, "compile_options",
               lambda compile_tuning: {"max_autotune_gemm": True, "coordinate_descent_tuning": True})],
    "stack": [(model.Attention, "__init__", attention_init), (model.Attention, "forward", attention_forward),
              (model.FeedForward, "__init__", feed_forward_init), (model.FeedForward, "forward", feed_forward_forward)],
    "wgrad32": [(speed, "make_fast", make_fast_wgrad32)],
    "ndtile": [(speed, "compile_options", with_tuning({"triton.prefer_nd_tiling": True}))],
    "combo": [(speed, "compile_options", with_tuning({"combo_kernels": True}))],
}


def apply(trial, set_attr=setattr):
    """Patch in TRIAL, or several joined with "+" (combo and ndtile replace the same options: give one)."""
    names = trial.split("+")
    if any(n not in TRIALS for n in names):
        raise SystemExit(f"usage: bench_trials.py {{{'|'.join(TRIALS)}}}[+...] [bench.py's arguments]")
    for n in names:
        for owner, name, value in TRIALS[n]:
            set_attr(owner, name, value)


def main(argv):
    apply(argv[0] if argv else "")
    return bench.main(argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
