"""
The GPU fast path for training: model.py's Transformer computed with fused and float8 operations.

model.py is the reference: one plain forward path per module. Training on a GPU spends its time
elsewhere than a reader looks, so this file computes the same forward and backward passes with
fewer, larger operations, reading the reference model's own modules and weights:

  * the q/k/v products as one (RopeQKVProduct), the SwiGLU products as one (SwiGLUProduct), each
    an autograd Function whose backward is one kernels.py kernel per row on CUDA;
  * the output head and the loss as one operation that touches the logits least (HeadCrossEntropy);
  * training products in float8 (train config fp8: head, blocks or all) on GPUs that have it, and
    with float8 blocks each projection into the residual stream, the add and the next norm as one
    (ResidualNorm);
  * causal attention through kernels.py's Triton kernels (model config sdpa_kernel "triton").

train.py applies it (FastTransformer) when the train config asks (fast_path, fp8) and trains the
reference model's parameters through it; evaluation, checkpoints and generation use the reference.
The fast path must never silently compute another model than model.py: check_reference compares
the reference code it re-implements with the code it was written against (REFERENCE, fingerprints
of the source without comments and docstrings) and the module types it reads, and refuses with a
message naming what changed. Edit model.py freely and train with fast_path=false; to train the
edited model fast, make the same change here, then update REFERENCE (python fast.py prints it).
tests/test_fast.py holds the two paths equal: the same loss and, within stated tolerances, the
same gradients, with and without float8, on CPU (kernels.py in Triton's interpreter) and GPU.
"""

import argparse
import ast
import hashlib
import inspect
import os
import textwrap

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import kernels
import model as ref
from files import ConfigError

FP8_MODES = ("off", "head", "blocks", "all")


class FastPathError(ConfigError):
    """The fast path does not know the model it was asked to train: the message names what differs."""


# ---------------------------------------------------------------------------
# What the fast path re-implements, and the reference code it was written against

# fingerprint(function) of each piece of model.py that FastTransformer computes its own way (not
# the modules it calls, such as LoRA layers, dropout or Attention.attend, whose changes it follows)
REFERENCE = {
    "Transformer.forward": "224e34e1784ab8db",
    "Block.forward": "7575f94248d20670",
    "Attention.forward": "0b55156306332b01",
    "FeedForward.forward": "ef580ecdf8c4ec66",
    "RMSNorm.forward": "d59f149f6aae93d5",
    "rms_norm": "8fe326151adcaa3e",
    "apply_rope": "fb8874109c04a851",
}
# ...and with the Triton attention (sdpa_kernel "triton"), which replaces Attention.attend
TRITON_REFERENCE = {"Attention.attend": "50defb14106c5a96"}
# the module types whose forward passes it re-implements, by attribute path in the Transformer
MODULE_TYPES = {"": ref.Transformer, "norm": ref.RMSNorm}
LAYER_TYPES = {"": ref.Block, "attn_norm": ref.RMSNorm, "attn": ref.Attention, "ffn_norm": ref.RMSNorm,
               "ffn": ref.FeedForward}


def fingerprint(fn):
    """sha256 of a function's syntax tree without its name, decorators and docstring: what it
    computes, as far as its source says, whatever its comments and layout."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0]
    tree.name, tree.decorator_list = "_", []
    body = tree.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        tree.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(syntax_text(tree).encode()).hexdigest()[:16]


def syntax_text(node):
    """A syntax tree as text, the same on every Python version that parses it alike (ast.dump and
    ast.unparse differ between versions; newer ones add fields such as type_params)."""
    if isinstance(node, list):
        return "[" + ", ".join(map(syntax_text, node)) + "]"
    if not isinstance(node, ast.AST):
        return repr(node)
    fields = (f"{name}={syntax_text(getattr(node, name, None))}" for name in node._fields
              if name not in ("type_params", "type_comment"))
    return f"{type(node).__name__}({', '.join(fields)})"


def reference_function(name):
    """model.py's function or method of that name ("Block.forward")."""
    obj = ref
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def check_reference(model, triton_attention=False):
    """Refuse (FastPathError) a model the fast path would not compute exactly: a changed reference
    function, a module of another type, or a forward set on one module instance."""
    expected = {**REFERENCE, **(TRITON_REFERENCE if triton_attention else {})}
    for name, want in expected.items():
        try:
            got = fingerprint(reference_function(name))
        except (OSError, TypeError, SyntaxError) as e:
            raise FastPathError(f"fast path: cannot read the source of model.{name} ({e})") from None
        if got != want:
            raise FastPathError(
                f"fast path: model.{name} has changed since fast.py was written against it (fingerprint {got}, "
                f"expected {want}), so the fast path would train another model: train with --set fast_path=false "
                "fp8=off (float8 runs only in the fast path), or make the same change in fast.py and update "
                "fast.REFERENCE (python fast.py prints the fingerprints)")
    modules = [(name, getattr_path(model, name), cls) for name, cls in MODULE_TYPES.items()]
    for i, layer in enumerate(getattr(model, "layers", [])):
        modules += [(f"layers.{i}{'.' * bool(name)}{name}", getattr_path(layer, name), cls)
                    for name, cls in LAYER_TYPES.items()]
    for name, module, cls in modules:
        where = f"module {name or 'model'}"
        if type(module) is not cls:
            raise FastPathError(f"fast path: {where} is a {type(module).__qualname__}, not model.{cls.__qualname__} "
                                "whose forward it re-implements: train with --set fast_path=false")
        if "forward" in vars(module):
            raise FastPathError(f"fast path: {where} has its own forward set on the instance, which the fast path "
                                "would bypass: train with --set fast_path=false")


