"""
Nano's model: a Llama-style decoder (or bidirectional encoder) in plain PyTorch.

Read top to bottom: the config, then the small modules (RMSNorm, rotary positions,
attention with grouped-query heads and a KV cache, SwiGLU feed-forward, the block),
then the Transformer that ties them together, then generation (the Decoder, the one decode loop
that generate(), serve.py and problem.py share) and sampling, then LoRA.

This is the only forward: training on a CPU or a GPU, eager or compiled, with or without float8,
evaluation and generation all run these modules. Speed enters only from outside, with the same call
contracts (speed.py: a float8 Linear in place of nn.Linear, the head and the loss as one step in
place of OutputHead, Triton attention in place of ScaledDotProduct), through torch.compile, and
through CUDA graphs around the training step; so an edit here takes effect everywhere.

Conventions every engine (infer_c/, infer/) follows as well:
  * RoPE rotates adjacent pairs (2i, 2i+1) of each head as (real, imaginary), with
    frequencies theta^(-2i/head_dim); the 2024.10 file layout depends on this.
  * The output head is the token embedding matrix (tied weights), unless tie_embeddings is off
    (models imported from Hugging Face with their own head, hf.py).
  * The KV cache holds K and V with n_kv_head heads (before GQA expansion).
"""

import dataclasses
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from files import ConfigError, check_finite, dataclass_from_dict

# ---------------------------------------------------------------------------
# Config: a dataclass that round-trips through plain JSON and is validated on load

SDPA_KERNELS = ("auto", "flash", "mem_efficient", "cudnn", "math", "triton")
ACTIVATIONS = ("swiglu", "relu2")
# The recipe options (docs/RECIPES.md) and the value that means "off": today's model. An engine that
# lacks one refuses a model that has it switched on, by this name (export.py).
RECIPE_DEFAULTS = {"qk_norm": False, "activation": "swiglu", "logit_softcap": None}
MAX_PARAMS = 10 ** 12  # a config past this is a typo (4 TB of float32 weights), refused before allocation


@dataclass
class ModelConfig:
    block_size: int = 256  # context length
    vocab_size: int = 4096  # embedding rows; may exceed the tokenizer's vocab (padding for speed)
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 8
    n_kv_head: int = 4  # grouped-query attention: n_head % n_kv_head == 0
    n_hidden: int = 704  # SwiGLU hidden size (relu2: 1.5x this, the same parameters and FLOPs)
    head_dim: Optional[int] = None  # default n_embd // n_head
    dropout: float = 0.0
    bias: bool = False  # a bias on every linear layer
    qkv_bias: bool = False  # a bias on the q, k and v projections only (Qwen2)
    tie_embeddings: bool = True  # False: a separate output head (output.weight), as many open models have
    use_rope: bool = True  # False: learned absolute positions
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    is_causal: bool = True  # False: bidirectional (encoder-style) attention
    # auto | flash | mem_efficient | cudnn | math: SDPA's backends (honoured on CUDA); triton: training on
    # CUDA runs speed_kernels.py's causal attention where it applies (speed.TritonAttention), SDPA elsewhere
    sdpa_kernel: str = "auto"
    # the training recipe (docs/RECIPES.md); the defaults are the model as it always was
    qk_norm: bool = False  # RMSNorm (with a learned gain) on each head's q and k before RoPE
    activation: str = "swiglu"  # swiglu: w2(silu(w1 x) * w3 x) | relu2: w2(relu(w1 x)^2), 1.5x wider
    zero_init: bool = False  # start wo and w2 (what writes into the residual stream) at zero
    logit_softcap: Optional[float] = None  # logits -> cap * tanh(logits / cap) (None: off)

    def __post_init__(self):
        if self.head_dim is None and isinstance(self.n_embd, int) and isinstance(self.n_head, int) and self.n_head > 0:
            self.head_dim = self.n_embd // self.n_head

    def validate(self, where="model config"):
        check_finite(self, where)
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
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"{where}: activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.activation == "relu2" and self.n_hidden % 2:
            raise ConfigError(f"{where}: activation relu2 is 1.5 x n_hidden wide: n_hidden must be even, "
                              f"got {self.n_hidden}")
        if self.logit_softcap is not None and self.logit_softcap <= 0:
            raise ConfigError(f"{where}: logit_softcap must be positive (or null: off), got {self.logit_softcap}")
        if self.num_params() > MAX_PARAMS:  # before anything tries to allocate it
            raise ConfigError(f"{where}: these sizes make {self.num_params():.3g} parameters "
                              f"({4 * self.num_params() / 2 ** 40:,.0f} TiB in float32), far beyond any machine")

    def num_params(self):
        """The parameter count of Transformer(self), from the sizes alone (nothing is allocated)."""
        q, kv, bias = self.n_head * self.head_dim, self.n_kv_head * self.head_dim, int(self.bias)
        qkv_bias = int(self.bias or self.qkv_bias)
        attention = self.n_embd * (q + 2 * kv) + q * self.n_embd + qkv_bias * (q + 2 * kv) + bias * self.n_embd
        w1_w3 = 1 if self.activation == "relu2" else 2  # relu2: one input matrix, as many columns as two
        feed_forward = 3 * self.n_embd * self.n_hidden + bias * (w1_w3 * self.ffn_hidden + self.n_embd)
        qk_norms = 2 * self.head_dim if self.qk_norm else 0
        layer = attention + feed_forward + 2 * self.n_embd + qk_norms  # + the two norms
        positions = 0 if self.use_rope else self.block_size * self.n_embd
        head = 0 if self.tie_embeddings else self.vocab_size * self.n_embd
        return self.vocab_size * self.n_embd + head + positions + self.n_layer * layer + self.n_embd

    @property
    def ffn_hidden(self):
        """The feed-forward's hidden width: n_hidden for SwiGLU; for ReLU^2, which has two matrices to
        SwiGLU's three, 1.5 x n_hidden, so that both cost the same parameters and FLOPs."""
        return self.n_hidden * 3 // 2 if self.activation == "relu2" else self.n_hidden

    def recipe(self):
        """The recipe options switched on (name -> value); those that change what the forward computes."""
        return {k: getattr(self, k) for k, off in RECIPE_DEFAULTS.items() if getattr(self, k) != off}

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
    # (F.rms_norm is x * rsqrt(mean(x^2) + eps) * weight: one fused kernel on CUDA instead of five)
    return F.rms_norm(x.float(), (x.size(-1),), weight.float(), eps=eps).type_as(x)


