"""
llama2.c's model files in: a .bin that Karpathy's llama2.c (run.c) runs loads, with its tokenizer.bin,
wherever a Nano checkpoint does (hf.load_checkpoint calls load_llama2c), and converts to a .pt once:

    python infer.py -m stories260K.bin --prompt "Once upon a time" -t 0      # tok512.bin lies beside it
    python llama2c.py import stories15M.bin stories15M.pt --tokenizer tokenizer.bin

The tokenizer: given (--tokenizer here, the tokenizer argument of load_llama2c), or found beside the
model: tok{vocab_size}.bin first (the name llama2.c gives the tokenizers it trains, tok512.bin for
stories260K), then tokenizer.bin (llama2.c's Llama 2 tokenizer, of the stories15M/42M/110M models).

Layouts (llama2.c's export.py), all little-endian:
  * legacy (version 0): 7 int32, dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
    (a negative vocab_size: the classifier is not the token embedding), then float32 tensors: token
    embedding, the attention norms of all layers, wq (all layers), wk, wv, wo, the ffn norms, w1, w2,
    w3, the final norm, freq_cis_real and freq_cis_imag ([seq_len, head_size / 2] each: skipped, Nano
    computes its own), then the classifier when it is not shared.
  * version 1: uint32 magic 0x616b3432 ("ak42"), int32 version 1, the same 7 int32 (vocab_size
    positive), a byte shared_classifier, zeros to byte 256; then float32: the attention norms, the ffn
    norms, the final norm, the token embedding, wq, wk, wv, wo, w1, w2, w3, and the classifier when
    it is not shared.
  Version 2 (Q8_0, for llama2.c's runq.c) is refused by name.

The model is model.py's own: llama2.c's Llama has RMSNorm with eps 1e-5, RoPE with theta 10000 on
adjacent pairs taken as complex numbers (model.apply_rope's convention, so no row reordering as
hf.py needs), SwiGLU and grouped-query attention, no biases.
"""

import argparse
import os
import struct

import numpy as np
import torch

from files import NANO_BIN_MAGIC, ConfigError, import_checkpoint
from model import ModelConfig
from tokenizer import LLAMA2C_NO_MERGE, TokenizerError, read_llama2c_tokenizer

V1_MAGIC = struct.pack("<I", 0x616B3432)  # llama2.c's "ak42", as its export.py writes it
V1_HEADER = 256
LEGACY_HEADER = 7 * 4
MAX_SIZE = 1 << 24  # a header number past this (dim, layers, vocab, context) is not a model, it is garbage


class Llama2cError(ConfigError):
    """A llama2.c model file that cannot be read: the message names the file and the fault."""


def is_llama2c(path):
    """Whether `path` is (meant as) a llama2.c model file: the version-1/2 magic, or a .bin file that is
    neither a torch checkpoint (a zip archive) nor Nano's own .bin (the legacy layout has no magic)."""
    if not os.path.isfile(path):
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return False
    if head[:4] == V1_MAGIC:
        return True
    return os.fspath(path).endswith(".bin") and not head.startswith(b"PK") and head != NANO_BIN_MAGIC


def read_header(path, data_size, head):
    """(version, header bytes, config ints, shared classifier) of a llama2.c file, checked for numbers that
    make a model at all; `head`: its first 256 bytes (fewer for a short file)."""
    if head[:4] == V1_MAGIC:
        if len(head) < V1_HEADER:
            raise Llama2cError(f"{path}: a llama2.c version-1 file cut short inside its 256-byte header "
                               f"({data_size} bytes)")
        version = struct.unpack_from("<i", head, 4)[0]
        if version == 2:
            raise Llama2cError(f"{path}: a llama2.c version-2 (Q8_0, runq.c) file; Nano reads the fp32 layouts "
                               "(legacy and version 1): export it from llama2.c with --version 1")
        if version != 1:
            raise Llama2cError(f"{path}: llama2.c header version {version} (Nano reads the legacy layout and version 1)")
        ints = struct.unpack_from("<7i", head, 8)
        shared = head[36]
        if shared not in (0, 1):
            raise Llama2cError(f"{path}: shared_classifier byte is {shared}, expected 0 or 1 (garbled header)")
        if ints[5] < 0:
            raise Llama2cError(f"{path}: vocab_size {ints[5]} in a version-1 header (garbled header)")
        return 1, V1_HEADER, ints, bool(shared)
    if len(head) < LEGACY_HEADER:
        raise Llama2cError(f"{path}: {data_size} bytes, shorter than a llama2.c header (28 bytes)")
    ints = struct.unpack_from("<7i", head)
    shared = ints[5] > 0  # a negative vocab_size: an untied classifier (llama2.c's legacy flag)
    return 0, LEGACY_HEADER, ints[:5] + (abs(ints[5]), ints[6]), shared


