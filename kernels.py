"""
Hand-written Triton kernels for GPU training, where torch.compile's own kernels leave time behind.

One so far: the cross-entropy loss and its gradient over the logits, for model.HeadCrossEntropy.
The logits are the step's biggest tensor (124M config: 32768 x 50304 in bf16, 3.3 GB). Inductor's
kernel reads them twice and writes the gradient once; float8 training then needs a second,
transposed copy of that gradient for the head's weight-gradient product (float8 products on these
GPUs reduce over both operands' contiguous dim), which cost a kernel of its own. Here one kernel
reads each block of rows twice (pass 1: log-sum-exp; pass 2: softmax - one-hot) and writes the
gradient in both layouts as it goes.

Triton ships with CUDA builds of PyTorch. Off CUDA, or without Triton (a CPU build), the model uses
cross_entropy_grad_reference: the same arithmetic in PyTorch ops. tests/test_kernels.py holds the
kernel to F.cross_entropy and to that reference, on the CPU under Triton's interpreter
(TRITON_INTERPRET=1, set by tests/conftest.py) and on a GPU compiled.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without Triton
    triton = None

available = triton is not None


def runs_on(t):
    """Whether the kernels serve tensor t's computation (model.py asks; tests widen it to CPU)."""
    return available and t.is_cuda


# rows per program: the transposed gradient is written as runs of ROWS contiguous elements (32 float8
# bytes: one memory sector); vocabulary columns per inner step. Picked with bench_kernels.py loss.
ROWS, COLS, WARPS = 32, 256, 8

if available:
    @triton.jit
    def _e5m2_bits(x):
        """float32 -> float8 e5m2, rounded to nearest even, as its uint8 bits. e5m2 is float16 with
        8 mantissa bits dropped (same exponent range, subnormals included), so: round to float16, then
        round its bits, where a float16 that lands exactly halfway is settled by which side of it x
        lay (no double rounding). Triton's own float8 cast gave wrong values in the transposed layout
        on an H100 (Triton 3.6), and its interpreter's rounds differently again."""
        h = x.to(tl.float16)
        bits = h.to(tl.uint16, bitcast=True).to(tl.uint32)
        nearest_even = bits + 0x7F + ((bits >> 8) & 1)
        above = tl.abs(x) > tl.abs(h.to(tl.float32))  # x's magnitude beyond the float16 one
        below = tl.abs(x) < tl.abs(h.to(tl.float32))
        halfway = (bits & 0xFF) == 0x80
        rounded = tl.where(halfway & above, bits + 0x80, tl.where(halfway & below, bits, nearest_even))
        return (rounded >> 8).to(tl.uint8)

    @triton.jit
    def _e5m2_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + i, _e5m2_bits(tl.load(x_ptr + i, mask=i < n)), mask=i < n)

    @triton.jit
    def _cross_entropy_grad_kernel(logits_ptr, targets_ptr, loss_ptr, grad_ptr, grad_t_ptr, rows, vocab,
                                   grad_scale, ROWS: tl.constexpr, COLS: tl.constexpr, E5M2: tl.constexpr,
                                   TRANSPOSED: tl.constexpr):
        row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_ok = row < rows
        target = tl.load(targets_ptr + row, mask=row_ok, other=-1)
        row_start = row.to(tl.int64) * vocab  # 64-bit offsets: the logits exceed 2^31 elements

        # pass 1: running max and sum of exponentials (online log-sum-exp), one tile at a time
        run_max = tl.full([ROWS], float("-inf"), tl.float32)
        run_sum = tl.zeros([ROWS], tl.float32)
        for start in range(0, vocab, COLS):
            col = start + tl.arange(0, COLS)
            ok = row_ok[:, None] & (col < vocab)[None, :]
            x = tl.load(logits_ptr + row_start[:, None] + col[None, :], mask=ok, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(run_max, tl.max(x, axis=1))
            new_max = tl.where(row_ok, new_max, 0.0)  # rows past the end: keep the arithmetic finite
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(x - new_max[:, None]), axis=1)
            run_max = new_max
        lse = run_max + tl.log(tl.where(row_ok, run_sum, 1.0))
        valid = row_ok & (target >= 0)  # targets of -1 are ignored, as in F.cross_entropy
        picked = tl.load(logits_ptr + row_start + tl.maximum(target, 0), mask=valid, other=0.0).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(valid, lse - picked, 0.0), mask=row_ok)

        # pass 2: the gradient softmax - one-hot (in [-1, 1]) times grad_scale, in one or both layouts
        for start in range(0, vocab, COLS):
            col = start + tl.arange(0, COLS)
            ok = row_ok[:, None] & (col < vocab)[None, :]
            x = tl.load(logits_ptr + row_start[:, None] + col[None, :], mask=ok, other=0.0).to(tl.float32)
            g = tl.exp(x - lse[:, None]) - tl.where(col[None, :] == target[:, None], 1.0, 0.0)
            g = tl.where(valid[:, None], g, 0.0) * grad_scale
            if E5M2:  # float8 e5m2 as uint8 bits (the pointers are uint8 views)
                g = _e5m2_bits(g)
            else:
                g = g.to(grad_ptr.dtype.element_ty)
            tl.store(grad_ptr + row_start[:, None] + col[None, :], g, mask=ok)
            if TRANSPOSED:  # [vocab, rows]: each column of the tile is ROWS contiguous elements
                tl.store(grad_t_ptr + col[None, :].to(tl.int64) * rows + row[:, None], g, mask=ok)


