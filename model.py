"""
Nano's model: a Llama-style decoder (or bidirectional encoder) in plain PyTorch.

Read top to bottom: the config, then the small modules (RMSNorm, rotary positions,
attention with grouped-query heads and a KV cache, SwiGLU feed-forward, the block),
then the Transformer that ties them together, then sampling and generation.

Conventions every engine (infer_c/, infer/) follows as well:
  * RoPE rotates adjacent pairs (2i, 2i+1) of each head as (real, imaginary), with
    frequencies theta^(-2i/head_dim); the 2024.10 file layout depends on this.
  * The output head is the token embedding matrix (tied weights).
  * The KV cache holds K and V with n_kv_head heads (before GQA expansion).
"""

import dataclasses
import json
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import kernels

# ---------------------------------------------------------------------------
# Config: a dataclass that round-trips through plain JSON and is validated on load


class ConfigError(ValueError):
    """A config file or dict is malformed; the message names the offending key."""


def dataclass_from_dict(cls, d, where="config"):
    """Build dataclass `cls` from a plain dict, refusing unknown keys and wrong types.

    Shared by every JSON config in Nano (model, training, SFT, LoRA) so that a
    misspelt key or a string where a number belongs stops with a message naming it.
    """
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        if key.startswith("_"):  # "_comment" and friends are allowed and ignored
            continue
        if key not in fields:
            close = [k for k in fields if k.lower() == key.lower() or _edit_distance(k, key) <= 2]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}")
        kwargs[key] = _check_type(value, fields[key].type, f"{where}: key {key!r}")
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where}: {e}") from None
    if hasattr(obj, "validate"):
        obj.validate(where)
    return obj


def _edit_distance(a, b):
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _check_type(value, annotation, where):
    """Check a JSON value against a (string) dataclass annotation; ints may stand for floats."""
    ann = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    ann = ann.replace("typing.", "")
    optional = ann.startswith("Optional[") or ann.endswith("| None")
    base = ann.removeprefix("Optional[").removesuffix("]").removesuffix(" | None").strip()
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where} must not be null")
    if base == "bool":
        ok = isinstance(value, bool)
    elif base == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif base == "str":
        ok = isinstance(value, str)
    elif base.startswith("list"):
        ok = isinstance(value, list)
    elif base.startswith("dict"):
        ok = isinstance(value, dict)
    else:
        ok = True
    if not ok:
        raise ConfigError(f"{where} must be {base}, got {json.dumps(value)}")
    return value


def read_json(path, what="config file", error=ConfigError):
    """Parse a JSON file; a missing or malformed file raises `error` naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        raise error(f"{path}: not valid JSON: {e}") from None


def load_json(path, cls, where=None):
    """Read a JSON file into dataclass `cls`, with errors that name the file and key."""
    return dataclass_from_dict(cls, read_json(path), where or str(path))


def load_torch_file(path, what="checkpoint"):
    """torch.load(weights_only=True) with errors that name the file: missing, truncated, not a
    torch file, or holding objects other than tensors and plain data."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except Exception as e:
        raise ConfigError(f"cannot load {what} {path}: {type(e).__name__}: {e}") from None


SDPA_KERNELS = ("auto", "flash", "mem_efficient", "cudnn", "math", "triton")
FP8_MODES = ("off", "head", "blocks", "all")


