"""
speed.py's Triton kernels, each entering through a module speed.py swaps in (model.py never calls
them), each with the same arithmetic in PyTorch ops beside it as its reference:

  * the head's loss and its gradient over the logits (speed.FusedLossHead, train config
    loss_kernel): one program per row reads the logits twice (the second pass from L2) and writes
    softmax - one-hot; Inductor's kernel reads them twice from memory;
  * causal attention (speed.TritonAttention, model config sdpa_kernel "triton"): a
    FlashAttention-style forward, a dq kernel and a dk/dv kernel, written for head_dim 32 with
    grouped-query heads (the 56M config), where cuDNN's backward is slow. q, k and v are read in the
    [B, T, heads, D] layout the projections make, and the output is written as the out-projection's
    rows.

Both came from the retired fast path (kernels.py, commit 74e1340) and stay because, measured as
module swaps on an H100 (2026-12-05, docs/BENCHMARKS.md), each gains over 3% end to end where it is on by
default: the loss kernel with the float8 head (+4.6% on the 124M fp8=all step; ±0 in bf16, so off
there), the attention at head_dim 32 (+9.1% on the 56M step; -1.8% at the 124M config's 64, which keeps
SDPA). Triton ships with CUDA builds of PyTorch; without it (a CPU build) nothing here
runs and the swaps fall back to model.py's own code. tests/test_speed_kernels.py holds the kernels to
autograd and to their references, on the CPU in Triton's interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py) and compiled on a GPU.
"""

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without Triton
    triton = None


def runs_on(t):
    """Whether the kernels serve tensor t's computation (the swaps ask; tests widen it to the CPU)."""
    return triton is not None and t.is_cuda


# ---------------------------------------------------------------------------
# The head's loss and its gradient
#
# Compiled, speed.HeadCrossEntropy's loss in PyTorch ops is Inductor's: it reads the logits twice from
# memory and writes the gradient, and the float8 transposed copy costs a pass of its own (5.1 ms a step
# at the 124M config on an H200, docs/BENCHMARKS.md). One program per row here: pass 1 the row's
# log-sum-exp (online max and sum), pass 2, right after while the row (100 KB at a 50k vocabulary) is
# still in L2, softmax - one-hot written in the gradient's dtype; then a tiled transpose for the
# float8 copy (2.25 ms in all where Inductor took 5.07, one H200, 2026-12-04).
# cross_entropy_grad_reference is the same arithmetic in PyTorch ops.

# vocabulary columns per inner step, warps, pipeline stages (tuned on an H100 for the 124M config)
LOSS_COLS, LOSS_WARPS, LOSS_STAGES = 8192, 16, 3


def hardware_float8(t):
    """The GPU's own float8 conversion instruction (compute capability 8.9+; not in the interpreter)."""
    return (t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"
            and torch.cuda.get_device_capability(t.device) >= (8, 9))


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


# ---------------------------------------------------------------------------
# Causal attention

