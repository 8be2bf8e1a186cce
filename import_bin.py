"""
Import a model file of the original Nano layout (2024.10) as a checkpoint for infer.py and train.py.

    python import_bin.py model.bin model.pt        # then: python infer.py -m model.pt -i

The layout is described in ../shared/docs/nano-bin-2024.10.md (fp32 and Q8_0 base models; Q8
weights are dequantized, so the checkpoint holds exactly the values the Q8 engine multiplies by).
The checkpoint records `"prompt_format": "2024.10"`: infer.py then frames prompts as the original
engine did, with no <|bos|> in front (docs/FORMAT.md, "Prompt framing"). A model fine-tuned from
it with train.py learns Nano's own framing from data.py's samples, so its checkpoints do not
carry the key. Files in Nano's own layout (2026.11) come from checkpoints already and are not
imported. The checks are those of a careful reader, not of the C engine's full validator: bad
sizes, an untied output head (model.py ties it) and unreadable tokenizers are refused by name.
"""

import argparse
import os
import struct
import sys

import numpy as np
import torch

from export import HEADER_SIZE, MAGIC, QUANT_Q8
from files import ConfigError, NanoError
from model import ModelConfig
from tokenizer import TokenizerError, TrieTokenizer

PROMPT_FORMAT = "2024.10"  # infer.FRAMING_2024


class BinImportError(NanoError):
    """The file cannot be imported; the message says why."""


class _Reader:
    """Consecutive little-endian arrays from a byte string, each checked against its end."""

    def __init__(self, data, pos):
        self.data, self.pos = data, pos

    def take(self, dtype, count, what):
        size = np.dtype(dtype).itemsize * count
        if self.pos + size > len(self.data):
            raise BinImportError(f"the file ends inside {what} (needs {size:,} bytes at offset {self.pos:,}, "
                               f"file is {len(self.data):,} bytes)")
        arr = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.pos)
        self.pos += size
        return arr


def _tokens(data):
    """The tokenizer section at byte 256: u32 size, u32 count, then per token u8 length, u8 special
    flag, 2 reserved bytes, u32 id and `length` UTF-32 code points."""
    if len(data) < HEADER_SIZE + 8:
        raise BinImportError("the file ends before its tokenizer section")
    size, count = struct.unpack_from("<II", data, HEADER_SIZE)
    end, pos, tokens = HEADER_SIZE + size, HEADER_SIZE + 8, []
    if end > len(data):
        raise BinImportError(f"tokenizer section of {size:,} bytes runs past the end of the file")
    for i in range(count):
        if pos + 8 > end:
            raise BinImportError(f"tokenizer section ends inside token {i}")
        length, _, _, _, tid = struct.unpack_from("<BBBBI", data, pos)
        if tid != i or pos + 8 + 4 * length > end:
            raise BinImportError(f"tokenizer entry {i} is damaged (id {tid}, length {length})")
        cps = struct.unpack_from(f"<{length}I", data, pos + 8)
        if any(cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF for cp in cps):
            raise BinImportError(f"token {i} holds a code point that is not a Unicode scalar value")
        tokens.append("".join(map(chr, cps)))
        pos += 8 + 4 * length
    if pos != end:
        raise BinImportError(f"{end - pos} bytes left over in the tokenizer section")
    return tokens, end


