"""
export.py: write a checkpoint or a LoRA adapter as a .bin file for the C engine (infer_c/).

    python export.py out.bin --checkpoint ckpt.pt [--quant fp32|q8] [--group-size 64] [--format 2026.11|2024.10]
    python export.py adapter.bin --lora adapter.pt [--format 2026.11|2024.10]
    python export.py model.gguf --checkpoint ckpt.pt --format gguf [--quant fp32|f16|q8]   # llama.cpp (gguf_export.py)

Two layouts:
  * 2026.11 (default, ours): the original's 256-byte header extended with what the engines need
    (head_dim, RoPE theta or learned positions, norm eps, causal flag, bias, quant type and group
    size, a CRC-32 and the base model's fingerprint), the tokenizer section, then every tensor on a
    64-byte boundary so the engine can use it straight from mmap. docs/FORMAT.md gives it byte by byte.
  * 2024.10: the original Nano layout (../shared/docs/nano-bin-2024.10.md), for the original engines.
    It can describe less, so models it cannot represent are refused with the reason.

`base_fingerprint(model_config, state_dict)` identifies a base model; LoRA checkpoints record it
and the engine refuses an adapter whose fingerprint is not its base's.
"""

import argparse
import contextlib
import json
import math
import os
import struct
import sys
import zlib

import numpy as np
import torch

import files
import gguf_export
import hf
from files import ConfigError, NanoError, weights_fingerprint
from merge_lora import merged_checkpoint
from model import ModelConfig, rope_tables
from tokenizer import GPT2_PATTERN, SPECIAL_TOKENS, BPETokenizer, HFTokenizer, Llama2cTokenizer, TokenizerError, tokenizer_from_dict

MAGIC = struct.unpack("<II", files.NANO_BIN_MAGIC)  # the two u32 words the header starts with
VERSION = (2026, 11)
OLD_VERSION = (2024, 10)
FORMATS = ("2026.11", "2024.10")
TYPE_BASE, TYPE_LORA = 0, 10
QUANT_F32, QUANT_Q8 = 0, 800
QUANTS = {"fp32": QUANT_F32, "q8": QUANT_Q8}
HEADER_SIZE = 256
ALIGN = 64  # every tensor of a 2026.11 file starts on a 64-byte boundary (cache line, AVX-512 load)
TOKENIZER_TRIE = 1
TOKENIZER_BPE = 2  # byte-level BPE section (docs/FORMAT.md, "Byte-level BPE section")
TOKENIZER_LLAMA2C = 3  # llama2.c's scored BPE with byte fallback (docs/FORMAT.md, "llama2.c tokenizer section")
LLAMA2C_SECTION_VERSION = 1
LLAMA2C_HEADER = 40  # section bytes before the first token entry
BPE_SECTION_VERSION = 1
BPE_SECTION_VERSION_STOP = 2  # entries may carry BPE_ENTRY_STOP (written only when one does)
BPE_ENTRY = 8  # bytes of an entry before the token's own bytes: u16 length, u8 kind, u8 flags, u32 rank
BPE_ENTRY_STOP = 1  # an entry's flag byte: generation ends at this token (besides <|eos|>)
BPE_MAX_STOP = 16  # nano.c's limit
BPE_PATTERNS = {"gpt2": 1, "llama3": 2, "qwen2": 3, "smollm": 4}  # pre-tokenization pattern ids
# the regular expressions of patterns 2 and 3 as Hugging Face tokenizer.json files spell them (a Split
# pre-tokenizer before ByteLevel); pattern 1 is ByteLevel's own regex (tokenizer.GPT2_PATTERN)
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                  r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
BPE_WHOLE_PIECE_FIRST = 1  # section flag: a piece that is a token is taken whole (tiktoken)
BPE_NO_RANK = 0xFFFFFFFF  # the rank field of a special token
BPE_HEADER = 48  # section bytes before the first token entry
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # bit i of the targets mask = LORA_TARGETS[i]
OLD_LORA_TARGETS = ("wq", "wk", "wv", "wo")

BIAS_NONE, BIAS_ALL, BIAS_QKV = 0, 1, 2  # the header's bias field
# The 2026.11 header after the 24 bytes shared with 2024.10: (offset, struct format, name).
# docs/FORMAT.md documents the same table; the C reader (infer_c/nano.c) uses the same offsets.
HEADER_FIELDS = [
    (24, "i", "block_size"), (28, "i", "vocab_size"), (32, "i", "n_layer"), (36, "i", "n_embd"),
    (40, "i", "n_head"), (44, "i", "n_kv_head"), (48, "i", "n_hidden"), (52, "i", "shared_classifier"),
    (56, "i", "quant_type"), (60, "i", "group_size"), (64, "i", "head_dim"), (68, "i", "use_rope"),
    (72, "i", "is_causal"), (76, "i", "bias"), (80, "d", "rope_theta"), (88, "d", "norm_eps"),
    (96, "i", "tokenizer_kind"), (100, "i", "tokenizer_vocab"), (104, "Q", "tokenizer_offset"),
    (112, "Q", "tokenizer_size"), (120, "Q", "params_offset"), (128, "Q", "params_size"),
    (136, "Q", "file_size"), (144, "I", "crc32"), (148, "I", "reserved"), (152, "32s", "fingerprint"),
    (184, "i", "lora_rank"), (188, "i", "lora_targets"), (192, "d", "lora_alpha"),
]
CONFIG_LEN = 200 - 24  # bytes of config after the config-length field
CRC_OFFSET = 144


class ExportError(NanoError):
    """The input cannot be exported (as asked); the message says why."""


# ---------------------------------------------------------------------------
# Reading checkpoints


