"""
gguf_export.py: Nano models as GGUF files, the format llama.cpp runs (`export.py --format gguf`).

    python export.py model.gguf --checkpoint ckpt.pt --format gguf [--quant fp32|f16|q8]
    llama-completion -m model.gguf -p "In the beginning" -n 50 --temp 0

export.py loads and checks the checkpoint, then calls write_gguf here; the `gguf` package (llama.cpp's
own Python writer) lays out the file.

The model. Nano's Transformer is llama.cpp's `llama` architecture: RMSNorm, rotary positions, grouped-
query attention, SwiGLU, a tied or untied head (without output.weight llama.cpp uses token_embd).
Models with biases on the q, k and v projections only (Qwen2's form) are written as the `qwen2`
architecture, the others as `llama`, whose biases on every projection llama.cpp also reads.

The q/k row order. Nano rotates adjacent pairs (2i, 2i+1) of each head. llama.cpp's `llama`
architecture does too (its "normal" RoPE, which is why its convert_hf_to_gguf.py permutes Hugging
Face's q_proj and k_proj back from halves to pairs), so wq and wk go out unchanged. Its `qwen2`
architecture rotates halves (i, i + head_dim/2) as Hugging Face does ("neox" RoPE), so wq and wk and
their biases go out in halves order (hf.pairs_to_halves), exactly as hf.export_hf writes them.

The layout. A torch weight [out, in] is the GGUF tensor of dims (in, out) over the same row-major
bytes. f32 writes every tensor as float32; f16 and q8 write the matrices (embedding, projections,
head) as float16 or q8_0 (blocks of 32 weights with one float16 scale: llama.cpp's Q8_0, not the C
engine's Q8, whose groups and scales differ) and keep norms and biases in float32. q8 needs every
matrix row to be a whole number of 32-weight blocks.

The tokenizers, and what cannot be carried over:
  * Nano's trie tokenizer is llama.cpp's `rwkv` vocabulary: greedy longest match from the left, the
    special tokens matched like any other string. The token strings are escaped as llama.cpp reads
    them (backslash, tab, newline and carriage return after a backslash). Every text made only of
    characters that are tokens gets Nano's ids. Characters outside the vocabulary do not: Nano makes
    one <|unknown|> of each character, llama.cpp one <|unknown|> of each UTF-8 byte when the byte
    starts no token, and when the character's first bytes do start a token (another character with
    the same lead bytes, or '<' of the special tokens where '<' is not itself a token) its
    tokenizer loops forever (it finds no token there and starts again from the text's beginning).
    Nano's default corpus has no '<', so "a < b" hangs llama.cpp with such a vocabulary.
  * GPT-2 BPE (Nano's `bpe`) and byte-level BPE tokenizers of imported Hugging Face models are
    llama.cpp's `gpt2` vocabulary with their merges and the pre-tokenizer's llama.cpp name (`gpt-2`,
    `llama-bpe`, `qwen2`, `smollm`). Special-token strings in a prompt are special tokens when
    llama.cpp parses special tokens (llama-completion and llama-tokenize do by default). Like Nano's
    C engine, llama.cpp does not apply a tokenizer's NFC normalizer (Qwen2's).
  * <|bos|> goes before every prompt where Nano puts it (add_bos_token; but llama.cpp never adds a BOS to an
    rwkv vocabulary's text, so there a prompt starts with "<|bos|>" written out), Nano's chat framing is
    the chat template (an imported model keeps its own), the end-of-generation tokens
    are Nano's (<|eos|>; an imported model's eos and end-of-turn tokens). llama.cpp also ends at any
    token spelled like an end-of-turn token of a known family (LLAMA_CPP_EOG_TEXTS): GPT-2's
    <|endoftext|>, for one, which Nano's engines generate through. write_gguf prints a note naming
    such tokens; a stop token of Nano's that llama.cpp would not stop at is refused.
  * Embedding rows past the tokenizer's last token (padding) get placeholder tokens that no text
    matches (type UNUSED); Nano decodes them as <|unknown|>, llama.cpp as the placeholder.
Learned positions, bidirectional attention and LoRA adapters (merge them first: merge_lora.py) have
no GGUF form here and are refused.
"""

import json
import os
import sys

import gguf
import numpy as np
import torch

from files import NanoError
from hf import pairs_to_halves, tokenizer_files
from llama2c import sentencepiece_pieces
from tokenizer import CHAT_TURN_END, LLAMA2C_BYTE0, LLAMA2C_NO_MERGE, SPECIAL_TOKENS

