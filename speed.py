"""
Speed options for training, beside model.py. None of them is a second model: they change how fast
model.py's own forward runs, never what it computes, so an edit to model.py takes effect with every
one of them on.

  * Module swaps with the same call contract (train config fp8, and the head on a GPU):
      - Float8Linear in place of each nn.Linear of the blocks: the same weights (the same
        Parameters, the same checkpoint keys), the products in float8 (fp8 blocks / all);
      - FusedLossHead in place of model.OutputHead: the output head and the loss as one step that
        never keeps the logits for the backward (the largest tensor of a step), in float8 with
        fp8 head / all; with train config loss_kernel (by default: with the float8 head) its loss and
        gradient are one Triton kernel;
      - TritonAttention in place of model.ScaledDotProduct (model config sdpa_kernel "triton", as
        config/model_56m.json has it): causal attention through Triton kernels written for head_dim 32.
    The Triton kernels are in speed_kernels.py. make_fast(model, fp8, fused_head, ...) swaps the
    modules in; everything else of the model runs as written.
  * torch.compile options (compile_options) for train config compile / compile_tuning.
  * CudaGraphStep: train config cuda_graph captures a whole optimizer step once and replays it.

float8 (Hopper-class GPUs, compute capability 8.9+, multiply float8 matrices at twice the bf16 rate):
each operand is scaled so that its largest magnitude (per row for the blocks, per tensor for the
head) fills the float8 range, cast, multiplied with torch._scaled_mm, and the scales are taken back
out. Scales are recomputed every step: nothing to tune or to store in checkpoints. The float32
master weights, the optimizer and everything outside these products stay as they were.
docs/BENCHMARKS.md has what each option gains; tests/test_speed.py holds each swap to the module it
replaces.
"""

import os

import torch
import torch.nn as nn

import speed_kernels
from model import OutputHead, ScaledDotProduct

TRITON = speed_kernels.triton is not None  # Triton, which the kernels need, comes with CUDA builds of torch
FP8_MODES = ("off", "head", "blocks", "all")
FP8_VALUES, FP8_GRADS = torch.float8_e4m3fn, torch.float8_e5m2  # 3 mantissa bits; a wider range for gradients

# ---------------------------------------------------------------------------
# float8 products


def fp8_cast(t, amax, dtype=FP8_VALUES):
    """t scaled so that amax (broadcast over t) lands on dtype's largest finite value, and cast; with
    the inverse scale (float32) that undoes it."""
    top = torch.finfo(dtype).max
    scale = top / amax.float().clamp(min=1e-12)
    return (t.float() * scale).clamp(-top, top).to(dtype), scale.reciprocal()


def fp8_rows(t, dtype=FP8_VALUES):
    """t [M, K] in float8, each row scaled by its own largest magnitude; with the [M, 1] inverse scales."""
    return fp8_cast(t, t.abs().amax(dim=-1, keepdim=True), dtype)


def fp8_fits(*dims):
    """Whether torch._scaled_mm takes these sizes: every one a multiple of 16."""
    return all(d % 16 == 0 for d in dims)


def scaled_mm(a, b, scale_a, scale_b, out_dtype, fast_accum=False):
    """torch._scaled_mm(a, b): a row-major, b column-major, both float8. fast_accum lets the tensor
    cores keep partial sums at reduced precision (1-2% faster, the loss unchanged where measured).
    The CPU kernels take per-tensor scales only: there row scales multiply the float32 product
    instead, which is the same arithmetic (tests run float8 on the CPU). The product is returned as
    a new tensor, never through a no-op .to(): torch 2.11's torch.compile gave an autograd.Function
    whose output was such an alias a zero gradient (every weight of a compiled float8 model on the
    CPU got none; tests/test_speed.py)."""
    if a.device.type == "cpu" and (scale_a.numel() > 1 or scale_b.numel() > 1):
        one = torch.ones((), device=a.device)
        out = torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.float32)
        out = out * scale_a * scale_b
        return out if out_dtype == torch.float32 else out.to(out_dtype)
    return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype, use_fast_accum=fast_accum)


MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()  # torch.mm(..., out_dtype=): not in older torch