@dataclass
class ModelConfig:
    block_size: int = 256  # context length
    vocab_size: int = 4096  # embedding rows; may exceed the tokenizer's vocab (padding for speed)
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 8
    n_kv_head: int = 4  # grouped-query attention: n_head % n_kv_head == 0
    n_hidden: int = 704  # SwiGLU hidden size
    head_dim: Optional[int] = None  # default n_embd // n_head
    dropout: float = 0.0
    bias: bool = False
    use_rope: bool = True  # False: learned absolute positions
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    is_causal: bool = True  # False: bidirectional (encoder-style) attention
    # auto | flash | mem_efficient | cudnn | math: SDPA's backends (honoured on CUDA); triton: kernels.py's
    # attention where it applies (CUDA, causal, no KV cache, no dropout while training, bf16/fp16 q, k, v:
    # training under autocast), else as auto
    sdpa_kernel: str = "auto"

    def __post_init__(self):
        if self.head_dim is None and isinstance(self.n_embd, int) and isinstance(self.n_head, int) and self.n_head > 0:
            self.head_dim = self.n_embd // self.n_head

    def validate(self, where="model config"):
        for key in ("block_size", "vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head", "n_hidden", "head_dim"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{where}: {key} must be positive, got {getattr(self, key)}")
        if self.head_dim * self.n_head != self.n_embd:
            raise ConfigError(
                f"{where}: n_embd ({self.n_embd}) must equal n_head ({self.n_head}) x head_dim ({self.head_dim})"
                " (n_embd % n_head must be 0)")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"{where}: n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.use_rope and self.head_dim % 2:
            raise ConfigError(f"{where}: RoPE needs an even head_dim, got {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{where}: dropout must be in [0, 1), got {self.dropout}")
        if self.sdpa_kernel not in SDPA_KERNELS:
            raise ConfigError(f"{where}: sdpa_kernel must be one of {SDPA_KERNELS}, got {self.sdpa_kernel!r}")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ConfigError(f"{where}: norm_eps and rope_theta must be positive")

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d, where="model config"):
        return dataclass_from_dict(cls, d, where)


# ---------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x, weight, eps):
    # normalise in float32 even under autocast: the mean of squares is precision-sensitive
    # (F.rms_norm is x * rsqrt(mean(x^2) + eps): one fused kernel on CUDA instead of four)
    return (F.rms_norm(x.float(), (x.size(-1),), eps=eps) * weight).type_as(x)


def rope_tables(head_dim, max_len, theta):
    """cos and sin of shape [max_len, head_dim/2]: pair i of position t turns by t * theta^(-2i/head_dim)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    """Rotate adjacent pairs (x[2i], x[2i+1]) of the last dim. x: [B, T, H, D]; cos/sin: [T, D/2].

    Attention rotates q and k in this token-major layout, before it transposes them to the [B, H, T, D]
    view that attention kernels take: the rotation then reads and writes memory in order, and the
    gradients that come back from attention need no transposing copy either."""
    if x.device.type in ("cpu", "cuda") and not torch.compiler.is_compiling():
        return rope_complex(x, cos, sin)
    return rope_real(x, cos, sin)


def rope_real(x, cos, sin):
    """RoPE spelt out in real arithmetic: what torch.compile fuses into one kernel (and the path for
    devices without complex support)."""
    x_even, x_odd = x.float()[..., 0::2], x.float()[..., 1::2]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [T, 1, D/2]: the same angles for every head
    out_even = (x_even * cos - x_odd * sin).to(x.dtype)
    out_odd = (x_even * sin + x_odd * cos).to(x.dtype)
    # cast before stacking, not after: torch 2.11's compiler dropped the gradient of a custom autograd
    # Function's output (RopeQKVProduct's q and k) that was a no-op cast (float32 training) of a view
    return torch.stack((out_even, out_odd), dim=-1).flatten(-2)


def rope_complex(x, cos, sin):
    """The same rotation with each pair read as one complex number x[2i] + i x[2i+1], times
    cos + i sin: three GPU kernels instead of about ten when running eagerly (no torch.compile),
    which is most of the step time of a small model on a GPU (and it is a little faster on the CPU)."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * torch.complex(cos, sin).unsqueeze(-2)).flatten(-2).type_as(x)


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
        return (apply_rope(q.view(B, T, n_head, head_dim), cos, sin),
                apply_rope(k.view(B, T, n_kv_head, head_dim), cos, sin), v.view(B, T, n_kv_head, head_dim))

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
        return out, rms_norm(out, norm_weight, eps)

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


