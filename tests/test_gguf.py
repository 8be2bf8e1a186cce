"""GGUF export (export.py --format gguf, gguf_export.py), read back by two readers that are not ours:
the gguf package's GGUFReader (llama.cpp's own Python reader) and transformers' GGUF loader.

  * every tensor is the checkpoint's weight in the documented layout: float32 exactly, float16 as the
    cast gives it, q8_0 within its rounding (half a block's scale);
  * the metadata keys and the vocabulary are what llama.cpp's loader reads (rwkv tokens unescaped as
    its llama_unescape_rwkv_token does; BPE tokens, merges, pre-tokenizer, special ids, add_bos);
  * transformers, reading the same file, computes Nano's logits and (GPT-2 BPE) gives Nano's ids, so the
    q/k row order and the keys are right for a reader that knows llama.cpp's conventions;
  * what cannot be carried over is refused in one line, and no file is left behind.
The same files against llama.cpp itself: bench/bench_llama_cpp.py (docs/BENCHMARKS.md)."""

import json
import os

import pytest
import torch

import gguf
import transformers

import export
import gguf_export
import hf
from hf import halves_to_pairs
from model import ModelConfig, Transformer, model_from_checkpoint
from tokenizer import SPECIAL_TOKENS, BPETokenizer, TrieTokenizer, _gpt2_files, tokenizer_from_dict
from test_hf import make_hf_model

TEXTS = ["In the beginning God created the heavens and the earth.", "And God said, Let there be light",
         "<|bos|>a<|eos|> b", "  two  spaces\nand a line\n", "café naïve 你好 😀", ""]


@pytest.fixture(scope="module")
def corpus():
    from corpus import default_corpus_documents
    return [d for _, d in zip(range(60), default_corpus_documents())]


@pytest.fixture(scope="module")
def trie(corpus):
    return TrieTokenizer.build(corpus[:50], 400)


def checkpoint(tok, vocab_size=None, seed=0, **kw):
    """A random model (biases and norms away from their init values, so that their layout is tested)."""
    cfg = ModelConfig(**dict(dict(block_size=64, vocab_size=vocab_size or tok.vocab_size + 5, n_layer=2, n_embd=64,
                                  n_head=4, n_kv_head=2, n_hidden=96), **kw))
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return {"model_config": cfg.to_dict(), "model": model.state_dict(), "tokenizer": tok.to_dict()}


def fields(reader):
    return {name: field.contents() for name, field in reader.fields.items()}


def rwkv_unescape(text):
    """llama.cpp's llama_unescape_rwkv_token: a token string of the file -> the bytes its trie holds."""
    out, chars = bytearray(), iter(text)
    for c in chars:
        if c != "\\":
            out += c.encode("utf-8")
            continue
        e = next(chars)
        if e == "x":
            out.append(int(next(chars) + next(chars), 16))
        else:
            out += {"t": b"\t", "n": b"\n", "r": b"\r"}.get(e, e.encode("utf-8"))
    return bytes(out)


def export_gguf(tmp_path, ck, quant="fp32", name="m"):
    path = str(tmp_path / f"{name}_{quant}.gguf")
    assert export.main([path, "--checkpoint", save(tmp_path, ck, name), "--format", "gguf", "--quant", quant]) == 0
    return path


def save(tmp_path, ck, name):
    path = str(tmp_path / f"{name}.pt")
    torch.save(ck, path)
    return path


