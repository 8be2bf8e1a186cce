# kernels.py's Triton kernels against PyTorch's arithmetic: on a GPU compiled, on a CPU in Triton's
# interpreter (tests/conftest.py sets TRITON_INTERPRET=1 there)
import pytest
import torch
import torch.nn.functional as F

import kernels
from fast import FP8_GRADS, HeadCrossEntropy

pytestmark = pytest.mark.skipif(not kernels.available, reason="Triton is not installed (requirements-dev.txt has it)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference_loss_grad(logits, targets):
    """Per-row loss and softmax - one-hot in float32, 0 on ignored rows (targets of -1)."""
    rows = logits.float()
    loss = F.cross_entropy(rows, targets, ignore_index=-1, reduction="none")
    grad = torch.softmax(rows, dim=1)
    grad[torch.arange(len(targets)), targets.clamp(min=0)] -= 1
    grad[targets < 0] = 0
    return loss, grad


# vocabularies of one column step (128), of several with a ragged last one (300, 1000), and within the
# shipped step; logits whose spread puts most of a row's probability on a few entries, as trained
# models do
@pytest.mark.parametrize("rows,vocab", [(70, 300), (32, 128), (5, 1000)])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cols", [128, kernels.COLS])
def test_cross_entropy_grad_matches_pytorch(monkeypatch, rows, vocab, grad_dtype, cols):
    monkeypatch.setattr(kernels, "COLS", cols)
    torch.manual_seed(rows + vocab)
    logits = (torch.randn(rows, vocab, device=DEVICE) * 4).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (rows,), device=DEVICE)
    targets[::4] = -1
    loss, grad, grad_t = kernels.cross_entropy_grad_triton(logits, targets, grad_dtype, 3.0, transposed=True)
    ref_loss, ref_grad = reference_loss_grad(logits, targets)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert torch.all(loss[::4] == 0)
    tol = 1e-6 if grad_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad.float(), 3 * ref_grad, rtol=tol, atol=tol)
    assert torch.equal(grad_t, grad.t())  # the same values in the transposed layout
    if grad_dtype == torch.float32:  # softmax - one-hot sums to 0 in every row
        assert grad.sum(dim=1).abs().max() < 1e-5
    _, _, none = kernels.cross_entropy_grad_triton(logits, targets, grad_dtype, 3.0, transposed=False)
    assert none.numel() == 0


@pytest.mark.parametrize("rows,cols", [(70, 300), (128, 128), (1, 5), (300, 129)])
@pytest.mark.parametrize("dtype", [torch.float8_e5m2, torch.bfloat16, torch.float32])
def test_transpose_moves_every_element(rows, cols, dtype):
    x = torch.randint(0, 256, (rows, cols), dtype=torch.uint8, device=DEVICE)
    x = x.view(dtype) if dtype.itemsize == 1 else x.to(dtype) * 1.5 - 7
    for block, warps in ((128, 8), (32, 4)):
        out = kernels.transpose_triton(x, block, warps)
        assert out.shape == (cols, rows) and out.dtype == dtype
        bits = (lambda t: t.view(torch.uint8)) if dtype.itemsize == 1 else (lambda t: t)
        assert torch.equal(bits(out), bits(x).t())  # float8 as bits: torch.equal is not reliable for it


@pytest.mark.parametrize("dtype", [torch.float8_e5m2, torch.float8_e4m3fn])
def test_float8_rounding_matches_torch_everywhere(dtype):
    # every float8 value (both signs, subnormals included), the midpoints between neighbours (ties go to
    # the even neighbour) and points just beside those (which must go to the nearer one)
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()
    values = values[values.isfinite()].sort().values
    mids = (values[1:] + values[:-1]) / 2
    beside = torch.cat([torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1),
                        mids * (1 + 2 ** -12), mids * (1 - 2 ** -12)])
    x = torch.cat([values, mids, beside, torch.randn(100_000) * 1000, torch.randn(100_000) * 1e-4])
    x = x[x.abs() <= torch.finfo(dtype).max].to(DEVICE)
    got = kernels.to_float8_triton(x, dtype).view(torch.uint8)
    want = x.to(dtype).view(torch.uint8)
    assert torch.equal(got, want), x[got != want][:10]


