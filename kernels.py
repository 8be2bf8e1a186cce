"""
Hand-written Triton kernels for GPU training, where torch.compile's own kernels leave time behind.

The cross-entropy loss and its gradient over the logits, for fast.HeadCrossEntropy. The logits
are the step's biggest tensor (124M config: 32768 x 50304 in bf16, 3.3 GB). Inductor's kernel reads
them twice and writes the gradient once; float8 training then needs a second, transposed copy of
that gradient for the head's weight-gradient product (float8 products on these GPUs reduce over both
operands' contiguous dim). Here one kernel reads each row twice (pass 1: log-sum-exp; pass 2:
softmax - one-hot, right after the first, while the row may still be in L2) and writes the float8
gradient; a tiled transpose kernel then makes the transposed copy.

Two row kernels for the backward of the blocks' stacked products (fast.SwiGLUProduct and
fast.RopeQKVProduct): the gradient through silu(gate) * up, and the q/k/v gradients with RoPE's
rotation taken back, each written as the product's output rows together with their float8 copy
and row scales (what fast.to_fp8 would make) in one pass. Inductor made each a looped reduction
that read every row twice (the float8 cast needs the row's amax first, and rows of 2,304-4,096
values are too long for its one-pass kernels), plus a separate kernel for RoPE's backward.

The backward of the RMSNorm after each projection into the residual stream (fast.ResidualNorm,
float8 blocks): the residual stream's gradient (the one from the layers above plus the norm's),
which is also the projection's output gradient, with its float8 copy, and the norm weight's
gradient summed over each program's rows. Inductor's norm backward (a "mix-order" reduction: along
the rows and down the columns in one kernel) would not take the float8 cast, which then needed a
kernel of its own that read every gradient again.

Causal attention (fast.CausalAttention, chosen by the model config's sdpa_kernel "triton"): a
FlashAttention-style forward, a dq kernel and a dk/dv kernel, written for the 56M config's head_dim
of 32 with grouped-query heads, where cuDNN's backward ran at ~115 TFLOP/s and needed three helper
kernels (dO.O, a dQ conversion from float32, the sum of dK/dV over the heads sharing a kv head).
Here the dq kernel makes dO.O on the way, dq is written in bf16 by the program that owns it, and
the dk/dv kernel loops over the group's heads. q, k, v are read where the q/k/v product put them and
the output is written as the out-projection's rows. At head_dim 64 cuDNN stays faster.

Triton ships with CUDA builds of PyTorch. Off CUDA, or without Triton (a CPU build), fast.py uses
the *_reference functions (the same arithmetic in PyTorch ops) and SDPA for attention. tests/test_kernels.py holds the
kernels to autograd and to those references, on the CPU under Triton's interpreter
(TRITON_INTERPRET=1, set by tests/conftest.py) and on a GPU compiled.
"""

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without Triton
    triton = None

available = triton is not None


def runs_on(t):
    """Whether the kernels serve tensor t's computation (fast.py asks; tests widen it to CPU)."""
    return available and t.is_cuda


# the loss kernel's vocabulary columns per inner step, warps and pipeline stages: picked with
# bench_kernels.py loss (docs/BENCHMARKS.md)
COLS, WARPS, STAGES = 8192, 16, 3
# float8 rounding by the GPU's conversion instruction where there is one (compute capability 8.9+),
# else in integer arithmetic (_float8_bits); bench_kernels.py switches it off to compare
HARDWARE_FLOAT8 = True


def hardware_float8(t):
    return (HARDWARE_FLOAT8 and t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"
            and torch.cuda.get_device_capability(t.device) >= (8, 9))

