# The fast path (fast.py) against the reference model (model.py): the same model, computed with fused
# and float8 operations. Off float8 the loss is the reference's (to float32 rounding) and the gradients
# agree to a relative 1e-5; with float8 products the loss stays within 2% and every gradient points
# the same way (cosine > 0.98), and float8 really ran. kernels.py's work runs through PyTorch ops and,
# on a CPU, through the kernels themselves in Triton's interpreter (the use_kernels fixture).
import pytest
import torch
import torch.nn.functional as F

import fast
from fast import (FP8_VALUES, FastPathError, FastTransformer, HeadCrossEntropy, RopeQKVProduct, SwiGLUProduct,
                  fp8_linear, rope_complex, to_fp8, to_fp8_columns, weight_grad_product)
from files import ConfigError
from model import LoRAConfig, ModelConfig, Transformer, add_lora, apply_rope, rope_tables


def tiny(**kw):
    base = dict(block_size=32, vocab_size=61, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, n_hidden=48)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("bias", [False, True])
def test_fused_training_projections_match_separate_ones(bias):
    # the fast path stacks wq|wk|wv and w1|w3 into one product each (with their biases: not the
    # RopeQKV/SwiGLU Functions then); the reference keeps them apart. Same loss and gradients.
    torch.manual_seed(0)
    cfg = ModelConfig(block_size=16, vocab_size=64, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, n_hidden=48,
                      bias=bias)
    model = Transformer(cfg).train()
    idx = torch.randint(0, 64, (3, 16))
    grads, losses = [], []
    for step in (FastTransformer(model).train(), model):
        model.zero_grad()
        _, loss = step(idx, idx.roll(-1, 1))
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6, msg=name)
    assert set(model.state_dict()) == set(Transformer(cfg).state_dict())  # layout unchanged


def test_rope_complex_path_equals_the_real_one():
    # eager CPU and CUDA runs use the complex form, compiled code the real one: same values and
    # the same gradients, also for a non-contiguous [B, T, H, D] slice of a fused q|k|v product as
    # attention passes
    cos, sin = rope_tables(16, 12, 10000.0)
    base = torch.randn(2, 12, 3 * 48, dtype=torch.float64).float()
    outs, grads = [], []
    for fn in (apply_rope, rope_complex):
        x = base.clone().requires_grad_(True)
        y = fn(x[..., 48:96].view(2, 12, 3, 16), cos, sin)
        (y * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
        outs.append(y.detach())
        grads.append(x.grad)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-6)