def _clean_state_dict(sd, keep_lora=False):
    """Drop LoRA keys (unless keep_lora) and torch.compile's '_orig_mod.' prefix."""
    return {k.removeprefix("_orig_mod."): v for k, v in sd.items() if keep_lora or ".lora_" not in k}


def base_fingerprint(model_config_dict, state_dict):
    """Hex SHA-256 identifying a base model: model.weights_fingerprint, the recipe train.py records in
    adapter checkpoints (config JSON with sorted keys, then each non-LoRA tensor's name, shape and
    float32 bytes in sorted name order). The engine compares the model file's copy with the adapter's."""
    return weights_fingerprint(model_config_dict, state_dict)


def _read_checkpoint(path, load=None):
    """A checkpoint .pt or a Hugging Face model directory, as hf.load_checkpoint reads them
    (load: files.load_torch_file for adapters), with its errors as ExportError."""
    try:
        return (load or hf.load_checkpoint)(path)
    except ConfigError as e:
        raise ExportError(str(e)) from None


def write_gguf(path, checkpoint, quant="fp32", adapter=None):
    """--format gguf: a GGUF file for llama.cpp (gguf_export.py), with a LoRA adapter merged first. An imported
    model's tokenizer must be one Nano's C engine runs (hf_bpe_section's checks), so that the file answers as
    the C engine does."""
    ck = _read_checkpoint(checkpoint) if isinstance(checkpoint, str) else checkpoint
    bos_first = not isinstance(ck, dict) or ck.get("prompt_format") != "2024.10"  # (infer.FRAMING_2024: no <|bos|>)
    if adapter:
        try:
            ck = merged_checkpoint(ck, checkpoint, adapter)
        except ConfigError as e:
            raise ExportError(str(e)) from None
    cfg, sd, tokens, _ = load_checkpoint(ck)
    if isinstance(tokens, BPETokenizer):
        vocab = gguf_export.gpt2_vocab(tokens, cfg.vocab_size, bos_first)
    elif isinstance(tokens, HFTokenizer):
        hf_bpe_section(tokens)
        pattern = _hf_pattern(json.loads(tokens.spec["json"]).get("pre_tokenizer"))
        vocab = gguf_export.hf_vocab(tokens, cfg.vocab_size, pattern, _hf_bos(tokens))
    elif isinstance(tokens, Llama2cTokenizer):
        vocab = gguf_export.llama2c_vocab(tokens, cfg.vocab_size)
    elif isinstance(tokens, list):
        vocab = gguf_export.trie_vocab(tokens, cfg.vocab_size, bos_first)
    else:
        raise ExportError(f"GGUF export: the {getattr(tokens, 'kind', type(tokens).__name__)} tokenizer has no GGUF form here")
    return gguf_export.write_gguf(path, cfg, sd, vocab, quant)


def write_hf(out_dir, checkpoint, adapter=None):
    """--format hf: a Hugging Face model directory (hf.export_hf), with a LoRA adapter merged first."""
    try:
        ck = hf.load_checkpoint(checkpoint)
        return hf.export_hf(merged_checkpoint(ck, checkpoint, adapter) if adapter else ck, out_dir)
    except ConfigError as e:
        raise ExportError(str(e)) from None


def load_checkpoint(path_or_dict):
    """-> (ModelConfig, state_dict, tokens, fingerprint hex) from a train.py checkpoint (path or dict);
    tokens: the trie tokenizer's list of strings, a tokenizer.BPETokenizer, HFTokenizer or Llama2cTokenizer."""
    ck = _read_checkpoint(path_or_dict) if isinstance(path_or_dict, str) else path_or_dict
    if not isinstance(ck, dict) or "model_config" not in ck or "model" not in ck:
        raise ExportError("not a Nano checkpoint: expected a dict with 'model_config' and 'model'")
    try:
        if not isinstance(ck["model_config"], dict):
            raise ConfigError(f"checkpoint model_config: expected a JSON object, got {type(ck['model_config']).__name__}")
        cfg = ModelConfig.from_dict(dict(ck["model_config"]), "checkpoint model_config")
    except ConfigError as e:
        raise ExportError(str(e)) from None
    if cfg.recipe():  # the engines would compute another model without them: refuse, never drop them
        raise ExportError(f"this model uses {', '.join(f'{k}={v}' for k, v in cfg.recipe().items())}, which the C and "
                          "browser engines do not compute (docs/RECIPES.md): it runs in PyTorch only (infer.py, serve.py)")
    tok = ck.get("tokenizer")
    if not isinstance(tok, dict):
        raise ExportError("checkpoint has no 'tokenizer' dict")
    if tok.get("type") in ("bpe", "hf", "llama2c"):
        try:
            tokens = tokenizer_from_dict(tok)  # "tokens" is then the tokenizer itself
        except TokenizerError as e:
            raise ExportError(str(e)) from None
        n_tokens = tokens.vocab_size
    elif tok.get("type") != "trie":
        raise ExportError(f"unknown tokenizer type {tok.get('type')!r}")
    else:
        tokens = tok.get("tokens")
        if (not isinstance(tokens, list) or not all(isinstance(t, str) and t for t in tokens)
                or tokens[:len(SPECIAL_TOKENS)] != SPECIAL_TOKENS):
            raise ExportError(f"trie tokenizer: 'tokens' must be a list of non-empty strings starting with {SPECIAL_TOKENS}")
        n_tokens = len(tokens)
    if n_tokens > cfg.vocab_size:
        raise ExportError(f"the tokenizer has {n_tokens} tokens but the model only {cfg.vocab_size} embedding rows")
    sd = _clean_state_dict(ck["model"])
    _check_state_dict(cfg, sd)
    return cfg, sd, tokens, base_fingerprint(ck["model_config"], ck["model"])