def getattr_path(obj, path):
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part)
    return obj


# ---------------------------------------------------------------------------
# RoPE: the reference's rotation, and the same in complex arithmetic for eager GPU steps


def rotate(x, cos, sin):
    """model.apply_rope, computed as rope_complex when running eagerly on a CPU or GPU."""
    if x.device.type in ("cpu", "cuda") and not torch.compiler.is_compiling():
        return rope_complex(x, cos, sin)
    # (the reference casts before it stacks the pairs, not after: torch 2.11's compiler dropped the
    # gradient of a custom autograd Function's output (RopeQKVProduct's q and k) that was a no-op
    # cast (float32 training) of a view)
    return ref.apply_rope(x, cos, sin)


def rope_complex(x, cos, sin):
    """The same rotation with each pair read as one complex number x[2i] + i x[2i+1], times
    cos + i sin: three GPU kernels instead of about ten when running eagerly (no torch.compile),
    which is most of the step time of a small model on a GPU (and it is a little faster on the CPU)."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * torch.complex(cos, sin).unsqueeze(-2)).flatten(-2).type_as(x)


# ---------------------------------------------------------------------------
# Products: stacked weights, float8


def fusable(*linears):
    """Plain nn.Linear layers (not LoRA-wrapped) whose products with one input can be fused."""
    return all(type(m) is nn.Linear for m in linears)


def fused_linear(x, linears, fp8=False, fast_accum=False):
    """x through several Linear layers as one matrix product over their stacked weights, split after.
    Training only: one large product keeps the GPU busier than three thin ones, and stacking the
    weights costs a copy of them per step, which is small next to the activations of a batch (but
    would double the weight reads of one-token decoding, so generation keeps separate products).
    The parameters stay separate, so checkpoints and the exported layout do not change. fp8: the
    product in float8 (fp8_linear)."""
    weight = torch.cat([m.weight for m in linears])
    bias = torch.cat([m.bias for m in linears]) if linears[0].bias is not None else None
    out = fp8_linear(x, weight, bias, fast_accum) if fp8 else F.linear(x, weight, bias)
    return out.split([m.out_features for m in linears], dim=-1)


# FP8 matrix products (train config fp8): Hopper-class GPUs (compute capability 8.9+) multiply
# float8 matrices at twice the bf16 rate. Operands are scaled so that their largest magnitude fills
# the float8 range (scales recomputed every step: nothing to tune or to store in checkpoints), cast,
# multiplied with torch._scaled_mm, and the scales are taken back out. The blocks' linear layers
# scale per row (FP8RowsMatmul); the output head per tensor, its gradient with a fixed scale
# (HeadCrossEntropy). The float32 master weights, the optimizer and everything outside these
# products stay as they were. docs/BENCHMARKS.md has what it gains and what it does to the loss.
#
# fast_accum (train config fp8_fast_accum): the forward products and the blocks' input-gradient
# products let the tensor cores keep their partial sums at reduced precision instead of adding them
# into float32 as they go (cuBLAS's "fast accumulation"): 1-2% faster steps, no change in the loss
# measured. The head's gradient products always accumulate exactly: they reduce over the 32k tokens
# of a batch or the 50k-word vocabulary, and fast accumulation there moved the 124M config's loss.
FP8_VALUES, FP8_GRADS = torch.float8_e4m3fn, torch.float8_e5m2


def to_fp8(t, dtype=FP8_VALUES, per_row=False):
    """t scaled so that its largest magnitude (per_row: of each row, the last dim) lands on dtype's
    largest finite value, then cast (e4m3 for values and weights: 3 mantissa bits; e5m2 for
    gradients: a wider range); with the inverse scale (float32: a scalar, or [rows, 1]) that undoes
    it. Row scales take one pass over each row, which torch.compile fuses into the kernel that makes
    the rows (the norm, SwiGLU, ...); a tensor's scale needs its whole amax first."""
    return fp8_cast(t, t.abs().amax(dim=-1, keepdim=True) if per_row else t.abs().amax(), dtype)


