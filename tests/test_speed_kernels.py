# speed_kernels.py's Triton kernels against PyTorch's arithmetic and autograd: on a GPU compiled, on
# the CPU in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 there), and the modules
# that bring them in (speed.FusedLossHead with loss_kernel, speed.TritonAttention) against model.py's
import pytest
import torch
import torch.nn.functional as F

import speed
import speed_kernels
from model import ModelConfig, ScaledDotProduct, Transformer

pytestmark = pytest.mark.skipif(speed_kernels.triton is None,
                                reason="Triton is not installed (requirements-dev.txt has it)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the attention kernels' inputs in half precision: float16 on the CPU (Triton's interpreter multiplies
# bfloat16 tiles wrongly: tl.dot of two bfloat16 16 x 16 tiles was off by ~1e10 there, while the same
# tiles in float16 or float32 are right), bfloat16, what training gives them, on a GPU
HALF = torch.bfloat16 if DEVICE == "cuda" else torch.float16


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float8_e5m2])
def test_loss_kernel_matches_its_reference_and_pytorch(grad_dtype):
    """The Triton loss kernel (in the interpreter) against cross_entropy_grad_reference and against
    F.cross_entropy's own gradient: per-row losses, the gradient in each dtype (float8 rounded as
    torch rounds, bit for bit), the transposed copy, ignored rows, a vocabulary that is no multiple
    of the kernel's tile, and logits in bf16."""
    torch.manual_seed(0)
    rows, vocab = 9, 333
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # compiled on a GPU, else Triton's interpreter
    for logits_dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(rows, vocab) * 4).to(logits_dtype).to(dev)
        targets = torch.randint(0, vocab, (rows,)).to(dev)
        targets[[2, 5]] = -1
        scale = torch.finfo(grad_dtype).max if grad_dtype == torch.float8_e5m2 else 3.0
        transposed = grad_dtype == torch.float8_e5m2
        loss, grad, grad_t = speed_kernels.cross_entropy_grad_triton(logits, targets, grad_dtype, scale, transposed)
        ref_loss, ref_grad, ref_grad_t = speed_kernels.cross_entropy_grad_reference(logits, targets, grad_dtype, scale,
                                                                            transposed)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        assert loss[[2, 5]].eq(0).all() and grad[[2, 5]].float().eq(0).all()
        assert grad.dtype == grad_dtype and grad.shape == (rows, vocab)
        g, r = grad.float(), ref_grad.float()
        if grad_dtype == torch.float8_e5m2:  # the same rounding: equal but where fp32 sums differ in the last bit
            assert (g == r).float().mean() > 0.995 and ((g - r).abs() <= 0.25 * r.abs() + 1e-6).all()
            assert torch.equal(grad_t.view(torch.uint8), grad.t().contiguous().view(torch.uint8))
        else:
            torch.testing.assert_close(g, r, rtol=1e-2 if grad_dtype == torch.bfloat16 else 1e-5, atol=1e-5)
            assert grad_t.numel() == 0
        # against autograd: the mean loss over valid rows and its gradient (count x grad / scale)
        x = logits.float().clone().requires_grad_()
        F.cross_entropy(x, targets, ignore_index=-1).backward()
        count = (targets >= 0).sum()
        torch.testing.assert_close(loss.sum() / count, F.cross_entropy(logits.float(), targets, ignore_index=-1),
                                   rtol=1e-5, atol=1e-5)
        tol = dict(rtol=0.25, atol=1e-6) if grad_dtype == torch.float8_e5m2 else dict(rtol=1e-2, atol=1e-5)
        torch.testing.assert_close(g / scale, x.grad * count, **tol)


def test_transpose_moves_every_element():
    # the float8 gradient's [vocab, rows] copy, for sizes that are no multiple of the tile
    for rows, cols in ((5, 7), (130, 300)):
        x = torch.arange(rows * cols, dtype=torch.float32, device=DEVICE).view(rows, cols)
        loss_input = x / x.max()  # any values: the transpose runs on every dtype the loss gives it
        _, grad, grad_t = speed_kernels.cross_entropy_grad_triton(
            loss_input, torch.zeros(rows, dtype=torch.long, device=DEVICE), torch.float8_e5m2, 1.0, True)
        assert grad_t.shape == (cols, rows)
        assert torch.equal(grad_t.view(torch.uint8), grad.t().contiguous().view(torch.uint8))


# shapes: a ragged last block (T 37, 50) and whole ones (64), grouped-query heads (2 and 3 per kv
# head) and plain ones, head_dim below the kernels' 16-wide tiles (8, padded) and between powers of
# two (24); block settings of each kind: several key steps per query block and the reverse
@pytest.mark.parametrize("B,T,heads,kv_heads,head_dim", [(2, 37, 4, 2, 16), (1, 64, 2, 2, 32), (1, 50, 3, 1, 24),
                                                         (2, 20, 2, 1, 8)])