def _expected_shapes(cfg):
    """name -> shape of every tensor a Transformer(cfg) state_dict holds."""
    D = cfg.n_embd
    shapes = {"tok_embeddings.weight": (cfg.vocab_size, D), "norm.weight": (D,)}
    if not cfg.tie_embeddings:
        shapes["output.weight"] = (cfg.vocab_size, D)
    if not cfg.use_rope:
        shapes["pos_embeddings.weight"] = (cfg.block_size, D)
    for i in range(cfg.n_layer):
        p = f"layers.{i}."
        shapes[p + "attn_norm.weight"] = shapes[p + "ffn_norm.weight"] = (D,)
        for name, out_f, in_f in _linears(cfg):
            shapes[p + name + ".weight"] = (out_f, in_f)
            if _has_bias(cfg, name):
                shapes[p + name + ".bias"] = (out_f,)
    return shapes


def _has_bias(cfg, name):
    """Whether the linear layer `name` ("attn.wq" ...) has a bias: all of them with bias, q/k/v with qkv_bias."""
    return cfg.bias or (cfg.qkv_bias and name in ("attn.wq", "attn.wk", "attn.wv"))


def _bias_field(cfg):
    return BIAS_ALL if cfg.bias else BIAS_QKV if cfg.qkv_bias else BIAS_NONE


def _linears(cfg):
    """(module path, out_features, in_features) of each linear layer in a block, in file order."""
    D, Q, KV, H = cfg.n_embd, cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_hidden
    return [("attn.wq", Q, D), ("attn.wk", KV, D), ("attn.wv", KV, D), ("attn.wo", D, Q),
            ("ffn.w1", H, D), ("ffn.w2", D, H), ("ffn.w3", H, D)]


def _check_state_dict(cfg, sd):
    for name, shape in _expected_shapes(cfg).items():
        if name not in sd:
            raise ExportError(f"state_dict lacks {name!r}")
        if tuple(sd[name].shape) != shape:
            raise ExportError(f"{name} has shape {tuple(sd[name].shape)}, the config implies {shape}")
        if not torch.isfinite(sd[name].float()).all():
            raise ExportError(f"{name} holds NaN or inf values")


# ---------------------------------------------------------------------------
# Quantization


def choose_group_size(requested, cfg):
    """Largest divisor of `requested` that divides every matrix row length (n_embd, n_head*head_dim,
    n_hidden): a group then never spans two rows, and no shape can fail. Always >= 1."""
    if requested < 1:
        raise ExportError(f"group size must be positive, got {requested}")
    return math.gcd(requested, cfg.n_embd, cfg.n_head * cfg.head_dim, cfg.n_hidden)