if available:
    @triton.jit
    def _float8_bits(x, MANTISSA: tl.constexpr, BIAS: tl.constexpr, SUBNORMAL_UNITS: tl.constexpr,
                     SMALLEST_NORMAL: tl.constexpr):
        """float32 -> a float8 format with MANTISSA mantissa bits and exponent bias BIAS, rounded to
        nearest even, as its uint8 bits; |x| must not exceed the format's largest value (callers
        clamp or know it). Normal numbers: round the float32 mantissa to MANTISSA bits (a carry moves
        into the exponent, as it should) and rebias the exponent. Below SMALLEST_NORMAL the format
        counts in units of 1/SUBNORMAL_UNITS: |x| * SUBNORMAL_UNITS + 2^23 in float32 rounds that count
        to nearest even. Triton's own float8 cast gave wrong values in a transposed layout on an
        H100 (Triton 3.6), and its interpreter rounds differently from the GPU; this is torch's
        rounding, bit for bit (tests/test_kernels.py). On the GPU _float8_hardware does the same
        in fewer instructions."""
        SHIFT: tl.constexpr = 23 - MANTISSA
        x_bits = x.to(tl.uint32, bitcast=True)
        a = tl.abs(x)
        bits = a.to(tl.uint32, bitcast=True)
        rounded = bits + ((1 << (SHIFT - 1)) - 1) + ((bits >> SHIFT) & 1)
        normal = (((rounded >> 23) - (127 - BIAS)) << MANTISSA) | ((rounded >> SHIFT) & ((1 << MANTISSA) - 1))
        subnormal = ((a * SUBNORMAL_UNITS + 8388608.0) - 8388608.0).to(tl.uint32)
        code = tl.where(a < SMALLEST_NORMAL, subnormal, normal) | ((x_bits >> 24) & 0x80)
        return code.to(tl.uint8)

    @triton.jit
    def _float8_hardware(x, E4M3: tl.constexpr):
        """The same rounding by the GPU's own conversion (PTX cvt.rn.satfinite, compute capability
        8.9+): one instruction per two values, four values per call. Not in the interpreter."""
        if E4M3:
            return tl.inline_asm_elementwise(
                "{ .reg .b16 lo, hi; cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1; cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3;"
                " mov.b32 $0, {lo, hi}; }", "=r,r,r,r,r", [x], dtype=tl.uint8, is_pure=True, pack=4)
        return tl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi; cvt.rn.satfinite.e5m2x2.f32 lo, $2, $1; cvt.rn.satfinite.e5m2x2.f32 hi, $4, $3;"
            " mov.b32 $0, {lo, hi}; }", "=r,r,r,r,r", [x], dtype=tl.uint8, is_pure=True, pack=4)

    @triton.jit
    def _e5m2_bits(x, HARDWARE: tl.constexpr):  # float8_e5m2: gradients (largest value 57344)
        if HARDWARE:
            return _float8_hardware(x, False)
        return _float8_bits(x, 2, 15, 65536.0, 2.0 ** -14)

    @triton.jit
    def _e4m3_bits(x, HARDWARE: tl.constexpr):  # float8_e4m3fn: values (largest value 448)
        if HARDWARE:
            return _float8_hardware(x, True)
        return _float8_bits(x, 3, 7, 512.0, 2.0 ** -6)

    @triton.jit
    def _float8_kernel(x_ptr, out_ptr, n, E4M3: tl.constexpr, HARDWARE: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + i, mask=i < n)
        tl.store(out_ptr + i, _e4m3_bits(x, HARDWARE) if E4M3 else _e5m2_bits(x, HARDWARE), mask=i < n)

    @triton.jit
    def _cross_entropy_grad_kernel(logits_ptr, targets_ptr, loss_ptr, grad_ptr, vocab, grad_scale,
                                   COLS: tl.constexpr, E5M2: tl.constexpr, WIDE: tl.constexpr,
                                   HARDWARE: tl.constexpr):
        # one row per program, both passes: the row (100 KB at the 124M config's vocabulary) is read a
        # second time right after the first, while it may still be in L2 (element offsets in 64 bits
        # only where the logits have 2^31 elements or more: the offset arithmetic costs instructions)
        row = tl.program_id(0)
        target = tl.load(targets_ptr + row)
        row_start = row.to(tl.int64) * vocab if WIDE else row * vocab

        # pass 1: running max and sum of exponentials (online log-sum-exp), one tile at a time
        run_max = tl.full([], float("-inf"), tl.float32)
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

        # pass 2: the gradient softmax - one-hot (in [-1, 1]) times grad_scale (0 on ignored rows)
        row_scale = tl.where(valid, grad_scale, 0.0)
        for start in range(0, vocab, COLS):
            col = start + tl.arange(0, COLS)
            x = tl.load(logits_ptr + row_start + col, mask=col < vocab, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) * row_scale - tl.where(col == target, row_scale, 0.0)
            if E5M2:  # float8 e5m2 as uint8 bits (the pointer is a uint8 view)
                g = _e5m2_bits(g, HARDWARE)
            else:
                g = g.to(grad_ptr.dtype.element_ty)
            tl.store(grad_ptr + row_start + col, g, mask=col < vocab)

    @triton.jit
    def _e4m3_row_scale(amax):
        """448 / amax as fast.to_fp8 computes it: torch's scalar / tensor is reciprocal, then multiply
        (and with IEEE division, not the GPU's faster approximate one), so that both give the same
        scale and hence the same float8 values."""
        return tl.math.div_rn(1.0, tl.maximum(amax, 1e-12)) * 448.0

    @triton.jit
    def _e4m3_scaled(x, scale, HARDWARE: tl.constexpr):
        """x * scale as float8_e4m3fn bits, clamped to its range (448), as fast.to_fp8 casts."""
        return _e4m3_bits(tl.minimum(tl.maximum(x * scale, -448.0), 448.0), HARDWARE)

    @triton.jit
    def _swiglu_backward_kernel(gate_up_ptr, grad_h_ptr, grad_ptr, grad8_ptr, inv_scale_ptr, hidden,
                                FP8: tl.constexpr, HARDWARE: tl.constexpr, BLOCK: tl.constexpr):
        # one row per program: its gate and up halves and the incoming gradient of silu(gate) * up
        row = tl.program_id(0).to(tl.int64)
        col = tl.arange(0, BLOCK)
        ok = col < hidden
        gate = tl.load(gate_up_ptr + row * 2 * hidden + col, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(gate_up_ptr + row * 2 * hidden + hidden + col, mask=ok, other=0.0).to(tl.float32)
        grad_h = tl.load(grad_h_ptr + row * hidden + col, mask=ok, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)  # silu(g) = g sigmoid(g); silu'(g) = sigmoid(g) (1 + g (1 - sigmoid(g)))
        grad_gate = (grad_h * up * sig * (1.0 + gate * (1.0 - sig))).to(grad_ptr.dtype.element_ty)
        grad_up = (grad_h * gate * sig).to(grad_ptr.dtype.element_ty)
        tl.store(grad_ptr + row * 2 * hidden + col, grad_gate, mask=ok)
        tl.store(grad_ptr + row * 2 * hidden + hidden + col, grad_up, mask=ok)
        if FP8:  # the row's float8 copy with one scale, from the values just stored (as to_fp8 would)
            grad_gate, grad_up = grad_gate.to(tl.float32), grad_up.to(tl.float32)
            scale = _e4m3_row_scale(tl.maximum(tl.max(tl.abs(grad_gate)), tl.max(tl.abs(grad_up))))
            tl.store(grad8_ptr + row * 2 * hidden + col, _e4m3_scaled(grad_gate, scale, HARDWARE), mask=ok)
            tl.store(grad8_ptr + row * 2 * hidden + hidden + col, _e4m3_scaled(grad_up, scale, HARDWARE), mask=ok)
            tl.store(inv_scale_ptr + row, tl.math.div_rn(1.0, scale))

    @triton.jit
    def _token_heads(ptr, b, t, stride_b, stride_t, stride_h, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_HEADS: tl.constexpr, BLOCK_DIM: tl.constexpr):
        """One token's heads [HEADS, HEAD_DIM] of a [B, T, heads, head_dim] tensor, in float32."""
        head, col = tl.arange(0, BLOCK_HEADS)[:, None], tl.arange(0, BLOCK_DIM)[None, :]
        at = ptr + b * stride_b + t * stride_t + head * stride_h + col
        return tl.load(at, mask=(head < HEADS) & (col < HEAD_DIM), other=0.0).to(tl.float32)

    @triton.jit
    def _unrotate(x, cos, sin, BLOCK_HEADS: tl.constexpr, BLOCK_DIM: tl.constexpr):
        """x's pairs (2i, 2i+1) of the last dim turned by minus their angle (cos, sin: [1, BLOCK_DIM / 2]):
        the gradient of RoPE's rotation taken back through it."""
        even, odd = tl.split(tl.reshape(x, [BLOCK_HEADS, BLOCK_DIM // 2, 2]))
        return tl.reshape(tl.join(even * cos + odd * sin, odd * cos - even * sin), [BLOCK_HEADS, BLOCK_DIM])

    @triton.jit
    def _qkv_rope_backward_kernel(grad_q_ptr, grad_k_ptr, grad_v_ptr, cos_ptr, sin_ptr, grad_ptr, grad8_ptr,
                                  inv_scale_ptr, seq_len, q_stride_b, q_stride_t, q_stride_h, k_stride_b,
                                  k_stride_t, k_stride_h, v_stride_b, v_stride_t, v_stride_h,
                                  Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                                  BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_DIM: tl.constexpr,
                                  FP8: tl.constexpr, HARDWARE: tl.constexpr):
        # one token per program: the gradients of its rotated q and k heads and of its v heads, written
        # as one row of the stacked [wq; wk; wv] product's output: q heads, k heads, v heads. Whole
        # heads are read and written (contiguous, so vectorised); pairs are split apart in registers.
        row = tl.program_id(0).to(tl.int64)
        b, t = row // seq_len, row % seq_len
        pair = tl.arange(0, BLOCK_DIM // 2)[None, :]
        cos = tl.load(cos_ptr + t * (HEAD_DIM // 2) + pair, mask=pair < HEAD_DIM // 2, other=0.0)
        sin = tl.load(sin_ptr + t * (HEAD_DIM // 2) + pair, mask=pair < HEAD_DIM // 2, other=0.0)
        dtype = grad_ptr.dtype.element_ty
        q = _unrotate(_token_heads(grad_q_ptr, b, t, q_stride_b, q_stride_t, q_stride_h, Q_HEADS, HEAD_DIM,
                                   BLOCK_Q, BLOCK_DIM), cos, sin, BLOCK_Q, BLOCK_DIM).to(dtype)
        k = _unrotate(_token_heads(grad_k_ptr, b, t, k_stride_b, k_stride_t, k_stride_h, KV_HEADS, HEAD_DIM,
                                   BLOCK_KV, BLOCK_DIM), cos, sin, BLOCK_KV, BLOCK_DIM).to(dtype)
        v = _token_heads(grad_v_ptr, b, t, v_stride_b, v_stride_t, v_stride_h, KV_HEADS, HEAD_DIM,
                         BLOCK_KV, BLOCK_DIM).to(dtype)  # v is not rotated
        col = tl.arange(0, BLOCK_DIM)[None, :]
        q_head, kv_head = tl.arange(0, BLOCK_Q)[:, None], tl.arange(0, BLOCK_KV)[:, None]
        q_ok, kv_ok = (q_head < Q_HEADS) & (col < HEAD_DIM), (kv_head < KV_HEADS) & (col < HEAD_DIM)
        row_at = row * (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM
        q_at = row_at + q_head * HEAD_DIM + col
        k_at = row_at + (Q_HEADS + kv_head) * HEAD_DIM + col
        v_at = k_at + KV_HEADS * HEAD_DIM
        tl.store(grad_ptr + q_at, q, mask=q_ok)
        tl.store(grad_ptr + k_at, k, mask=kv_ok)
        tl.store(grad_ptr + v_at, v, mask=kv_ok)
        if FP8:  # the row's float8 copy with one scale, from the values just stored (as to_fp8 would)
            q, k, v = q.to(tl.float32), k.to(tl.float32), v.to(tl.float32)
            scale = _e4m3_row_scale(tl.maximum(tl.max(tl.abs(q)), tl.maximum(tl.max(tl.abs(k)), tl.max(tl.abs(v)))))
            tl.store(grad8_ptr + q_at, _e4m3_scaled(q, scale, HARDWARE), mask=q_ok)
            tl.store(grad8_ptr + k_at, _e4m3_scaled(k, scale, HARDWARE), mask=kv_ok)
            tl.store(grad8_ptr + v_at, _e4m3_scaled(v, scale, HARDWARE), mask=kv_ok)
            tl.store(inv_scale_ptr + row, tl.math.div_rn(1.0, scale))

    @triton.jit
    def _add_pairs(a, b, c, d):
        return a + c, b + d

    @triton.jit
    def _residual_norm_backward_kernel(grad_out_ptr, grad_normed_ptr, x_ptr, weight_ptr, grad_ptr, grad8_ptr,
                                       inv_scale_ptr, partial_ptr, rows, dim, eps, TILE: tl.constexpr,
                                       TILES: tl.constexpr, STAGES: tl.constexpr, BLOCK: tl.constexpr,
                                       FP8: tl.constexpr, HARDWARE: tl.constexpr):
        # TILES tiles of TILE rows per program. Per row: the RMSNorm's input gradient (its rows' sums
        # recomputed from x) plus the gradient that came down the residual stream, stored, and (fp8)
        # its float8 copy. The norm weight's gradient, a sum over all rows, is summed over this
        # program's rows in registers (element by element, one sum down the tile at the end) and
        # stored as one partial row, which the caller adds up.
        col = tl.arange(0, BLOCK)[None, :]
        col_ok = col < dim
        weight = tl.load(weight_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
        grad_weight = tl.zeros([TILE, BLOCK], tl.float32)
        for tile in tl.range(TILES, num_stages=STAGES):  # STAGES: later tiles' loads start early
            row = (tl.program_id(0) * TILES + tile) * TILE + tl.arange(0, TILE)[:, None].to(tl.int64)
            ok = (row < rows) & col_ok
            at = row * dim + col
            x = tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float32)
            grad_normed = tl.load(grad_normed_ptr + at, mask=ok, other=0.0).to(tl.float32)
            grad_out = tl.load(grad_out_ptr + at, mask=ok, other=0.0).to(tl.float32)
            grad_hat = grad_normed * weight  # the gradient of the normalised x, before the weight
            # both of a row's sums in one reduction (one exchange between the warps, not two)
            sum_squares, sum_grad_x = tl.reduce((x * x, grad_hat * x), 1, _add_pairs)
            rstd = 1.0 / tl.sqrt(sum_squares[:, None] / dim + eps)
            x_hat = x * rstd
            grad = grad_out + rstd * (grad_hat - x_hat * (rstd * sum_grad_x[:, None] / dim))
            grad = grad.to(grad_ptr.dtype.element_ty)
            tl.store(grad_ptr + at, grad, mask=ok)
            grad_weight += grad_normed * x_hat
            if FP8:  # each row's float8 copy with one scale, from the values just stored (as to_fp8 would)
                grad = grad.to(tl.float32)
                scale = _e4m3_row_scale(tl.max(tl.abs(grad), 1)[:, None])
                tl.store(grad8_ptr + at, _e4m3_scaled(grad, scale, HARDWARE), mask=ok)
                tl.store(inv_scale_ptr + row, tl.math.div_rn(1.0, scale), mask=row < rows)
        tl.store(partial_ptr + tl.program_id(0) * dim + col, tl.sum(grad_weight, 0)[None, :], mask=col_ok)

    @triton.jit
    def _transpose_kernel(x_ptr, out_ptr, rows, cols, BLOCK: tl.constexpr):
        # one BLOCK x BLOCK tile per program: read along x's rows, written along out's rows
        row = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = (row < rows)[:, None] & (col < cols)[None, :]
        x = tl.load(x_ptr + row[:, None].to(tl.int64) * cols + col[None, :], mask=ok)
        tl.store(out_ptr + col[:, None].to(tl.int64) * rows + row[None, :], tl.trans(x), mask=tl.trans(ok))

    # Causal attention (model.Attention with sdpa_kernel "triton"): q [B, T, heads, D] and k, v
    # [B, T, kv heads, D] read in the layout the q/k/v product makes (no transposed copies), the
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
    and, if `transposed`, the same gradient as [vocab, rows] (else an empty tensor). The transposed
    copy comes from a transpose kernel afterwards: a loss kernel writing it too needs blocks of 32
    rows per program (32-byte runs of the transposed copy), and with ~1,000 such blocks in flight
    their second read of the logits cannot come from L2 (docs/BENCHMARKS.md: 4.5 ms against
    2.7 + 1.2 ms at the 124M config)."""
    rows, vocab = logits.shape
    assert logits.is_contiguous() and targets.shape == (rows,), "logits [rows, vocab] contiguous, targets [rows]"
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    grad = torch.empty(rows, vocab, dtype=grad_dtype, device=logits.device)
    e5m2 = grad_dtype == torch.float8_e5m2
    assert e5m2 or grad_dtype.itemsize > 1, "float8 gradients: e5m2 only"
    _cross_entropy_grad_kernel[(rows,)](
        logits, targets, loss, grad.view(torch.uint8) if e5m2 else grad, vocab, grad_scale, COLS=COLS, E5M2=e5m2,
        WIDE=rows * vocab >= 2 ** 31, HARDWARE=hardware_float8(logits), num_warps=WARPS, num_stages=STAGES)
    grad_t = transpose_triton(grad) if transposed else grad.new_empty(0)
    return loss, grad, grad_t


def transpose_triton(x, block=128, warps=8):
    """x [rows, cols] contiguous -> x.t().contiguous(), tile by tile (float8 moved as its bytes)."""
    rows, cols = x.shape
    assert x.is_contiguous()
    out = torch.empty(cols, rows, dtype=x.dtype, device=x.device)
    bits = (lambda t: t.view(torch.uint8)) if x.element_size() == 1 else (lambda t: t)
    _transpose_kernel[(triton.cdiv(rows, block), triton.cdiv(cols, block))](
        bits(x), bits(out), rows, cols, BLOCK=block, num_warps=warps)
    return out

def to_float8_triton(x, dtype):
    """float32 tensor -> float8 (e4m3fn or e5m2) through the kernels' rounding: for the tests."""
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    _float8_kernel[(triton.cdiv(x.numel(), 1024),)](x.contiguous(), out.view(torch.uint8), x.numel(),
                                                   E4M3=dtype == torch.float8_e4m3fn, HARDWARE=hardware_float8(x),
                                                   BLOCK=1024)
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


def swiglu_backward_reference(gate_up, grad_h):
    """The gradient of silu(gate) * up with respect to gate_up = [gate | up] (the stacked [w1; w3]
    product), computed in float32 and returned in gate_up's dtype: the path off CUDA."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    grad_h = grad_h.float()
    return torch.cat([grad_h * up * sig * (1 + gate * (1 - sig)), grad_h * gate * sig], dim=-1).to(gate_up.dtype)


def swiglu_backward_triton(gate_up, grad_h, fp8):
    """The kernel: gate_up [rows, 2 hidden] and grad_h [rows, hidden], contiguous. Returns the gradient
    of gate_up in its dtype and, if fp8, its float8_e4m3fn copy scaled per row and the inverse scales
    [rows, 1] (fast.to_fp8's layout); else two empty tensors."""
    rows, hidden = grad_h.shape
    assert gate_up.is_contiguous() and grad_h.is_contiguous() and gate_up.shape == (rows, 2 * hidden)
    grad, grad8, inv_scale = _row_grad_outputs(gate_up, rows, 2 * hidden, fp8)
    block = triton.next_power_of_2(hidden)
    _swiglu_backward_kernel[(rows,)](gate_up, grad_h, grad, grad8.view(torch.uint8), inv_scale, hidden,
                                     FP8=fp8, HARDWARE=hardware_float8(gate_up), BLOCK=block,
                                     num_warps=8 if block >= 2048 else 4)
    return grad, grad8, inv_scale


def qkv_rope_backward_reference(grad_q, grad_k, grad_v, cos, sin):
    """The gradients of RoPE-rotated q, k (and of v), [B, T, heads, head_dim], taken back through the
    rotation (turning each pair by minus its angle) and laid out as the rows of the stacked
    [wq; wk; wv] product's output: [B * T, (q heads + 2 kv heads) * head_dim]. The path off CUDA."""
    def unrotate(g):
        even, odd = g.float()[..., 0::2], g.float()[..., 1::2]
        c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
        return torch.stack((even * c + odd * s, odd * c - even * s), dim=-1).flatten(-3).to(g.dtype)
    B, T = grad_q.shape[:2]
    return torch.cat([unrotate(grad_q), unrotate(grad_k), grad_v.flatten(-2)], dim=-1).view(B * T, -1)


def qkv_rope_backward_triton(grad_q, grad_k, grad_v, cos, sin, fp8):
    """The kernel: grad_q [B, T, q heads, head_dim], grad_k and grad_v [B, T, kv heads, head_dim]
    (any strides, head_dim contiguous), cos and sin [T, head_dim / 2] contiguous float32. Returns what
    qkv_rope_backward_reference does and, if fp8, its float8_e4m3fn copy scaled per row and the inverse
    scales [rows, 1]; else two empty tensors."""
    B, T, q_heads, head_dim = grad_q.shape
    kv_heads = grad_k.size(2)
    assert grad_k.shape == grad_v.shape == (B, T, kv_heads, head_dim) and head_dim % 2 == 0
    assert grad_q.stride(-1) == grad_k.stride(-1) == grad_v.stride(-1) == 1, "head_dim must be contiguous"
    assert cos.shape == sin.shape == (T, head_dim // 2) and cos.is_contiguous() and sin.is_contiguous()
    rows, width = B * T, (q_heads + 2 * kv_heads) * head_dim
    grad, grad8, inv_scale = _row_grad_outputs(grad_q, rows, width, fp8)
    _qkv_rope_backward_kernel[(rows,)](
        grad_q, grad_k, grad_v, cos, sin, grad, grad8.view(torch.uint8), inv_scale, T,
        *grad_q.stride()[:3], *grad_k.stride()[:3], *grad_v.stride()[:3],
        Q_HEADS=q_heads, KV_HEADS=kv_heads, HEAD_DIM=head_dim, BLOCK_Q=triton.next_power_of_2(q_heads),
        BLOCK_KV=triton.next_power_of_2(kv_heads), BLOCK_DIM=triton.next_power_of_2(head_dim), FP8=fp8,
        HARDWARE=hardware_float8(grad_q), num_warps=4)
    return grad, grad8, inv_scale


def residual_norm_backward_reference(grad_out, grad_normed, x, weight, eps):
    """The backward of out = rms_norm(x) * weight (x [rows, dim]) for a residual stream x whose own
    gradient grad_out comes down from the layers above: x's whole gradient, grad_out plus the norm's
    (in x's dtype), and the norm weight's (float32). The path off CUDA (PyTorch ops)."""
    x = x.float()
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    x_hat, grad_normed = x * rstd, grad_normed.float()
    grad_hat = grad_normed * weight.float()
    grad = grad_out.float() + rstd * (grad_hat - x_hat * (grad_hat * x_hat).mean(-1, keepdim=True))
    return grad.to(grad_out.dtype), (grad_normed * x_hat).sum(0)


# the residual-norm backward kernel's rows per tile, tiles per program, warps and pipeline stages of its loop
# over the tiles: picked with bench_kernels.py norm (docs/BENCHMARKS.md)
NORM_TILE, NORM_TILES, NORM_WARPS, NORM_STAGES = 1, 64, 4, 4


def residual_norm_backward_triton(grad_out, grad_normed, x, weight, eps, fp8, tile=None, tiles=None, warps=None,
                                  stages=None):
    """The kernel: grad_out, grad_normed and x [rows, dim] contiguous, weight [dim]. Returns what
    residual_norm_backward_reference does, with (if fp8) x's gradient's float8_e4m3fn copy scaled per
    row and the inverse scales [rows, 1] (else two empty tensors) between: grad, grad8, inv_scale,
    grad_weight."""
    rows, dim = x.shape
    assert grad_out.shape == grad_normed.shape == x.shape and weight.shape == (dim,)
    assert grad_out.is_contiguous() and grad_normed.is_contiguous() and x.is_contiguous()
    tile, tiles, warps, stages = tile or NORM_TILE, tiles or NORM_TILES, warps or NORM_WARPS, stages or NORM_STAGES
    programs = triton.cdiv(rows, tile * tiles)
    grad, grad8, inv_scale = _row_grad_outputs(grad_out, rows, dim, fp8)
    partial = torch.empty(programs, dim, dtype=torch.float32, device=x.device)
    _residual_norm_backward_kernel[(programs,)](
        grad_out, grad_normed, x, weight, grad, grad8.view(torch.uint8), inv_scale, partial, rows, dim, eps,
        TILE=tile, TILES=tiles, STAGES=stages, BLOCK=triton.next_power_of_2(dim), FP8=fp8, HARDWARE=hardware_float8(x),
        num_warps=warps)
    return grad, grad8, inv_scale, partial.sum(0)


def _row_grad_outputs(like, rows, width, fp8):
    """The outputs of a row kernel: a gradient [rows, width] in like's dtype; with fp8 its
    float8_e4m3fn copy and inverse row scales [rows, 1], else empty tensors in their place."""
    grad = torch.empty(rows, width, dtype=like.dtype, device=like.device)
    grad8 = torch.empty((rows, width) if fp8 else (0,), dtype=torch.float8_e4m3fn, device=like.device)
    inv_scale = torch.empty((rows, 1) if fp8 else (0,), dtype=torch.float32, device=like.device)
    return grad, grad8, inv_scale


@torch.library.custom_op("nano::swiglu_backward", mutates_args=())
def swiglu_backward(gate_up: torch.Tensor, grad_h: torch.Tensor, fp8: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return swiglu_backward_triton(gate_up, grad_h, fp8)


@swiglu_backward.register_fake
def _(gate_up, grad_h, fp8):
    return _row_grad_outputs(gate_up, grad_h.size(0), gate_up.size(1), fp8)


@torch.library.custom_op("nano::qkv_rope_backward", mutates_args=())
def qkv_rope_backward(grad_q: torch.Tensor, grad_k: torch.Tensor, grad_v: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, fp8: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return qkv_rope_backward_triton(grad_q, grad_k, grad_v, cos, sin, fp8)


@qkv_rope_backward.register_fake
def _(grad_q, grad_k, grad_v, cos, sin, fp8):
    B, T, q_heads, head_dim = grad_q.shape
    return _row_grad_outputs(grad_q, B * T, (q_heads + 2 * grad_k.size(2)) * head_dim, fp8)


@torch.library.custom_op("nano::residual_norm_backward", mutates_args=())
def residual_norm_backward(grad_out: torch.Tensor, grad_normed: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                           eps: float, fp8: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return residual_norm_backward_triton(grad_out, grad_normed, x, weight, eps, fp8)


@residual_norm_backward.register_fake
def _(grad_out, grad_normed, x, weight, eps, fp8):
    return (*_row_grad_outputs(grad_out, *x.shape, fp8), weight.new_empty(weight.shape, dtype=torch.float32))


# Block sizes of the attention kernels (queries x keys per inner step), warps and pipeline stages:
# picked with bench_kernels.py attention (docs/BENCHMARKS.md). Forward and dq kernel: BLOCK_M a
# multiple of BLOCK_N; dk/dv kernel: BLOCK_N a multiple of BLOCK_M (the diagonal blocks start on a
# step boundary).
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