def _sdpa_backends(name):
    from torch.nn.attention import SDPBackend
    return {"flash": [SDPBackend.FLASH_ATTENTION], "mem_efficient": [SDPBackend.EFFICIENT_ATTENTION],
            "cudnn": [SDPBackend.CUDNN_ATTENTION], "math": [SDPBackend.MATH]}[name]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.wq = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=cfg.bias)
        self.wk = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.bias)
        self.wv = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.bias)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.fp8 = self.fast_accum = False  # products in float8 while training (Transformer.set_fp8)

    def forward(self, x, rope, cache=None, pos=0):
        y = self.mix(x, rope, cache, pos)
        return self.resid_dropout(linear(y, self.wo, self.fp8 and self.training, self.fast_accum))

    def mix(self, x, rope, cache=None, pos=0):
        """Attention up to the out-projection: its input [B, T, heads * head_dim]."""
        B, T, _ = x.shape
        fp8 = self.fp8 and self.training
        plain = fusable(self.wq, self.wk, self.wv) and self.wq.bias is None
        if self.training and plain and rope is not None and cache is None:
            weight = torch.cat([self.wq.weight, self.wk.weight, self.wv.weight])
            q, k, v = RopeQKVProduct.apply(x, weight, *rope, self.n_head, self.n_kv_head,
                                           fp8 and fp8_fits(B * T, x.size(-1), weight.size(0)), self.fast_accum)
        else:
            if self.training and fusable(self.wq, self.wk, self.wv):
                q, k, v = fused_linear(x, (self.wq, self.wk, self.wv), fp8, self.fast_accum)
            else:
                q, k, v = self.wq(x), self.wk(x), self.wv(x)
            q = q.view(B, T, self.n_head, self.head_dim)
            k = k.view(B, T, self.n_kv_head, self.head_dim)
            v = v.view(B, T, self.n_kv_head, self.head_dim)
            if rope is not None:
                cos, sin = rope
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if (self.cfg.sdpa_kernel == "triton" and kernels.runs_on(q) and cache is None and self.cfg.is_causal
                and q.dtype in (torch.bfloat16, torch.float16) and not (self.training and self.cfg.dropout)):
            y = CausalAttention.apply(q, k, v)  # [B, T, H, D]
        else:
            y = self.sdpa(q, k, v, cache, pos)
        return y.reshape(B, T, self.n_head * self.head_dim)

    def sdpa(self, q, k, v, cache, pos):
        """Attention through F.scaled_dot_product_attention, with the KV cache if one is given:
        q [B, T, H, D], k and v [B, T, KV, D]; returns [B, T, H, D] (a transposed view)."""
        B, T = q.shape[:2]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D] views
        mask, causal = None, self.cfg.is_causal
        if cache is not None:
            # compact cache: [B, n_kv_head, max_len, head_dim]; new keys go to [pos, pos+T)
            k_cache, v_cache = cache
            k_cache[:B, :, pos:pos + T] = k.to(k_cache.dtype)
            v_cache[:B, :, pos:pos + T] = v.to(v_cache.dtype)
            k, v = k_cache[:B, :, :pos + T].to(q.dtype), v_cache[:B, :, :pos + T].to(q.dtype)
            if causal and pos > 0:
                # SDPA's is_causal aligns the mask top-left; with a non-empty cache the
                # queries sit at the bottom-right, so spell the mask out (or skip it for T=1)
                causal = False
                if T > 1:
                    mask = torch.ones(T, pos + T, dtype=torch.bool, device=q.device).tril(diagonal=pos)

        gqa = self.n_head != self.n_kv_head
        kernel = self.cfg.sdpa_kernel
        chosen = kernel not in ("auto", "triton") and q.is_cuda
        with nn.attention.sdpa_kernel(_sdpa_backends(kernel)) if chosen else nullcontext():
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal and T > 1,
                dropout_p=self.cfg.dropout if self.training else 0.0, enable_gqa=gqa)
        return y.transpose(1, 2)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.n_embd, cfg.n_hidden, bias=cfg.bias)
        self.w2 = nn.Linear(cfg.n_hidden, cfg.n_embd, bias=cfg.bias)
        self.w3 = nn.Linear(cfg.n_embd, cfg.n_hidden, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)
        self.fp8 = self.fast_accum = False  # products in float8 while training (Transformer.set_fp8)

    def forward(self, x):
        return self.dropout(linear(self.hidden(x), self.w2, self.fp8 and self.training, self.fast_accum))

    def hidden(self, x):
        """silu(w1 x) * w3 x: the input of w2."""
        fp8 = self.fp8 and self.training
        if self.training and fusable(self.w1, self.w3) and self.w1.bias is None:
            rows, weight = x.numel() // x.size(-1), torch.cat([self.w1.weight, self.w3.weight])
            return SwiGLUProduct.apply(x.reshape(rows, x.size(-1)), weight, fp8 and fp8_fits(rows, x.size(-1), weight.size(0)),
                                       self.fast_accum).view(*x.shape[:-1], -1)
        gate, up = (fused_linear(x, (self.w1, self.w3), fp8, self.fast_accum) if self.training and fusable(self.w1, self.w3)
                    else (self.w1(x), self.w3(x)))
        return F.silu(gate) * up


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.ffn = FeedForward(cfg)

    def forward(self, x, rope, cache=None, pos=0):
        x = x + self.attn(self.attn_norm(x), rope, cache, pos)
        return x + self.ffn(self.ffn_norm(x))

    def fuses_residuals(self):
        """Whether forward_fused serves this block: training with float8 blocks, plain projections
        into the residual stream (no bias, no LoRA) and no dropout after them."""
        return (self.training and self.attn.fp8 and fusable(self.attn.wo, self.ffn.w2) and self.attn.wo.bias is None
                and self.ffn.w2.bias is None and self.attn.resid_dropout.p == 0 and self.ffn.dropout.p == 0)

    def forward_fused(self, x, h, rope, next_norm):
        """The same block for training with float8 products, given h = attn_norm(x); returns its output
        and next_norm of it (the next block's attn_norm, or the final norm). Each projection into
        the residual stream, the residual add and the norm after it are one ResidualNorm: the
        norm's backward then also makes the float8 copy of the projection's output gradient."""
        attn, ffn = self.attn, self.ffn
        x, h = residual_norm(x, attn.mix(h, rope), attn.wo.weight, self.ffn_norm, attn.fast_accum)
        return residual_norm(x, ffn.hidden(h), ffn.w2.weight, next_norm, ffn.fast_accum)