def rope_tables(head_dim, max_len, theta):
    """cos and sin of shape [max_len, head_dim/2]: pair i of position t turns by t * theta^(-2i/head_dim)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    """Rotate adjacent pairs (x[2i], x[2i+1]) of the last dim by the angles of their position.
    x: [B, T, H, D]; cos/sin: [T, D/2] (or [B, T, D/2], each row's own positions), the same angles for
    every head. In float32, cast back.

    A pair (e, o) turns into (e cos - o sin, e sin + o cos) = (e, o) cos + (o, e) (-sin, sin): the pairs
    times cos plus the swapped pairs times signed sines. Every operation then reads whole rows in
    order, where taking the even and odd halves apart reads both at a stride of 2: run eagerly (the
    GPU's time-to-loss config) that was 3x the kernels, and slow ones."""
    pairs = x.float().unflatten(-1, (-1, 2))  # [B, T, H, D/2, 2]
    cos, sin = cos.unsqueeze(-2).unsqueeze(-1), sin.unsqueeze(-2).unsqueeze(-1)  # [T, 1, D/2, 1]: over heads and pairs
    signed_sin = torch.cat((-sin, sin), dim=-1)  # [T, 1, D/2, 2]
    return (pairs * cos + pairs.flip(-1) * signed_sin).flatten(-2).to(x.dtype)


def _sdpa_backends(name):
    from torch.nn.attention import SDPBackend
    return {"flash": [SDPBackend.FLASH_ATTENTION], "mem_efficient": [SDPBackend.EFFICIENT_ATTENTION],
            "cudnn": [SDPBackend.CUDNN_ATTENTION], "math": [SDPBackend.MATH]}[name]


class ScaledDotProduct(nn.Module):
    """softmax(q k^T / sqrt(head_dim)) v over the heads, through F.scaled_dot_product_attention (the
    backend sdpa_kernel names on CUDA), with the KV cache if one is given. It owns no parameters; it
    is a module so that speed.py can put a faster one with the same contract in its place
    (sdpa_kernel "triton": speed.TritonAttention, in training)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg

    def forward(self, q, k, v, cache=None, pos=0):
        """q [B, T, H, D], k and v [B, T, KV, D]; returns [B, T, H, D] (a transposed view)."""
        B, T = q.shape[:2]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D] views
        mask, causal = None, self.cfg.is_causal
        if cache is not None and not isinstance(pos, int):
            # each row at its own position (pos: a [B] tensor, serve.py's batched decoding): row b's new
            # keys go to [pos[b], pos[b]+T), and its queries see its keys up to their own position
            k_cache, v_cache = cache
            at = pos.view(B, 1) + torch.arange(T, device=q.device)  # [B, T]
            rows = torch.arange(B, device=q.device).view(B, 1)
            k_cache[rows, :, at] = k.transpose(1, 2).to(k_cache.dtype)  # [B, T, KV, D] at [B, T]
            v_cache[rows, :, at] = v.transpose(1, 2).to(v_cache.dtype)
            n = int(at.max()) + 1
            k, v = k_cache[:B, :, :n].to(q.dtype), v_cache[:B, :, :n].to(q.dtype)
            mask = (torch.arange(n, device=q.device) <= at.unsqueeze(-1)).unsqueeze(1)  # [B, 1, T, n]
            causal = False
        elif cache is not None:
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

        gqa = q.size(1) != k.size(1)
        kernel = self.cfg.sdpa_kernel
        chosen = kernel not in ("auto", "triton") and q.is_cuda
        with nn.attention.sdpa_kernel(_sdpa_backends(kernel)) if chosen else nullcontext():
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal and T > 1,
                dropout_p=self.cfg.dropout if self.training else 0.0, enable_gqa=gqa)
        return y.transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        qkv_bias = cfg.bias or cfg.qkv_bias
        self.wq = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=qkv_bias)
        self.wk = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=qkv_bias)
        self.wv = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=qkv_bias)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        # qk_norm: every head's q and k at unit RMS (times a learned gain), so that attention logits
        # cannot grow without bound (OLMo 2, Qwen3, the NanoGPT speedrun); one gain for all heads
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.sdpa = ScaledDotProduct(cfg)

    def forward(self, x, rope, cache=None, pos=0):
        B, T, _ = x.shape
        # q, k and v token-major, [B, T, heads, head_dim]: RoPE then reads and writes them in order
        q = self.wq(x).view(B, T, self.n_head, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = self.sdpa(q, k, v, cache, pos)
        return self.resid_dropout(self.wo(y.reshape(B, T, self.n_head * self.head_dim)))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); or (activation relu2) ReLU squared, w2(relu(w1 x)^2), 1.5x as
    wide and without w3: the same cost, and in the NanoGPT speedrun a little better per step."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=cfg.bias)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=cfg.bias)
        self.w3 = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=cfg.bias) if cfg.activation == "swiglu" else None
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        if self.w3 is None:
            return self.dropout(self.w2(F.relu(self.w1(x)).square()))
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class OutputHead(nn.Module):
    """The logits over the vocabulary and, given targets ([B, T], -1 = ignore), the mean cross-entropy
    loss. The weight comes in from the Transformer (the token embeddings when tied), so the head owns
    no parameters; it is a module so that speed.py can put a faster one with the same contract in its
    place (the head and the loss as one step, in float8)."""

    def __init__(self, softcap=None):
        super().__init__()
        self.softcap = softcap  # ModelConfig.logit_softcap

    def forward(self, x, weight, targets=None):
        logits = F.linear(x, weight)
        if self.softcap is not None:  # squash the logits smoothly into (-cap, cap): no token's can run away
            logits = self.softcap * torch.tanh(logits / self.softcap)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)


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
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.head = OutputHead(cfg.logit_softcap)
        # activation checkpointing (train config activation_checkpointing): a training choice, not
        # part of the architecture, so it is a plain attribute and not in the config or checkpoint
        self.checkpoint_layers = False
        if cfg.use_rope:
            cos, sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2 n_layer);
        # zero_init: start them at zero, so that every block begins as the identity (modded-nanogpt)
        for name, p in self.named_parameters():
            if name.endswith("attn.wo.weight") or name.endswith("ffn.w2.weight"):
                if cfg.zero_init:
                    nn.init.zeros_(p)
                else:
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

        `cache` (from make_cache) and `pos` (the position of idx[:, 0]) decode incrementally; pos may
        also be a LongTensor [B] of each row's own position (batched decoding of several requests).
        `last_only` computes logits for the last position only (generation).
        """
        B, T = idx.shape
        end = pos + T if isinstance(pos, int) else int(pos.max()) + T
        if end > self.cfg.block_size:
            raise ValueError(f"sequence of {end} tokens exceeds block_size {self.cfg.block_size}")
        # the positions of idx: [T] for all rows, or [B, T] when each row has its own (pos a [B] tensor)
        positions = torch.arange(T, device=idx.device) + (pos if isinstance(pos, int) else pos.view(B, 1))
        x = self.tok_embeddings(idx)
        rope = None
        if self.pos_embeddings is not None:
            x = x + self.pos_embeddings(positions)
        else:
            rope = (self.rope_cos[positions], self.rope_sin[positions])
        x = self.dropout(x)
        if torch.is_autocast_enabled(x.device.type):
            # the residual stream in the autocast dtype (bf16): every residual add and norm then moves
            # half the bytes of float32, most of a GPU step's memory traffic (norms still compute in fp32)
            x = x.to(torch.get_autocast_dtype(x.device.type))
        for i, layer in enumerate(self.layers):
            if cache is not None:
                x = layer(x, rope, cache[i], pos)
            elif self.checkpoint_layers and self.training and torch.is_grad_enabled():
                # keep each layer's input only, and recompute the rest of it in the backward pass
                x = torch.utils.checkpoint.checkpoint(layer, x, rope, use_reentrant=False)
            else:
                x = layer(x, rope)
        x = self.norm(x)
        if last_only:
            x = x[:, -1:]
        return self.head(x, self.head_weight(), targets)

    def head_weight(self):
        """The output head: the token embeddings (tied), or the model's own output layer."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight

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

        Stops at `eos_id` (not returned; an id or a list of them), after max_new_tokens, or when the
        context is full.
        `callback(token_id)` is called for every new token (streaming); returning True stops.
        """
        if not self.cfg.is_causal:
            raise ValueError("generate() needs a causal model; use one_pass() for bidirectional models")
        was_training = self.training
        self.eval()
        ids, stop = list(prompt_ids), {eos_id} if isinstance(eos_id, int) else set(eos_id or ())
        if not ids:
            raise ValueError("generate() needs at least one prompt token")
        ids = ids[-self.cfg.block_size:]  # keep the most recent context that fits
        # the cache as long as this answer can get: imported models have contexts of 32k tokens
        cache_len = min(self.cfg.block_size, len(ids) + max_new_tokens)
        decoder = Decoder(self, 1, cache_len)
        logits = decoder.prefill([ids])[0]
        out = []
        for _ in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, repetition_penalty, ids, generator)
            if nxt in stop:
                break
            ids.append(nxt)
            out.append(nxt)
            if callback is not None and callback(nxt):
                break
            if len(ids) > cache_len:  # the context is full: this token is never fed back
                break
            logits = decoder.step([nxt], len(ids) - 1)[0]
        self.train(was_training)
        return out


class Decoder:
    """The autoregressive decode loop's state, shared by Transformer.generate (one row), serve.py's
    Scheduler (requests that join and leave a running batch, each row at its own position) and
    problem.py's greedy_decode (a batch of equal-length prompts): a KV cache of `rows` rows, one
    sequence in each. The caller picks the tokens (sample_next, or argmax) and decides when a row ends.

      prefill(ids, row) -> logits   prompts into their own rows, from position 0
      step(tokens, pos) -> logits   one token for each of rows 0..B-1, all in one forward
      move(src, dst, n)             a row's first n cached positions into another row (serve.py keeps
                                    its running rows packed at the front, so one step covers them)
    """

    def __init__(self, model, rows=1, max_len=None):
        self.model = model
        self.cache = model.make_cache(rows, max_len)
        self.device = model.tok_embeddings.weight.device

    @torch.no_grad()
    def prefill(self, ids, row=0):
        """Prompts of one length (a [B, T] tensor or B lists of ids) into rows row..row+B-1 at
        position 0; returns each one's next-token logits, [B, vocab]."""
        ids = torch.as_tensor(ids, device=self.device)
        cache = [(k[row:row + len(ids)], v[row:row + len(ids)]) for k, v in self.cache]  # views
        logits, _ = self.model(ids, cache=cache, pos=0, last_only=True)
        return logits[:, -1]

    @torch.no_grad()
    def step(self, tokens, pos):
        """Feed tokens[b] (a list or a [B] tensor) to row b at position pos[b] (a list of ints, or one
        int for all rows) for rows 0..B-1; returns the next-token logits, [B, vocab]."""
        tokens = torch.as_tensor(tokens, device=self.device).view(-1, 1)
        if not isinstance(pos, int) and len(set(pos)) == 1:
            pos = pos[0]
        # rows at one position take the int path: no mask, no gathered cache writes, and a single
        # row's very arithmetic (the C engine's tests compare generate's tokens with its own);
        # rows at their own positions go through the [B] tensor path (ScaledDotProduct.forward)
        if not isinstance(pos, int):
            pos = torch.tensor(pos, device=self.device)
        logits, _ = self.model(tokens, cache=self.cache, pos=pos, last_only=True)
        return logits[:, -1]

    def move(self, src, dst, n):
        for k, v in self.cache:
            k[dst, :, :n], v[dst, :, :n] = k[src, :, :n], v[src, :, :n]


# Temperatures below this are greedy, in every engine (infer_c/nano.h NANO_MIN_TEMPERATURE): dividing
# the logits by a tinier one overflows to infinity, and sampling from infinities is noise
MIN_TEMPERATURE = 1e-6


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, previous_ids=(), generator=None):
    """Pick the next token from a [vocab] logits vector (on any device; `generator` is a CPU one). The C and
    browser engines follow the same order:

    1. repetition penalty on every distinct previous token: divide positive logits, multiply negative
       ones (so a penalty > 1 always makes the token less likely, whatever the logit's sign);
    2. temperature below MIN_TEMPERATURE (0, say) -> argmax (greedy); otherwise divide by the temperature;
    3. top-k: keep the k largest (0 = off);
    4. top-p: keep the smallest set of most likely tokens whose probability reaches p (always >= 1 token);
    5. sample from the softmax of what is left.
    """
    # on the CPU: one row's sampling is a few dozen small steps, each a kernel launch and a wait on a GPU
    logits = logits.detach().float().cpu().clone()
    if repetition_penalty != 1.0 and len(previous_ids):
        prev = torch.tensor(sorted(set(previous_ids)))
        vals = logits[prev]
        logits[prev] = torch.where(vals > 0, vals / repetition_penalty, vals * repetition_penalty)
    if not temperature >= MIN_TEMPERATURE:
        return int(torch.argmax(logits))
    logits /= temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits[logits < kth] = -float("inf")
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        # the nucleus is a prefix of the probabilities in descending order: keep those whose more likely
        # tokens have less than top_p of the mass together (at least the first). Its smallest probability
        # is a threshold: drop every token below it. Only the values are sorted (numpy's sort without the
        # indices that torch.sort also returns: 6 µs against 40 for a 4k vocabulary)
        desc = torch.from_numpy(np.sort(probs.numpy())[::-1].copy())
        before = torch.cumsum(desc, dim=-1) - desc  # mass of strictly more likely tokens
        n_keep = max(1, int((before < top_p).sum()))
        probs[probs < desc[n_keep - 1]] = 0.0
    # one uniform number and the first token whose cumulative probability passes it (inverse CDF;
    # torch.multinomial draws an exponential per token: ten times the time for a 4k vocabulary)
    cdf = torch.cumsum(probs, dim=-1)
    i = int(torch.searchsorted(cdf, torch.rand((), generator=generator) * cdf[-1], right=True))
    return i if i < cdf.numel() else int(probs.nonzero()[-1])  # (u rounded up to the total: the last token in)


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
    """(parent module, attribute name) of every layer LoRA can adapt, in a fixed order (relu2 has no w3)."""
    for layer in model.layers:
        for name, part in LORA_TARGETS.items():
            if getattr(getattr(layer, part), name) is not None:
                yield getattr(layer, part), name