def model_config(path, ints, shared):
    names = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
    for name, value in zip(names, ints):
        if not 1 <= value <= MAX_SIZE:
            raise Llama2cError(f"{path}: header {name} is {value}, outside 1 .. {MAX_SIZE} (not a llama2.c model, "
                               "or a garbled header)")
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = ints
    if dim % heads or heads % kv_heads or (dim // heads) % 2:
        raise Llama2cError(f"{path}: header dim {dim}, n_heads {heads}, n_kv_heads {kv_heads} do not make a model "
                           "(dim must be n_heads x an even head size, n_heads a multiple of n_kv_heads)")
    cfg = ModelConfig(block_size=seq_len, vocab_size=vocab, n_layer=layers, n_embd=dim, n_head=heads,
                      n_kv_head=kv_heads, n_hidden=hidden, tie_embeddings=shared, rope_theta=10000.0, norm_eps=1e-5)
    try:
        cfg.validate(path)
    except ConfigError as e:
        raise Llama2cError(str(e)) from None
    return cfg


def tensor_layout(cfg, version):
    """[(name, shape)] in file order; 'skip' entries are the legacy RoPE tables."""
    D, H, L, V = cfg.n_embd, cfg.n_hidden, cfg.n_layer, cfg.vocab_size
    Q, KV = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    per_layer = {"attn_norm": (D,), "attn.wq": (Q, D), "attn.wk": (KV, D), "attn.wv": (KV, D), "attn.wo": (D, Q),
                 "ffn_norm": (D,), "ffn.w1": (H, D), "ffn.w2": (D, H), "ffn.w3": (H, D)}
    stacked = lambda name: (name, (L, *per_layer[name]))  # noqa: E731  (all layers, one after the other)
    matrices = [stacked(n) for n in ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "ffn.w1", "ffn.w2", "ffn.w3")]
    if version == 0:
        rope = (cfg.block_size, cfg.head_dim // 2)
        order = ([("tok_embeddings", (V, D)), stacked("attn_norm")] + matrices[:4] + [stacked("ffn_norm")]
                 + matrices[4:] + [("norm", (D,)), ("skip", rope), ("skip", rope)])
    else:
        order = [stacked("attn_norm"), stacked("ffn_norm"), ("norm", (D,)), ("tok_embeddings", (V, D))] + matrices
    return order + ([] if cfg.tie_embeddings else [("output", (V, D))])


def find_tokenizer(path, vocab_size):
    """The tokenizer.bin beside a model: tok{vocab_size}.bin, then tokenizer.bin; Llama2cError if neither."""
    folder = os.path.dirname(os.path.abspath(path))
    names = [f"tok{vocab_size}.bin", "tokenizer.bin"]
    for name in names:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise Llama2cError(f"{path} is a llama2.c model, and its tokenizer is not beside it (looked for "
                       f"{' and '.join(names)} in {folder}): put it there, or convert the model once with python "
                       f"llama2c.py import {path} OUT.pt --tokenizer TOKENIZER.bin")


def load_llama2c(path, tokenizer=None):
    """A Nano checkpoint dict (what hf.load_checkpoint returns) from a llama2.c model file and its
    tokenizer.bin (`tokenizer`, or find_tokenizer's). Llama2cError names what is wrong."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(V1_HEADER)
    except OSError as e:
        raise Llama2cError(f"cannot read {path}: {e.strerror or e}") from None
    version, offset, ints, shared = read_header(path, size, head)
    cfg = model_config(path, ints, shared)
    layout = tensor_layout(cfg, version)
    floats = sum(int(np.prod(shape)) for _, shape in layout)
    if offset + 4 * floats != size:
        what = "a shared classifier" if shared else "a classifier of its own"
        raise Llama2cError(f"{path}: the sizes do not add up: a llama2.c {'version-1' if version else 'legacy'} model "
                           f"of dim {cfg.n_embd}, hidden {cfg.n_hidden}, {cfg.n_layer} layers, {cfg.n_head}/"
                           f"{cfg.n_kv_head} heads, vocab {cfg.vocab_size}, context {cfg.block_size} and {what} "
                           f"is {offset + 4 * floats:,} bytes, the file {size:,} (truncated, or not a llama2.c model)")
    try:
        tok = read_llama2c_tokenizer(tokenizer or find_tokenizer(path, cfg.vocab_size), cfg.vocab_size)
    except TokenizerError as e:
        raise Llama2cError(str(e)) from None
    flat = torch.from_numpy(np.fromfile(path, dtype="<f4", count=floats, offset=offset).astype(np.float32, copy=False))
    sd, at = {}, 0
    for name, shape in layout:
        count = int(np.prod(shape))
        t = flat[at:at + count].view(shape)
        at += count
        if name == "skip":
            continue
        if len(shape) == 3 or (name.endswith("norm") and name != "norm"):  # one tensor per layer
            for i in range(cfg.n_layer):
                sd[f"layers.{i}.{name}.weight"] = t[i].clone()
        else:
            sd[f"{name}.weight"] = t.clone()
    return {"format": "nano-checkpoint", "version": 1, "model_config": cfg.to_dict(), "model": sd,
            "tokenizer": tok.to_dict(), "imported_from": os.path.abspath(path)}


SENTENCEPIECE_NAMES = {0: "<unk>", 1: "<s>", 2: "</s>"}  # tokenizer.bin writes "\n<s>\n" and "\n</s>\n"


def sentencepiece_pieces(tok):
    """The tokens of a tokenizer.Llama2cTokenizer as SentencePiece spells them, the form the Llama tokenizers of
    Hugging Face and of llama.cpp (GGUF's "llama" vocabulary, with the scores and add_space_prefix) read: a
    space is U+2581 again, ids 0-2 are <unk>, <s> and </s>. ConfigError if that makes two tokens alike."""
    pieces = [SENTENCEPIECE_NAMES.get(i, t.replace(" ", "\u2581")) for i, t in enumerate(tok.tokens)]
    if len(set(pieces)) != len(pieces):
        raise ConfigError("the llama2.c tokenizer has a token spelled <unk>, <s> or </s> (or with U+2581) besides "
                          "ids 0-2: it has no SentencePiece form")
    return pieces


def hf_tokenizer_files(tok):
    """{file name: text or dict}: tokenizer.json and tokenizer_config.json for a tokenizer.Llama2cTokenizer, in
    the form of Llama 2's own (a SentencePiece BPE with byte fallback, as transformers' converter writes it):
    spaces are U+2581 again, a U+2581 goes before the text, and <s> before the document. The `tokenizers`
    library merges only listed pairs, by their place in the list; run.c joins any adjacent pair whose text is
    a token, by the token's score. So every way to split every token in two tokens is listed, in the order of
    the joined token's score (high first; a score at or below -1e10 never joins). Ids 1 and 2 are written
    <s> and </s>, SentencePiece's names (tokenizer.bin spells them with newlines around). The one difference
    left: the library takes "<unk>", "<s>" and "</s>" in a text for those tokens (as Llama 2's own Hugging
    Face tokenizer does), where run.c spells them out like any other text."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    pieces = sentencepiece_pieces(tok)
    vocab = {p: i for i, p in enumerate(pieces)}
    names = {i: pieces[i] for i in SENTENCEPIECE_NAMES}
    merges = []
    for i, p in enumerate(pieces):
        if i in names or tok.scores[i] <= LLAMA2C_NO_MERGE:
            continue
        merges += [(-tok.scores[i], i, k) for k in range(1, len(p)) if p[:k] in vocab and p[k:] in vocab]
    merges.sort()
    hf = Tokenizer(models.BPE(vocab, [(pieces[i][:k], pieces[i][k:]) for _, i, k in merges], unk_token="<unk>",
                              byte_fallback=True, fuse_unk=True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    hf.add_special_tokens([AddedToken(names[i], special=True, normalized=False) for i in sorted(names)])
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", tok.bos_id)])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
              "add_eos_token": False}
    return {"tokenizer.json": hf.to_str(), "tokenizer_config.json": config}


def main(argv=None):
    p = argparse.ArgumentParser(description="Convert a llama2.c model (.bin, with its tokenizer.bin) into a Nano "
                                            "checkpoint (.pt)")
    p.add_argument("command", choices=["import"])
    p.add_argument("model", help="the llama2.c model file (legacy or version-1 layout)")
    p.add_argument("out", help="the checkpoint to write")
    p.add_argument("--tokenizer", help="its tokenizer.bin (default: tok{vocab_size}.bin or tokenizer.bin beside it)")
    args = p.parse_args(argv)
    import_checkpoint(lambda: load_llama2c(args.model, args.tokenizer), args.out,
                      lambda ck: f"{'tied' if ck['model_config']['tie_embeddings'] else 'untied'} classifier")


if __name__ == "__main__":
    main()