# ---------------------------------------------------------------------------
# The Transformer


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_embeddings = None if cfg.use_rope else nn.Embedding(cfg.block_size, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        # activation checkpointing (train config activation_checkpointing): a training choice, not
        # part of the architecture, so it is a plain attribute and not in the config or checkpoint
        self.checkpoint_layers = False
        self.fp8_head = self.fp8_fast_accum = False  # likewise training choices: see set_fp8
        if cfg.use_rope:
            cos, sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2 n_layer)
        for name, p in self.named_parameters():
            if name.endswith("attn.wo.weight") or name.endswith("ffn.w2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, cache=None, pos=0, last_only=False):
        """idx: [B, T] token ids. With `targets` ([B, T], -1 = ignore) returns (logits, mean loss).

        `cache` (from make_cache) and `pos` (the position of idx[:, 0]) decode incrementally.
        `last_only` computes logits for the last position only (generation).
        """
        B, T = idx.shape
        if pos + T > self.cfg.block_size:
            raise ValueError(f"sequence of {pos + T} tokens exceeds block_size {self.cfg.block_size}")
        x = self.tok_embeddings(idx)
        rope = None
        if self.pos_embeddings is not None:
            x = x + self.pos_embeddings(torch.arange(pos, pos + T, device=idx.device))
        else:
            rope = (self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T])
        x = self.dropout(x)
        if torch.is_autocast_enabled(x.device.type):
            # the residual stream in the autocast dtype (bf16): every residual add and norm then moves
            # half the bytes of float32, most of a GPU step's memory traffic (norms still compute in fp32)
            x = x.to(torch.get_autocast_dtype(x.device.type))
        def run(f, *args):  # activation checkpointing: keep each layer's input, recompute the rest in the backward
            if self.checkpoint_layers and self.training and torch.is_grad_enabled():
                return torch.utils.checkpoint.checkpoint(f, *args, use_reentrant=False)
            return f(*args)

        if cache is None and all(layer.fuses_residuals() for layer in self.layers):
            h = self.layers[0].attn_norm(x)  # each layer's normalised input, made by the layer before it
            for layer, next_norm in zip(self.layers, [layer.attn_norm for layer in self.layers[1:]] + [self.norm]):
                x, h = run(layer.forward_fused, x, h, rope, next_norm)
            x = h
        else:
            for i, layer in enumerate(self.layers):
                x = run(layer, x, rope) if cache is None else layer(x, rope, cache[i], pos)
            x = self.norm(x)
        if last_only:
            x = x[:, -1:]
        fp8 = self.fp8_head and self.training
        if targets is not None and (fp8 or torch.compiler.is_compiling()):
            # compiled training: head and loss as one operation that touches the logits least
            rows, dim, vocab = x.numel() // x.size(-1), x.size(-1), self.cfg.vocab_size
            fp8 = fp8 and fp8_fits(rows, dim, vocab)
            loss, logits = HeadCrossEntropy.apply(x.reshape(rows, dim), self.tok_embeddings.weight,
                                                  targets.reshape(rows), fp8, self.fp8_fast_accum)
            return logits.view(*x.shape[:-1], vocab), loss
        logits = F.linear(x, self.tok_embeddings.weight)  # tied output head
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def set_fp8(self, mode, fast_accum=False):
        """Which training-time products run in float8: "off", "head" (the output head), "blocks" (every
        linear layer of the blocks) or "all" (both); fast_accum: their fast accumulation (see
        scaled_mm). Evaluation and generation always use the weights' own precision."""
        if mode not in FP8_MODES:
            raise ConfigError(f"fp8 must be one of {FP8_MODES}, got {mode!r}")
        for layer in self.layers:
            layer.attn.fp8 = layer.ffn.fp8 = mode in ("blocks", "all")
            layer.attn.fast_accum = layer.ffn.fast_accum = fast_accum
        self.fp8_head, self.fp8_fast_accum = mode in ("head", "all"), fast_accum

    # -- KV cache --------------------------------------------------------------

    def make_cache(self, batch_size=1, max_len=None, dtype=None, device=None):
        """One (K, V) pair per layer, each [B, n_kv_head, max_len, head_dim]: compact, before GQA expansion."""
        max_len = max_len or self.cfg.block_size
        p = self.tok_embeddings.weight
        dtype, device = dtype or p.dtype, device or p.device
        shape = (batch_size, self.cfg.n_kv_head, max_len, self.cfg.head_dim)
        return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                for _ in range(self.cfg.n_layer)]

    # -- accounting ------------------------------------------------------------

    def num_params(self, non_embedding=False):
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.pos_embeddings is not None:
            n -= self.pos_embeddings.weight.numel()
        return n

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 L H Q T."""
        c = self.cfg
        T = seq_len or c.block_size
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.n_head * c.head_dim * T

    def estimate_mfu(self, tokens_per_sec, peak_flops, seq_len=None):
        """Model FLOPs utilisation: achieved training FLOP/s over the device's peak."""
        return self.flops_per_token(seq_len) * tokens_per_sec / peak_flops

    # -- decoding ----------------------------------------------------------------

    @torch.no_grad()
    def one_pass(self, idx):
        """Non-autoregressive decode for bidirectional models: argmax at every position in one forward."""
        logits, _ = self(idx)
        return logits.argmax(dim=-1)

    @torch.no_grad()
    def generate(self, prompt_ids, max_new_tokens=128, temperature=1.0, top_k=0, top_p=1.0,
                 repetition_penalty=1.0, eos_id=None, callback=None, generator=None):
        """Autoregressive sampling with the KV cache; returns the new token ids (without the prompt).

        Stops at `eos_id` (not returned), after max_new_tokens, or when the context is full.
        `callback(token_id)` is called for every new token (streaming); returning True stops.
        """
        if not self.cfg.is_causal:
            raise ValueError("generate() needs a causal model; use one_pass() for bidirectional models")
        was_training = self.training
        self.eval()
        ids = list(prompt_ids)
        if not ids:
            raise ValueError("generate() needs at least one prompt token")
        ids = ids[-self.cfg.block_size:]  # keep the most recent context that fits
        device = self.tok_embeddings.weight.device
        cache = self.make_cache(1, self.cfg.block_size)
        logits, _ = self(torch.tensor([ids], device=device), cache=cache, pos=0, last_only=True)
        pos, out = len(ids), []
        for _ in range(max_new_tokens):
            nxt = sample_next(logits[0, -1], temperature, top_k, top_p, repetition_penalty, ids, generator)
            if eos_id is not None and nxt == eos_id:
                break
            ids.append(nxt)
            out.append(nxt)
            if callback is not None and callback(nxt):
                break
            if pos >= self.cfg.block_size:
                break
            logits, _ = self(torch.tensor([[nxt]], device=device), cache=cache, pos=pos, last_only=True)
            pos += 1
        self.train(was_training)
        return out


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, previous_ids=(), generator=None):
    """Pick the next token from a [vocab] logits vector. The C and browser engines follow the same order:

    1. repetition penalty on every distinct previous token: divide positive logits, multiply negative
       ones (so a penalty > 1 always makes the token less likely, whatever the logit's sign);
    2. temperature 0 -> argmax (greedy); otherwise divide by the temperature;
    3. top-k: keep the k largest (0 = off);
    4. top-p: keep the smallest set of most likely tokens whose probability reaches p (always >= 1 token);
    5. sample from the softmax of what is left.
    """
    logits = logits.detach().float().clone()
    if repetition_penalty != 1.0 and len(previous_ids):
        prev = torch.tensor(sorted(set(previous_ids)), device=logits.device)
        vals = logits[prev]
        logits[prev] = torch.where(vals > 0, vals / repetition_penalty, vals * repetition_penalty)
    if temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits[logits < kth] = -float("inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        cum_before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly more likely tokens
        drop = cum_before >= top_p
        drop[0] = False
        logits[order[drop]] = -float("inf")
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


# ---------------------------------------------------------------------------
# LoRA: low-rank adapters that attach to, detach from and merge into the linear layers.
# The adapted layer computes W x + (alpha / rank) * B (A x). B starts at zero, so a fresh
# adapter changes nothing; only A and B train. Parameter names extend the base layer's
# (layers.0.attn.wq.weight -> layers.0.attn.wq.lora_A / lora_B), which is also how adapter
# checkpoints and the engines' adapter files name them.

LORA_TARGETS = {"wq": "attn", "wk": "attn", "wv": "attn", "wo": "attn", "w1": "ffn", "w2": "ffn", "w3": "ffn"}


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list = dataclasses.field(default_factory=lambda: ["wq", "wk", "wv", "wo"])

    def validate(self, where="lora config"):
        if self.rank <= 0:
            raise ConfigError(f"{where}: rank must be positive, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{where}: dropout must be in [0, 1), got {self.dropout}")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"{where}: targets must be distinct names from {list(LORA_TARGETS)}, got {self.targets}")

    @property
    def scale(self):
        return self.alpha / self.rank