def expected_tensors(ck, arch):
    """GGUF name -> the float32 tensor the file must hold: the state dict, q/k rows in halves order
    for qwen2 (Hugging Face's, whose rows halves_to_pairs takes back to Nano's), pairs for llama."""
    cfg = ModelConfig.from_dict(ck["model_config"])
    out = {}
    for name, t in ck["model"].items():
        t = t.float()
        if arch == "qwen2" and (".attn.wq." in name or ".attn.wk." in name):
            heads = cfg.n_head if ".wq." in name else cfg.n_kv_head
            t = t.reshape(heads, cfg.head_dim // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)
            assert torch.equal(halves_to_pairs(t, heads, cfg.head_dim), ck["model"][name].float())
        out[gguf_export.gguf_name(name)] = t
    return out


def check_tensors(path, ck, quant, arch):
    reader = gguf.GGUFReader(path)
    want = expected_tensors(ck, arch)
    assert sorted(t.name for t in reader.tensors) == sorted(want)
    for t in reader.tensors:
        w, got = want[t.name], gguf_export.dequantized(t)
        assert got.shape == w.shape, t.name
        assert list(t.shape) == list(reversed(w.shape)), t.name  # GGUF dims: (in, out)
        if w.dim() == 1 or quant == "fp32":
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and torch.equal(got, w), t.name
        elif quant == "f16":
            assert t.tensor_type == gguf.GGMLQuantizationType.F16 and torch.equal(got, w.half().float()), t.name
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0, t.name
            # q8_0: q = round(w / d) with d = max|w| / 127 per block of 32, stored as float16; so each weight is
            # off by at most half a step, plus 127 times the scale's float16 rounding
            blocks = w.reshape(-1, 32)
            scale = blocks.abs().amax(dim=1, keepdim=True) / 127
            bound = scale / 2 + 127 * (scale.half().float() - scale).abs()
            err = (got.reshape(-1, 32) - blocks).abs()
            assert (err <= bound * (1 + 1e-5) + 1e-12).all(), t.name
            assert err.max() > 0, t.name  # (really quantized)
    return reader


CASES = [  # (tokenizer, model options, architecture)
    ("trie", dict(), "llama"),
    ("trie", dict(tie_embeddings=False), "llama"),
    ("trie", dict(qkv_bias=True, tie_embeddings=False), "qwen2"),
    ("trie", dict(qkv_bias=True), "qwen2"),
    ("trie", dict(bias=True, tie_embeddings=False), "llama"),
    ("bpe", dict(), "llama"),
]


@pytest.mark.parametrize("quant", ["fp32", "f16", "q8"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[2]}-{'-'.join(c[1]) or 'tied'}")
def test_tensors_are_the_checkpoints_weights(tmp_path, trie, case, quant):
    kind, options, arch = case
    tok = trie if kind == "trie" else BPETokenizer()
    ck = checkpoint(tok, vocab_size=50304 if kind == "bpe" else None, **options)
    path = export_gguf(tmp_path, ck, quant)
    reader = check_tensors(path, ck, quant, arch)
    meta = fields(reader)
    cfg = ModelConfig.from_dict(ck["model_config"])
    assert meta["general.architecture"] == arch
    assert meta["general.file_type"] == {"fp32": 0, "f16": 1, "q8": 7}[quant]
    for key, value in {"context_length": cfg.block_size, "embedding_length": cfg.n_embd, "block_count": cfg.n_layer,
                       "feed_forward_length": cfg.n_hidden, "attention.head_count": cfg.n_head,
                       "attention.head_count_kv": cfg.n_kv_head, "rope.dimension_count": cfg.head_dim,
                       "attention.key_length": cfg.head_dim, "vocab_size": cfg.vocab_size}.items():
        assert meta[f"{arch}.{key}"] == value, key
    assert meta[f"{arch}.rope.freq_base"] == cfg.rope_theta
    assert meta[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps, rel=1e-6)
    assert ("output.weight" in [t.name for t in reader.tensors]) == (not cfg.tie_embeddings)


@pytest.mark.parametrize("case", [c for c in CASES if not c[1].get("bias")], ids=lambda c: f"{c[2]}-{'-'.join(c[1]) or 'tied'}")
def test_transformers_reads_the_file_as_nanos_model(tmp_path, trie, case):
    """transformers undoes llama.cpp's conventions itself (it permutes a llama file's q/k rows to
    Hugging Face's order, and not a qwen2 file's): Nano's logits mean the rows and keys are right.
    (It does not read the llama architecture's optional biases, so that case is left to llama.cpp.)"""
    kind, options, _ = case
    tok = trie if kind == "trie" else BPETokenizer()
    ck = checkpoint(tok, vocab_size=50304 if kind == "bpe" else None, seed=5, rope_theta=5000.0, norm_eps=1e-6, **options)
    path = export_gguf(tmp_path, ck)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=os.path.basename(path)).eval()
    ours = model_from_checkpoint(ck).eval()
    ids = torch.randint(0, tok.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids)[0], atol=2e-5, rtol=0)