if triton is not None:
    # Causal attention (speed.TritonAttention, model config sdpa_kernel "triton"): q [B, T, heads, D]
    # and k, v [B, T, kv heads, D] read in the layout the q/k/v product makes (no transposed copies), the
    # output written as [B, T, heads, D] (what the out-projection reads). Scores are kept in log2
    # units (the softmax scale times log2(e) folded into one multiply), so exp2 serves for exp.
    # Blocks on the diagonal need the causal mask; the others are left of it and need none, so
    # each loop runs in two stages (MASKED a constexpr: two copies of the loop body).
    @triton.jit
    def _rows_at(ptr, b, h, stride_b, stride_h, stride_t, rows, dims):
        """Pointers to the tile [rows, dims] of batch b, head h of a [B, T, heads, D] tensor."""
        return ptr + b * stride_b + h * stride_h + rows[:, None] * stride_t + dims[None, :]

    @triton.jit
    def _head_block(seq_len, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
                    BLOCK_D: tl.constexpr):
        """This program's block of positions, on the grid (blocks of T, B x HEADS): its first position,
        the batch x head index, batch, head, the positions, the dims and which of them are in bounds."""
        start = tl.program_id(0) * BLOCK
        bh = tl.program_id(1)
        positions, dims = start + tl.arange(0, BLOCK), tl.arange(0, BLOCK_D)
        ok = (positions < seq_len)[:, None] & (dims < HEAD_DIM)[None, :]
        return start, bh, (bh // HEADS).to(tl.int64), bh % HEADS, positions, dims, ok

    @triton.jit
    def _attention_forward_block(acc, m_i, l_i, q, k_at, v_at, k_st, v_st, rows, lo, hi, seq_len, scale_log2,
                                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                                 MASKED: tl.constexpr):
        dims = tl.arange(0, BLOCK_D)
        for start in range(lo, hi, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            k_ok = (dims < HEAD_DIM)[:, None] & (cols < seq_len)[None, :]  # keys past the end: diagonal blocks
            k = tl.load(k_at + cols[None, :] * k_st + dims[:, None], mask=k_ok, other=0.0)
            s = tl.dot(q, k) * scale_log2  # [BLOCK_M, BLOCK_N]
            if MASKED:
                s = tl.where(cols[None, :] <= rows[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_at + cols[:, None] * v_st + dims[None, :], mask=tl.trans(k_ok), other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        return acc, m_i, l_i

    @triton.jit
    def _attention_forward_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, seq_len, scale_log2,
                                  q_sb, q_st, q_sh, k_sb, k_st, k_sh, v_sb, v_st, v_sh, o_sb, o_st, o_sh,
                                  HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # one block of BLOCK_M queries of one head per program; the online softmax over the key blocks
        start_m, bh, b, h, rows, dims, ok = _head_block(seq_len, HEADS, HEAD_DIM, BLOCK_M, BLOCK_D)
        q = tl.load(_rows_at(q_ptr, b, h, q_sb, q_sh, q_st, rows, dims), mask=ok, other=0.0)
        k_at = k_ptr + b * k_sb + (h // GROUP) * k_sh
        v_at = v_ptr + b * v_sb + (h // GROUP) * v_sh
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        acc, m_i, l_i = _attention_forward_block(acc, m_i, l_i, q, k_at, v_at, k_st, v_st, rows, 0, start_m,
                                                 seq_len, scale_log2, BLOCK_N, BLOCK_D, HEAD_DIM, False)
        acc, m_i, l_i = _attention_forward_block(acc, m_i, l_i, q, k_at, v_at, k_st, v_st, rows, start_m,
                                                 tl.minimum(start_m + BLOCK_M, seq_len), seq_len, scale_log2, BLOCK_N,
                                                 BLOCK_D, HEAD_DIM, True)
        out = acc / l_i[:, None]
        tl.store(_rows_at(o_ptr, b, h, o_sb, o_sh, o_st, rows, dims),
                 out.to(o_ptr.dtype.element_ty), mask=ok)
        # log2 of the softmax's denominator, per row: what the backward recomputes the weights from
        tl.store(lse_ptr + bh * seq_len + rows, m_i + tl.math.log2(l_i), mask=rows < seq_len)

    @triton.jit
    def _attention_dq_block(dq, q, do, lse, delta, k_at, v_at, k_st, v_st, rows, lo, hi, seq_len, scale_log2,
                            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                            MASKED: tl.constexpr):
        dims = tl.arange(0, BLOCK_D)
        for start in range(lo, hi, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            k_ok = (dims < HEAD_DIM)[:, None] & (cols < seq_len)[None, :]
            k_t = tl.load(k_at + cols[None, :] * k_st + dims[:, None], mask=k_ok, other=0.0)
            v_t = tl.load(v_at + cols[None, :] * v_st + dims[:, None], mask=k_ok, other=0.0)
            p = tl.math.exp2(tl.dot(q, k_t) * scale_log2 - lse[:, None])  # the softmax weights again
            if MASKED:
                p = tl.where(cols[None, :] <= rows[:, None], p, 0.0)
            ds = p * (tl.dot(do, v_t) - delta[:, None])  # gradient of the scores
            dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t))
        return dq

    @triton.jit
    def _attention_dq_kernel(q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, seq_len,
                             scale, scale_log2, q_sb, q_st, q_sh, k_sb, k_st, k_sh, v_sb, v_st, v_sh,
                             o_sb, o_st, o_sh, do_sb, do_st, do_sh, dq_sb, dq_st, dq_sh,
                             HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # one block of queries of one head per program, as in the forward. It first makes the rows'
        # delta = sum(o * do) (the softmax backward's correction) and stores it for the dk/dv kernel,
        # which runs after it.
        start_m, bh, b, h, rows, dims, ok = _head_block(seq_len, HEADS, HEAD_DIM, BLOCK_M, BLOCK_D)
        q = tl.load(_rows_at(q_ptr, b, h, q_sb, q_sh, q_st, rows, dims), mask=ok, other=0.0)
        do = tl.load(_rows_at(do_ptr, b, h, do_sb, do_sh, do_st, rows, dims), mask=ok, other=0.0)
        o = tl.load(_rows_at(o_ptr, b, h, o_sb, o_sh, o_st, rows, dims), mask=ok, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(delta_ptr + bh * seq_len + rows, delta, mask=rows < seq_len)
        lse = tl.load(lse_ptr + bh * seq_len + rows, mask=rows < seq_len, other=0.0)
        k_at = k_ptr + b * k_sb + (h // GROUP) * k_sh
        v_at = v_ptr + b * v_sb + (h // GROUP) * v_sh
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        dq = _attention_dq_block(dq, q, do, lse, delta, k_at, v_at, k_st, v_st, rows, 0, start_m, seq_len,
                                 scale_log2, BLOCK_N, BLOCK_D, HEAD_DIM, False)
        dq = _attention_dq_block(dq, q, do, lse, delta, k_at, v_at, k_st, v_st, rows, start_m,
                                 tl.minimum(start_m + BLOCK_M, seq_len), seq_len, scale_log2, BLOCK_N, BLOCK_D,
                                 HEAD_DIM, True)
        tl.store(_rows_at(dq_ptr, b, h, dq_sb, dq_sh, dq_st, rows, dims),
                 (dq * scale).to(dq_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _attention_dkdv_block(dk, dv, k, v, q_at, do_at, lse_at, delta_at, q_st, do_st, cols, lo, hi, seq_len,
                              scale_log2, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                              MASKED: tl.constexpr):
        dims = tl.arange(0, BLOCK_D)
        for start in range(lo, hi, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            ok = (rows < seq_len)[None, :] & (dims < HEAD_DIM)[:, None]
            q_t = tl.load(q_at + rows[None, :] * q_st + dims[:, None], mask=ok, other=0.0)
            do_t = tl.load(do_at + rows[None, :] * do_st + dims[:, None], mask=ok, other=0.0)
            # rows past the end: an infinite log-sum-exp makes their weights 0
            lse = tl.load(lse_at + rows, mask=rows < seq_len, other=float("inf"))
            delta = tl.load(delta_at + rows, mask=rows < seq_len, other=0.0)
            p_t = tl.math.exp2(tl.dot(k, q_t) * scale_log2 - lse[None, :])  # [BLOCK_N, BLOCK_M]: keys x queries
            if MASKED:
                p_t = tl.where(rows[None, :] >= cols[:, None], p_t, 0.0)
            dv += tl.dot(p_t.to(do_t.dtype), tl.trans(do_t))
            ds_t = p_t * (tl.dot(v, do_t) - delta[None, :])
            dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t))
        return dk, dv

    @triton.jit
    def _attention_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, seq_len,
                               scale, scale_log2, q_sb, q_st, q_sh, k_sb, k_st, k_sh, v_sb, v_st, v_sh,
                               do_sb, do_st, do_sh, dk_sb, dk_st, dk_sh, dv_sb, dv_st, dv_sh,
                               KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # one block of BLOCK_N keys of one kv head per program, over the queries of every head that
        # shares it (grouped-query attention): their dk and dv summed here, not by a kernel after
        start_n, bh, b, kv_h, cols, dims, ok = _head_block(seq_len, KV_HEADS, HEAD_DIM, BLOCK_N, BLOCK_D)
        k = tl.load(_rows_at(k_ptr, b, kv_h, k_sb, k_sh, k_st, cols, dims), mask=ok, other=0.0)
        v = tl.load(_rows_at(v_ptr, b, kv_h, v_sb, v_sh, v_st, cols, dims), mask=ok, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        diagonal_end = tl.minimum(start_n + BLOCK_N, seq_len)
        for g in range(GROUP):
            h = kv_h * GROUP + g
            q_at = q_ptr + b * q_sb + h * q_sh
            do_at = do_ptr + b * do_sb + h * do_sh
            stats = (b * (KV_HEADS * GROUP) + h) * seq_len
            dk, dv = _attention_dkdv_block(dk, dv, k, v, q_at, do_at, lse_ptr + stats, delta_ptr + stats, q_st, do_st,
                                           cols, start_n, diagonal_end, seq_len, scale_log2, BLOCK_M, BLOCK_D,
                                           HEAD_DIM, True)
            dk, dv = _attention_dkdv_block(dk, dv, k, v, q_at, do_at, lse_ptr + stats, delta_ptr + stats, q_st, do_st,
                                           cols, diagonal_end, seq_len, seq_len, scale_log2, BLOCK_M, BLOCK_D,
                                           HEAD_DIM, False)
        tl.store(_rows_at(dk_ptr, b, kv_h, dk_sb, dk_sh, dk_st, cols, dims),
                 (dk * scale).to(dk_ptr.dtype.element_ty), mask=ok)
        tl.store(_rows_at(dv_ptr, b, kv_h, dv_sb, dv_sh, dv_st, cols, dims),
                 dv.to(dv_ptr.dtype.element_ty), mask=ok)


# Block sizes of the attention kernels (queries x keys per inner step), warps and pipeline stages:
# picked for the 56M config on an H100 (docs/BENCHMARKS.md, 2026-11-23). Forward and dq kernel:
# BLOCK_M a multiple of BLOCK_N; dk/dv kernel: BLOCK_N a multiple of BLOCK_M (the diagonal blocks
# start on a step boundary).
ATTENTION_FORWARD = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3)
ATTENTION_DQ = dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=3)
ATTENTION_DKDV = dict(BLOCK_M=32, BLOCK_N=128, num_warps=4, num_stages=3)
LOG2_E = 1.4426950408889634  # the kernels' scores are in log2 units: exp(x) = exp2(x log2(e))


def attention_reference(q, k, v, scale):
    """Causal attention in PyTorch ops, in the kernels' layout: q [B, T, heads, D], k and v
    [B, T, kv heads, D]; returns [B, T, heads, D] (the tests' reference)."""
    group = q.size(2) // k.size(2)
    q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    T = q.size(2)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    return (weights @ v).transpose(1, 2)


def _attention_inputs(q, k, v, grad_o=None):
    """The kernels' inputs checked (q [B, T, heads, D]; k, v [B, T, kv heads, D], heads a multiple of
    kv heads; grad_o like q) and with D contiguous, and the tile width for D (at least 16, tl.dot's
    smallest)."""
    B, T, H, D = q.shape
    KV = k.size(2)
    assert k.shape == v.shape == (B, T, KV, D) and H % KV == 0, \
        f"q [B, T, heads, D] {list(q.shape)}, k {list(k.shape)} and v {list(v.shape)} [B, T, kv heads, D]: " \
        "heads must be a multiple of kv heads"
    assert grad_o is None or grad_o.shape == q.shape, f"grad_o {list(grad_o.shape)} must be shaped as q"
    inputs = [t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, grad_o) if t is not None]
    return (*inputs, max(16, triton.next_power_of_2(D)))


def attention_forward_triton(q, k, v, scale, forward=None):
    """Causal attention through the forward kernel: q [B, T, heads, D], k and v [B, T, kv heads, D]
    (any strides with D contiguous; heads a multiple of kv heads). Returns the output [B, T, heads, D]
    contiguous and the rows' log2-sum-exp2 of the scaled scores [B, heads, T] (float32), which the
    backward recomputes the weights from."""
    q, k, v, block_d = _attention_inputs(q, k, v)
    B, T, H, D = q.shape
    KV = k.size(2)
    cfg = dict(forward or ATTENTION_FORWARD)
    block_m = cfg.pop("BLOCK_M")
    o = torch.empty(B, T, H, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    _attention_forward_kernel[(triton.cdiv(T, block_m), B * H)](
        q, k, v, o, lse, T, scale * LOG2_E, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *o.stride()[:3], HEADS=H, GROUP=H // KV, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_D=block_d, **cfg)
    return o, lse


def attention_backward_triton(q, k, v, o, lse, grad_o, scale, dq_cfg=None, dkdv_cfg=None):
    """The gradients of q, k and v (their shapes, contiguous) from the forward's inputs, output and
    log2-sum-exp2 and the output's gradient: the dq kernel (which also makes each row's
    delta = sum(o * grad_o)), then the dk/dv kernel (one program per block of keys of a kv head,
    summing over the heads that share it)."""
    q, k, v, grad_o, block_d = _attention_inputs(q, k, v, grad_o)
    B, T, H, D = q.shape
    KV = k.size(2)
    delta = torch.empty_like(lse)
    dq = torch.empty(B, T, H, D, dtype=q.dtype, device=q.device)
    dk = torch.empty(B, T, KV, D, dtype=k.dtype, device=k.device)
    dv = torch.empty(B, T, KV, D, dtype=v.dtype, device=v.device)
    cfg = dict(dq_cfg or ATTENTION_DQ)
    block_m = cfg.pop("BLOCK_M")
    _attention_dq_kernel[(triton.cdiv(T, block_m), B * H)](
        q, k, v, o, grad_o, lse, delta, dq, T, scale, scale * LOG2_E, *q.stride()[:3], *k.stride()[:3],
        *v.stride()[:3], *o.stride()[:3], *grad_o.stride()[:3], *dq.stride()[:3], HEADS=H, GROUP=H // KV,
        HEAD_DIM=D, BLOCK_M=block_m, BLOCK_D=block_d, **cfg)
    cfg = dict(dkdv_cfg or ATTENTION_DKDV)
    block_n = cfg.pop("BLOCK_N")
    _attention_dkdv_kernel[(triton.cdiv(T, block_n), B * KV)](
        q, k, v, grad_o, lse, delta, dk, dv, T, scale, scale * LOG2_E, *q.stride()[:3],
        *k.stride()[:3], *v.stride()[:3], *grad_o.stride()[:3], *dk.stride()[:3], *dv.stride()[:3], KV_HEADS=KV,
        GROUP=H // KV, HEAD_DIM=D, BLOCK_N=block_n, BLOCK_D=block_d, **cfg)
    return dq, dk, dv


@torch.library.custom_op("nano::attention_forward", mutates_args=())
def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_forward_triton(q, k, v, scale)


@attention_forward.register_fake
def _(q, k, v, scale):
    B, T, H, D = q.shape
    return q.new_empty(B, T, H, D), q.new_empty(B, H, T, dtype=torch.float32)


@torch.library.custom_op("nano::attention_backward", mutates_args=())
def attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                       grad_o: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward_triton(q, k, v, o, lse, grad_o, scale)


@attention_backward.register_fake
def _(q, k, v, o, lse, grad_o, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


class CausalAttention(torch.autograd.Function):
    """Causal attention through the kernels: q [B, T, heads, D], k and v [B, T, kv heads, D] as the
    projections make them; the output [B, T, heads, D]. The backward sums the gradients of k and v
    over the heads that share them inside its kernel."""

    @staticmethod
    def forward(ctx, q, k, v):
        scale = q.size(-1) ** -0.5
        out, lse = attention_forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return attention_backward(*ctx.saved_tensors, grad_out, ctx.scale)
