"""
Tiny GPT-2-BPE models and BPE model files for the tests of the C engine (test_bpe_c.py) and the
browser page (test_browser.py). Not a test file itself.

A BPE model's embedding has GPT-2's 50,257 + 7 rows (padded to 50,304), too many to train in a few
seconds on a CPU. trained_bpe_checkpoint() therefore trains a small model on the few dozen ids its
text uses, then writes its rows into those ids of a full 50,304-row embedding (the other rows small
random values): a real GPT-2-BPE checkpoint, with confident predictions, that export.py and the
engines see like any other.
"""

import struct
import sys
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import export  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from tokenizer import BPETokenizer  # noqa: E402

BPE_VOCAB = 50304  # GPT-2's 50,257 + Nano's special tokens, padded to a multiple of 64
# multi-byte characters that GPT-2 splits into byte tokens (so that replies end tokens inside a
# character), words it has whole, numbers, a contraction
BPE_TEXT = ("Once upon a time a little fox lived in the forest café. It's 42 steps to the river 😀. "
            "Every morning the fox ran to the river and drank the cold water, 你好! "
            "Then the fox went home and slept under the old tree. ") * 30


def _tokenizer():
    return BPETokenizer()


def train_on_windows(model, data, starts, bos, steps, lr=1e-2, batch=8):
    """Trains a tiny model in place on windows of `data` (token ids) that start at `starts`, each
    after the id `bos` ([1] tensor), as the engines' prompts start; checks that it learned."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # much faster than two contended threads for a model this small
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        for _ in range(steps):
            ix = starts[torch.randint(len(starts), (batch,))]
            seq = torch.stack([torch.cat([bos, data[i:i + model.cfg.block_size]]) for i in ix])
            _, loss = model(seq[:, :-1], seq[:, 1:])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 0.5, f"the tiny model did not learn (loss {loss.item():.2f})"


def random_bpe_checkpoint(seed=0, n_embd=16, **kw):
    cfg = ModelConfig(**dict(dict(block_size=32, vocab_size=BPE_VOCAB, n_layer=1, n_embd=n_embd, n_head=2,
                                  n_kv_head=1, n_hidden=32), **kw))
    torch.manual_seed(seed)
    model = Transformer(cfg)
    return {"model_config": cfg.to_dict(), "model": model.state_dict(), "tokenizer": {"type": "bpe", "name": "gpt2"}}


def trained_bpe_checkpoint(steps=150):
    """See the module docstring: trained on BPE_TEXT in windows that start with <|bos|> and a sentence."""
    tok = _tokenizer()
    ids = tok.encode(BPE_TEXT)
    used = sorted(set(ids) | {tok.bos_id, tok.eos_id, tok.instruct_id, tok.response_id, tok.pad_id})
    compact = {t: i for i, t in enumerate(used)}
    data = torch.tensor([compact[t] for t in ids])
    period = {compact[t] for t in tok.encode(". ")}
    starts = torch.tensor([0] + [i + 1 for i in range(len(data) - 70) if int(data[i]) in period])
    bos = torch.tensor([compact[tok.bos_id]])
    small = ModelConfig(block_size=64, vocab_size=len(used), n_layer=2, n_embd=64, n_head=4, n_kv_head=2, n_hidden=128)
    torch.manual_seed(0)
    model = Transformer(small)
    train_on_windows(model, data, starts, bos, steps)
    cfg = ModelConfig(**dict(small.to_dict(), vocab_size=BPE_VOCAB))
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    emb = torch.randn(BPE_VOCAB, small.n_embd, generator=gen) * 0.02
    emb[torch.tensor(used)] = sd["tok_embeddings.weight"]
    sd["tok_embeddings.weight"] = emb  # also the output head (tied)
    return {"model_config": cfg.to_dict(), "model": sd, "tokenizer": {"type": "bpe", "name": "gpt2"}}


# ---------------------------------------------------------------------------------------------
# editing 2026.11 files (docs/FORMAT.md): another tokenizer section, another pattern


def with_crc(data):
    """data with its CRC-32 field recomputed (docs/FORMAT.md, Checksum)"""
    data = bytearray(data)
    data[export.CRC_OFFSET:export.CRC_OFFSET + 4] = bytes(4)
    crc = zlib.crc32(bytes(data[:256]), zlib.crc32(bytes(data[256:])))
    struct.pack_into("<I", data, export.CRC_OFFSET, crc)
    return bytes(data)


def splice_tokenizer(data, section, kind, n_tokens):
    """The 2026.11 file `data` with its tokenizer section replaced (parameters moved, header updated)."""
    h = export.read_header(data)
    params = data[h["params_offset"]:]
    start = (256 + len(section) + 63) // 64 * 64
    out = bytearray(data[:256]) + section + bytes(start - 256 - len(section)) + params
    for off, fmt, name in export.HEADER_FIELDS:
        value = {"tokenizer_kind": kind, "tokenizer_vocab": n_tokens, "tokenizer_size": len(section),
                 "params_offset": start, "file_size": len(out)}.get(name)
        if value is not None:
            struct.pack_into("<" + fmt, out, off, value)
    return with_crc(out)


def with_pattern(data, pattern):
    """A BPE model file with another pre-tokenization pattern id (the section's field at 12)."""
    out = bytearray(data)
    struct.pack_into("<I", out, 256 + 12, export.BPE_PATTERNS[pattern])
    return with_crc(out)