class LoRALinear(nn.Linear):
    """A Linear that shares the base layer's weight and bias and adds a low-rank update."""

    def __init__(self, base: nn.Linear, cfg: LoRAConfig):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the very same Parameters: nothing is copied
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(cfg.rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, cfg.rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.scale = cfg.scale
        self.lora_dropout = nn.Dropout(cfg.dropout)
        self.lora_enabled = True

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        if self.lora_enabled:
            out = out + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scale
        return out

    def merged_weight(self):
        return self.weight + self.scale * (self.lora_B @ self.lora_A)


def _lora_sites(model):
    """(parent module, attribute name) of every layer LoRA can adapt, in a fixed order."""
    for layer in model.layers:
        for name, part in LORA_TARGETS.items():
            yield getattr(layer, part), name


def add_lora(model, cfg: LoRAConfig):
    """Wrap the target layers with fresh adapters (B = 0: the model's outputs do not change)."""
    cfg.validate()
    for parent, name in _lora_sites(model):
        layer = getattr(parent, name)
        if isinstance(layer, LoRALinear):
            raise ValueError("the model already has LoRA adapters: detach or merge them first")
        if name in cfg.targets:
            setattr(parent, name, LoRALinear(layer, cfg))
    model.lora_config = cfg
    return model


def detach_lora(model):
    """Remove the adapters; the base weights are untouched."""
    for parent, name in _lora_sites(model):
        layer = getattr(parent, name)
        if isinstance(layer, LoRALinear):
            plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                              device="meta")
            plain.weight, plain.bias = layer.weight, layer.bias
            setattr(parent, name, plain)
    model.lora_config = None
    return model