def read_2024(path):
    """-> a checkpoint dict (model_config, model, tokenizer, prompt_format) from a 2024.10 model file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BinImportError(f"cannot read {path}: {e.strerror}") from None
    if len(data) < HEADER_SIZE or struct.unpack_from("<II", data) != MAGIC:
        raise BinImportError(f"{path} is not a Nano model file (bad magic)")
    major, minor, kind, config_len = struct.unpack_from("<4i", data, 8)
    if (major, minor) != (2024, 10):
        raise BinImportError(f"{path} has layout {major}.{minor}; only 2024.10 files are imported (2026.11 files "
                           "are exported from checkpoints: use the checkpoint)")
    if kind != 0 or config_len != 32:
        raise BinImportError(f"{path} is not a 2024.10 base model (model type {kind}, config length {config_len})")
    block, vocab, L, D, n_head, n_kv, H, shared, quant, group = struct.unpack_from("<10i", data, 24)
    if shared != 1:
        raise BinImportError(f"{path} has an untied output head (shared classifier {shared}); model.py ties the "
                           "head to the token embedding")
    try:
        cfg = ModelConfig(block_size=block, vocab_size=vocab, n_layer=L, n_embd=D, n_head=n_head, n_kv_head=n_kv,
                          n_hidden=H)  # 2024.10 implies RoPE (theta 10000), eps 1e-5, causal, no biases
        cfg.validate(f"{path}: header")
    except (ConfigError, TypeError, ZeroDivisionError) as e:
        raise BinImportError(str(e)) from None
    tokens, params_at = _tokens(data)
    try:
        tokenizer = TrieTokenizer(tokens)
    except TokenizerError as e:
        raise BinImportError(f"{path}: tokenizer: {e}") from None
    if len(tokens) > vocab:
        raise BinImportError(f"{path}: {len(tokens)} tokens but only {vocab} embedding rows")
    state = _params_q8(data, params_at, cfg, group) if quant == QUANT_Q8 else _params_fp32(data, params_at, cfg)
    return {"model_config": cfg.to_dict(), "model": state, "tokenizer": tokenizer.to_dict(),
            "prompt_format": PROMPT_FORMAT}


def _shapes(cfg):
    """(name in model.py, per-layer shape) of the stacked matrices, in file order."""
    D, Q, KV, H = cfg.n_embd, cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_hidden
    return [("attn.wq", (Q, D)), ("attn.wk", (KV, D)), ("attn.wv", (KV, D)), ("attn.wo", (D, Q)),
            ("ffn.w1", (H, D)), ("ffn.w2", (D, H)), ("ffn.w3", (H, D))]


def _finish(r, cfg, state):
    """The RoPE tables close the file; model.py computes the same ones, so they are only skipped."""
    r.take("<f4", 2 * cfg.block_size * cfg.head_dim // 2, "the RoPE tables")
    if r.pos != len(r.data):
        raise BinImportError(f"{len(r.data) - r.pos:,} unexpected bytes after the parameters")
    return {k: torch.from_numpy(v.astype(np.float32)).contiguous() for k, v in state.items()}


def _params_fp32(data, pos, cfg):
    r, L, D = _Reader(data, pos), cfg.n_layer, cfg.n_embd
    state = {"tok_embeddings.weight": r.take("<f4", cfg.vocab_size * D, "the token embedding").reshape(-1, D)}
    attn_norm = r.take("<f4", L * D, "the attention norms").reshape(L, D)
    mats = {}
    for name, shape in _shapes(cfg)[:4]:
        mats[name] = r.take("<f4", L * shape[0] * shape[1], name).reshape(L, *shape)
    ffn_norm = r.take("<f4", L * D, "the FFN norms").reshape(L, D)
    for name, shape in _shapes(cfg)[4:]:
        mats[name] = r.take("<f4", L * shape[0] * shape[1], name).reshape(L, *shape)
    state["norm.weight"] = r.take("<f4", D, "the final norm")
    _per_layer(state, L, attn_norm, ffn_norm, mats)
    return _finish(r, cfg, state)


def _params_q8(data, pos, cfg, group):
    """Norms first, then each matrix's int8 values and fp32 scales (one per group of the flattened
    matrix), then the RoPE tables. The header keeps the requested group size; the original writer
    halved it while n_embd was not a multiple of it, and so does the reader."""
    if group < 1:
        raise BinImportError(f"Q8 group size {group} in the header")
    while cfg.n_embd % group:
        group //= 2
    r, L, D = _Reader(data, pos), cfg.n_layer, cfg.n_embd
    attn_norm = r.take("<f4", L * D, "the attention norms").reshape(L, D)
    ffn_norm = r.take("<f4", L * D, "the FFN norms").reshape(L, D)
    state = {"norm.weight": r.take("<f4", D, "the final norm")}

    def matrix(shape, what):
        n = shape[0] * shape[1]
        if n % group:
            raise BinImportError(f"{what} has {n} elements, not a multiple of the group size {group}")
        q = r.take("i1", n, what).astype(np.float32).reshape(-1, group)
        scales = r.take("<f4", n // group, what + " scales")
        return (q * scales[:, None]).reshape(shape)

    state["tok_embeddings.weight"] = matrix((cfg.vocab_size, D), "the token embedding")
    mats = {name: np.stack([matrix(shape, f"layer {i} {name}") for i in range(L)]) for name, shape in _shapes(cfg)}
    _per_layer(state, L, attn_norm, ffn_norm, mats)
    return _finish(r, cfg, state)


def _per_layer(state, L, attn_norm, ffn_norm, mats):
    for i in range(L):
        state[f"layers.{i}.attn_norm.weight"] = attn_norm[i]
        state[f"layers.{i}.ffn_norm.weight"] = ffn_norm[i]
        for name, stacked in mats.items():
            state[f"layers.{i}.{name}.weight"] = stacked[i]


def main(argv=None):
    p = argparse.ArgumentParser(description="Import a 2024.10 Nano .bin model as a checkpoint (.pt)")
    p.add_argument("model", help="the 2024.10 model file (.bin)")
    p.add_argument("out", help="the checkpoint to write (.pt)")
    args = p.parse_args(argv)
    try:
        ck = read_2024(args.model)
    except NanoError as e:  # BinImportError
        print(f"error: {e}", file=sys.stderr)
        return 2
    tmp = args.out + ".tmp"  # written whole, then renamed: no half checkpoint is left behind
    torch.save(ck, tmp)
    os.replace(tmp, args.out)
    cfg = ck["model_config"]
    print(f"{args.model} -> {args.out}: {cfg['n_layer']} layers x {cfg['n_embd']}, vocab {cfg['vocab_size']}, "
          f"context {cfg['block_size']}; prompts framed as 2024.10 (no <|bos|>)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
