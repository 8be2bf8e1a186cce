"""
Speed options for training, beside model.py. None of them is a second model: they change how fast
model.py's own forward runs, never what it computes, so an edit to model.py takes effect with every
one of them on.

  * Module swaps with the same call contract (train config fp8, and the head on a GPU):
      - Float8Linear in place of each nn.Linear of the blocks: the same weights (the same
        Parameters, the same checkpoint keys), the products in float8 (fp8 blocks / all);
      - FusedLossHead in place of model.OutputHead: the output head and the loss as one step that
        never keeps the logits for the backward (the largest tensor of a step), in float8 with
        fp8 head / all. On CUDA its loss and gradient are one Triton kernel (below).
    make_fast(model, fp8, fused_head) swaps them in; everything else of the model runs as written.
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

from model import OutputHead

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without Triton: the loss runs as PyTorch ops
    triton = None

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
    instead, which is the same arithmetic (tests run float8 on the CPU)."""
    if a.device.type == "cpu" and (scale_a.numel() > 1 or scale_b.numel() > 1):
        one = torch.ones((), device=a.device)
        out = torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.float32)
        return (out * scale_a * scale_b).to(out_dtype)
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
    scale: softmax - one-hot lies in [-1, 1], so it needs no amax pass."""

    @staticmethod
    def forward(ctx, x, weight, targets, fp8, fast_accum):
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
        loss_grad = cross_entropy_grad if loss_kernel_runs(logits) else cross_entropy_grad_reference
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
        return grad_x, grad_w, None, None, None



# ---------------------------------------------------------------------------
# The loss and its gradient as one Triton kernel (CUDA)
#
# Compiled, the loss above is Inductor's: it reads the logits twice and writes the gradient, and the
# float8 transposed copy costs a pass of its own (5.1 ms a step at the 124M config, docs/BENCHMARKS.md).
# One program per row here: pass 1 the row's log-sum-exp (online max and sum), pass 2, right after
# while the row (100 KB at a 50k vocabulary) is still in L2, softmax - one-hot written in the
# gradient's dtype; then a tiled transpose for the float8 copy. It enters as a function of the
# swapped head only (model.py never sees it); off CUDA, or without Triton, the same arithmetic runs
# as PyTorch ops (cross_entropy_grad_reference, also the tests' oracle: tests/test_speed.py runs the
# kernel in Triton's interpreter on the CPU).

# vocabulary columns per inner step, warps, pipeline stages (tuned on an H100 for the 124M config)
LOSS_COLS, LOSS_WARPS, LOSS_STAGES = 8192, 16, 3


def loss_kernel_runs(t):
    return triton is not None and t.is_cuda


def hardware_float8(t):
    """The GPU's own float8 conversion instruction (compute capability 8.9+; not in the interpreter)."""
    return t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.get_device_capability(t.device) >= (8, 9)


def cross_entropy_grad_reference(logits, targets, grad_dtype, grad_scale, transposed):
    """(loss per row, 0 where the target is -1; (softmax - one-hot) x grad_scale in grad_dtype, 0 on
    ignored rows; the same as [vocab, rows] if transposed, else an empty tensor)."""
    logits32, valid = logits.float(), targets >= 0
    lse = torch.logsumexp(logits32, dim=-1)
    target_logit = logits32.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    loss = torch.where(valid, lse - target_logit, 0.0)
    one_hot = torch.arange(logits.size(-1), device=logits.device) == targets.unsqueeze(1)
    grad = (torch.exp(logits32 - lse.unsqueeze(1)) - one_hot.float()) * valid.unsqueeze(1) * grad_scale
    grad_t = (grad.t().to(grad_dtype).contiguous() if transposed else grad.new_empty(0, dtype=grad_dtype))
    return loss, grad.to(grad_dtype), grad_t