@pytest.mark.parametrize("blocks", [((32, 16), (32, 16), (16, 32)), ((16, 16), (16, 16), (16, 16))])
def test_attention_kernels_match_autograd(B, T, heads, kv_heads, head_dim, blocks):
    torch.manual_seed(T * heads)
    # q, k and v as strided views of one tensor's rows: the kernels take any strides with D contiguous
    qkv = torch.randn(B, T, heads + 2 * kv_heads, head_dim, device=DEVICE).to(HALF)
    q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=2)
    assert not q.is_contiguous()
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    scale = head_dim ** -0.5
    ref = speed_kernels.attention_reference(*leaves, scale)
    # the reference against PyTorch's own attention, so that the kernels are held to SDPA's arithmetic
    sdpa = F.scaled_dot_product_attention(*(t.detach().transpose(1, 2) for t in leaves), is_causal=True,
                                          enable_gqa=heads != kv_heads).transpose(1, 2)
    torch.testing.assert_close(ref.detach(), sdpa, rtol=1e-4, atol=1e-4)
    grad_out = torch.randn_like(ref).to(HALF)
    ref.backward(grad_out.float())
    (fm, fn), (qm, qn), (km, kn) = blocks
    out, lse = speed_kernels.attention_forward_triton(q, k, v, scale, dict(BLOCK_M=fm, BLOCK_N=fn))
    assert out.shape == q.shape and out.dtype == HALF and out.is_contiguous()
    # the log2-sum-exp2 of each row's scaled causal scores, which the backward recomputes the weights from
    scores = (leaves[0].transpose(1, 2) @ leaves[1].repeat_interleave(heads // kv_heads, 2).permute(0, 2, 3, 1)) * scale
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=DEVICE).tril(), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1) / 0.6931471805599453, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)
    grads = speed_kernels.attention_backward_triton(q, k, v, out, lse, grad_out, scale, dict(BLOCK_M=qm, BLOCK_N=qn),
                                                    dict(BLOCK_M=km, BLOCK_N=kn))
    for got, leaf, name in zip(grads, leaves, "qkv"):
        assert got.shape == leaf.shape and got.dtype == HALF, name
        torch.testing.assert_close(got.float(), leaf.grad, rtol=2e-2, atol=2e-2, msg=f"grad {name}")


def tiny_triton(**kw):
    base = dict(block_size=24, vocab_size=64, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, n_hidden=96,
                sdpa_kernel="triton")
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("compiled", [False, True])
def test_a_model_with_triton_attention_trains_like_sdpa(monkeypatch, compiled):
    # a model with sdpa_kernel "triton" after make_fast (its kernels on the CPU only when the test asks),
    # one training step under autocast: the loss and every gradient of the SDPA path; compiled, the
    # custom ops' fake versions give Inductor the shapes
    torch.manual_seed(0)
    cfg = tiny_triton()
    model = speed.make_fast(Transformer(cfg).to(DEVICE).train())
    assert all(isinstance(layer.attn.sdpa, speed.TritonAttention) for layer in model.layers)
    idx = torch.randint(0, 64, (2, 24), device=DEVICE)
    calls = []
    forward = speed_kernels.attention_forward_triton
    monkeypatch.setattr(speed_kernels, "attention_forward_triton", lambda *a: calls.append(1) or forward(*a))

    def run(use_kernels):
        monkeypatch.setattr(speed_kernels, "runs_on", lambda t: use_kernels)
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
    torch._dynamo.reset()
    assert len(calls) == cfg.n_layer  # the kernels ran, once per layer, and only when asked
    # each gradient within 1% of its largest entry (half precision's noise here: up to 0.2%; a dq
    # with its softmax correction 10% off moved the q/k/v weights' by 24%)
    for i, (g, r) in enumerate(zip(got, ref)):
        assert (g - r).abs().max() <= 1e-2 * r.abs().max(), f"entry {i} (0: loss, then the parameters' gradients)"


def test_triton_attention_leaves_what_its_kernels_do_not_cover_to_sdpa(monkeypatch):
    # generation with a KV cache, float32, attention dropout while training and a bidirectional model go
    # through model.ScaledDotProduct unchanged, even where the kernels could run
    monkeypatch.setattr(speed_kernels, "runs_on", lambda t: True)
    monkeypatch.setattr(speed_kernels, "attention_forward_triton", lambda *a: pytest.fail("the kernel ran"))
    torch.manual_seed(0)
    idx = torch.randint(0, 64, (1, 8), device=DEVICE)
    plain = Transformer(tiny_triton()).to(DEVICE).eval()
    swapped = speed.make_fast(Transformer(tiny_triton()).to(DEVICE).eval())
    swapped.load_state_dict(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(swapped(idx)[0], plain(idx)[0])  # float32
        out_plain = plain.generate(idx[0].tolist(), 6, temperature=0.0)
        out_swapped = swapped.generate(idx[0].tolist(), 6, temperature=0.0)  # the KV cache: ScaledDotProduct's
    assert out_plain == out_swapped and len(out_plain) == 6
    for cfg, train in ((tiny_triton(dropout=0.1), True), (tiny_triton(is_causal=False), False)):
        sdpa = speed.TritonAttention(cfg).train(train)
        q = torch.randn(1, 8, 4, 16, device=DEVICE, dtype=HALF)
        k = v = torch.randn(1, 8, 2, 16, device=DEVICE, dtype=HALF)
        torch.manual_seed(1)
        got = sdpa(q, k, v)
        torch.manual_seed(1)
        torch.testing.assert_close(got, ScaledDotProduct(cfg).train(train)(q, k, v))