def weight_grad(a, b, weight_dtype):
    """a @ b for a weight's gradient, in the weight's dtype. On CUDA a bf16 product can write float32
    (the master weights' dtype) straight from its accumulators: no extra pass to convert."""
    if a.is_cuda and weight_dtype == torch.float32 and a.dtype == torch.bfloat16 and MM_OUT_DTYPE:
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).to(weight_dtype)


class Float8Matmul(torch.autograd.Function):
    """x [M, K] @ weight.T with the forward product and the input's gradient in float8, scaled per
    row, and the weight's gradient in x's precision. (float8 products must reduce along both
    operands' contiguous dim; the weight's gradient reduces over the tokens, which would need
    transposed float8 copies of x and of the gradient: more than the product saves at these sizes.)"""

    @staticmethod
    def forward(ctx, x, weight, out_dtype, fast_accum):
        ctx.save_for_backward(x, weight)
        ctx.fast_accum = fast_accum
        x8, x_inv = fp8_rows(x)
        w8, w_inv = fp8_rows(weight)
        return scaled_mm(x8, w8.t(), x_inv, w_inv.t(), out_dtype, fast_accum)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # [M, N] @ [N, K]: rows of the gradient, columns of the weight
            g8, g_inv = fp8_rows(grad.contiguous())
            w8, w_inv = fp8_cast(weight, weight.abs().amax(dim=0, keepdim=True))  # a scale per column
            grad_x = scaled_mm(g8, w8.t().contiguous().t(), g_inv, w_inv, grad.dtype, ctx.fast_accum)
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad(grad.t(), x.to(grad.dtype), weight.dtype)
        return grad_x, grad_w, None, None