def quantize_q8(w, group_size):
    """Q8_0: symmetric int8 over groups of `group_size` consecutive elements of the flattened tensor.

    scale = max|w| / 127 and q = round(w / scale) in [-127, 127] (never -128, so the engine's int8
    kernels may take absolute values). An all-zero group gets scale 0 and q = 0, not NaN.
    Returns (int8 tensor of w's shape, float32 scales [numel / group_size]).
    """
    w = w.detach().float()
    if w.numel() % group_size:
        raise ExportError(f"tensor of {w.numel()} elements is not a multiple of the group size {group_size}")
    g = w.reshape(-1, group_size)
    scale = g.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(g / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(w.shape), scale


def dequantize_q8(q, scale, group_size):
    return (q.float().reshape(-1, group_size) * scale[:, None]).reshape(q.shape)


# ---------------------------------------------------------------------------
# Writing


@contextlib.contextmanager
def _atomic_open(path):
    """Write to path.tmp and rename on success, so a failed export leaves no half-written .bin behind."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class _Out:
    """A file being written: tracks the position and the CRC-32 of everything after the header."""

    def __init__(self, f):
        self.f, self.pos, self.crc = f, 0, 0

    def write(self, b):
        b = bytes(b) if not isinstance(b, (bytes, bytearray)) else b
        self.f.write(b)
        if self.pos >= HEADER_SIZE:
            self.crc = zlib.crc32(b, self.crc)
        self.pos += len(b)

    def pad(self, align=ALIGN):
        n = (-self.pos) % align
        if n:
            self.write(b"\0" * n)

    def tensor(self, t, dtype=np.float32, align=ALIGN):
        """Write a tensor's raw little-endian bytes at the next `align` boundary."""
        self.pad(align)
        arr = t.detach().cpu().contiguous().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
        self.write(np.ascontiguousarray(arr, dtype=dtype).tobytes())


def tokenizer_section(tokens):
    """The 2024.10 tokenizer section (used by both layouts): u32 size, u32 count, then per token
    u8 length in code points, u8 special flag, 0xFF 0xFF, u32 id, length x u32 code points."""
    parts = []
    for i, t in enumerate(tokens):
        cps = [ord(c) for c in t]
        if len(cps) > 255:
            raise ExportError(f"token {i} is {len(cps)} code points long; the file's tokenizer section allows 255")
        special = 1 if i < len(SPECIAL_TOKENS) else 0
        parts.append(struct.pack(f"<BBBBI{len(cps)}I", len(cps), special, 0xFF, 0xFF, i, *cps))
    body = b"".join(parts)
    return struct.pack("<II", 8 + len(body), len(tokens)) + body


def bpe_section(tokens, pattern, special_ids, whole_piece_first=True, stop_ids=()):
    """The 2026.11 byte-level BPE section (docs/FORMAT.md). tokens: [(bytes, merge rank)] in id order,
    rank None for a special token (matched in the text, never merged); pattern: a key of BPE_PATTERNS;
    special_ids: the ids of Nano's SPECIAL_TOKENS, in that order (-1 where the tokenizer has none);
    stop_ids: tokens besides <|eos|> that end generation (an imported model's end-of-turn tokens), which
    take section version 2 (an engine that reads only version 1 says so rather than run past them)."""
    stop_ids = set(stop_ids) - {special_ids[SPECIAL_TOKENS.index("<|eos|>")]}
    if len(stop_ids) > BPE_MAX_STOP:
        raise ExportError(f"{len(stop_ids)} tokens end generation; the file's BPE section holds at most {BPE_MAX_STOP}")
    parts = []
    for i, (b, rank) in enumerate(tokens):
        if not 1 <= len(b) <= 0xFFFF:
            raise ExportError(f"BPE token {i} is {len(b)} bytes long; the file's BPE section allows 1 to 65535")
        flags = BPE_ENTRY_STOP if i in stop_ids else 0
        parts.append(struct.pack("<HBBI", len(b), rank is None, flags, BPE_NO_RANK if rank is None else rank) + b)
    body = b"".join(parts)
    n_special = sum(rank is None for _, rank in tokens)
    version = BPE_SECTION_VERSION_STOP if stop_ids else BPE_SECTION_VERSION
    head = struct.pack("<6I6i", BPE_HEADER + len(body), len(tokens), version, BPE_PATTERNS[pattern],
                       BPE_WHOLE_PIECE_FIRST if whole_piece_first else 0, n_special, *special_ids)
    return head + body


def gpt2_bpe_section(tok):
    """The BPE section of a tokenizer.BPETokenizer: GPT-2's tokens (tiktoken's ids are their merge
    ranks), then the special tokens, <|endoftext|> and Nano's six."""
    by_id = {rank: (b, rank) for b, rank in tok.mergeable_ranks.items()}
    by_id.update({i: (s.encode("utf-8"), None) for s, i in tok.special_tokens.items()})
    if sorted(by_id) != list(range(len(by_id))):
        raise ExportError("the BPE tokenizer's ids are not 0 .. N-1 without gaps")
    tokens = [by_id[i] for i in range(len(by_id))]
    return bpe_section(tokens, "gpt2", [tok.special_tokens[s] for s in SPECIAL_TOKENS]), len(tokens)


def _bytes_to_unicode():
    """GPT-2's map of the 256 bytes to printable characters, in which byte-level BPE vocabularies
    (tokenizer.json's vocab and merges) spell their tokens: -> {character: byte}."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _short(obj):
    text = json.dumps(obj, ensure_ascii=False)
    return text if len(text) <= 160 else text[:157] + "..."


def _hf_pattern(pre):
    """The BPE section's pattern name for a tokenizer.json pre_tokenizer, or ExportError naming it."""
    def byte_level(p, regex):
        return (isinstance(p, dict) and p.get("type") == "ByteLevel" and not p.get("add_prefix_space", True)
                and bool(p.get("use_regex", True)) == regex)

    parts = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    if isinstance(parts, list):
        if len(parts) == 1 and byte_level(parts[0], True):
            return "gpt2"
        if len(parts) == 2 and byte_level(parts[1], True) and parts[0] == {"type": "Digits", "individual_digits": True}:
            return "smollm"
        split = parts[0] if len(parts) == 2 and byte_level(parts[1], False) else None
        if (isinstance(split, dict) and split.get("type") == "Split" and split.get("behavior") == "Isolated"
                and not split.get("invert") and isinstance(split.get("pattern"), dict)):
            regex = split["pattern"].get("Regex")
            for name, known in (("llama3", LLAMA3_PATTERN), ("qwen2", QWEN2_PATTERN)):
                if regex == known:
                    return name
    raise ExportError(f"Hugging Face tokenizer: the pre-tokenizer {_short(pre)} is none the C engine has (GPT-2's "
                      "ByteLevel, Llama 3's or Qwen2's Split + ByteLevel, SmolLM's Digits + ByteLevel)")


def _hf_bos(tok):
    """The token the tokenizer's post-processor puts before a document (Llama 3's <|begin_of_text|>), or -1
    where it puts none (Qwen2): what the C engine puts before a continuation prompt as its <|bos|>."""
    probe = "a b"
    plain, doc = tok.encode(probe), tok.encode_document(probe)
    if doc == plain:
        return -1
    if len(doc) == len(plain) + 1 and doc[1:] == plain:
        return doc[0]
    raise ExportError(f"Hugging Face tokenizer: its post-processor frames a document as {doc} around the text's "
                      f"{plain}; the C engine puts at most one token (its <|bos|>) before a prompt and none after")


def hf_bpe_section(tok):
    """The BPE section of a tokenizer.HFTokenizer (a Hugging Face tokenizer.json): byte-level BPE only.
    A token's merge rank is the index of the first merge in the file's list that makes it (256 + index;
    the single bytes rank 0..255, below every merge); the added tokens are the section's special tokens;
    the pre-tokenizer picks the pattern; ignore_merges (Llama 3) is the flag *whole pieces first*.
    Anything the C engine would run differently is an ExportError that names it (docs/FORMAT.md)."""
    try:
        j = json.loads(tok.spec["json"])
    except (ValueError, TypeError) as e:
        raise ExportError(f"Hugging Face tokenizer: tokenizer.json is not JSON: {e}") from None
    m = j.get("model") if isinstance(j, dict) else None
    if not isinstance(m, dict) or m.get("type") != "BPE":
        kind = m.get("type") if isinstance(m, dict) else None
        raise ExportError(f"Hugging Face tokenizer: model type {kind!r}; the C engine runs byte-level BPE only")
    if m.get("byte_fallback"):
        raise ExportError("Hugging Face tokenizer: byte_fallback BPE (SentencePiece-style <0x..> tokens) is not "
                          "byte-level BPE; the C engine cannot run it")
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if m.get(key):
            raise ExportError(f"Hugging Face tokenizer: BPE {key} {m[key]!r} is not supported by the C engine")
    norm = j.get("normalizer")
    if not (norm is None or norm == {"type": "NFC"} or norm == {"type": "Sequence", "normalizers": []}):
        raise ExportError(f"Hugging Face tokenizer: the normalizer {_short(norm)} is not supported (only none or NFC)")
    dec = j.get("decoder")
    if not (isinstance(dec, dict) and dec.get("type") == "ByteLevel"):
        raise ExportError(f"Hugging Face tokenizer: the decoder {_short(dec)} is not ByteLevel: not a byte-level BPE")
    pattern = _hf_pattern(j.get("pre_tokenizer"))
    vocab, merges, added = m.get("vocab"), m.get("merges"), j.get("added_tokens") or []
    if not isinstance(vocab, dict) or not isinstance(merges, list) or not isinstance(added, list):
        raise ExportError("Hugging Face tokenizer: model.vocab, model.merges or added_tokens has the wrong type")
    u2b = _bytes_to_unicode()

    def raw(s):
        try:
            return bytes(u2b[c] for c in s)
        except (KeyError, TypeError):
            raise ExportError(f"Hugging Face tokenizer: vocab token {s!r} is not spelled in byte-level characters "
                              "(not a byte-level BPE)") from None

    by_id = {}
    for s, i in vocab.items():
        if not isinstance(i, int) or i < 0 or i in by_id:
            raise ExportError(f"Hugging Face tokenizer: vocab token {s!r} has the id {i!r} (not a new id >= 0)")
        by_id[i] = [raw(s), None]
    specials = {}
    for a in added:
        if not isinstance(a, dict) or not isinstance(a.get("content"), str) or not isinstance(a.get("id"), int):
            raise ExportError(f"Hugging Face tokenizer: added token {_short(a)} lacks its content or id")
        for opt in ("lstrip", "rstrip", "single_word"):
            if a.get(opt):
                raise ExportError(f"Hugging Face tokenizer: added token {a['content']!r} has {opt}: the C engine "
                                  "matches added tokens exactly as they are written")
        if not a["content"] or a["id"] < 0:
            raise ExportError(f"Hugging Face tokenizer: added token {_short(a)} is empty or has a negative id")
        specials[a["id"]] = a["content"].encode("utf-8")
    for i, b in specials.items():
        by_id[i] = [b, None]  # matched whole in the text before the pre-tokenizer runs
    n = tok.vocab_size
    if sorted(by_id) != list(range(n)):
        raise ExportError(f"Hugging Face tokenizer: the ids of vocab and added tokens are not 0 .. {n - 1} without gaps")
    merged_id = {b: i for i, (b, _) in by_id.items() if i not in specials}
    for b in range(256):
        if bytes([b]) not in merged_id:
            raise ExportError(f"Hugging Face tokenizer: byte 0x{b:02x} has no token of its own (the C engine needs "
                              "all 256 single bytes)")
        by_id[merged_id[bytes([b])]][1] = b
    for k, pair in enumerate(merges):
        parts = pair.split(" ") if isinstance(pair, str) else pair
        if not (isinstance(parts, list) and len(parts) == 2 and all(isinstance(p, str) for p in parts)):
            raise ExportError(f"Hugging Face tokenizer: merge {k} {pair!r} is not a pair of tokens")
        a, b = raw(parts[0]), raw(parts[1])
        if a not in merged_id or b not in merged_id or a + b not in merged_id:
            raise ExportError(f"Hugging Face tokenizer: merge {k} {pair!r} joins tokens or makes one not in the vocab")
        entry = by_id[merged_id[a + b]]
        if entry[1] is None:  # the first merge that makes a token gives its rank
            entry[1] = 256 + k
    for i, (b, rank) in by_id.items():
        if rank is None and i not in specials:
            raise ExportError(f"Hugging Face tokenizer: token {i} ({b!r}) is made by no merge; the C engine merges "
                              "by rank and would make it where the tokenizers library does not")
    special_ids = [-1] * len(SPECIAL_TOKENS)
    for role, i in (("<|padding|>", tok.pad_id), ("<|bos|>", _hf_bos(tok)), ("<|eos|>", tok.eos_id)):
        special_ids[SPECIAL_TOKENS.index(role)] = -1 if i is None else i
    tokens = [tuple(by_id[i]) for i in range(n)]
    return bpe_section(tokens, pattern, special_ids, whole_piece_first=bool(m.get("ignore_merges")),
                       stop_ids=tok.stop_ids), n


def llama2c_section(tok):
    """The llama2.c tokenizer section (docs/FORMAT.md) of a tokenizer.Llama2cTokenizer: its pieces (UTF-8, with
    spaces where SentencePiece writes U+2581) and their float32 scores, in id order."""
    special_ids = [-1] * len(SPECIAL_TOKENS)
    for role, i in (("<|unknown|>", tok.unk_id), ("<|bos|>", tok.bos_id), ("<|eos|>", tok.eos_id)):
        special_ids[SPECIAL_TOKENS.index(role)] = i
    parts = []
    for i, (piece, score) in enumerate(zip(tok.tokens, tok.scores)):
        b = piece.encode("utf-8")
        if len(b) > 0xFFFF:
            raise ExportError(f"llama2.c token {i} is {len(b)} bytes long; the file's section allows 65535")
        parts.append(struct.pack("<fI", score, len(b)) + b)
    body = b"".join(parts)
    head = struct.pack("<4I6i", LLAMA2C_HEADER + len(body), len(parts), LLAMA2C_SECTION_VERSION, 0, *special_ids)
    return head + body, len(parts)


def _tokenizer_for_file(tokens):
    """-> (tokenizer kind, section bytes, number of tokens) for load_checkpoint's tokens."""
    if isinstance(tokens, Llama2cTokenizer):
        return (TOKENIZER_LLAMA2C, *llama2c_section(tokens))
    if isinstance(tokens, BPETokenizer):
        return (TOKENIZER_BPE, *gpt2_bpe_section(tokens))
    if isinstance(tokens, HFTokenizer):
        return (TOKENIZER_BPE, *hf_bpe_section(tokens))
    return TOKENIZER_TRIE, tokenizer_section(tokens), len(tokens)


def pack_header(fields, model_type):
    """The 256-byte 2026.11 header from a dict of HEADER_FIELDS values (missing ones are zero)."""
    h = bytearray(HEADER_SIZE)
    struct.pack_into("<IIiiii", h, 0, MAGIC[0], MAGIC[1], VERSION[0], VERSION[1], model_type, CONFIG_LEN)
    for off, fmt, name in HEADER_FIELDS:
        struct.pack_into("<" + fmt, h, off, fields.get(name, b"" if fmt == "32s" else 0))
    return h


def read_header(data):
    """Parse a 2026.11 header (bytes) into a dict; used by tests and for inspection."""
    if len(data) < HEADER_SIZE:
        raise ExportError("file shorter than the 256-byte header")
    m0, m1, major, minor, mtype, clen = struct.unpack_from("<IIiiii", data, 0)
    d = {"magic": (m0, m1), "version": (major, minor), "model_type": mtype, "config_length": clen}
    for off, fmt, name in HEADER_FIELDS:
        d[name] = struct.unpack_from("<" + fmt, data, off)[0]
    return d


def _finish(f, out, fields, model_type):
    """Pad the file, then write the header with sizes and the CRC-32 (payload, then header with crc 0)."""
    out.pad()
    fields["file_size"] = out.pos
    fields["params_size"] = out.pos - fields["params_offset"]
    header = pack_header(fields, model_type)
    struct.pack_into("<I", header, CRC_OFFSET, zlib.crc32(bytes(header), out.crc))
    f.seek(0)
    f.write(header)


def _config_fields(cfg):
    return dict(block_size=cfg.block_size, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_embd=cfg.n_embd,
                n_head=cfg.n_head, n_kv_head=cfg.n_kv_head, n_hidden=cfg.n_hidden,
                shared_classifier=int(cfg.tie_embeddings), head_dim=cfg.head_dim, use_rope=int(cfg.use_rope),
                is_causal=int(cfg.is_causal), bias=_bias_field(cfg), rope_theta=float(cfg.rope_theta), norm_eps=float(cfg.norm_eps))


def write_model(path, checkpoint, quant="fp32", group_size=64, fmt="2026.11"):
    """Export a base model. `checkpoint`: a .pt path or the loaded dict. Returns the header fields."""
    if quant not in QUANTS:
        raise ExportError(f"--quant must be one of {list(QUANTS)}, got {quant!r}")
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {FORMATS}, got {fmt!r}")
    cfg, sd, tokens, fingerprint = load_checkpoint(checkpoint)
    kind, tok, n_tokens = _tokenizer_for_file(tokens)
    if fmt == "2024.10":
        _check_2024_representable(cfg)
        if kind != TOKENIZER_TRIE:
            raise ExportError(f"the 2024.10 layout cannot represent this model: the {'llama2.c' if kind == TOKENIZER_LLAMA2C else 'BPE'} tokenizer (2024.10 has "
                              "the trie tokenizer's section only); use --format 2026.11")
        return _write_model_2024(path, cfg, sd, tok, quant, group_size)
    gs = choose_group_size(group_size, cfg) if quant == "q8" else 0
    if quant == "q8" and gs != group_size:
        print(f"export.py: note: group size {gs} instead of {group_size}, so that groups divide every row",
              file=sys.stderr)
    fields = _config_fields(cfg)
    fields.update(quant_type=QUANTS[quant], group_size=gs, tokenizer_kind=kind,
                  tokenizer_vocab=n_tokens, tokenizer_offset=HEADER_SIZE, tokenizer_size=len(tok),
                  fingerprint=bytes.fromhex(fingerprint))

    def matrix(t):
        if quant == "fp32":
            out.tensor(t)
        else:
            q, s = quantize_q8(t, gs)
            out.tensor(q, np.int8)
            out.tensor(s)

    with _atomic_open(path) as f:
        out = _Out(f)
        out.write(bytes(HEADER_SIZE))  # placeholder, rewritten by _finish
        out.write(tok)
        out.pad()
        fields["params_offset"] = out.pos
        matrix(sd["tok_embeddings.weight"])
        if not cfg.use_rope:
            out.tensor(sd["pos_embeddings.weight"])
        for i in range(cfg.n_layer):
            p = f"layers.{i}."
            for name, _, _ in _linears(cfg):
                if name == "attn.wq":
                    out.tensor(sd[p + "attn_norm.weight"])
                if name == "ffn.w1":
                    out.tensor(sd[p + "ffn_norm.weight"])
                matrix(sd[p + name + ".weight"])
                if _has_bias(cfg, name):
                    out.tensor(sd[p + name + ".bias"])
        out.tensor(sd["norm.weight"])
        if not cfg.tie_embeddings:
            matrix(sd["output.weight"])  # the untied output head (shared classifier 0)
        _finish(f, out, fields, TYPE_BASE)
    return fields


def _check_2024_representable(cfg):
    why = []
    if not cfg.use_rope:
        why.append("learned positions (2024.10 implies RoPE)")
    if cfg.bias or cfg.qkv_bias:
        why.append("biases (2024.10 has none)")
    if not cfg.tie_embeddings:
        why.append("an untied output head (2024.10's engines tie it to the token embedding)")
    if cfg.norm_eps != 1e-5:
        why.append(f"norm_eps {cfg.norm_eps} (2024.10 implies 1e-5)")
    if cfg.rope_theta != 10000.0:
        why.append(f"rope_theta {cfg.rope_theta} (2024.10 implies 10000)")
    if cfg.head_dim * cfg.n_head != cfg.n_embd:
        why.append(f"head_dim {cfg.head_dim} != n_embd / n_head")
    if not cfg.is_causal:
        why.append("bidirectional attention (2024.10 implies causal)")
    if why:
        raise ExportError("the 2024.10 layout cannot represent this model: " + "; ".join(why))


def _write_model_2024(path, cfg, sd, tok, quant, group_size):
    """(write_model has checked that cfg fits the layout)"""
    L = cfg.n_layer
    header = bytearray(HEADER_SIZE)
    struct.pack_into("<IIiiii8i", header, 0, MAGIC[0], MAGIC[1], OLD_VERSION[0], OLD_VERSION[1], TYPE_BASE, 32,
                     cfg.block_size, cfg.vocab_size, L, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.n_hidden, 1)
    stacked = {n: torch.stack([sd[f"layers.{i}.{n}.weight"] for i in range(L)]) for n in
               ("attn_norm", "ffn_norm", "attn.wq", "attn.wk", "attn.wv", "attn.wo", "ffn.w1", "ffn.w2", "ffn.w3")}
    cos, sin = rope_tables(cfg.head_dim, cfg.block_size, 10000.0)
    with _atomic_open(path) as f:
        out = _Out(f)
        if quant == "fp32":
            out.write(header)
            out.write(tok)
            for t in [sd["tok_embeddings.weight"], stacked["attn_norm"], stacked["attn.wq"], stacked["attn.wk"],
                      stacked["attn.wv"], stacked["attn.wo"], stacked["ffn_norm"], stacked["ffn.w1"],
                      stacked["ffn.w2"], stacked["ffn.w3"], sd["norm.weight"], cos, sin]:
                out.tensor(t, align=1)
        else:
            # the original writer: header keeps the requested size; halve while n_embd % gs != 0
            if group_size < 1:
                raise ExportError(f"group size must be positive, got {group_size}")
            gs = group_size
            while cfg.n_embd % gs:
                gs //= 2
            struct.pack_into("<ii", header, 56, QUANT_Q8, group_size)
            out.write(header)
            out.write(tok)
            for t in [stacked["attn_norm"], stacked["ffn_norm"], sd["norm.weight"]]:
                out.tensor(t, align=1)
            mats = [sd["tok_embeddings.weight"]] + [stacked[n][i] for n in (
                "attn.wq", "attn.wk", "attn.wv", "attn.wo", "ffn.w1", "ffn.w2", "ffn.w3") for i in range(L)]
            for m in mats:
                q, s = quantize_q8(m, gs)
                out.tensor(q, np.int8, align=1)
                out.tensor(s, align=1)
            out.tensor(cos, align=1)
            out.tensor(sin, align=1)
    return {"format": "2024.10", "quant": quant}


# ---------------------------------------------------------------------------
# LoRA adapters


def load_lora(path_or_dict):
    """-> (base ModelConfig, lora_config dict, adapter tensors, fingerprint hex) from a nano-lora checkpoint."""
    ck = _read_checkpoint(path_or_dict, files.load_torch_file) if isinstance(path_or_dict, str) else path_or_dict
    if not isinstance(ck, dict) or ck.get("format") != "nano-lora":
        raise ExportError("not a LoRA adapter checkpoint (expected format 'nano-lora')")
    for key in ("lora_config", "base", "adapter"):
        if not isinstance(ck.get(key), dict):
            raise ExportError(f"LoRA checkpoint lacks the dict {key!r}")
    try:
        cfg = ModelConfig.from_dict(dict(ck["base"].get("model_config", {})), "LoRA base model_config")
    except ConfigError as e:
        raise ExportError(str(e)) from None
    lc = ck["lora_config"]
    rank, alpha, targets = lc.get("rank"), lc.get("alpha"), lc.get("targets")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ExportError(f"lora_config rank must be a positive integer, got {rank!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise ExportError(f"lora_config alpha must be a number, got {alpha!r}")
    if not isinstance(targets, list) or not targets or any(t not in LORA_TARGETS for t in targets):
        raise ExportError(f"lora_config targets must be a non-empty list drawn from {LORA_TARGETS}, got {targets!r}")
    fp = ck["base"].get("fingerprint")
    try:
        fp_bytes = bytes.fromhex(fp) if isinstance(fp, str) else None
    except ValueError:
        fp_bytes = None
    if fp_bytes is None or len(fp_bytes) != 32:
        raise ExportError("LoRA checkpoint's base fingerprint must be a 64-digit hex SHA-256 (see base_fingerprint)")
    ad = _clean_state_dict(ck["adapter"], keep_lora=True)
    dims = {n.split(".")[-1]: (o, i) for n, o, i in _linears(cfg)}
    mods = {n.split(".")[-1]: n for n, _, _ in _linears(cfg)}
    for layer in range(cfg.n_layer):
        for t in targets:
            out_f, in_f = dims[t]
            for part, shape in (("lora_A", (rank, in_f)), ("lora_B", (out_f, rank))):
                key = f"layers.{layer}.{mods[t]}.{part}"
                if key not in ad:
                    raise ExportError(f"adapter lacks {key!r}")
                if tuple(ad[key].shape) != shape:
                    raise ExportError(f"{key} has shape {tuple(ad[key].shape)}, expected {shape}")
    return cfg, {"rank": rank, "alpha": float(alpha), "targets": list(targets)}, ad, fp


def write_lora(path, adapter, fmt="2026.11"):
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {FORMATS}, got {fmt!r}")
    cfg, lc, ad, fp = load_lora(adapter)
    mods = {n.split(".")[-1]: n for n, _, _ in _linears(cfg)}
    if fmt == "2024.10":
        return _write_lora_2024(path, cfg, lc, ad, mods)
    mask = sum(1 << LORA_TARGETS.index(t) for t in set(lc["targets"]))
    fields = _config_fields(cfg)
    fields.update(fingerprint=bytes.fromhex(fp), lora_rank=lc["rank"], lora_targets=mask, lora_alpha=lc["alpha"])
    with _atomic_open(path) as f:
        out = _Out(f)
        out.write(bytes(HEADER_SIZE))
        fields["params_offset"] = out.pos
        for layer in range(cfg.n_layer):
            for t in LORA_TARGETS:
                if mask & (1 << LORA_TARGETS.index(t)):
                    out.tensor(ad[f"layers.{layer}.{mods[t]}.lora_A"].float())
                    out.tensor(ad[f"layers.{layer}.{mods[t]}.lora_B"].float())
        _finish(f, out, fields, TYPE_LORA)
    return fields


def _write_lora_2024(path, cfg, lc, ad, mods):
    _check_2024_representable(cfg)
    extra = [t for t in lc["targets"] if t not in OLD_LORA_TARGETS]
    if extra:
        raise ExportError(f"the 2024.10 LoRA layout covers only {OLD_LORA_TARGETS}; this adapter also targets {extra}")
    if float(lc["alpha"]) != int(lc["alpha"]):
        raise ExportError(f"the 2024.10 LoRA layout stores alpha as an integer; got {lc['alpha']}")
    r, L = lc["rank"], cfg.n_layer
    header = bytearray(HEADER_SIZE)
    struct.pack_into("<IIiiii8i", header, 0, MAGIC[0], MAGIC[1], OLD_VERSION[0], OLD_VERSION[1], TYPE_LORA, 32,
                     r, int(lc["alpha"]), L, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.n_hidden, 0)
    dims = {n.split(".")[-1]: (o, i) for n, o, i in _linears(cfg)}
    with _atomic_open(path) as f:
        out = _Out(f)
        out.write(header)
        for t in OLD_LORA_TARGETS:
            out_f, in_f = dims[t]
            for part, shape in (("lora_A", (r, in_f)), ("lora_B", (out_f, r))):
                # a q/k/v/o target the adapter does not train is written as zeros: a zero delta
                ts = [ad[f"layers.{i}.{mods[t]}.{part}"].float() if t in lc["targets"] else torch.zeros(shape)
                      for i in range(L)]
                out.tensor(torch.stack(ts), align=1)
    return {"format": "2024.10", "lora_rank": r}


# ---------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description="Export a Nano checkpoint or LoRA adapter for the C engine (infer_c/).")
    ap.add_argument("out", help="output .bin file")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="base model checkpoint (.pt from train.py)")
    src.add_argument("--lora", help="LoRA adapter checkpoint (.pt, format nano-lora)")
    ap.add_argument("--quant", default="fp32", choices=list(QUANTS) + ["f16"],
                    help="weight type of the matrices (base models); f16 for --format gguf only, where q8 is q8_0")
    ap.add_argument("--group-size", type=int, default=64, help="Q8 group size requested (default 64)")
    ap.add_argument("--format", default="2026.11", choices=FORMATS + ("hf", "gguf"),
                    help="file layout (default: ours, 2026.11); hf: a Hugging Face model directory at OUT; "
                         "gguf: a GGUF file for llama.cpp")
    ap.add_argument("--merge", metavar="ADAPTER", help="--format hf or gguf: merge this LoRA adapter into the checkpoint first")
    args = ap.parse_args(argv)
    try:
        if args.format == "hf":
            if not args.checkpoint:
                raise ExportError("--format hf exports a base model: give --checkpoint (and --merge ADAPTER to fold one in)")
            written = write_hf(args.out, args.checkpoint, args.merge)
            print(f"wrote {args.out}/: {', '.join(written)}", file=sys.stderr)
            return 0
        if args.format == "gguf":
            if not args.checkpoint:
                raise ExportError("--format gguf exports a base model: give --checkpoint (and --merge ADAPTER to fold one in)")
            write_gguf(args.out, args.checkpoint, args.quant, args.merge)
            print(f"wrote {args.out}", file=sys.stderr)
            return 0
        if args.merge:
            raise ExportError("--merge goes with --format hf or gguf; for the C engine export the adapter itself with --lora")
        if args.checkpoint:
            write_model(args.out, args.checkpoint, args.quant, args.group_size, args.format)
        else:
            if args.quant != "fp32":
                raise ExportError("adapters are always fp32; --quant applies to base models only")
            write_lora(args.out, args.lora, args.format)
    except (NanoError, OSError) as e:  # ExportError, TokenizerError, ...
        print(f"export.py: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