if triton is not None:
    @triton.jit
    def _e5m2_bits(x, HARDWARE: tl.constexpr):
        """float32 (|x| <= 57344, e5m2's largest value) -> float8_e5m2 bits, rounded to nearest even as
        torch rounds. On the GPU by its conversion instruction (cvt.rn.satfinite, two values each);
        in the interpreter by integer arithmetic: round the mantissa to 2 bits (a carry moves into the
        exponent) and rebias the exponent; below 2^-14 count in units of 2^-16 (adding 2^23 in float32
        rounds that count to nearest even)."""
        if HARDWARE:
            return tl.inline_asm_elementwise(
                "{ .reg .b16 lo, hi; cvt.rn.satfinite.e5m2x2.f32 lo, $2, $1; cvt.rn.satfinite.e5m2x2.f32 hi, $4, $3;"
                " mov.b32 $0, {lo, hi}; }", "=r,r,r,r,r", [x], dtype=tl.uint8, is_pure=True, pack=4)
        a = tl.abs(x)
        bits = a.to(tl.uint32, bitcast=True)
        rounded = bits + ((1 << 20) - 1) + ((bits >> 21) & 1)
        normal = (((rounded >> 23) - (127 - 15)) << 2) | ((rounded >> 21) & 3)
        subnormal = ((a * 65536.0 + 8388608.0) - 8388608.0).to(tl.uint32)
        sign = (x.to(tl.uint32, bitcast=True) >> 24) & 0x80
        return (tl.where(a < 2.0 ** -14, subnormal, normal) | sign).to(tl.uint8)

    @triton.jit
    def _cross_entropy_grad_kernel(logits_ptr, targets_ptr, loss_ptr, grad_ptr, vocab, grad_scale,
                                   COLS: tl.constexpr, E5M2: tl.constexpr, WIDE: tl.constexpr,
                                   HARDWARE: tl.constexpr):
        # (offsets in 64 bits only where the logits have 2^31 elements or more: they cost instructions)
        row = tl.program_id(0)
        target = tl.load(targets_ptr + row)
        row_start = row.to(tl.int64) * vocab if WIDE else row * vocab
        run_max = tl.full([], float("-inf"), tl.float32)  # pass 1: online log-sum-exp, a tile at a time
        run_sum = tl.zeros([], tl.float32)
        for start in range(0, vocab, COLS):
            col = start + tl.arange(0, COLS)
            x = tl.load(logits_ptr + row_start + col, mask=col < vocab, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(run_max, tl.max(x))
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(x - new_max))
            run_max = new_max
        lse = run_max + tl.log(run_sum)
        valid = target >= 0  # targets of -1 are ignored, as in F.cross_entropy
        picked = tl.load(logits_ptr + row_start + tl.maximum(target, 0)).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(valid, lse - picked, 0.0))
        row_scale = tl.where(valid, grad_scale, 0.0)
        for start in range(0, vocab, COLS):  # pass 2: (softmax - one-hot) x grad_scale
            col = start + tl.arange(0, COLS)
            x = tl.load(logits_ptr + row_start + col, mask=col < vocab, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) * row_scale - tl.where(col == target, row_scale, 0.0)
            g = _e5m2_bits(g, HARDWARE) if E5M2 else g.to(grad_ptr.dtype.element_ty)
            tl.store(grad_ptr + row_start + col, g, mask=col < vocab)

    @triton.jit
    def _transpose_kernel(x_ptr, out_ptr, rows, cols, BLOCK: tl.constexpr):
        # one BLOCK x BLOCK tile per program, read along x's rows and written along out's rows
        row = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = (row < rows)[:, None] & (col < cols)[None, :]
        x = tl.load(x_ptr + row[:, None].to(tl.int64) * cols + col[None, :], mask=ok)
        tl.store(out_ptr + col[:, None].to(tl.int64) * rows + row[None, :], tl.trans(x), mask=tl.trans(ok))