class Float8Linear(nn.Linear):
    """nn.Linear with its products in float8: the same call, the same Parameters (shared with the
    layer it replaces, so the optimizer, checkpoints and exports see no difference). Sizes that
    float8 kernels cannot take (not multiples of 16) run as nn.Linear."""

    def __init__(self, linear: nn.Linear, fast_accum=True):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.fast_accum = fast_accum

    def forward(self, x):
        rows = x.numel() // x.size(-1)
        if not fp8_fits(rows, self.in_features, self.out_features):
            return super().forward(x)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        out = Float8Matmul.apply(x.reshape(rows, -1), self.weight, dtype, self.fast_accum)
        out = out.view(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias.to(dtype)


# ---------------------------------------------------------------------------
# The output head and the loss as one step


class HeadCrossEntropy(torch.autograd.Function):
    """logits = x @ weight.T and the mean cross-entropy over targets (-1 = ignored), as one step.

    The logits of a large vocabulary are the biggest tensor of a step (124M config: 32768 x 50304).
    Their gradient, softmax - one-hot, does not depend on the incoming gradient (but for a scalar),
    so it is made in the forward, right after the logits, and the logits need not live until the
    backward. With fp8 the products run in float8 and the gradient is kept in float8 with a fixed
    scale: softmax - one-hot lies in [-1, 1], so it needs no amax pass. kernel: the loss and the
    gradient from speed_kernels.py's Triton kernel, else the same arithmetic in PyTorch ops."""

    @staticmethod
    def forward(ctx, x, weight, targets, fp8, fast_accum, kernel):
        if fp8:
            x_op, x_inv = fp8_cast(x, x.abs().amax())
            w_op, w_inv = fp8_cast(weight, weight.abs().amax())
            logits = scaled_mm(x_op, w_op.t(), x_inv, w_inv, x.dtype, fast_accum)
        else:
            x_op, w_op, x_inv, w_inv = x, weight.to(x.dtype), None, None
            logits = x_op @ w_op.t()
        # the gradient scaled to fill float8's range (softmax - one-hot lies in [-1, 1]) and, for the
        # head's weight gradient, also as [vocab, rows]: float8 products reduce along both operands'
        # contiguous dim
        top = torch.finfo(FP8_GRADS).max if fp8 else 1.0
        grad_dtype, transposed = (FP8_GRADS, ctx.needs_input_grad[1]) if fp8 else (logits.dtype, False)
        loss_grad = speed_kernels.cross_entropy_grad if kernel else speed_kernels.cross_entropy_grad_reference
        row_loss, grad, grad_t = loss_grad(logits, targets, grad_dtype, top, transposed)
        count = (targets >= 0).sum()
        loss, scale = row_loss.sum() / count, 1.0 / top
        ctx.save_for_backward(x_op, x_inv, w_op, w_inv, grad, grad_t, count)
        ctx.fp8, ctx.scale, ctx.out_dtype, ctx.weight_dtype = fp8, scale, x.dtype, weight.dtype
        ctx.mark_non_differentiable(logits)
        return loss, logits

    @staticmethod
    def backward(ctx, grad_loss, _):
        x_op, x_inv, w_op, w_inv, grad, grad_t, count = ctx.saved_tensors
        scale = grad_loss.float() * ctx.scale / count
        grad_x = grad_w = None  # (a frozen head, as in LoRA training, needs no weight gradient)
        if ctx.fp8:
            grad_x = scaled_mm(grad, w_op.t().contiguous().t(), scale, w_inv, ctx.out_dtype)
            if ctx.needs_input_grad[1]:
                grad_w = scaled_mm(grad_t, x_op.t().contiguous().t(), scale, x_inv, torch.float32).to(ctx.weight_dtype)
        else:
            grad_x = ((grad @ w_op).float() * scale).to(ctx.out_dtype)
            if ctx.needs_input_grad[1]:
                grad_w = (weight_grad(grad.t(), x_op, torch.float32) * scale).to(ctx.weight_dtype)
        return grad_x, grad_w, None, None, None, None


class FusedLossHead(OutputHead):
    """model.OutputHead's contract, (x, weight, targets) -> (logits, loss), with the head and the
    loss as one HeadCrossEntropy while training (in float8 if fp8; the loss through the Triton kernel
    if kernel, where it runs); without targets or gradients (evaluation, generation) it is OutputHead."""

    def __init__(self, fp8=False, fast_accum=True, kernel=False):
        super().__init__()
        self.fp8, self.fast_accum, self.kernel = fp8, fast_accum, kernel

    def forward(self, x, weight, targets=None):
        if targets is None or not torch.is_grad_enabled():
            return super().forward(x, weight, targets)
        rows, dim, vocab = x.numel() // x.size(-1), x.size(-1), weight.size(0)
        fp8 = self.fp8 and fp8_fits(rows, dim, vocab)
        kernel = self.kernel and speed_kernels.runs_on(x)
        loss, logits = HeadCrossEntropy.apply(x.reshape(rows, dim), weight, targets.reshape(rows), fp8, self.fast_accum,
                                              kernel)
        return logits.view(*x.shape[:-1], vocab), loss


# ---------------------------------------------------------------------------
# Attention through speed_kernels.py's Triton kernels


class TritonAttention(ScaledDotProduct):
    """model.ScaledDotProduct's contract, (q, k, v, cache, pos) -> [B, T, heads, D], through
    speed_kernels.CausalAttention where its kernels apply: causal attention over a whole sequence (no
    KV cache), no attention dropout, half-precision inputs on a device the kernels run on. Anything
    else (generation, float32, a bidirectional model) is ScaledDotProduct."""

    def forward(self, q, k, v, cache=None, pos=0):
        applies = (cache is None and self.cfg.is_causal and not (self.training and self.cfg.dropout > 0)
                   and q.dtype in (torch.float16, torch.bfloat16) and q.dtype == k.dtype == v.dtype
                   and speed_kernels.runs_on(q))
        if not applies:
            return super().forward(q, k, v, cache, pos)
        return speed_kernels.CausalAttention.apply(q, k, v)


# ---------------------------------------------------------------------------
# Applying the swaps


def loss_kernel_on(setting, device_type, fp8):
    """Train config loss_kernel: true or false as given; null (the default) where it pays, with the
    float8 head on CUDA: there the PyTorch reference writes the float8 gradient and its transposed copy
    in two passes over the logits, the kernel in one (+4.6% on the 124M fp8=all step; in bf16 Inductor's
    kernel is as fast: docs/BENCHMARKS.md, 2026-12-05)."""
    if setting is not None:
        return setting
    return device_type == "cuda" and TRITON and fp8 in ("head", "all")


def make_fast(model, fp8="off", fused_head=False, fast_accum=True, loss_kernel=False):
    """Swap model's modules in place for faster ones with the same contract: Float8Linear for every
    plain nn.Linear of the blocks (fp8 blocks / all; LoRA layers keep their own forward),
    FusedLossHead for the head (fused_head, or fp8 head / all; its loss through the Triton kernel if
    loss_kernel), and TritonAttention for each layer's attention if the model config's sdpa_kernel
    is "triton". Returns the model."""
    if fp8 not in FP8_MODES:
        raise ValueError(f"fp8 must be one of {FP8_MODES}, got {fp8!r}")
    if fp8 in ("blocks", "all"):
        swap_block_linears(model, lambda linear: Float8Linear(linear, fast_accum))
    if fused_head or fp8 in ("head", "all"):
        model.head = FusedLossHead(fp8 in ("head", "all"), fast_accum, loss_kernel)
    if model.cfg.sdpa_kernel == "triton":
        for layer in model.layers:
            layer.attn.sdpa = TritonAttention(model.cfg)
    if fp8 in ("blocks", "all") and next(model.parameters()).is_cuda:
        cublaslt_without_workspace()
    return model


def swap_block_linears(model, swap):
    """Replace every plain nn.Linear of the blocks' attention and feed-forward with swap(linear) (LoRA
    layers, not plain, keep their own forward)."""
    for layer in model.layers:
        for parent in (layer.attn, layer.ffn):
            for name, child in parent.named_children():
                if type(child) is nn.Linear:
                    setattr(parent, name, swap(child))


def cublaslt_without_workspace():
    """Given a workspace, cuBLASLt picks float8 kernels that clear part of it before each product (a
    memset and a gap, about 100 times a step for the 124M config); without one it picks kernels that
    need none: +1.5% (124M fp8=all, docs/BENCHMARKS.md). torch reads the size at its first cuBLASLt
    product; a value the user set stays."""
    os.environ.setdefault("CUBLASLT_WORKSPACE_SIZE", "0")


# ---------------------------------------------------------------------------
# torch.compile and CUDA graphs

# train config compile_tuning: Inductor tries neighbouring block sizes and warp counts for each
# kernel it generates and keeps the fastest (minutes more compilation for a faster step)
COMPILE_TUNING = {"coordinate_descent_tuning": True}


def compile_options(compile_tuning):
    """The Inductor options torch.compile gets (None: its defaults)."""
    return dict(COMPILE_TUNING) if compile_tuning else None


class CudaGraphStep:
    """train config cuda_graph: step(batches) -> outputs, recorded once as a CUDA graph and replayed.

    The first WARMUP calls run eagerly on a side stream (compilation, cuBLAS workspaces, optimizer
    state); the next is captured (every micro-step's forward and backward, clipping, the optimizer
    step) and from then on replayed: one launch per step instead of hundreds of kernels, which is
    what a small model on a large GPU waits for. Replays read the batch from the capture's input
    tensors (filled in place) and write the same output tensors. `step` must clear the gradients
    first (set_to_none): in the capture the backward then makes them in the graph's memory, and every
    replay overwrites them."""
    WARMUP = 3

    def __init__(self, step):
        self.step = step
        self.graph = self.inputs = self.outputs = None
        self.eager_steps = 0
        self.side_stream = torch.cuda.Stream()

    def __call__(self, batches):
        if self.graph is not None:
            for (x, y), (gx, gy) in zip(batches, self.inputs):
                gx.copy_(x, non_blocking=True)
                gy.copy_(y, non_blocking=True)
            self.graph.replay()
            return self.outputs
        if self.eager_steps < self.WARMUP:
            self.eager_steps += 1
            self.side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side_stream):
                out = self.step(batches)
            torch.cuda.current_stream().wait_stream(self.side_stream)
            return out
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # records, does not run: the replay below runs this step
            self.outputs = self.step(batches)
        self.inputs = batches
        self.graph.replay()
        return self.outputs