def test_cross_entropy_grad_in_float8_matches_torch_in_both_layouts():
    torch.manual_seed(0)
    rows, vocab = (256, 50304) if DEVICE == "cuda" else (96, 3000)
    logits = (torch.randn(rows, vocab, device=DEVICE) * 4).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (rows,), device=DEVICE)
    top = torch.finfo(FP8_GRADS).max
    _, grad, grad_t = kernels.cross_entropy_grad_triton(logits, targets, FP8_GRADS, top, transposed=True)
    _, ref_grad = reference_loss_grad(logits, targets)
    ref = (ref_grad * top).to(FP8_GRADS).float()
    # the same float8 value, or its neighbour where exp() differs in the last float32 bit at a tie
    assert (grad.float() != ref).float().mean() < 1e-4
    torch.testing.assert_close(grad.float(), ref, rtol=0.25, atol=1e-3)
    assert torch.equal(grad_t.view(torch.uint8), grad.view(torch.uint8).t())


@pytest.mark.parametrize("compiled", [False, True])
def test_head_cross_entropy_with_the_kernel_matches_the_pytorch_path(monkeypatch, compiled):
    # model.HeadCrossEntropy served by the kernel (on a CPU only when the test asks) gives the loss and
    # gradients of its PyTorch path; compiled, the custom op's fake version gives Inductor the shapes
    torch.manual_seed(0)
    x = torch.randn(70, 32, device=DEVICE, requires_grad=True)
    w = (torch.randn(300, 32, device=DEVICE) * 0.3).requires_grad_()
    targets = torch.randint(0, 300, (70,), device=DEVICE)
    targets[::5] = -1

    def run(use_kernel):
        monkeypatch.setattr(kernels, "runs_on", lambda t: use_kernel)
        x.grad = w.grad = None
        step = (lambda a, b, t: HeadCrossEntropy.apply(a, b, t, False, False))
        if compiled:
            torch._dynamo.reset()
            step = torch.compile(step)
        loss, logits = step(x, w, targets)
        (loss * 2).backward()
        return loss.detach(), logits.detach(), x.grad.clone(), w.grad.clone()

    for got, ref, name in zip(run(True), run(False), ("loss", "logits", "grad x", "grad w")):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6, msg=name)


def check_row_float8(grad, grad8, inv_scale):
    """grad8 * inv_scale is grad's per-row float8 copy, bit for bit what model.to_fp8 makes of grad
    (the same scales, the same rounding), and within float8's precision of grad."""
    from fast import to_fp8
    ref8, ref_inv = to_fp8(grad, per_row=True)
    assert torch.equal(inv_scale, ref_inv)
    assert torch.equal(grad8.view(torch.uint8), ref8.view(torch.uint8))
    # e4m3: 3 mantissa bits (relative error <= 1/16) down to its subnormals (steps of 2^-9 x the scale)
    error = (grad8.float() * inv_scale - grad.float()).abs()
    assert torch.all(error <= grad.float().abs() / 16 + inv_scale * 2 ** -10)


@pytest.mark.parametrize("rows,hidden", [(3, 64), (5, 176), (2, 1408)])
@pytest.mark.parametrize("fp8", [False, True])
def test_swiglu_backward_matches_autograd(rows, hidden, fp8):
    torch.manual_seed(hidden)
    gate_up = (torch.randn(rows, 2 * hidden, device=DEVICE) * 2).to(torch.bfloat16)
    grad_h = torch.randn(rows, hidden, device=DEVICE).to(torch.bfloat16)
    leaf = gate_up.float().requires_grad_()
    gate, up = leaf.chunk(2, dim=-1)
    (F.silu(gate) * up).backward(grad_h.float())
    grad, grad8, inv_scale = kernels.swiglu_backward_triton(gate_up, grad_h, fp8)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad.float(), leaf.grad, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grad, kernels.swiglu_backward_reference(gate_up, grad_h), rtol=1e-2, atol=1e-5)
    if fp8:
        check_row_float8(grad, grad8, inv_scale)
    else:
        assert grad8.numel() == inv_scale.numel() == 0