def test_fp8_linear_multiplies_the_scaled_float8_operands():
    # the forward and input-gradient products must equal the float32 products of the dequantised
    # float8 operands, scaled per row (so the scales are applied and undone correctly); the weight
    # gradient is the exact product; all stay near the exact values
    torch.manual_seed(0)
    x = (torch.randn(64, 96) * torch.logspace(-2, 1, 64).unsqueeze(1)).requires_grad_()  # rows of any size
    w = (torch.randn(48, 96) * 0.02).requires_grad_()
    y = fp8_linear(x, w)
    x8, x_inv = to_fp8(x.detach(), per_row=True)
    w8, w_inv = to_fp8(w.detach(), per_row=True)
    assert x8.dtype == FP8_VALUES and x_inv.shape == (64, 1)
    assert torch.equal(x8.float().abs().amax(dim=1), torch.full((64,), 448.0))  # every row fills the range
    xq, wq = x8.float() * x_inv, w8.float() * w_inv
    torch.testing.assert_close(y, xq @ wq.T, rtol=1e-4, atol=1e-6)
    g = torch.randn_like(y) * 1e-3
    y.backward(g)
    g8, g_inv = to_fp8(g, per_row=True)
    wt8, wt_inv = to_fp8(w.detach().t(), per_row=True)
    torch.testing.assert_close(x.grad, (g8.float() * g_inv) @ (wt8.float() * wt_inv).T, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(w.grad, g.T @ x.detach(), rtol=1e-5, atol=1e-8)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()
    exact = x.detach() @ w.detach().T
    assert 0 < rel(y, exact) < 0.06  # e4m3 keeps 3 mantissa bits
    assert 0 < rel(x.grad, g @ w.detach()) < 0.06


@pytest.fixture(params=[False, True], ids=["pytorch_ops", "triton_kernels"])
def use_kernels(request, monkeypatch):
    """The training-only paths with kernels.py's work (the loss and its gradient, the SwiGLU and q/k/v
    gradients) from PyTorch ops, then from kernels.py (the GPU's path) on CPU tensors: Triton's
    interpreter, which tests/conftest.py sets where there is no GPU."""
    import kernels
    if request.param and (not kernels.available or torch.cuda.is_available()):
        pytest.skip("CPU tensors through the kernels: Triton's interpreter, set where there is no GPU")
    monkeypatch.setattr(kernels, "runs_on", lambda t: request.param)
    return request.param


@pytest.mark.parametrize("fast_accum", [False, True])
def test_fp8_products_have_the_layout_cuda_kernels_need(monkeypatch, use_kernels, fast_accum):
    # torch._scaled_mm on a GPU takes a row-major first and a column-major second operand and float32
    # scales, per tensor or per row of each (the CPU kernel takes any layout): check every product of
    # a bf16 training step for that, with the head's gradient from PyTorch and from kernels.py (the
    # GPU's path; on a CPU in Triton's interpreter). fast_accum: every forward product and the blocks'
    # input-gradient products ask for fast accumulation; the head's two gradient products never do
    real = fast.scaled_mm
    seen = []

    def checked(a, b, scale_a, scale_b, out_dtype, fast_accum=False):
        assert a.is_contiguous() and b.t().is_contiguous(), (a.shape, a.stride(), b.shape, b.stride())
        assert scale_a.dtype == scale_b.dtype == torch.float32
        rows_a = scale_a.numel() > 1
        assert scale_a.shape == ((a.size(0), 1) if rows_a else ()) and scale_b.shape == ((1, b.size(1)) if rows_a else ())
        seen.append((a.dtype, fast_accum))
        return real(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype, fast_accum=fast_accum)

    monkeypatch.setattr(fast, "scaled_mm", checked)
    model = FastTransformer(Transformer(tiny(vocab_size=64)), "all", fast_accum).train()
    idx = torch.randint(0, 64, (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(idx, idx.roll(-1, 1))
    loss.backward()
    assert len(seen) == 8 * 2 + 3  # blocks: forward and input gradient; head: all three
    head_grads = [accum for dtype, accum in seen if dtype == fast.FP8_GRADS]
    assert head_grads == [False, False]  # the head's gradient (float8 e5m2): exact accumulation
    assert sum(accum for _, accum in seen) == (8 * 2 + 1 if fast_accum else 0)


def test_weight_columns_cast_equals_the_cast_of_the_transposed_copy():
    # the input-gradient products take the weight transposed, in float8 rows: to_fp8_columns makes it
    # without a transposed float32 copy, and must give the very same bytes and scales (also for a
    # column of zeros and a weight made by concatenation, as the q|k|v and w1|w3 weights are)
    torch.manual_seed(0)
    for shape in [(96, 64), (48, 160)]:
        w = torch.randn(shape) * torch.rand(shape[1]) * 3
        w[:, 5] = 0
        w = torch.cat([w[: shape[0] // 2], 2 * w[shape[0] // 2:]])
        ref8, ref_inv = to_fp8(w.t().contiguous(), per_row=True)
        w8, w_inv = to_fp8_columns(w)
        assert w8.shape == (shape[1], shape[0]) and w8.is_contiguous() and w_inv.shape == (shape[1], 1)
        assert torch.equal(w8.view(torch.uint8), ref8.view(torch.uint8)) and torch.equal(w_inv, ref_inv)
        assert w_inv.t().is_contiguous()  # (scaled_mm takes the scales as a [1, K] row)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="GPU-only path: run on a CUDA machine"))])
def test_weight_gradient_product_comes_out_in_the_weights_dtype(device):
    # a bf16 product for a float32 weight's gradient: on CUDA written in float32 from the float32
    # accumulators (closer to the exact product than bf16-rounded values), elsewhere rounded and cast
    torch.manual_seed(0)
    a, b = (torch.randn(64, 512, device=device).bfloat16(), torch.randn(512, 48, device=device).bfloat16())
    exact = a.double() @ b.double()
    out = weight_grad_product(a, b, torch.float32)
    assert out.dtype == torch.float32 and out.shape == (64, 48)
    rounded = (a @ b).float()
    torch.testing.assert_close(out, exact.float(), rtol=0, atol=1e-2 * exact.abs().max().item())
    if device == "cuda":  # not rounded to bf16 on the way: nearer than the rounded product
        assert (out.double() - exact).abs().max() < 0.25 * (rounded.double() - exact).abs().max()
    else:
        assert torch.equal(out, rounded)
    assert weight_grad_product(a, b, torch.bfloat16).dtype == torch.bfloat16


def test_fp8_linear_handles_zeros_and_falls_back_on_odd_shapes():
    w = torch.randn(32, 16, requires_grad=True)
    zeros = torch.zeros(16, 16, requires_grad=True)
    out = fp8_linear(zeros, w)
    out.sum().backward()
    assert torch.equal(out, torch.zeros(16, 32)) and torch.isfinite(zeros.grad).all() and torch.equal(
        w.grad, torch.zeros_like(w))
    x = torch.randn(3, 5, 16)  # 15 rows: not a multiple of 16, so the plain product
    assert torch.equal(fp8_linear(x, w), torch.nn.functional.linear(x, w))


@pytest.mark.parametrize("mode,casts", [("head", 2), ("blocks", 32), ("all", 34)])
def test_fp8_mode_sends_the_training_products_through_float8(mode, casts, monkeypatch):
    # per layer: q|k|v, wo, w1|w3, w2 (2 layers: 8 products, each casting input and weight forward,
    # gradient and weight backward: 32); "head" casts the head's input and weight (its gradient has a
    # fixed scale). Training loss and gradients stay close to full precision; in eval mode the fast
    # model is the reference, without float8.
    cfg = tiny(vocab_size=64)
    torch.manual_seed(0)
    reference = Transformer(cfg)
    idx = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(1))
    results = {}
    for m in ("off", mode):
        model = FastTransformer(reference, m)
        model.train().zero_grad()
        calls = []
        for name in ("to_fp8", "to_fp8_columns"):  # (the second: the weights' transposed casts)
            real = getattr(fast, name)
            monkeypatch.setattr(fast, name, lambda *a, real=real, **k: calls.append(1) or real(*a, **k))
        _, loss = model(idx, idx.roll(-1, 1))
        loss.backward()
        model.eval()
        with torch.no_grad():
            logits, _ = model(idx)
        monkeypatch.undo()
        results[m] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, logits, len(calls))
    (loss0, grads0, logits0, calls0), (loss1, grads1, logits1, calls1) = results["off"], results[mode]
    assert calls0 == 0 and calls1 == casts
    assert torch.equal(logits0, logits1)
    assert loss0 != loss1 and abs(loss1 - loss0) < 0.02 * loss0
    for name in grads0:
        cos = torch.nn.functional.cosine_similarity(grads0[name].flatten(), grads1[name].flatten(), dim=0)
        assert cos > 0.98, (name, cos)
    with pytest.raises(ConfigError, match="fp8 must be one of"):
        FastTransformer(reference, "fast")


@pytest.mark.parametrize("fp8", [False, True])
def test_head_cross_entropy_matches_linear_then_cross_entropy(fp8, use_kernels):
    # the fused head + loss of compiled training: same loss, logits and gradients as F.linear followed
    # by F.cross_entropy (ignore_index -1); in float8 close to them. use_kernels: the loss and its
    # gradient from kernels.py (the GPU's path; on a CPU in Triton's interpreter)
    torch.manual_seed(0)
    x = torch.randn(64, 32, requires_grad=True)
    w = (torch.randn(80, 32) * 0.3).requires_grad_()
    targets = torch.randint(0, 80, (64,))
    targets[::7] = -1
    loss, logits = HeadCrossEntropy.apply(x, w, targets, fp8, False)
    (loss * 3).backward()
    got = (loss.detach(), logits.detach(), x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    ref_logits = F.linear(x, w)
    ref_loss = F.cross_entropy(ref_logits, targets, ignore_index=-1)
    (ref_loss * 3).backward()
    ref = (ref_loss.detach(), ref_logits.detach(), x.grad, w.grad)
    if not fp8:
        for a, b, name in zip(got, ref, ("loss", "logits", "grad x", "grad w")):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        return
    assert abs(got[0] - ref[0]) < 0.02 * ref[0]
    for a, b in zip(got[1:], ref[1:]):
        assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
    assert not torch.equal(got[2], ref[2])  # float8 really ran
    w.requires_grad_(False)  # a frozen head (LoRA): no weight gradient, the same input gradient
    x.grad = w.grad = None
    loss, _ = HeadCrossEntropy.apply(x, w, targets, fp8, False)
    (loss * 3).backward()
    assert w.grad is None and torch.equal(x.grad, got[2])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_float8_blocks_fuse_each_residual_add_with_the_norm_after_it(monkeypatch, use_kernels, checkpointing):
    # training with float8 blocks: every projection into the residual stream, the add and the next
    # norm are one ResidualNorm (FastTransformer.block_fused), whose backward also makes the float8 copy of
    # the projection's output gradient. The same loss as the separate modules, bit for bit (the
    # forward is the same arithmetic), and the same gradients up to float32 rounding (the two norm
    # backwards order their sums differently: here no float8 value rounds the other way, which
    # could happen in other cases); activation checkpointing changes nothing
    idx = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(1))
    real, fused = fast.residual_norm, []
    monkeypatch.setattr(fast, "residual_norm", lambda *a: fused.append(1) or real(*a))

    def step(fuse, checkpoint=False):
        torch.manual_seed(0)
        reference = Transformer(tiny(vocab_size=64))
        model = FastTransformer(reference, "blocks").train()
        reference.checkpoint_layers = checkpoint
        if not fuse:
            monkeypatch.setattr(FastTransformer, "fuses_residuals", lambda self, layer: False)
        fused.clear()
        _, loss = model(idx, idx.roll(-1, 1))
        loss.backward()
        monkeypatch.setattr(FastTransformer, "fuses_residuals", real_fuses)
        return loss.detach(), {n: p.grad for n, p in reference.named_parameters()}, len(fused)

    real_fuses = FastTransformer.fuses_residuals
    loss, grads, calls = step(True, checkpointing)
    assert calls == 2 * 2 * (2 if checkpointing else 1)  # two per layer (checkpointing: again in the backward)
    ref_loss, ref_grads, ref_calls = step(False)
    assert ref_calls == 0 and torch.equal(loss, ref_loss)
    for name, ref in ref_grads.items():
        error = (grads[name] - ref).norm() / ref.norm()
        assert error < 1e-5, (name, error)
    if checkpointing:
        same_loss, same_grads, _ = step(True)
        assert torch.equal(loss, same_loss)
        for name, grad in same_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=0, atol=0, msg=name)


def check_grads(got, ref, fp8, names):
    """Outputs and gradients equal to those of plain autograd (float32), or in float8 close to them."""
    for a, b, name in zip(got, ref, names):
        if not fp8:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
        else:
            assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99, name
    if fp8:  # the first output came from a float8 product
        assert not torch.allclose(got[0], ref[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fp8", [False, True])
def test_swiglu_product_matches_autograd(fp8, use_kernels):
    # training's SwiGLU: silu(x w1^T) * (x w3^T) as one product whose backward (a kernel on the GPU)
    # takes the gradient through silu * up and casts it to float8 rows
    torch.manual_seed(0)
    x = torch.randn(48, 32, requires_grad=True)
    w1, w3 = (torch.randn(48, 32) * 0.2).requires_grad_(), (torch.randn(48, 32) * 0.2).requires_grad_()
    grad_h = torch.randn(48, 48)
    h = SwiGLUProduct.apply(x, torch.cat([w1, w3]), fp8, False)
    h.backward(grad_h)
    got = (h.detach(), x.grad.clone(), w1.grad.clone(), w3.grad.clone())
    x.grad = w1.grad = w3.grad = None
    ref_h = F.silu(x @ w1.t()) * (x @ w3.t())
    ref_h.backward(grad_h)
    check_grads(got, (ref_h.detach(), x.grad, w1.grad, w3.grad), fp8, ("h", "grad x", "grad w1", "grad w3"))


@pytest.mark.parametrize("fp8", [False, True])
def test_rope_qkv_product_matches_autograd(fp8, use_kernels):
    # training's q/k/v: one product, q and k rotated, whose backward (a kernel on the GPU) takes the
    # rotation back and lays the gradients out as the product's rows (float8 rows too); the gradients
    # come in the transposed layout attention kernels return
    torch.manual_seed(0)
    B, T, dim, n_head, n_kv_head, head_dim = 2, 8, 32, 4, 2, 8
    cos, sin = rope_tables(head_dim, T, 10000.0)
    x = torch.randn(B, T, dim, requires_grad=True)
    ws = [(torch.randn(h * head_dim, dim) * 0.2).requires_grad_() for h in (n_head, n_kv_head, n_kv_head)]
    grads = [torch.randn(B, h, T, head_dim).transpose(1, 2) for h in (n_head, n_kv_head, n_kv_head)]
    out = RopeQKVProduct.apply(x, torch.cat(ws), cos, sin, n_head, n_kv_head, fp8, False)
    torch.autograd.backward(out, grads)
    got = (*[o.detach() for o in out], x.grad.clone(), *[w.grad.clone() for w in ws])
    x.grad = None
    for w in ws:
        w.grad = None
    q, k, v = [(x @ w.t()).unflatten(-1, (-1, head_dim)) for w in ws]
    ref = (apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
    torch.autograd.backward(ref, grads)
    check_grads(got, (*[r.detach() for r in ref], x.grad, *[w.grad for w in ws]), fp8,
                ("q", "k", "v", "grad x", "grad wq", "grad wk", "grad wv"))


OLD_TORCH = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) < (2, 13)


@pytest.mark.parametrize("fp8", ["off", pytest.param("all", marks=pytest.mark.skipif(
    OLD_TORCH, reason="torch < 2.13 compiles float8 casts on the CPU with other rounding than eager "
                      "(measured on 2.11: the head's weight gradient 9% off); GPU runs are checked by "
                      "test_fp8_compiled_cuda_graph_run_follows_the_bf16_curve"))])
def test_compiled_training_step_equals_the_eager_one(fp8, use_kernels):
    # torch.compile traces the training-only paths (fused head + loss, SwiGLU and q/k/v products,
    # float8 products, the real RoPE; with kernels.py's custom ops, or PyTorch ops): the compiled
    # forward and backward must give the eager loss and gradients (on the CPU here)
    torch.manual_seed(0)
    model = FastTransformer(Transformer(tiny(vocab_size=64)), fp8).train()
    idx = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(3))
    targets = idx.roll(-1, 1)
    targets[:, :5] = -1  # ignored positions (SFT prompts) too
    results = []
    for run in (model, torch.compile(model)):
        model.zero_grad()
        _, loss = run(idx, targets)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    # float8: compiled code may round a scale differently in its last bit, which moves a few float8
    # values by one step; the products would be ~3% off if float8 were skipped, so 0.2% tells them apart
    tolerance = 2e-3 if fp8 != "off" else 1e-5
    torch.testing.assert_close(results[0][0], results[1][0], rtol=tolerance, atol=0)
    for name, grad in results[0][1].items():
        error = ((results[1][1][name] - grad).norm() / grad.norm()).item()
        assert error < tolerance, (name, error)


def loss_and_grads(step, model, idx, targets):
    """One forward and backward of `step` (the reference model or a fast one built from it)."""
    model.zero_grad()
    _, loss = step(idx, targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", fast.FP8_MODES)
def test_fast_path_trains_the_reference_model(mode, use_kernels):
    # the promise of fast.py: a training step through FastTransformer is a training step of the
    # reference model. Without float8: the same loss (float32 rounding) and gradients within a
    # relative 1e-5; with float8 products: loss within 2%, each gradient at cosine > 0.98 with the
    # reference's, and not equal to it (float8 ran)
    torch.manual_seed(0)
    model = Transformer(tiny(vocab_size=64, n_layer=3)).train()
    idx = torch.randint(0, 64, (3, 32), generator=torch.Generator().manual_seed(2))
    targets = idx.roll(-1, 1)
    targets[0, :7] = -1
    ref_loss, ref_grads = loss_and_grads(model, model, idx, targets)
    loss, grads = loss_and_grads(FastTransformer(model, mode).train(), model, idx, targets)
    assert grads.keys() == ref_grads.keys()
    if mode == "off":
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
        for name, ref in ref_grads.items():
            assert ((grads[name] - ref).norm() / ref.norm()).item() < 1e-5, name
        return
    assert loss != ref_loss and abs(loss - ref_loss) < 0.02 * ref_loss
    for name, ref in ref_grads.items():
        assert F.cosine_similarity(grads[name].flatten(), ref.flatten(), dim=0) > 0.98, name


@pytest.mark.parametrize("variant", ["dropout", "lora", "learned_positions", "checkpointing"])
def test_fast_path_follows_what_it_does_not_fuse(variant, use_kernels):
    # dropout, LoRA-wrapped layers and learned positions run through the reference's own modules:
    # the same loss and gradients as the reference (dropout: the same masks, drawn in the same order)
    torch.manual_seed(0)
    model = Transformer(tiny(vocab_size=64, dropout=0.1 if variant == "dropout" else 0.0,
                             use_rope=variant != "learned_positions"))
    if variant == "lora":
        add_lora(model, LoRAConfig(rank=4, targets=["wq", "wo", "w1", "w2"]))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)  # a trained adapter (B = 0 would change nothing)
    model.checkpoint_layers = variant == "checkpointing"
    model.train()
    idx = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(2))
    results = []
    for step in (model, FastTransformer(model).train()):
        torch.manual_seed(7)
        results.append(loss_and_grads(step, model, idx, idx.roll(-1, 1)))
    (ref_loss, ref_grads), (loss, grads) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for name, ref in ref_grads.items():
        assert ((grads[name] - ref).norm() / ref.norm()).item() < 1e-5, name


def test_fast_path_refuses_a_changed_reference_block(monkeypatch):
    # a researcher tries an idea in model.Block.forward: the fast path, which computes the block its
    # own way, must refuse to train (naming what changed) instead of silently training the old block
    import model as model_module
    import train

    def forward(self, x, rope, cache=None, pos=0):  # the idea: a damped attention branch
        x = x + 0.5 * self.attn(self.attn_norm(x), rope, cache, pos)
        return x + self.ffn(self.ffn_norm(x))

    monkeypatch.setattr(model_module.Block, "forward", forward)
    with pytest.raises(FastPathError, match=r"model\.Block\.forward has changed since fast\.py was written"):
        FastTransformer(Transformer(tiny()))
    cfg = train.TrainConfig(fast_path="true")
    with pytest.raises(ConfigError, match="train with --set fast_path=false"):  # as train.py builds its step
        train.step_model(Transformer(tiny()), cfg, train.Env(0, 0, 1, "cpu", "float32"), use_fast=True)
    assert train.step_model(model := Transformer(tiny()), cfg, train.Env(0, 0, 1, "cpu", "float32"), False) is model
    monkeypatch.undo()
    FastTransformer(Transformer(tiny()))  # the reference as fast.py knows it


def test_fast_path_follows_a_changed_attend_and_refuses_it_with_triton(monkeypatch, use_kernels):
    # Attention.attend (SDPA) is called by the fast path, so a change there is followed; with the
    # Triton attention (sdpa_kernel "triton"), which replaces it, the change is refused
    import model as model_module
    real = model_module.Attention.attend

    def attend(self, q, k, v, cache=None, pos=0):  # the idea: attention output damped by half
        return 0.5 * real(self, q, k, v, cache, pos)

    torch.manual_seed(0)
    model = Transformer(tiny(vocab_size=64)).train()
    idx = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(2))
    before, _ = loss_and_grads(model, model, idx, idx.roll(-1, 1))
    monkeypatch.setattr(model_module.Attention, "attend", attend)
    changed, _ = loss_and_grads(model, model, idx, idx.roll(-1, 1))
    fast_loss, _ = loss_and_grads(FastTransformer(model).train(), model, idx, idx.roll(-1, 1))
    assert changed != before
    torch.testing.assert_close(fast_loss, changed, rtol=1e-6, atol=0)
    with pytest.raises(FastPathError, match=r"model\.Attention\.attend has changed"):
        FastTransformer(Transformer(tiny(sdpa_kernel="triton")))


def test_fast_path_refuses_modules_it_does_not_know():
    import model as model_module

    class GatedBlock(model_module.Block):  # a subclass could compute anything in its forward
        pass

    model = Transformer(tiny())
    model.layers[1] = GatedBlock(model.cfg)
    with pytest.raises(FastPathError, match="module layers.1 is a .*GatedBlock, not model.Block"):
        FastTransformer(model)
    model = Transformer(tiny())
    model.layers[0].ffn.forward = lambda x: 2 * x  # a forward set on one instance
    with pytest.raises(FastPathError, match="module layers.0.ffn has its own forward"):
        FastTransformer(model)


def test_fingerprints_ignore_comments_and_docstrings_and_are_current():
    def a(x):
        """Doubled."""
        return x * 2  # twice

    def b(x):
        # the same code, other words
        return x * 2

    def c(x):
        return x * 3

    assert fast.fingerprint(a) == fast.fingerprint(b) != fast.fingerprint(c)
    # fast.REFERENCE describes model.py as it is (a change there updates fast.py and this table together)
    for name, want in {**fast.REFERENCE, **fast.TRITON_REFERENCE}.items():
        assert fast.fingerprint(fast.reference_function(name)) == want, name