def cross_entropy_grad_triton(logits, targets, grad_dtype, grad_scale, transposed):
    """cross_entropy_grad_reference's results from the kernel (CUDA tensors, or CPU ones under
    TRITON_INTERPRET=1). float8 gradients are e5m2, handled as their bytes."""
    rows, vocab = logits.shape
    assert logits.is_contiguous() and targets.shape == (rows,), "logits [rows, vocab] contiguous, targets [rows]"
    e5m2 = grad_dtype == torch.float8_e5m2
    assert e5m2 or grad_dtype.itemsize > 1, "float8 gradients: e5m2 only"
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    grad = torch.empty(rows, vocab, dtype=grad_dtype, device=logits.device)
    _cross_entropy_grad_kernel[(rows,)](
        logits, targets, loss, grad.view(torch.uint8) if e5m2 else grad, vocab, float(grad_scale),
        COLS=LOSS_COLS, E5M2=e5m2, WIDE=rows * vocab >= 2 ** 31, HARDWARE=hardware_float8(logits),
        num_warps=LOSS_WARPS, num_stages=LOSS_STAGES)
    grad_t = grad.new_empty(0)
    if transposed:  # (a loss kernel writing this copy too needs 32-row programs: slower, docs/BENCHMARKS.md)
        grad_t, block = torch.empty(vocab, rows, dtype=grad_dtype, device=logits.device), 128
        as_bytes = (lambda t: t.view(torch.uint8)) if e5m2 else (lambda t: t)
        _transpose_kernel[(triton.cdiv(rows, block), triton.cdiv(vocab, block))](
            as_bytes(grad), as_bytes(grad_t), rows, vocab, BLOCK=block, num_warps=8)
    return loss, grad, grad_t


# a custom op, so that torch.compile calls the kernel as it is (one node of the compiled graph) and
# knows the output shapes from the fake version without running it
@torch.library.custom_op("nano::cross_entropy_grad", mutates_args=())
def cross_entropy_grad(logits: torch.Tensor, targets: torch.Tensor, grad_dtype: torch.dtype, grad_scale: float,
                       transposed: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return cross_entropy_grad_triton(logits, targets, grad_dtype, grad_scale, transposed)


@cross_entropy_grad.register_fake
def _(logits, targets, grad_dtype, grad_scale, transposed):
    rows, vocab = logits.shape
    return (logits.new_empty(rows, dtype=torch.float32), logits.new_empty(rows, vocab, dtype=grad_dtype),
            logits.new_empty((vocab, rows) if transposed else (0,), dtype=grad_dtype))


class FusedLossHead(OutputHead):
    """model.OutputHead's contract, (x, weight, targets) -> (logits, loss), with the head and the
    loss as one HeadCrossEntropy while training (in float8 if fp8); without targets or gradients
    (evaluation, generation) it is OutputHead."""

    def __init__(self, fp8=False, fast_accum=True):
        super().__init__()
        self.fp8, self.fast_accum = fp8, fast_accum

    def forward(self, x, weight, targets=None):
        if targets is None or not torch.is_grad_enabled():
            return super().forward(x, weight, targets)
        rows, dim, vocab = x.numel() // x.size(-1), x.size(-1), weight.size(0)
        fp8 = self.fp8 and fp8_fits(rows, dim, vocab)
        loss, logits = HeadCrossEntropy.apply(x.reshape(rows, dim), weight, targets.reshape(rows), fp8, self.fast_accum)
        return logits.view(*x.shape[:-1], vocab), loss


# ---------------------------------------------------------------------------
# Applying the swaps


def make_fast(model, fp8="off", fused_head=False, fast_accum=True):
    """Swap model's modules in place for faster ones with the same contract: Float8Linear for every
    plain nn.Linear of the blocks (fp8 blocks / all; LoRA layers keep their own forward), and
    FusedLossHead for the head (fused_head, or fp8 head / all). Returns the model."""
    if fp8 not in FP8_MODES:
        raise ValueError(f"fp8 must be one of {FP8_MODES}, got {fp8!r}")
    if fp8 in ("blocks", "all"):
        for layer in model.layers:
            for parent in (layer.attn, layer.ffn):
                for name, child in parent.named_children():
                    if type(child) is nn.Linear:
                        setattr(parent, name, Float8Linear(child, fast_accum))
    if fused_head or fp8 in ("head", "all"):
        model.head = FusedLossHead(fp8 in ("head", "all"), fast_accum)
    if fp8 in ("blocks", "all") and next(model.parameters()).is_cuda:
        cublaslt_without_workspace()
    return model


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