@pytest.mark.parametrize("q_heads,kv_heads,head_dim", [(4, 4, 16), (6, 2, 8), (3, 1, 12)])
@pytest.mark.parametrize("fp8", [False, True])
def test_qkv_rope_backward_matches_autograd(q_heads, kv_heads, head_dim, fp8):
    # the gradients of rope(q), rope(k), v taken back to the stacked q/k/v product's rows, from
    # gradients in the strided [B, H, T, D]-transposed layout that attention kernels return
    from model import apply_rope as rope_real, rope_tables
    torch.manual_seed(q_heads * head_dim)
    B, T = 2, 5
    cos, sin = rope_tables(head_dim, T, 10000.0)
    cos, sin = cos.to(DEVICE), sin.to(DEVICE)
    qkv = torch.randn(B, T, (q_heads + 2 * kv_heads) * head_dim, device=DEVICE, requires_grad=True)
    q, k, v = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    outs = (rope_real(q.unflatten(-1, (q_heads, head_dim)), cos, sin),
            rope_real(k.unflatten(-1, (kv_heads, head_dim)), cos, sin), v.unflatten(-1, (kv_heads, head_dim)))
    grads = [torch.randn(o.transpose(1, 2).shape, device=DEVICE).to(torch.bfloat16).transpose(1, 2) for o in outs]
    assert not grads[0].is_contiguous()
    torch.autograd.backward(outs, [g.float() for g in grads])
    grad, grad8, inv_scale = kernels.qkv_rope_backward_triton(*grads, cos, sin, fp8)
    assert grad.shape == (B * T, qkv.size(-1)) and grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad.float(), qkv.grad.view(B * T, -1), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grad, kernels.qkv_rope_backward_reference(*grads, cos, sin), rtol=1e-2, atol=1e-5)
    if fp8:
        check_row_float8(grad, grad8, inv_scale)


# widths below and between powers of two (48, 200; 768 is the 124M config's), rows that leave the last
# program's tiles ragged, and tilings of one and of several rows per tile
@pytest.mark.parametrize("rows,dim", [(7, 48), (70, 200), (33, 768)])
@pytest.mark.parametrize("tiling", [(1, 4), (4, 2)])
@pytest.mark.parametrize("fp8", [False, True])
def test_residual_norm_backward_matches_autograd(rows, dim, tiling, fp8):
    # the gradient of a residual stream x that is normalised (out = rms_norm(x) * w) and also carried
    # on: the norm's gradient plus the one from above, and the norm weight's gradient
    torch.manual_seed(rows + dim)
    eps = 1e-5
    x = (torch.randn(rows, dim, device=DEVICE) * 3).to(torch.bfloat16)
    weight = torch.rand(dim, device=DEVICE) + 0.5
    grad_out = torch.randn(rows, dim, device=DEVICE).to(torch.bfloat16)
    grad_normed = torch.randn(rows, dim, device=DEVICE).to(torch.bfloat16)
    leaf, leaf_weight = x.float().requires_grad_(), weight.clone().requires_grad_()
    (F.rms_norm(leaf, (dim,), eps=eps) * leaf_weight).backward(grad_normed.float())
    want = grad_out.float() + leaf.grad
    grad, grad8, inv_scale, grad_weight = kernels.residual_norm_backward_triton(
        grad_out, grad_normed, x, weight, eps, fp8, *tiling, 4)
    assert grad.dtype == torch.bfloat16 and grad_weight.dtype == torch.float32
    torch.testing.assert_close(grad.float(), want, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grad_weight, leaf_weight.grad, rtol=1e-4, atol=1e-3)
    ref_grad, ref_weight = kernels.residual_norm_backward_reference(grad_out, grad_normed, x, weight, eps)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(grad_weight, ref_weight, rtol=1e-4, atol=1e-4)
    if fp8:
        check_row_float8(grad, grad8, inv_scale)
    else:
        assert grad8.numel() == inv_scale.numel() == 0


# the attention kernels' inputs in half precision: float16 on the CPU (Triton 3.9's interpreter
# multiplies bfloat16 tiles wrongly: tl.dot of two bfloat16 16 x 16 tiles is off by ~1e10 there, while
# the same tiles in float16 or float32 are right), bfloat16, what training gives them, on a GPU
HALF = torch.bfloat16 if DEVICE == "cuda" else torch.float16