def to_fp8_columns(t, dtype=FP8_VALUES):
    """t.t() as float8 rows with their inverse scales ([K, N] contiguous, [K, 1]): the same values
    as to_fp8(t.t().contiguous(), per_row=True), but each column's amax reduces down t's rows as
    they lie in memory. (Compiled, the amax of the transposed copy became a reduction along the
    strided dim, reading the weights, cold at the start of the backward, in short scattered runs.)"""
    t8, inv_scale = fp8_cast(t, t.abs().amax(dim=0, keepdim=True), dtype)
    return t8.t().contiguous(), inv_scale.t()


def fp8_cast(t, amax, dtype):
    """t scaled so that amax (broadcast over t) lands on dtype's largest finite value, and cast; with
    the inverse scale. The scaling rule of to_fp8 and to_fp8_columns."""
    top = torch.finfo(dtype).max
    scale = top / amax.float().clamp(min=1e-12)
    return (t.float() * scale).clamp(-top, top).to(dtype), scale.reciprocal()


def fp8_fits(rows, inner, outer):
    """Whether float8 kernels take a [rows, inner] x [inner, outer] product: every dim a multiple of 16."""
    return rows % 16 == 0 and inner % 16 == 0 and outer % 16 == 0


def scaled_mm(a, b, scale_a, scale_b, out_dtype, fast_accum=False):
    """torch._scaled_mm(a, b) with a row-major and b column-major (fast_accum: see above). CPU kernels
    of torch before 2.13 take per-tensor scales only: there (tests) row-wise scales multiply the
    float32 product instead, which is the same arithmetic."""
    if a.device.type == "cpu" and scale_a.numel() > 1:
        one = torch.ones((), device=a.device)
        return (torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.float32,
                                 use_fast_accum=fast_accum) * scale_a * scale_b).to(out_dtype)
    return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype, use_fast_accum=fast_accum)


class FP8RowsMatmul(torch.autograd.Function):
    """x @ weight.T with the forward product and the input-gradient product in float8, scaled per
    row, and the weight-gradient product in the input's precision. float8 products on these GPUs
    must reduce over the operands' contiguous dim; the weight gradient reduces over the tokens, which
    would need transposed float8 copies of the input and of the gradient: costlier than the product
    saves at these sizes."""

    @staticmethod
    def forward(ctx, x, weight, out_dtype, fast_accum):
        ctx.save_for_backward(x, weight)
        ctx.fast_accum = fast_accum
        return fp8_rows_product(x, weight, out_dtype, fast_accum)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_fp8 = to_fp8(grad_out.contiguous(), per_row=True) if ctx.needs_input_grad[0] else None
        grads = rows_product_backward(grad_out, grad_fp8, x, weight, ctx.needs_input_grad[:2], ctx.fast_accum)
        return *grads, None, None


def fp8_rows_product(x, weight, out_dtype, fast_accum):
    """x [M, K] @ weight.T in float8, x and the weight each scaled per row."""
    x8, x_inv = to_fp8(x.contiguous(), per_row=True)
    w8, w_inv = to_fp8(weight.contiguous(), per_row=True)
    return scaled_mm(x8, w8.t(), scale_a=x_inv, scale_b=w_inv.t(), out_dtype=out_dtype, fast_accum=fast_accum)


def rows_product_backward(grad, grad_fp8, x, weight, needs_input_grad, fast_accum):
    """The gradients of x [M, K] @ weight.T from the output's gradient `grad` [M, N]: the input's
    from grad_fp8 (grad's float8 rows and inverse scales, from to_fp8 or a kernel that made them with
    grad) in float8 if given, else in grad's dtype; the weight's in grad's dtype (see FP8RowsMatmul)."""
    grad_x = grad_w = None
    if needs_input_grad[0] and grad_fp8 is not None:  # [M, N] @ [N, K]: rows of the gradient, columns of the weight
        w8, w_inv = to_fp8_columns(weight)  # float8 products: row-major first operand
        grad_x = scaled_mm(grad_fp8[0], w8.t(), scale_a=grad_fp8[1], scale_b=w_inv.t(), out_dtype=grad.dtype,
                           fast_accum=fast_accum)
    elif needs_input_grad[0]:
        grad_x = grad @ weight.to(grad.dtype)
    if needs_input_grad[1]:
        grad_w = weight_grad_product(grad.t(), x.to(grad.dtype), weight.dtype)
    return grad_x, grad_w


MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()  # torch.mm(..., out_dtype=): not in older torch


def weight_grad_product(a, b, weight_dtype):
    """a @ b for a weight gradient in weight_dtype. On CUDA a bf16/fp16 product writes float32 (the
    master weights' dtype) straight from its float32 accumulators: no rounding to 16 bits and no
    separate conversion pass over every weight gradient (124M: 85M values read and written again)."""
    if a.is_cuda and weight_dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16) and MM_OUT_DTYPE:
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).to(weight_dtype)


def fp8_linear(x, weight, bias=None, fast_accum=False):
    """F.linear with the products in float8 (FP8RowsMatmul); shapes that float8 kernels cannot take
    (a dimension not a multiple of 16) fall back to F.linear."""
    rows = x.numel() // x.size(-1)
    if not fp8_fits(rows, x.size(-1), weight.size(0)):
        return F.linear(x, weight, bias)
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    out = FP8RowsMatmul.apply(x.reshape(rows, x.size(-1)), weight, dtype, fast_accum).view(*x.shape[:-1], weight.size(0))
    return out if bias is None else out + bias.to(out.dtype)


class HeadCrossEntropy(torch.autograd.Function):
    """The tied output head and the mean cross-entropy loss as one step, for compiled training.

    The logits of a large vocabulary are the biggest tensor of a step (124M config: 32768 x 50304).
    Here they are written once (the head's product) and read twice, both in the forward: once for
    the log-sum-exp and once for their gradient softmax - one-hot, which does not depend on the
    incoming gradient (a scalar scale aside), so the logits need not live until the backward. On
    CUDA with Triton both passes are one kernel (kernels.py); elsewhere PyTorch's ops do the same
    arithmetic (kernels.cross_entropy_grad_reference). With fp8 the head's three products
    run in float8 and the logits' gradient is written in float8 with a fixed scale: softmax -
    one-hot lies in [-1, 1], so no amax pass is needed; the weight-gradient product needs it
    transposed as well, which the kernel writes in the same pass. Targets of -1 are ignored, as in
    F.cross_entropy."""

    @staticmethod
    def forward(ctx, x, weight, targets, fp8, fast_accum):
        # x: [M, K] (the autocast dtype under autocast); weight: [V, K]; targets: [M]
        if fp8:
            x_op, x_inv = to_fp8(x)
            w_op, w_inv = to_fp8(weight)
            logits = scaled_mm(x_op, w_op.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=x.dtype, fast_accum=fast_accum)
        else:
            x_op, w_op = x, weight.to(x.dtype)
            x_inv = w_inv = None
            logits = x_op @ w_op.t()
        count = (targets >= 0).sum()
        grad_dtype, grad_scale = (FP8_GRADS, torch.finfo(FP8_GRADS).max) if fp8 else (logits.dtype, 1.0)
        loss_grad = kernels.cross_entropy_grad if kernels.runs_on(logits) else kernels.cross_entropy_grad_reference
        row_loss, grad, grad_t = loss_grad(logits, targets, grad_dtype, grad_scale,
                                           transposed=fp8 and ctx.needs_input_grad[1])
        ctx.save_for_backward(x_op, x_inv, w_op, w_inv, grad, grad_t, count)
        ctx.fp8, ctx.grad_scale, ctx.weight_dtype, ctx.out_dtype = fp8, grad_scale, weight.dtype, logits.dtype
        ctx.mark_non_differentiable(logits)
        return row_loss.sum() / count, logits

    @staticmethod
    def backward(ctx, grad_loss, _):
        x_op, x_inv, w_op, w_inv, grad, grad_t, count = ctx.saved_tensors
        scale = grad_loss.float() / count / ctx.grad_scale
        grad_w = None  # (a frozen head, as in LoRA training, needs no weight gradient)
        if ctx.fp8:
            grad_x = scaled_mm(grad, w_op.t().contiguous().t(), scale_a=scale, scale_b=w_inv, out_dtype=ctx.out_dtype)
            if ctx.needs_input_grad[1]:
                grad_w = scaled_mm(grad_t, x_op.t().contiguous().t(), scale_a=scale, scale_b=x_inv,
                                   out_dtype=torch.float32).to(ctx.weight_dtype)
        else:
            grad_x = ((grad @ w_op) * scale).to(ctx.out_dtype)
            if ctx.needs_input_grad[1]:
                grad_w = ((grad.t() @ x_op).float() * scale).to(ctx.weight_dtype)
        return grad_x, grad_w, None, None, None