GGUF_QUANTS = {"fp32": "F32", "f16": "F16", "q8": "Q8_0"}  # --quant -> the GGUF type of the matrices
Q8_0_BLOCK = 32  # weights per q8_0 block (llama.cpp's QK8_0)
# tokenizer.json pre-tokenizer (export._hf_pattern's name) -> llama.cpp's tokenizer.ggml.pre
LLAMA_CPP_PRE = {"gpt2": "gpt-2", "llama3": "llama-bpe", "qwen2": "qwen2", "smollm": "smollm"}
# the token texts llama.cpp's vocabulary loader makes end-of-generation tokens whatever the file says
# (src/llama-vocab.cpp, "maintain a list of tokens that cause end-of-generation")
LLAMA_CPP_EOG_TEXTS = frozenset([
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>"])


# Nano's chat framing (data.chat_encode) as a chat template for llama.cpp's chat modes: each exchange is
# <|instruct_mark|> question <|response_mark|> answer <|eos|>; a system message goes before the next
# question, a blank line between. BOS_SLOT: "<|bos|>" where llama.cpp adds none itself (rwkv), else "".
NANO_CHAT_TEMPLATE = (
    "BOS_SLOT{%- set ns = namespace(system='') -%}{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{%- set ns.system = ns.system + m['content'] + '\n\n' -%}"
    "{%- elif m['role'] == 'user' -%}{{- '<|instruct_mark|>' + ns.system + m['content'] + '<|response_mark|>' -}}"
    "{%- set ns.system = '' -%}"
    "{%- elif m['role'] == 'assistant' -%}{{- m['content'] + '<|eos|>' -}}{%- endif -%}{%- endfor -%}")


class GGUFExportError(NanoError):
    """The model or its tokenizer has no GGUF form that llama.cpp runs as Nano does; the message says why."""


# ---------------------------------------------------------------------------
# Vocabularies


class Vocab:
    """What the file's tokenizer.* keys hold: token strings as llama.cpp reads them, their gguf.TokenType
    values, merges (BPE), and the special ids (None where the tokenizer has none)."""

    def __init__(self, model, tokens, types, merges=None, pre=None, bos=None, eos=None, eot=None, unk=None,
                 pad=None, add_bos=False, stop=(), template=None):
        self.model, self.tokens, self.types, self.merges, self.pre = model, tokens, types, merges, pre
        self.bos, self.eos, self.eot, self.unk, self.pad, self.add_bos = bos, eos, eot, unk, pad, add_bos
        self.stop, self.template = sorted(set(stop)), template


def rwkv_escape(text):
    """A token string as llama.cpp's rwkv vocabulary spells it: its reader (llama_unescape_rwkv_token)
    turns \\t, \\n, \\r and \\xNN into those bytes and a backslash before anything else into that
    character, and copies every other byte (UTF-8 passes through)."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _special_crossings(tokens):
    """Ordinary tokens that reach into a special token's string (the special token's start inside them,
    or a special token followed by more): there llama.cpp, which cuts special tokens out of the text
    first, and Nano's plain longest match split a text differently."""
    specials = tokens[:len(SPECIAL_TOKENS)]

    def crosses(t):
        starts_inside = any(s.startswith(t[i:]) or t[i:].startswith(s) for i in range(1, len(t)) for s in specials)
        return starts_inside or any(t.startswith(s) for s in specials)

    return [t for t in tokens[len(SPECIAL_TOKENS):] if len(t) > 1 and crosses(t)]


def trie_vocab(tok, n_vocab, bos_first=True):
    """Nano's trie tokenizer (tokenizer.TrieTokenizer, or its list of strings) as an rwkv vocabulary.
    bos_first: Nano puts <|bos|> before a prompt (all but models framed as 2024.10's engines did)."""
    tokens = list(getattr(tok, "tokens", tok))
    crossing = _special_crossings(tokens)
    if crossing:
        raise GGUFExportError(f"trie tokenizer: the token {crossing[0]!r} runs into a special token's string; "
                              "llama.cpp cuts special tokens out of a text before matching and would split it otherwise")
    types = [gguf.TokenType.CONTROL] * len(SPECIAL_TOKENS) + [gguf.TokenType.NORMAL] * (len(tokens) - len(SPECIAL_TOKENS))
    types[SPECIAL_TOKENS.index("<|unknown|>")] = gguf.TokenType.UNKNOWN
    escaped = [rwkv_escape(t) for t in tokens]
    # placeholders for the padding rows: byte 0xFF never occurs in UTF-8 text, so no text reaches them
    escaped += [f"\\xff[PAD{i}]" for i in range(len(tokens), n_vocab)]
    types += [gguf.TokenType.UNUSED] * (n_vocab - len(tokens))
    ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    traps = sorted({s[0] for s in SPECIAL_TOKENS} - set(tokens))
    if traps:
        print(f"gguf: note: {', '.join(map(repr, traps))} starts Nano's special tokens but is not a token of this "
              "vocabulary: llama.cpp's rwkv tokenizer loops forever on a text with a '<' that starts no special "
              "token (Nano makes it <|unknown|>)", file=sys.stderr)
    # (llama.cpp never puts a BOS before an rwkv vocabulary's text, add_bos_token or not: a prompt starts
    # with "<|bos|>" written out, and the chat template writes it)
    return Vocab("rwkv", escaped, types, bos=ids["<|bos|>"], eos=ids["<|eos|>"], eot=ids["<|eos|>"],
                 unk=ids["<|unknown|>"], pad=ids["<|padding|>"], add_bos=bos_first, stop=[ids["<|eos|>"]],
                 template=NANO_CHAT_TEMPLATE.replace("BOS_SLOT", "<|bos|>" if bos_first else ""))


def bpe_vocab(tokenizer_json, n_vocab, pre, bos, eos, eot=None, stop=(), pad=None, unk=None, template=None):
    """A byte-level BPE tokenizer.json (dict) as a gpt2 vocabulary: tokens spelled in GPT-2's byte
    characters as tokenizer.json spells them, merges in rank order, added tokens as control tokens
    (special) or user-defined ones (matched in the text, shown as text)."""
    model = tokenizer_json["model"]
    by_id = {i: s for s, i in model["vocab"].items()}
    kinds = {i: gguf.TokenType.NORMAL for i in by_id}
    for a in tokenizer_json.get("added_tokens") or []:
        by_id[a["id"]] = a["content"]
        kinds[a["id"]] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
    n = len(by_id)
    if sorted(by_id) != list(range(n)) or n > n_vocab:
        raise GGUFExportError(f"BPE tokenizer: its ids are not 0 .. {n - 1} without gaps within the model's {n_vocab} rows")
    tokens = [by_id[i] for i in range(n)] + [f"[PAD{i}]" for i in range(n, n_vocab)]
    types = [kinds[i] for i in range(n)] + [gguf.TokenType.UNUSED] * (n_vocab - n)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return Vocab("gpt2", tokens, types, merges=merges, pre=LLAMA_CPP_PRE[pre], bos=bos, eos=eos, eot=eot,
                 unk=unk, pad=pad, add_bos=bos is not None, stop=stop, template=template)


def gpt2_vocab(tok, n_vocab, bos_first=True):
    """Nano's GPT-2 BPE (tokenizer.BPETokenizer): GPT-2's vocabulary and merges as hf.tokenizer_files writes
    them into tokenizer.json, then Nano's special tokens; <|bos|> before every prompt, <|eos|> ends."""
    j = json.loads(tokenizer_files(tok)["tokenizer.json"])
    vocab = bpe_vocab(j, n_vocab, "gpt2", bos=tok.bos_id, eos=tok.eos_id, eot=tok.eos_id, stop=[tok.eos_id],
                      pad=tok.pad_id, unk=tok.unk_id, template=NANO_CHAT_TEMPLATE.replace("BOS_SLOT", ""))
    vocab.add_bos = bos_first
    return vocab


def hf_vocab(tok, n_vocab, pattern, bos):
    """An imported model's own byte-level BPE (tokenizer.HFTokenizer); pattern: export._hf_pattern's name
    of its pre-tokenizer; bos: what its post-processor puts before a document (export._hf_bos, -1: none).
    export.hf_bpe_section has already refused what Nano's C engine would tokenize differently."""
    j = json.loads(tok.spec["json"])
    if bool(j["model"].get("ignore_merges")) != (pattern == "llama3"):
        raise GGUFExportError(f"Hugging Face tokenizer: ignore_merges {bool(j['model'].get('ignore_merges'))} with "
                              f"the {pattern} pre-tokenizer; llama.cpp's {LLAMA_CPP_PRE[pattern]} has it "
                              f"{'on' if pattern == 'llama3' else 'off'}")
    turn_end = tok.token_to_id(CHAT_TURN_END[tok.chat]) if tok.chat in CHAT_TURN_END else None
    eos = tok.eos_id if tok.eos_id is not None else (tok.stop_ids or [None])[0]
    if eos is None:  # (llama.cpp's gpt2 vocabulary takes token 11 for bos and eos unless the file names them)
        raise GGUFExportError("Hugging Face tokenizer: no eos token; llama.cpp would stop at token 11 instead")
    return bpe_vocab(j, n_vocab, pattern, bos=None if bos == -1 else bos, eos=eos,
                     eot=turn_end if turn_end in tok.stop_ids else None, stop=tok.stop_ids, pad=tok.pad_id,
                     template=tok.spec.get("template"))


def llama2c_vocab(tok, n_vocab):
    """A llama2.c model's tokenizer (tokenizer.Llama2cTokenizer: SentencePiece pieces with scores) as llama.cpp's
    `llama` (SentencePiece) vocabulary (llama2c.sentencepiece_pieces): spaces spelled U+2581, <unk> <s> </s>,
    the scores, <0xNN> byte tokens, a space put before the text (add_space_prefix, run.c's dummy prefix),
    <s> first; generation ends at </s> and at <s> (run.c's stop, which begins the next story)."""
    if any(sc <= LLAMA2C_NO_MERGE for sc in tok.scores):
        raise GGUFExportError(f"llama2.c tokenizer: a score at or below {LLAMA2C_NO_MERGE:g}, which run.c never merges "
                              "and llama.cpp would")
    n = len(tok.tokens)
    tokens = sentencepiece_pieces(tok) + [f"[PAD{i}]" for i in range(n, n_vocab)]
    types = [gguf.TokenType.NORMAL] * n + [gguf.TokenType.UNUSED] * (n_vocab - n)
    types[tok.unk_id] = gguf.TokenType.UNKNOWN
    types[tok.bos_id] = types[tok.eos_id] = gguf.TokenType.CONTROL
    types[LLAMA2C_BYTE0:LLAMA2C_BYTE0 + 256] = [gguf.TokenType.BYTE] * 256
    vocab = Vocab("llama", tokens, types, bos=tok.bos_id, eos=tok.eos_id, eot=tok.bos_id, unk=tok.unk_id,
                  add_bos=True, stop=tok.stop_ids)
    vocab.scores = list(tok.scores) + [-1e9] * (n_vocab - n)  # (placeholders: below every piece, never merged to)
    return vocab


def check_stops(vocab):
    """Nano's stop tokens against the ones llama.cpp will have: eos, eot and every token spelled like a
    known family's end of turn (LLAMA_CPP_EOG_TEXTS). A stop of Nano's missing there is refused; one
    more of llama.cpp's is a note."""
    llama_cpp = {i for i in (vocab.eos, vocab.eot) if i is not None}
    llama_cpp |= {i for i, t in enumerate(vocab.tokens) if t in LLAMA_CPP_EOG_TEXTS}
    missing = [i for i in vocab.stop if i not in llama_cpp]
    if missing:
        raise GGUFExportError(f"the tokenizer stops at {len(vocab.stop)} tokens {vocab.stop}; a GGUF file names "
                              f"two (eos, eot), and llama.cpp would generate through {missing}")
    extra = sorted(llama_cpp - set(vocab.stop))
    if extra:
        print(f"gguf: note: llama.cpp also ends generation at {', '.join(f'{i} {vocab.tokens[i]!r}' for i in extra)} "
              "(it picks tokens by their text), where Nano's engines go on", file=sys.stderr)


# ---------------------------------------------------------------------------
# Tensors


def architecture(cfg):
    """'qwen2' for biases on q, k and v only, else 'llama'; refuses what neither computes."""
    why = [w for w, bad in (("learned positions (llama.cpp's Llama has rotary ones only)", not cfg.use_rope),
                            ("bidirectional attention (llama.cpp's Llama is causal)", not cfg.is_causal)) if bad]
    if why:
        raise GGUFExportError("GGUF export: this model has " + " and ".join(why))
    return "qwen2" if cfg.qkv_bias and not cfg.bias else "llama"


# Nano's names (after "layers.{i}.") -> GGUF's (after "blk.{i}.")
LAYER_TENSORS = {"attn_norm": "attn_norm", "attn.wq": "attn_q", "attn.wk": "attn_k", "attn.wv": "attn_v",
                 "attn.wo": "attn_output", "ffn_norm": "ffn_norm", "ffn.w1": "ffn_gate", "ffn.w2": "ffn_down",
                 "ffn.w3": "ffn_up"}
TOP_TENSORS = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output"}


def gguf_name(name):
    """'layers.3.attn.wq.weight' -> 'blk.3.attn_q.weight'; 'tok_embeddings.weight' -> 'token_embd.weight'."""
    stem, _, kind = name.rpartition(".")
    if stem.startswith("layers."):
        _, i, rest = stem.split(".", 2)
        return f"blk.{i}.{LAYER_TENSORS[rest]}.{kind}"
    return f"{TOP_TENSORS[stem]}.{kind}"


def gguf_tensors(cfg, sd, arch):
    """(GGUF name, float32 numpy array in the file's row order) for every weight of the state dict."""
    for name, t in sd.items():
        t = t.detach().float().cpu()
        if arch == "qwen2" and ".attn.wq." in name:
            t = pairs_to_halves(t, cfg.n_head, cfg.head_dim)
        elif arch == "qwen2" and ".attn.wk." in name:
            t = pairs_to_halves(t, cfg.n_kv_head, cfg.head_dim)
        yield gguf_name(name), t.contiguous().numpy()


def encode_tensor(array, quant):
    """-> (array to write, its GGML type or None when numpy's dtype says it). Matrices take the chosen
    type; vectors (norms, biases) stay float32, as llama.cpp's own converter keeps them."""
    if array.ndim < 2 or quant == "fp32":
        return array.astype(np.float32), None
    if quant == "f16":
        return array.astype(np.float16), None
    return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0


# ---------------------------------------------------------------------------
# The file


def write_gguf(path, cfg, sd, vocab, quant="fp32", name="nano"):
    """Write a GGUF file: cfg (model.ModelConfig) and sd (its state dict, checked by export.py), vocab (a
    Vocab from trie_vocab, gpt2_vocab or hf_vocab). Written to path.tmp and renamed when complete."""
    if quant not in GGUF_QUANTS:
        raise GGUFExportError(f"--quant for GGUF must be one of {list(GGUF_QUANTS)}, got {quant!r}")
    arch = architecture(cfg)
    if quant == "q8":
        rows = [n for n in (cfg.n_embd, cfg.n_hidden) if n % Q8_0_BLOCK]  # the matrices' row lengths
        if rows:
            raise GGUFExportError(f"q8_0 packs rows in blocks of {Q8_0_BLOCK} weights; this model has rows of "
                                  f"{rows[0]}: use --quant f16 or fp32")
    if len(vocab.tokens) != cfg.vocab_size:
        raise GGUFExportError(f"{len(vocab.tokens)} tokens for {cfg.vocab_size} embedding rows")
    check_stops(vocab)
    tmp = f"{path}.tmp"
    try:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(name)
        w.add_file_type({"fp32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                         "q8": gguf.LlamaFileType.MOSTLY_Q8_0}[quant])
        if quant == "q8":
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_context_length(cfg.block_size)
        w.add_embedding_length(cfg.n_embd)
        w.add_block_count(cfg.n_layer)
        w.add_feed_forward_length(cfg.n_hidden)
        w.add_head_count(cfg.n_head)
        w.add_head_count_kv(cfg.n_kv_head)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(float(cfg.rope_theta))
        w.add_layer_norm_rms_eps(float(cfg.norm_eps))
        w.add_vocab_size(cfg.vocab_size)

        w.add_tokenizer_model(vocab.model)
        if vocab.pre:
            w.add_tokenizer_pre(vocab.pre)
        w.add_token_list(vocab.tokens)
        w.add_token_types([int(t) for t in vocab.types])
        if vocab.merges is not None:
            w.add_token_merges(vocab.merges)
        if vocab.model == "llama":  # SentencePiece: scores rank the merges, a space goes before the text
            w.add_token_scores(vocab.scores)
            w.add_add_space_prefix(True)
        for add, i in ((w.add_bos_token_id, vocab.bos), (w.add_eos_token_id, vocab.eos), (w.add_eot_token_id, vocab.eot),
                       (w.add_unk_token_id, vocab.unk), (w.add_pad_token_id, vocab.pad)):
            if i is not None:
                add(i)
        w.add_add_bos_token(vocab.add_bos)
        w.add_add_eos_token(False)
        if vocab.template:
            w.add_chat_template(vocab.template)

        for tensor_name, array in gguf_tensors(cfg, sd, arch):
            data, raw_dtype = encode_tensor(array, quant)
            w.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"architecture": arch, "quant": quant, "tokenizer": vocab.model, "tensors": len(sd)}


def dequantized(reader_tensor):
    """A tensor read back by gguf.GGUFReader as float32, in torch's [out, in] shape (tests, inspection)."""
    data = np.asarray(reader_tensor.data)
    if reader_tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0:
        data = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q8_0)
    return torch.from_numpy(np.array(data, dtype=np.float32)).reshape(
        [int(d) for d in reversed(reader_tensor.shape.tolist())])