def test_trie_vocabulary_is_what_llama_cpp_reads(tmp_path, trie, corpus):
    tokens = list(trie.tokens) + ["\\back\\slash", "tab\there", "new\nline", "cr\r"]  # the escaped characters
    tok = TrieTokenizer(tokens)
    ck = checkpoint(tok, vocab_size=len(tokens) + 7)
    meta = fields(gguf.GGUFReader(export_gguf(tmp_path, ck)))
    assert meta["tokenizer.ggml.model"] == "rwkv" and "tokenizer.ggml.merges" not in meta
    stored = meta["tokenizer.ggml.tokens"]
    assert len(stored) == len(tokens) + 7
    assert [rwkv_unescape(s) for s in stored[:len(tokens)]] == [t.encode("utf-8") for t in tokens]
    assert all(rwkv_unescape(s)[0] == 0xFF for s in stored[len(tokens):])  # padding rows: no UTF-8 text reaches them
    types = meta["tokenizer.ggml.token_type"]
    assert types[:6] == [3, 2, 3, 3, 3, 3]  # control tokens, <|unknown|> the unknown one
    assert set(types[6:len(tokens)]) == {1} and set(types[len(tokens):]) == {5}
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"], meta["tokenizer.ggml.eot_token_id"],
            meta["tokenizer.ggml.unknown_token_id"], meta["tokenizer.ggml.padding_token_id"]) == (2, 3, 3, 1, 0)
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_eos_token"] is False


def test_bpe_vocabulary_is_what_llama_cpp_reads(tmp_path):
    tok = BPETokenizer()
    ck = checkpoint(tok, vocab_size=50304)
    path = export_gguf(tmp_path, ck)
    meta = fields(gguf.GGUFReader(path))
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    stored, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    with open(_gpt2_files()["encoder.json"], encoding="utf-8") as f:
        encoder = json.load(f)  # GPT-2's own vocabulary file
    assert all(stored[i] == s for s, i in encoder.items())
    assert stored[50257:50263] == SPECIAL_TOKENS and types[50256:50263] == [3] * 7
    assert set(types[50263:]) == {5} and len(stored) == 50304
    with open(_gpt2_files()["vocab.bpe"], encoding="utf-8") as f:
        merges = [line for line in f.read().splitlines()[1:] if line.strip()]
    assert meta["tokenizer.ggml.merges"] == merges
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
            meta["tokenizer.ggml.eot_token_id"]) == (tok.bos_id, tok.eos_id, tok.eos_id)
    assert meta["tokenizer.ggml.add_bos_token"] is True
    # transformers builds its tokenizer from the file's vocabulary, merges and add_bos: Nano's ids
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=os.path.basename(path))
    for text in TEXTS:
        assert theirs(text)["input_ids"] == [tok.bos_id] + tok.encode(text), text


def ignore_merges(folder):
    """Llama 3's tokenizer.json takes a pre-tokenized piece whole when it is a token (ignore_merges), as
    llama.cpp's llama-bpe does; the tokenizers library's trainer writes it without."""
    path = os.path.join(folder, "tokenizer.json")
    with open(path, encoding="utf-8") as f:
        tj = json.load(f)
    tj["model"]["ignore_merges"] = True
    with open(path, "w", encoding="utf-8") as f:
        json.dump(tj, f)


