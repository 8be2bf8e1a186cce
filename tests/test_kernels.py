# kernels.py's Triton kernels against PyTorch's arithmetic: on a GPU compiled, on a CPU in Triton's
# interpreter (tests/conftest.py sets TRITON_INTERPRET=1 there)
import pytest
import torch
import torch.nn.functional as F

import kernels
from model import FP8_GRADS, HeadCrossEntropy

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


# sizes that are not multiples of the kernel's row block (32) or column step (256); logits whose
# spread puts most of a row's probability on a few entries, as trained models do
@pytest.mark.parametrize("rows,vocab", [(70, 300), (32, 128), (5, 1000)])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_grad_matches_pytorch(rows, vocab, grad_dtype):
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


def test_float8_rounding_matches_torch_everywhere():
    # every e5m2 value, the midpoints between neighbours, and points just beside those (float32
    # neighbours of a midpoint round to float16 on the midpoint: the double-rounding case)
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e5m2).float()
    values = values[values.isfinite()].sort().values
    mids = (values[1:] + values[:-1]) / 2
    beside = torch.cat([torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1),
                        mids * (1 + 2 ** -12), mids * (1 - 2 ** -12)])
    x = torch.cat([values, mids, beside, torch.randn(100_000) * 1000, torch.randn(100_000) * 1e-4])
    x = x[x.abs() <= torch.finfo(torch.float8_e5m2).max].to(DEVICE)
    got = kernels.to_e5m2_triton(x).view(torch.uint8)
    want = x.to(torch.float8_e5m2).view(torch.uint8)
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
        step = (lambda a, b, t: HeadCrossEntropy.apply(a, b, t, False))
        if compiled:
            torch._dynamo.reset()
            step = torch.compile(step)
        loss, logits = step(x, w, targets)
        (loss * 2).backward()
        return loss.detach(), logits.detach(), x.grad.clone(), w.grad.clone()

    for got, ref, name in zip(run(True), run(False), ("loss", "logits", "grad x", "grad w")):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6, msg=name)