# shapes: a ragged last block (T 37, 50) and whole ones (64), grouped-query heads (2 and 3 per kv
# head) and plain ones, head_dim below the kernels' 16-wide tiles (8, padded) and between powers of
# two (24); block settings of each kind: several key steps per query block and the reverse
@pytest.mark.parametrize("B,T,heads,kv_heads,head_dim", [(2, 37, 4, 2, 16), (1, 64, 2, 2, 32), (1, 50, 3, 1, 24),
                                                         (2, 20, 2, 1, 8)])
@pytest.mark.parametrize("blocks", [((32, 16), (32, 16), (16, 32)), ((16, 16), (16, 16), (16, 16))])
def test_attention_kernels_match_autograd(B, T, heads, kv_heads, head_dim, blocks):
    torch.manual_seed(T * heads)
    # q, k and v as strided views of one q/k/v product's rows, as model.Attention hands them over
    qkv = torch.randn(B, T, heads + 2 * kv_heads, head_dim, device=DEVICE).to(HALF)
    q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=2)
    assert not q.is_contiguous()
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    scale = head_dim ** -0.5
    ref = kernels.attention_reference(*leaves, scale)
    grad_out = torch.randn_like(ref).to(HALF)
    ref.backward(grad_out.float())
    (fm, fn), (qm, qn), (km, kn) = blocks
    out, lse = kernels.attention_forward_triton(q, k, v, scale, dict(BLOCK_M=fm, BLOCK_N=fn))
    assert out.shape == q.shape and out.dtype == HALF and out.is_contiguous()
    # the log2-sum-exp2 of each row's scaled causal scores, which the backward recomputes the weights from
    scores = (leaves[0].transpose(1, 2) @ leaves[1].repeat_interleave(heads // kv_heads, 2).permute(0, 2, 3, 1)) * scale
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=DEVICE).tril(), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1) / 0.6931471805599453, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)
    grads = kernels.attention_backward_triton(q, k, v, out, lse, grad_out, scale, dict(BLOCK_M=qm, BLOCK_N=qn),
                                              dict(BLOCK_M=km, BLOCK_N=kn))
    for got, leaf, name in zip(grads, leaves, "qkv"):
        assert got.shape == leaf.shape and got.dtype == HALF, name
        torch.testing.assert_close(got.float(), leaf.grad, rtol=2e-2, atol=2e-2, msg=f"grad {name}")


@pytest.mark.parametrize("compiled", [False, True])
def test_model_with_triton_attention_matches_sdpa(monkeypatch, compiled):
    # a model with sdpa_kernel "triton" through the fast path (its kernels on a CPU only when the test
    # asks), one training step under autocast, gives the loss and gradients of the SDPA path; compiled, the custom ops'
    # fake versions give Inductor the shapes
    from fast import FastTransformer
    from model import ModelConfig, Transformer
    torch.manual_seed(0)
    cfg = ModelConfig(block_size=24, vocab_size=64, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, n_hidden=96,
                      sdpa_kernel="triton")
    model = FastTransformer(Transformer(cfg).to(DEVICE)).train()  # the fast path runs sdpa_kernel "triton"
    idx = torch.randint(0, 64, (2, 24), device=DEVICE)
    calls = []
    forward = kernels.attention_forward_triton
    monkeypatch.setattr(kernels, "attention_forward_triton", lambda *a: calls.append(1) or forward(*a))

    def run(use_kernels):
        monkeypatch.setattr(kernels, "runs_on", lambda t: use_kernels)
        model.zero_grad()
        step = model
        if compiled:
            torch._dynamo.reset()
            step = torch.compile(model)
        with torch.autocast(DEVICE, dtype=HALF):  # as training runs it: q, k and v come in HALF
            _, loss = step(idx, idx)
        loss.backward()
        return [loss.detach().float()] + [p.grad.float() for p in model.parameters()]

    got, ref = run(True), run(False)
    assert len(calls) == cfg.n_layer  # the kernels ran, once per layer
    # each gradient within 1% of its largest entry (half precision's noise here: up to 0.2%; a dq
    # with its softmax correction 10% off moved the q/k/v weights' by 24%)
    for i, (g, r) in enumerate(zip(got, ref)):
        assert (g - r).abs().max() <= 1e-2 * r.abs().max(), f"entry {i} (0: loss, then the parameters' gradients)"