@pytest.mark.parametrize("family,arch", [("llama3", "llama"), ("chatml", "qwen2")])
def test_imported_hugging_face_models(tmp_path, corpus, family, arch):
    folder = str(tmp_path / "hf")
    make_hf_model(folder, arch, family, corpus, tied=False)
    if family == "llama3":
        ignore_merges(folder)
    ck = hf.load_checkpoint(folder)
    path = export_gguf(tmp_path, ck, name=family)
    reader = check_tensors(path, ck, "fp32", arch)
    meta = fields(reader)
    with open(os.path.join(folder, "tokenizer.json"), encoding="utf-8") as f:
        tj = json.load(f)
    stored = meta["tokenizer.ggml.tokens"]
    assert all(stored[i] == s for s, i in tj["model"]["vocab"].items())
    assert all(stored[a["id"]] == a["content"] for a in tj["added_tokens"])
    assert meta["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    assert meta["tokenizer.ggml.pre"] == {"llama3": "llama-bpe", "chatml": "gpt-2"}[family]  # (the test chatml: ByteLevel)
    ids = {s: stored.index(s) for s in ("<|begin_of_text|>", "<|eot_id|>", "<|im_end|>") if s in stored}
    if family == "llama3":  # its post-processor puts <|begin_of_text|> first: llama.cpp adds it too
        assert meta["tokenizer.ggml.add_bos_token"] is True
        assert meta["tokenizer.ggml.bos_token_id"] == ids["<|begin_of_text|>"]
        assert meta["tokenizer.ggml.eot_token_id"] == ids["<|eot_id|>"]
    else:  # Qwen2 puts nothing first
        assert meta["tokenizer.ggml.add_bos_token"] is False
        assert meta["tokenizer.ggml.eot_token_id"] == ids["<|im_end|>"]
    assert meta["tokenizer.chat_template"] == ck["tokenizer"]["template"]
    # the q/k rows are the Hugging Face file's own for qwen2 (llama.cpp's neox RoPE), un-permuted for llama
    from safetensors.torch import load_file
    q = load_file(os.path.join(folder, "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    got = gguf_export.dequantized(next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight"))
    assert torch.equal(got, q if arch == "qwen2" else halves_to_pairs(q, 4, 16))


def test_hugging_face_export_adds_bos_where_nano_does(tmp_path, trie):
    """tokenizer_config.json's add_bos_token and tokenizer.json's post-processor: transformers and the
    tokenizers library put <|bos|> first, as Nano's engines do; a 2024.10-framed model has none."""
    from tokenizers import Tokenizer
    for tok in (trie, BPETokenizer()):
        for framing in (None, "2024.10"):
            ck = checkpoint(tok, vocab_size=50304 if tok.kind == "bpe" else None)
            if framing:
                ck["prompt_format"] = framing
            out = str(tmp_path / f"{tok.kind}{framing}")
            hf.export_hf(ck, out)
            with open(os.path.join(out, "tokenizer_config.json"), encoding="utf-8") as f:
                assert json.load(f)["add_bos_token"] is (framing is None)
            first = [tok.bos_id] if framing is None else []
            theirs = transformers.AutoTokenizer.from_pretrained(out)
            library = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
            for text in TEXTS[:4]:
                assert theirs(text)["input_ids"] == first + tok.encode(text), (tok.kind, text)
                assert library.encode(text).ids == first + tok.encode(text)
                assert theirs(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
            if tok.kind == "trie":
                gguf_path = export_gguf(tmp_path, ck, name=f"framing{framing}")
                assert fields(gguf.GGUFReader(gguf_path))["tokenizer.ggml.add_bos_token"] is (framing is None)


def refused(tmp_path, ck, *args, capsys):
    path = str(tmp_path / "refused.gguf")
    assert export.main([path, "--checkpoint", save(tmp_path, ck, "bad"), "--format", "gguf", *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert not os.path.exists(path) and not os.path.exists(path + ".tmp")
    assert err[-1].startswith("export.py: error: ")
    return err[-1]


def test_refusals_are_one_clear_line(tmp_path, trie, corpus, capsys):
    assert "learned positions" in refused(tmp_path, checkpoint(trie, use_rope=False), capsys=capsys)
    assert "bidirectional" in refused(tmp_path, checkpoint(trie, is_causal=False), capsys=capsys)
    assert "blocks of 32" in refused(tmp_path, checkpoint(trie, n_embd=48, n_head=4, n_kv_head=2), "--quant", "q8",
                                     capsys=capsys)
    assert "rows of 100" in refused(tmp_path, checkpoint(trie, n_hidden=100), "--quant", "q8", capsys=capsys)
    # ordinary tokens that run into a special token's string, in every way they can
    for bad in ("x<|b", "<|bos|>x", "a<|eos|>b", "x<"):
        tokens = list(trie.tokens) + [bad]
        line = refused(tmp_path, checkpoint(TrieTokenizer(tokens)), capsys=capsys)
        assert repr(bad) in line and "special token" in line
    # an imported model whose stop tokens llama.cpp cannot all have: three, none of them a known end text
    folder = str(tmp_path / "hf")
    make_hf_model(folder, "qwen2", "chatml", corpus[:40])
    ck = hf.load_checkpoint(folder)
    vocab = json.loads(ck["tokenizer"]["json"])["model"]["vocab"]
    stops = sorted(vocab[s] for s in ("Ġthe", "Ġand", "Ġof"))
    ck["tokenizer"] = dict(ck["tokenizer"], stop=stops, eos=stops[0])
    line = refused(tmp_path, ck, capsys=capsys)
    assert "would generate through" in line and str(stops[-1]) in line
    # a Llama 3 pre-tokenizer without Llama 3's whole-piece rule (llama.cpp's llama-bpe has it), and the reverse
    make_hf_model(str(tmp_path / "llama3"), "llama", "llama3", corpus[:40])
    assert "ignore_merges False with the llama3 pre-tokenizer" in refused(
        tmp_path, hf.load_checkpoint(str(tmp_path / "llama3")), capsys=capsys)
    ignore_merges(folder)
    assert "ignore_merges True with the gpt2 pre-tokenizer" in refused(tmp_path, hf.load_checkpoint(folder), capsys=capsys)
    # the same model with no eos at all: llama.cpp would take token 11
    ck["tokenizer"] = dict(ck["tokenizer"], stop=[], eos=None)
    assert "no eos token" in refused(tmp_path, ck, capsys=capsys)
    # f16 is a GGUF type only; adapters are merged, not exported, for GGUF
    assert export.main([str(tmp_path / "x.bin"), "--checkpoint", save(tmp_path, checkpoint(trie), "ok"),
                        "--quant", "f16"]) == 1
    assert "--quant must be one of" in capsys.readouterr().err
    assert export.main([str(tmp_path / "x.gguf"), "--lora", "adapter.pt", "--format", "gguf"]) == 1
    assert "--format gguf exports a base model" in capsys.readouterr().err


def test_stop_notes_name_what_llama_cpp_adds(tmp_path, trie, capsys):
    """GPT-2's <|endoftext|> ends llama.cpp's generation whatever the file says; the export says so.
    A trie vocabulary without '<' gets the note on llama.cpp's tokenizer."""
    export_gguf(tmp_path, checkpoint(BPETokenizer(), vocab_size=50304))
    assert "50256 '<|endoftext|>'" in capsys.readouterr().err
    assert "<" not in trie.tokens
    export_gguf(tmp_path, checkpoint(trie))
    assert "'<' starts Nano's special tokens" in capsys.readouterr().err
    with_lt = TrieTokenizer(list(trie.tokens) + ["<"])
    export_gguf(tmp_path, checkpoint(with_lt))
    assert "gguf: note" not in capsys.readouterr().err


def test_chat_template_frames_as_nano_does(tmp_path, trie):
    """The file's chat template, rendered by jinja2 as llama.cpp's and transformers' chat modes render it,
    then tokenized as llama.cpp does (BOS added for BPE, written out for rwkv): data.chat_encode's ids."""
    import jinja2
    from data import chat_encode
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "system", "content": "Be kind."},
                    {"role": "user", "content": "Who made the light?"}, {"role": "assistant", "content": "God did."},
                    {"role": "user", "content": "And the earth?"}]
    for tok in (trie, BPETokenizer()):
        for framing in (None, "2024.10"):
            ck = checkpoint(tok, vocab_size=50304 if tok.kind == "bpe" else None)
            if framing:
                ck["prompt_format"] = framing
            meta = fields(gguf.GGUFReader(export_gguf(tmp_path, ck, name=f"chat{framing}")))
            text = jinja2.Environment().from_string(meta["tokenizer.chat_template"]).render(messages=conversation)
            added = [tok.bos_id] if meta["tokenizer.ggml.add_bos_token"] and tok.kind == "bpe" else []
            assert added + tok.encode(text) == chat_encode(tok, conversation, bos=framing is None)[0], (tok.kind, framing)


STORIES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "llama2c",
                       "stories260K.bin")


def test_llama2c_model_as_llama_cpps_sentencepiece_vocabulary(tmp_path):
    """stories260K (llama2.c) as llama.cpp's `llama` vocabulary: pieces with U+2581 for spaces, run.c's
    scores, byte tokens, the dummy-prefix space; transformers builds its tokenizer from those keys and
    gives run.c's ids (Llama2cTokenizer's), and computes the model's logits from the tensors."""
    assert os.path.exists(STORIES), f"{STORIES} is missing: the shared data (../shared/data/llama2c) is needed"
    ck = hf.load_checkpoint(STORIES)
    tok = tokenizer_from_dict(ck["tokenizer"])
    path = export_gguf(tmp_path, ck, name="stories260K")
    reader = check_tensors(path, ck, "fp32", "llama")
    meta = fields(reader)
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.add_space_prefix"] is True
    assert meta["tokenizer.ggml.tokens"] == ["<unk>", "<s>", "</s>"] + [t.replace(" ", "\u2581") for t in tok.tokens[3:]]
    assert meta["tokenizer.ggml.scores"] == pytest.approx(tok.scores, rel=0, abs=0)
    types = meta["tokenizer.ggml.token_type"]
    assert types[:3] == [2, 3, 3] and set(types[3:259]) == {6} and set(types[259:]) == {1}
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
            meta["tokenizer.ggml.eot_token_id"], meta["tokenizer.ggml.add_bos_token"]) == (1, 2, 1, True)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=os.path.basename(path))
    for text in ["Once upon a time", "Lily said, \"Hello!\" and ran.", "café 你好 😀", "two  spaces"]:
        assert theirs(text)["input_ids"] == [tok.bos_id] + tok.encode(text), text
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=os.path.basename(path)).eval()
    ids = torch.tensor([[tok.bos_id] + tok.encode("Once upon a time, there was a little girl")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, model_from_checkpoint(ck).eval()(ids)[0], atol=2e-5, rtol=0)


def test_lora_adapter_merged_into_the_file(tmp_path, trie):
    """--merge ADAPTER: the file holds W + (alpha / rank) B A for every targeted projection, the rest as is."""
    from test_export import lora_checkpoint
    ck = checkpoint(trie)
    adapter = lora_checkpoint(ck, ("wq", "w2"), rank=2, alpha=4)
    torch.save(adapter, tmp_path / "adapter.pt")
    path = str(tmp_path / "merged.gguf")
    assert export.main([path, "--checkpoint", save(tmp_path, ck, "base"), "--format", "gguf",
                        "--merge", str(tmp_path / "adapter.pt")]) == 0
    got = {t.name: gguf_export.dequantized(t) for t in gguf.GGUFReader(path).tensors}
    for name, w in ck["model"].items():
        a, b = adapter["adapter"].get(name.replace(".weight", ".lora_A")), adapter["adapter"].get(name.replace(".weight", ".lora_B"))
        want = w + 4 / 2 * b @ a if a is not None else w
        torch.testing.assert_close(got[gguf_export.gguf_name(name)], want, atol=1e-5, rtol=0)
    assert any(".lora_A" in k for k in adapter["adapter"]) and "blk.0.attn_q.weight" in got