def linear(x, layer, fp8, fast_accum=False):
    """A Linear layer's product, in float8 when asked and the layer is a plain nn.Linear (not LoRA)."""
    return fp8_linear(x, layer.weight, layer.bias, fast_accum) if fp8 and fusable(layer) else layer(x)


def rows_product(x, weight, fp8, fast_accum):
    """x [M, K] @ weight.T in the autocast dtype (else x's): in float8 with row scales if fp8 (the
    caller checked fp8_fits), else as autocast's F.linear would."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    return fp8_rows_product(x, weight, dtype, fast_accum) if fp8 else x.to(dtype) @ weight.to(dtype).t()


def rows_grad(kernel, reference, fp8, *tensors):
    """A product's output gradient from `tensors` through kernels.py's `kernel` where it serves them
    (which also casts it to float8 rows, if fp8, in the same pass), else through `reference` (PyTorch
    ops) and to_fp8. Returns the gradient and, if fp8, its (float8 rows, inverse scales), else None."""
    if kernels.runs_on(tensors[0]):
        grad, grad8, inv_scale = kernel(*tensors, fp8)
        return grad, (grad8, inv_scale) if fp8 else None
    grad = reference(*tensors)
    return grad, to_fp8(grad, per_row=True) if fp8 else None


class SwiGLUProduct(torch.autograd.Function):
    """silu(x @ w1.T) * (x @ w3.T) for training, the two products as one over the stacked [w1; w3]
    weight, in float8 if fp8. The backward takes the gradient through silu(gate) * up back to that
    product's output and (fp8) casts it to float8 rows in one pass over each row: kernels.py on CUDA,
    PyTorch ops elsewhere. (torch.compile makes that a looped reduction that reads each row twice:
    rows of 2 x hidden values are too long for its one-pass kernels.)"""

    @staticmethod
    def forward(ctx, x, weight, fp8, fast_accum):
        gate_up = rows_product(x, weight, fp8, fast_accum)
        ctx.save_for_backward(x, weight, gate_up)
        ctx.fp8, ctx.fast_accum = fp8, fast_accum
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_h):
        x, weight, gate_up = ctx.saved_tensors
        grad, grad_fp8 = rows_grad(kernels.swiglu_backward, kernels.swiglu_backward_reference, ctx.fp8,
                                   gate_up, grad_h.contiguous())
        return *rows_product_backward(grad, grad_fp8, x, weight, ctx.needs_input_grad[:2], ctx.fast_accum), None, None


class RopeQKVProduct(torch.autograd.Function):
    """q, k, v = x @ [wq; wk; wv].T for training, as one product (float8 if fp8), with q and k
    RoPE-rotated, returned as [B, T, heads, head_dim]. The backward takes the rotation back and lays
    the three gradients out as the product's output rows, (fp8) with their float8 copy, in one pass
    (kernels.py on CUDA, PyTorch ops elsewhere): compiled, that was a kernel for the rotation and a
    looped reduction reading the rows twice for the concatenation and the float8 cast."""

    @staticmethod
    def forward(ctx, x, weight, cos, sin, n_head, n_kv_head, fp8, fast_accum):
        B, T, dim = x.shape
        x = x.reshape(B * T, dim)
        qkv = rows_product(x, weight, fp8, fast_accum).view(B, T, -1)
        head_dim = qkv.size(-1) // (n_head + 2 * n_kv_head)
        q, k, v = qkv.split([n_head * head_dim, n_kv_head * head_dim, n_kv_head * head_dim], dim=-1)
        ctx.save_for_backward(x, weight, cos, sin)
        ctx.fp8, ctx.fast_accum = fp8, fast_accum
        return (rotate(q.view(B, T, n_head, head_dim), cos, sin),
                rotate(k.view(B, T, n_kv_head, head_dim), cos, sin), v.view(B, T, n_kv_head, head_dim))

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        x, weight, cos, sin = ctx.saved_tensors
        grad, grad_fp8 = rows_grad(kernels.qkv_rope_backward, kernels.qkv_rope_backward_reference, ctx.fp8,
                                   grad_q, grad_k, grad_v, cos, sin)
        grad_x, grad_w = rows_product_backward(grad, grad_fp8, x, weight, ctx.needs_input_grad[:2], ctx.fast_accum)
        return grad_x if grad_x is None else grad_x.view(*grad_q.shape[:2], -1), grad_w, *[None] * 6


class ResidualNorm(torch.autograd.Function):
    """out = x + y @ weight.T (a projection into the residual stream x) and rms_norm(out) * norm_weight,
    for training with float8 products. Both outputs go on: out down the residual stream, its norm into
    the next attention or feed-forward. So out's gradient in the backward is their sum, the
    residual's gradient plus the norm's; it is also the projection's output gradient, which its
    float8 input-gradient product needs as float8 rows. Here one pass over each row makes both (on
    CUDA a kernels.py kernel, which also sums the norm weight's gradient): separately, Inductor's
    norm backward (a reduction along the rows and down the columns at once) would not fuse the
    float8 cast, which then read every gradient once more in its own kernel. (Compiled, this needs
    train.py's FP8_BLOCKS_COMPILE, or Inductor recomputes the residual stream in chains of adds.)"""

    @staticmethod
    def forward(ctx, x, y, weight, norm_weight, eps, fp8, fast_accum):
        ctx.y_shape = y.shape
        y = y.reshape(-1, y.size(-1))
        out = x + rows_product(y, weight, fp8, fast_accum).view(x.shape)
        ctx.save_for_backward(y, weight, out, norm_weight)
        ctx.eps, ctx.fp8, ctx.fast_accum = eps, fp8, fast_accum
        return out, ref.rms_norm(out, norm_weight, eps)

    @staticmethod
    def backward(ctx, grad_out, grad_normed):
        y, weight, out, norm_weight = ctx.saved_tensors
        rows = [t.reshape(-1, out.size(-1)).contiguous() for t in (grad_out, grad_normed, out)]
        if kernels.runs_on(out):
            grad, grad8, inv_scale, grad_norm = kernels.residual_norm_backward(*rows, norm_weight, ctx.eps, ctx.fp8)
            grad_fp8 = (grad8, inv_scale) if ctx.fp8 else None
        else:
            grad, grad_norm = kernels.residual_norm_backward_reference(*rows, norm_weight, ctx.eps)
            grad_fp8 = to_fp8(grad, per_row=True) if ctx.fp8 else None
        grad_y, grad_w = rows_product_backward(grad, grad_fp8, y, weight, ctx.needs_input_grad[1:3], ctx.fast_accum)
        grad_y = grad_y if grad_y is None else grad_y.view(ctx.y_shape)
        return grad.view(out.shape), grad_y, grad_w, grad_norm.to(norm_weight.dtype), None, None, None


def residual_norm(x, y, weight, norm, fast_accum):
    """ResidualNorm of x [B, T, dim] and y [B, T, K] through weight [dim, K] (float8 where the shapes
    allow) and the RMSNorm module norm: (x + y @ weight.T, norm of it)."""
    fp8 = fp8_fits(y.numel() // y.size(-1), y.size(-1), weight.size(0))
    return ResidualNorm.apply(x, y, weight, norm.weight, norm.eps, fp8, fast_accum)


class CausalAttention(torch.autograd.Function):
    """Causal attention through kernels.py's Triton kernels (sdpa_kernel "triton"): q [B, T, heads, D],
    k and v [B, T, kv heads, D] in the layout the q/k/v product makes them, the output [B, T, heads, D]
    (the out-projection's rows without a transposed copy). The backward sums the gradients of k and v
    over the heads that share them inside its kernel."""

    @staticmethod
    def forward(ctx, q, k, v):
        scale = q.size(-1) ** -0.5
        out, lse = kernels.attention_forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return kernels.attention_backward(*ctx.saved_tensors, grad_out, ctx.scale)



# ---------------------------------------------------------------------------
# The fast model: the reference's training forward, from its modules and weights


class FastTransformer(nn.Module):
    """model.Transformer's training step (forward with targets) computed with the operations above.
    It holds the reference model as its only submodule, so its parameters are the reference's own:
    the optimizer, DDP, checkpoints and evaluation all see one model. Layers the fast path cannot
    fuse (LoRA-wrapped or biased products, dropout before a residual add) it calls as modules,
    following whatever they compute. In eval mode it is the reference model."""

    def __init__(self, model, fp8="off", fast_accum=True):
        super().__init__()
        if fp8 not in FP8_MODES:
            raise ConfigError(f"fp8 must be one of {FP8_MODES}, got {fp8!r}")
        self.triton_attention = getattr(getattr(model, "cfg", None), "sdpa_kernel", None) == "triton"
        check_reference(model, self.triton_attention)
        self.model = model
        self.fp8_blocks, self.fp8_head = fp8 in ("blocks", "all"), fp8 in ("head", "all")
        self.fast_accum = fast_accum

    def forward(self, idx, targets=None):
        m = self.model
        if not self.training:
            return m(idx, targets)
        T = idx.size(1)
        if T > m.cfg.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {m.cfg.block_size}")
        x, angles = m.tok_embeddings(idx), None
        if m.pos_embeddings is not None:
            x = x + m.pos_embeddings(torch.arange(T, device=idx.device))
        else:
            angles = (m.rope_cos[:T], m.rope_sin[:T])
        x = m.dropout(x)
        if torch.is_autocast_enabled(x.device.type):  # the bf16 residual stream, as the reference
            x = x.to(torch.get_autocast_dtype(x.device.type))
        if all(self.fuses_residuals(layer) for layer in m.layers):
            h = m.layers[0].attn_norm(x)  # each layer's normalised input, made by the layer before it
            for layer, next_norm in zip(m.layers, [layer.attn_norm for layer in m.layers[1:]] + [m.norm]):
                x, h = self.run(self.block_fused, layer, x, h, angles, next_norm)
            x = h
        else:
            for layer in m.layers:
                x = self.run(self.block, layer, x, angles)
            x = m.norm(x)
        return self.head_and_loss(x, targets)

    def run(self, f, *args):
        """f(*args), under activation checkpointing if the reference model has it on."""
        if self.model.checkpoint_layers and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(f, *args, use_reentrant=False)
        return f(*args)

    def block(self, layer, x, angles):
        """model.Block.forward."""
        attn, ffn = layer.attn, layer.ffn
        x = x + attn.resid_dropout(self.linear(self.attention(attn, layer.attn_norm(x), angles), attn.wo))
        return x + ffn.dropout(self.linear(self.swiglu(ffn, layer.ffn_norm(x)), ffn.w2))

    def fuses_residuals(self, layer):
        """Whether block_fused serves this layer: float8 blocks, plain projections into the residual
        stream (no bias, no LoRA) and no dropout after them."""
        attn, ffn = layer.attn, layer.ffn
        return (self.fp8_blocks and fusable(attn.wo, ffn.w2) and attn.wo.bias is None and ffn.w2.bias is None
                and attn.resid_dropout.p == 0 and ffn.dropout.p == 0)

    def block_fused(self, layer, x, h, angles, next_norm):
        """The same block given h = attn_norm(x); returns its output and next_norm of it (the next
        block's attn_norm, or the final norm). Each projection into the residual stream, the residual
        add and the norm after it are one ResidualNorm: the norm's backward then also makes the
        float8 copy of the projection's output gradient."""
        attn, ffn = layer.attn, layer.ffn
        x, h = residual_norm(x, self.attention(attn, h, angles), attn.wo.weight, layer.ffn_norm, self.fast_accum)
        return residual_norm(x, self.swiglu(ffn, h), ffn.w2.weight, next_norm, self.fast_accum)

    def linear(self, x, layer):
        """A Linear layer's product, in float8 with float8 blocks if it is a plain nn.Linear (not LoRA)."""
        return fp8_linear(x, layer.weight, layer.bias, self.fast_accum) if self.fp8_blocks and fusable(layer) else layer(x)

    def attention(self, attn, x, angles):
        """model.Attention.forward up to the out-projection: its input [B, T, heads * head_dim]."""
        B, T, _ = x.shape
        fp8, plain = self.fp8_blocks, fusable(attn.wq, attn.wk, attn.wv)
        if plain and attn.wq.bias is None and angles is not None:
            weight = torch.cat([attn.wq.weight, attn.wk.weight, attn.wv.weight])
            q, k, v = RopeQKVProduct.apply(x, weight, *angles, attn.n_head, attn.n_kv_head,
                                           fp8 and fp8_fits(B * T, x.size(-1), weight.size(0)), self.fast_accum)
        else:
            q, k, v = (fused_linear(x, (attn.wq, attn.wk, attn.wv), fp8, self.fast_accum) if plain
                       else (attn.wq(x), attn.wk(x), attn.wv(x)))
            q = q.view(B, T, attn.n_head, attn.head_dim)
            k, v = k.view(B, T, attn.n_kv_head, attn.head_dim), v.view(B, T, attn.n_kv_head, attn.head_dim)
            if angles is not None:
                q, k = rotate(q, *angles), rotate(k, *angles)
        if (self.triton_attention and kernels.runs_on(q) and attn.cfg.is_causal and not attn.cfg.dropout
                and q.dtype in (torch.bfloat16, torch.float16)):
            y = CausalAttention.apply(q, k, v)  # [B, T, H, D]
        else:
            y = attn.attend(q, k, v)
        return y.reshape(B, T, attn.n_head * attn.head_dim)

    def swiglu(self, ffn, x):
        """model.FeedForward.forward up to w2: silu(w1 x) * w3 x."""
        fp8 = self.fp8_blocks
        if fusable(ffn.w1, ffn.w3) and ffn.w1.bias is None:
            rows, weight = x.numel() // x.size(-1), torch.cat([ffn.w1.weight, ffn.w3.weight])
            return SwiGLUProduct.apply(x.reshape(rows, x.size(-1)), weight,
                                       fp8 and fp8_fits(rows, x.size(-1), weight.size(0)),
                                       self.fast_accum).view(*x.shape[:-1], -1)
        gate, up = (fused_linear(x, (ffn.w1, ffn.w3), fp8, self.fast_accum) if fusable(ffn.w1, ffn.w3)
                    else (ffn.w1(x), ffn.w3(x)))
        return F.silu(gate) * up

    def head_and_loss(self, x, targets):
        """The head and the loss of model.Transformer.forward; in float8 with fp8 head, and as
        one HeadCrossEntropy when compiled (training with targets)."""
        weight = self.model.head_weight()
        if targets is not None and (self.fp8_head or torch.compiler.is_compiling()):
            rows, dim, vocab = x.numel() // x.size(-1), x.size(-1), weight.size(0)
            fp8 = self.fp8_head and fp8_fits(rows, dim, vocab)
            loss, logits = HeadCrossEntropy.apply(x.reshape(rows, dim), weight, targets.reshape(rows), fp8,
                                                  self.fast_accum)
            return logits.view(*x.shape[:-1], vocab), loss
        logits = F.linear(x, weight)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)


# ---------------------------------------------------------------------------
# Compiler and library settings for the fast path

# Inductor setting behind train config compile_tuning (a torch.compile option): coordinate descent
# tries neighbouring block sizes and warp counts for each generated kernel and keeps the fastest.
# (Inductor's multi_kernel, persistent beside looped reductions, gained 2% more on the 124M config
# but fails to reload its kernels from the compile cache on torch 2.11: docs/BENCHMARKS.md.)
COMPILE_TUNING = {"coordinate_descent_tuning": True}
# Inductor setting for float8 blocks (train config fp8 blocks or all). Inductor writes a pointwise
# result that several kernels read only once it takes 4 reads to recompute; until then each reader
# recomputes it. The residual stream's x + projection (ResidualNorm) then became chains of adds
# recomputed in later layers' kernels, and the copies saved for the backward were written by extra
# kernels (124M: 0.7 ms per step). With 1 each layer's residual is written where it is made, by its
# norm's kernel.
FP8_BLOCKS_COMPILE = {"realize_reads_threshold": 1}


def compile_options(cfg):
    """The Inductor options torch.compile gets for train config cfg (None: its defaults)."""
    options = {**(COMPILE_TUNING if cfg.compile_tuning else {}),
               **(FP8_BLOCKS_COMPILE if cfg.fp8 in ("blocks", "all") else {})}
    return options or None


def cublaslt_without_workspace():
    """For float8 blocks on CUDA. The blocks' float8 products go through cuBLASLt. Given a
    workspace, it picks kernels that clear part of it before each product: a memset and a few
    microseconds' gap, about 100 times a step for the 124M config. Without one it picks kernels that
    need none: +1.5% (124M fp8=all); for bf16 and fp8=head steps it made no difference
    (docs/BENCHMARKS.md). torch reads the size at its first cuBLASLt product, so it holds for the
    whole process from then; a value the user set stays."""
    os.environ.setdefault("CUBLASLT_WORKSPACE_SIZE", "0")


def main(argv=None):
    argparse.ArgumentParser(description="Print the fingerprints of the model.py code that the fast path "
                                        "re-implements, as fast.REFERENCE and TRITON_REFERENCE hold them.").parse_args(argv)
    for table, names in (("REFERENCE", REFERENCE), ("TRITON_REFERENCE", TRITON_REFERENCE)):
        print(f"{table} = {{")
        for name in names:
            print(f'    "{name}": "{fingerprint(reference_function(name))}",')
        print("}")


if __name__ == "__main__":
    main()