def add_lora(model, cfg: LoRAConfig):
    """Wrap the target layers with fresh adapters (B = 0: the model's outputs do not change)."""
    cfg.validate()
    if "w3" in cfg.targets and model.cfg.activation != "swiglu":
        raise ConfigError(f"lora targets: w3 is SwiGLU's; this model's activation is {model.cfg.activation}")
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


def adapter_checkpoint(model, base_model_config, base_fingerprint, extra=None):
    """The adapter-only checkpoint: LoRA tensors, LoRA config and the identity of the base."""
    ck = {"format": "nano-lora", "version": 1,
          "lora_config": dataclasses.asdict(model.lora_config),
          "base": {"model_config": base_model_config, "fingerprint": base_fingerprint},
          "adapter": lora_state_dict(model)}
    ck.update(extra or {})
    return ck


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


def model_from_checkpoint(ck, path="checkpoint", device="cpu"):
    """The Transformer of a checkpoint dict (files.load_checkpoint), on `device`."""
    cfg = ModelConfig.from_dict(ck["model_config"], f"{path}: model_config")
    # built without weights (meta), then given memory and the checkpoint's values: no random init
    # to overwrite (seconds for a 0.5B model imported from Hugging Face)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise ConfigError(f"{path}: weights do not match its model_config: {e}") from None
    if cfg.use_rope:  # buffers that are not in the checkpoint
        model.rope_cos, model.rope_sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_theta)
    return model.to(device)