@torch.no_grad()
def merge_lora(model):
    """Fold every adapter into its base weight (W += scale B A) and remove the adapters."""
    for parent, name in _lora_sites(model):
        layer = getattr(parent, name)
        if isinstance(layer, LoRALinear):
            layer.weight.copy_(layer.merged_weight())
    return detach_lora(model)


def set_lora_enabled(model, enabled):
    for parent, name in _lora_sites(model):
        layer = getattr(parent, name)
        if isinstance(layer, LoRALinear):
            layer.lora_enabled = enabled


def lora_state_dict(model):
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if ".lora_" in k}


def base_state_dict(model):
    return {k: v for k, v in model.state_dict().items() if ".lora_" not in k}


def weights_fingerprint(model_config, state_dict):
    """Identity of a base model: sha256 over its config (JSON, sorted keys) and every base tensor's
    name, shape and float32 bytes (names sorted; LoRA tensors excluded). Adapters record it so that
    attaching one to a different base fails loudly instead of producing garbage."""
    import hashlib
    h = hashlib.sha256(json.dumps(model_config, sort_keys=True).encode())
    for name in sorted(k for k in state_dict if ".lora_" not in k):
        t = state_dict[name].detach().cpu().float().contiguous()
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def adapter_checkpoint(model, base_model_config, base_fingerprint, extra=None):
    """The adapter-only checkpoint: LoRA tensors, LoRA config and the identity of the base."""
    ck = {"format": "nano-lora", "version": 1,
          "lora_config": dataclasses.asdict(model.lora_config),
          "base": {"model_config": base_model_config, "fingerprint": base_fingerprint},
          "adapter": lora_state_dict(model)}
    ck.update(extra or {})
    return ck