def cross_entropy_grad_reference(logits, targets, grad_dtype, grad_scale, transposed):
    """What the kernel computes, in PyTorch ops: the path off CUDA, and the tests' and
    bench_kernels.py's reference (Inductor fuses it into one kernel when compiled)."""
    lse = torch.logsumexp(logits.float(), dim=-1)
    picked = logits.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1).float()
    loss = torch.where(targets >= 0, lse - picked, 0.0)
    grad = torch.exp(logits.float() - lse.unsqueeze(1))
    vocab = torch.arange(logits.size(1), device=logits.device)
    grad = torch.where(vocab == targets.unsqueeze(1), grad - 1, grad)
    grad = (torch.where(targets.unsqueeze(1) >= 0, grad, 0.0) * grad_scale).to(grad_dtype)
    return loss, grad, grad.t().contiguous() if transposed else grad.new_empty(0)


def cross_entropy_grad_triton(logits, targets, grad_dtype, grad_scale, transposed):
    """Run the kernel (on CUDA tensors, or on CPU ones under TRITON_INTERPRET=1): the loss of each
    row (0 where the target is -1), the gradient (softmax - one-hot) x grad_scale in grad_dtype,
    and, if `transposed`, the same gradient as [vocab, rows] (else an empty tensor)."""
    rows, vocab = logits.shape
    assert logits.is_contiguous() and targets.shape == (rows,), "logits [rows, vocab] contiguous, targets [rows]"
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    grad = torch.empty(rows, vocab, dtype=grad_dtype, device=logits.device)
    grad_t = torch.empty((vocab, rows) if transposed else (0,), dtype=grad_dtype, device=logits.device)
    e5m2 = grad_dtype == torch.float8_e5m2
    assert e5m2 or grad_dtype.itemsize > 1, "float8 gradients: e5m2 only"
    bits = (lambda t: t.view(torch.uint8)) if e5m2 else (lambda t: t)
    _cross_entropy_grad_kernel[(triton.cdiv(rows, ROWS),)](
        logits, targets, loss, bits(grad), bits(grad_t), rows, vocab, grad_scale,
        ROWS=ROWS, COLS=COLS, E5M2=e5m2, TRANSPOSED=transposed, num_warps=WARPS)
    return loss, grad, grad_t


def to_e5m2_triton(x):
    """float32 tensor -> float8 e5m2 through the kernels' rounding (_e5m2_bits): for the tests."""
    out = torch.empty(x.shape, dtype=torch.float8_e5m2, device=x.device)
    _e5m2_kernel[(triton.cdiv(x.numel(), 1024),)](x.contiguous(), out.view(torch.uint8), x.numel(), BLOCK=1024)
    return out


# A custom op, so that torch.compile calls the kernel as it is (the compiled graph keeps it as one
# node) and the fake version gives the output shapes without running it.
@torch.library.custom_op("nano::cross_entropy_grad", mutates_args=())
def cross_entropy_grad(logits: torch.Tensor, targets: torch.Tensor, grad_dtype: torch.dtype, grad_scale: float,
                       transposed: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return cross_entropy_grad_triton(logits, targets, grad_dtype, grad_scale, transposed)


@cross_entropy_grad.register_fake
def _(logits, targets, grad_dtype, grad_scale, transposed):
    rows, vocab = logits.shape
    return (logits.new_empty(rows, dtype=torch.float32), logits.new_empty(rows, vocab, dtype=grad_dtype),
            logits.new_empty((vocab, rows) if transposed else (0,), dtype=grad_dtype))