def check_adapter(adapter, base_ck, where="adapter"):
    """Refuse an adapter whose base is not this checkpoint's model (config and weights)."""
    if not isinstance(adapter, dict) or adapter.get("format") != "nano-lora" or "adapter" not in adapter:
        raise ConfigError(f"{where} is not a Nano LoRA adapter checkpoint")
    base = adapter.get("base", {})
    if base.get("model_config") != base_ck["model_config"]:
        raise ConfigError(f"{where} was made for a different model shape than this base "
                          f"({base.get('model_config')} vs {base_ck['model_config']})")
    fp = weights_fingerprint(base_ck["model_config"], base_ck["model"])
    if base.get("fingerprint") != fp:
        raise ConfigError(f"{where} was trained on a different base model (weight fingerprint "
                          f"{str(base.get('fingerprint'))[:12]}... vs this base {fp[:12]}...)")


def load_adapter(path, base_ck):
    """Load an adapter checkpoint (weights_only) and check that it belongs to base_ck."""
    adapter = load_torch_file(path, "adapter")
    check_adapter(adapter, base_ck, path)
    return adapter


def attach_lora(model, adapter):
    """Add adapters shaped by the adapter checkpoint's config and load its tensors (all must match)."""
    cfg = dataclass_from_dict(LoRAConfig, adapter["lora_config"], "adapter lora_config")
    add_lora(model, cfg)
    expected = set(lora_state_dict(model))
    got = set(adapter["adapter"])
    if expected != got:
        detach_lora(model)
        raise ConfigError(f"adapter tensors do not match its config: missing {sorted(expected - got)[:3]}, "
                          f"unexpected {sorted(got - expected)[:3]}")
    try:
        model.load_state_dict(adapter["adapter"], strict=False)
    except RuntimeError as e:
        detach_lora(model)
        raise ConfigError(f"adapter tensors do not fit this model: {e}") from None
    return model
