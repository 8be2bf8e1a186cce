"""
export.py on its own: the 2026.11 layout read back byte by byte as docs/FORMAT.md describes it,
the 2024.10 layout, Q8_0 quantization, the base fingerprint, and refusals with clear errors.
"""

import math
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import export  # noqa: E402
from export import ExportError  # noqa: E402
from files import weights_fingerprint  # noqa: E402
from model import ModelConfig, Transformer, rope_tables  # noqa: E402
from tokenizer import SPECIAL_TOKENS, TrieTokenizer  # noqa: E402

TEXT = "hello world, héllo wörld! 你好 😀 the cat sat on the mat " * 3


def checkpoint(seed=0, vocab_extra=3, **kw):
    tok = TrieTokenizer.build([TEXT], 1000, min_word_count=1)
    cfg_kw = dict(block_size=16, vocab_size=len(tok.tokens) + vocab_extra, n_layer=2, n_embd=32, n_head=4,
                  n_kv_head=2, n_hidden=48)
    cfg_kw.update(kw)
    cfg = ModelConfig(**cfg_kw)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("weight") or "norm" in name:
                p.add_(torch.randn_like(p))  # biases and norms away from 0 / 1
    return {"model_config": cfg.to_dict(), "model": model.state_dict(), "tokenizer": tok.to_dict(), "step": 7}


def read_tokenizer(data, off):
    size, n = struct.unpack_from("<II", data, off)
    p, tokens = off + 8, []
    for i in range(n):
        length, special, r0, r1, tid = struct.unpack_from("<BBBBI", data, p)
        assert tid == i and (r0, r1) == (0xFF, 0xFF) and special == (i < len(SPECIAL_TOKENS))
        cps = struct.unpack_from(f"<{length}I", data, p + 8)
        tokens.append("".join(map(chr, cps)))
        p += 8 + 4 * length
    assert p == off + size
    return tokens


def read_bpe_tokenizer(data, off):
    """docs/FORMAT.md's byte-level BPE section -> (fields of its 48-byte head, [(bytes, rank or None)])"""
    size, n, version, pattern, flags, n_special = struct.unpack_from("<6I", data, off)
    head = dict(size=size, n=n, version=version, pattern=pattern, flags=flags, n_special=n_special,
                special_ids=struct.unpack_from("<6i", data, off + 24))
    p, tokens = off + 48, []
    for _ in range(n):
        length, kind, zero, rank = struct.unpack_from("<HBBI", data, p)
        assert kind in (0, 1) and zero == 0 and (rank == 0xFFFFFFFF) == (kind == 1)
        tokens.append((data[p + 8:p + 8 + length], None if kind else rank))
        p += 8 + length
    assert p == off + size
    return head, tokens


def read_model_2026(data):
    """An independent reader of docs/FORMAT.md: returns (header, tokens, state_dict of numpy arrays);
    tokens: the trie's strings, or (section head, tokens) of a BPE section."""
    h = export.read_header(data)
    cfg = ModelConfig(**{k: h[k] for k in ("block_size", "vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head",
                                           "n_hidden", "head_dim", "norm_eps", "rope_theta")},
                      use_rope=bool(h["use_rope"]), is_causal=bool(h["is_causal"]), bias=bool(h["bias"]))
    read = {1: read_tokenizer, 2: read_bpe_tokenizer}[h["tokenizer_kind"]]
    tokens = read(data, h["tokenizer_offset"])
    pos, gs = h["params_offset"], h["group_size"]

    def take(n, dtype):
        nonlocal pos
        pos = (pos + 63) // 64 * 64
        arr = np.frombuffer(data, dtype=dtype, count=n, offset=pos)
        pos += arr.nbytes
        return arr

    def mat(rows, cols):
        if h["quant_type"] == export.QUANT_F32:
            return take(rows * cols, "<f4").reshape(rows, cols)
        q, s = take(rows * cols, np.int8), take(rows * cols // gs, "<f4")
        return (q.reshape(-1, gs).astype(np.float32) * s[:, None]).reshape(rows, cols)

    sd = {"tok_embeddings.weight": mat(cfg.vocab_size, cfg.n_embd)}
    if not cfg.use_rope:
        sd["pos_embeddings.weight"] = take(cfg.block_size * cfg.n_embd, "<f4").reshape(cfg.block_size, cfg.n_embd)
    for i in range(cfg.n_layer):
        for name, out_f, in_f in export._linears(cfg):
            if name == "attn.wq":
                sd[f"layers.{i}.attn_norm.weight"] = take(cfg.n_embd, "<f4")
            if name == "ffn.w1":
                sd[f"layers.{i}.ffn_norm.weight"] = take(cfg.n_embd, "<f4")
            sd[f"layers.{i}.{name}.weight"] = mat(out_f, in_f)
            if cfg.bias:
                sd[f"layers.{i}.{name}.bias"] = take(out_f, "<f4")
    sd["norm.weight"] = take(cfg.n_embd, "<f4")
    assert (pos + 63) // 64 * 64 == len(data) == h["file_size"]
    return h, tokens, sd


@pytest.mark.parametrize("kw", [{}, {"use_rope": False, "bias": True}, {"n_kv_head": 1, "norm_eps": 1e-6}])
def test_2026_layout_roundtrip_fp32(tmp_path, kw):
    ck = checkpoint(**kw)
    path = tmp_path / "m.bin"
    export.write_model(str(path), ck)
    data = path.read_bytes()
    h, tokens, sd = read_model_2026(data)
    cfg = ModelConfig.from_dict(ck["model_config"])
    assert h["magic"] == export.MAGIC and h["version"] == (2026, 11) and h["model_type"] == 0
    assert h["config_length"] == export.CONFIG_LEN
    assert (h["head_dim"], h["use_rope"], h["is_causal"], h["bias"]) == (cfg.head_dim, cfg.use_rope, 1, cfg.bias)
    assert (h["rope_theta"], h["norm_eps"], h["shared_classifier"]) == (cfg.rope_theta, cfg.norm_eps, 1)
    assert h["params_offset"] % 64 == 0 and h["tokenizer_offset"] == 256
    assert h["fingerprint"] == bytes.fromhex(export.base_fingerprint(ck["model_config"], ck["model"]))
    assert tokens == ck["tokenizer"]["tokens"] and h["tokenizer_vocab"] == len(tokens)
    assert set(sd) == set(ck["model"])
    for name, t in ck["model"].items():
        assert np.array_equal(sd[name], t.numpy()), name
    # CRC-32 over the payload, then the header with the CRC field zeroed
    head = bytearray(data[:256])
    head[144:148] = b"\0\0\0\0"
    assert zlib.crc32(bytes(head), zlib.crc32(data[256:])) == h["crc32"]


def test_2026_layout_q8(tmp_path):
    ck = checkpoint(n_embd=48, n_head=4, n_kv_head=2, n_hidden=80)  # group size: gcd(64, 48, 80) = 16
    path = tmp_path / "q.bin"
    export.write_model(str(path), ck, "q8", 64)
    h, _, sd = read_model_2026(path.read_bytes())
    assert h["quant_type"] == 800 and h["group_size"] == 16
    for name, t in ck["model"].items():
        if t.dim() == 2 and name != "pos_embeddings.weight":
            q, s = export.quantize_q8(t, 16)
            assert np.array_equal(sd[name], export.dequantize_q8(q, s, 16).numpy()), name
        else:
            assert np.array_equal(sd[name], t.numpy()), name


@pytest.mark.parametrize("quant", ["fp32", "q8"])
def test_2026_layout_bpe(tmp_path, quant):
    """A GPT-2-BPE checkpoint: tokenizer kind 2, its section holds tiktoken's tokens byte for byte."""
    from tokenizer import BPETokenizer
    tok = BPETokenizer()
    ck = checkpoint(vocab_extra=0, vocab_size=tok.vocab_size + 41, n_layer=1)
    ck["tokenizer"] = tok.to_dict()
    path = tmp_path / "bpe.bin"
    export.write_model(str(path), ck, quant)
    h, (head, tokens), sd = read_model_2026(path.read_bytes())
    assert (h["tokenizer_kind"], h["tokenizer_vocab"], h["tokenizer_size"]) == (2, 50263, head["size"])
    assert head == dict(size=head["size"], n=50263, version=1, pattern=1, flags=1, n_special=7,
                        special_ids=tuple(range(50257, 50263)))
    assert tokens == [(tok.enc.decode_single_token_bytes(i), i if i < 50256 else None) for i in range(50263)]
    assert tokens[50256][0] == b"<|endoftext|>" and tokens[50259][0] == b"<|bos|>"
    ref = ck["model"]["tok_embeddings.weight"]
    if quant == "q8":
        ref = export.dequantize_q8(*export.quantize_q8(ref, h["group_size"]), h["group_size"])
    assert np.array_equal(sd["tok_embeddings.weight"], ref.numpy())
    with pytest.raises(ExportError, match="2024.10 layout cannot represent this model: the BPE tokenizer"):
        export.write_model(str(tmp_path / "old.bin"), ck, quant, fmt="2024.10")


def test_quantization_error_bounded_and_zero_groups():
    torch.manual_seed(0)
    w = torch.randn(37, 64) * torch.logspace(-3, 2, 37)[:, None]  # rows of very different magnitude
    w[5] = 0.0  # all-zero groups
    w[9, :32] = 0.0
    q, s = export.quantize_q8(w, 32)
    assert q.dtype == torch.int8 and int(q.min()) >= -127 and int(q.max()) <= 127
    assert torch.isfinite(s).all() and (s[10:12] == 0).all() and s[18] == 0
    deq = export.dequantize_q8(q, s, 32)
    assert torch.isfinite(deq).all() and (deq[5] == 0).all() and (deq[9, :32] == 0).all()
    err = (deq - w).abs().reshape(-1, 32)
    assert (err <= s[:, None] / 2 * (1 + 1e-5) + 1e-12).all()  # round to nearest: half a step at most
    with pytest.raises(ExportError, match="not a multiple of the group size"):
        export.quantize_q8(torch.ones(3, 5), 4)


@pytest.mark.parametrize("dims,expected", [((64, 8, 176), 16), ((768, 12, 2048), 64), ((30, 3, 45), 1),
                                           ((512, 16, 1408), 64)])
def test_group_size_divides_every_row(tmp_path, dims, expected):
    n_embd, n_head, n_hidden = dims
    cfg = ModelConfig(n_embd=n_embd, n_head=n_head, n_kv_head=1, n_hidden=n_hidden)
    assert export.choose_group_size(64, cfg) == expected
    with pytest.raises(ExportError, match="positive"):
        export.choose_group_size(0, cfg)
    if n_embd <= 64:  # a shape where only 1 divides everything still exports
        ck = checkpoint(n_embd=n_embd, n_head=n_head, n_kv_head=1, n_hidden=n_hidden)
        export.write_model(str(tmp_path / "g.bin"), ck, "q8")
        assert export.read_header((tmp_path / "g.bin").read_bytes())["group_size"] == expected


def test_2024_layout_bytes(tmp_path):
    ck = checkpoint(vocab_extra=0)
    cfg = ModelConfig.from_dict(ck["model_config"])
    sd = ck["model"]
    path = tmp_path / "old.bin"
    export.write_model(str(path), ck, "fp32", fmt="2024.10")
    data = path.read_bytes()
    ints = struct.unpack_from("<IIiiii10i", data, 0)
    assert ints[:6] == (0x42443453, 0x55524C4D, 2024, 10, 0, 32)
    assert ints[6:] == (cfg.block_size, cfg.vocab_size, cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head,
                        cfg.n_hidden, 1, 0, 0)
    assert data[64:256] == bytes(192)
    tokens = read_tokenizer(data, 256)
    assert tokens == ck["tokenizer"]["tokens"]
    params = np.frombuffer(data, "<f4", offset=256 + struct.unpack_from("<I", data, 256)[0])
    L, D, H = cfg.n_layer, cfg.n_embd, cfg.n_hidden
    KV = cfg.n_kv_head * cfg.head_dim
    counts = [cfg.vocab_size * D, L * D, L * D * D, L * KV * D, L * KV * D, L * D * D, L * D, L * H * D,
              L * D * H, L * H * D, D, cfg.block_size * cfg.head_dim // 2, cfg.block_size * cfg.head_dim // 2]
    assert params.size == sum(counts)
    parts = np.split(params, np.cumsum(counts)[:-1])
    stack = lambda n: torch.stack([sd[f"layers.{i}.{n}"] for i in range(L)]).numpy().ravel()  # noqa: E731
    assert np.array_equal(parts[0], sd["tok_embeddings.weight"].numpy().ravel())
    assert np.array_equal(parts[2], stack("attn.wq.weight"))
    assert np.array_equal(parts[8], stack("ffn.w2.weight"))
    cos, sin = rope_tables(cfg.head_dim, cfg.block_size, 10000.0)
    assert np.array_equal(parts[11], cos.numpy().ravel()) and np.array_equal(parts[12], sin.numpy().ravel())

    # Q8: header keeps the requested group size; the writer halves it until n_embd divides
    path = tmp_path / "oldq8.bin"
    export.write_model(str(path), checkpoint(n_embd=48, n_head=4), "q8", 128, "2024.10")
    data = path.read_bytes()
    assert struct.unpack_from("<ii", data, 56) == (800, 128)
    cfg = ModelConfig.from_dict(checkpoint(n_embd=48, n_head=4)["model_config"])
    gs = 16
    mats = [cfg.vocab_size * 48] + [n for n in (48 * 48, 24 * 48, 24 * 48, 48 * 48, 48 * 48, 48 * 48, 48 * 48)
                                    for _ in range(cfg.n_layer)]
    size = 256 + struct.unpack_from("<I", data, 256)[0] + 4 * (2 * cfg.n_layer * 48 + 48)
    size += sum(n + 4 * n // gs for n in mats) + 4 * cfg.block_size * cfg.head_dim
    assert len(data) == size


@pytest.mark.parametrize("kw,why", [({"use_rope": False}, "learned positions"), ({"bias": True}, "biases"),
                                    ({"norm_eps": 1e-6}, "norm_eps"), ({"rope_theta": 500.0}, "rope_theta"),
                                    ({"is_causal": False}, "bidirectional")])
def test_2024_refuses_what_it_cannot_represent(tmp_path, kw, why):
    with pytest.raises(ExportError, match=why):
        export.write_model(str(tmp_path / "x.bin"), checkpoint(**kw), fmt="2024.10")
    assert not (tmp_path / "x.bin").exists() and not (tmp_path / "x.bin.tmp").exists()


def lora_checkpoint(ck, targets=("wq", "wv"), rank=2, alpha=4):
    cfg = ModelConfig.from_dict(ck["model_config"])
    ad = {}
    for i in range(cfg.n_layer):
        for name, out_f, in_f in export._linears(cfg):
            if name.split(".")[1] in targets:
                ad[f"layers.{i}.{name}.lora_A"] = torch.randn(rank, in_f)
                ad[f"layers.{i}.{name}.lora_B"] = torch.randn(out_f, rank)
    return {"format": "nano-lora", "lora_config": {"rank": rank, "alpha": alpha, "targets": list(targets)},
            "base": {"model_config": ck["model_config"],
                     "fingerprint": export.base_fingerprint(ck["model_config"], ck["model"])},
            "adapter": ad}


def test_lora_layouts(tmp_path):
    ck = checkpoint()
    lck = lora_checkpoint(ck, ("wq", "wo", "w2"), rank=3, alpha=1.5)
    export.write_lora(str(tmp_path / "a.bin"), lck)
    data = (tmp_path / "a.bin").read_bytes()
    h = export.read_header(data)
    assert h["model_type"] == 10 and h["lora_rank"] == 3 and h["lora_alpha"] == 1.5
    assert h["lora_targets"] == 0b101001 and h["params_offset"] == 256
    assert h["fingerprint"].hex() == lck["base"]["fingerprint"]
    first = np.frombuffer(data, "<f4", count=3 * 32, offset=256)
    assert np.array_equal(first, lck["adapter"]["layers.0.attn.wq.lora_A"].numpy().ravel())
    # 2024.10: q, k, v, o only (untrained ones as zeros), integer alpha
    with pytest.raises(ExportError, match="covers only"):
        export.write_lora(str(tmp_path / "b.bin"), lck, "2024.10")
    with pytest.raises(ExportError, match="integer"):
        export.write_lora(str(tmp_path / "b.bin"), lora_checkpoint(ck, alpha=1.5), "2024.10")
    export.write_lora(str(tmp_path / "b.bin"), lora_checkpoint(ck, rank=2, alpha=4), "2024.10")
    data = (tmp_path / "b.bin").read_bytes()
    assert struct.unpack_from("<IIiiii8i", data) == (0x42443453, 0x55524C4D, 2024, 10, 10, 32, 2, 4, 2, 32, 4, 2, 48, 0)
    L, D, KV, r = 2, 32, 16, 2
    assert len(data) == 256 + 4 * L * r * (D + D + D + KV + D + KV + D + D)


def test_fingerprint():
    ck = checkpoint()
    fp = export.base_fingerprint(ck["model_config"], ck["model"])
    assert len(fp) == 64 and fp == export.base_fingerprint(dict(ck["model_config"]), dict(reversed(ck["model"].items())))
    extra = dict(ck["model"], **{"layers.0.attn.wq.lora_A": torch.ones(2, 2)})
    assert export.base_fingerprint(ck["model_config"], extra) == fp
    changed = {k: v.clone() for k, v in ck["model"].items()}
    changed["norm.weight"][3] += 1e-3
    assert export.base_fingerprint(ck["model_config"], changed) != fp
    assert export.base_fingerprint(dict(ck["model_config"], rope_theta=500.0), ck["model"]) != fp
    # the recipe train.py records in adapter checkpoints
    assert fp == weights_fingerprint(ck["model_config"], ck["model"])


def test_export_refuses_bad_inputs(tmp_path):
    out = str(tmp_path / "x.bin")
    ck = checkpoint()
    cases = [
        (dict(ck, tokenizer={"type": "bpe", "name": "gpt2"}), "has 50263 tokens but the model only"),
        (dict(ck, tokenizer={"type": "bpe", "name": "llama"}), "unknown BPE encoding"),
        (dict(ck, tokenizer={"type": "trie", "tokens": ["a", "b"]}), "starting with"),
        (dict(ck, tokenizer={"type": "trie", "tokens": SPECIAL_TOKENS + ["x" * 300]}), "255"),
        (dict(ck, model_config=dict(ck["model_config"], vocab_size=10)), "only 10 embedding rows"),
        (dict(ck, model_config=dict(ck["model_config"], n_head=5)), "n_embd"),
        (dict(ck, model={k: v for k, v in ck["model"].items() if k != "norm.weight"}), "lacks 'norm.weight'"),
        (dict(ck, model=dict(ck["model"], **{"norm.weight": torch.ones(3)})), "has shape"),
        (dict(ck, model=dict(ck["model"], **{"norm.weight": torch.full((32,), math.nan)})), "NaN"),
        ({"model": ck["model"]}, "not a Nano checkpoint"),
    ]
    for bad, msg in cases:
        with pytest.raises(ExportError, match=msg):
            export.write_model(out, bad)
    with pytest.raises(ExportError, match="--quant"):
        export.write_model(out, ck, "q4")
    lck = lora_checkpoint(ck)
    bad_lora = [
        (dict(lck, format="other"), "not a LoRA adapter"),
        (dict(lck, base=dict(lck["base"], fingerprint="abc")), "fingerprint"),
        (dict(lck, lora_config=dict(lck["lora_config"], targets=["wq", "bogus"])), "targets"),
        (dict(lck, lora_config=dict(lck["lora_config"], rank=0)), "rank"),
        (dict(lck, adapter={k: v for k, v in lck["adapter"].items() if "layers.1" not in k}), "lacks"),
        (dict(lck, adapter=dict(lck["adapter"], **{"layers.0.attn.wq.lora_B": torch.ones(5, 2)})), "shape"),
    ]
    for bad, msg in bad_lora:
        with pytest.raises(ExportError, match=msg):
            export.write_lora(out, bad)
    assert not Path(out).exists()


def test_cli(tmp_path):
    ck_path = tmp_path / "ck.pt"
    torch.save(checkpoint(), ck_path)
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "export.py"), *map(str, a)],  # noqa: E731
                                    capture_output=True, text=True, cwd=tmp_path)
    r = run(tmp_path / "m.bin", "--checkpoint", ck_path, "--quant", "q8")
    assert r.returncode == 0 and (tmp_path / "m.bin").exists(), r.stderr
    r = run(tmp_path / "n.bin", "--checkpoint", tmp_path / "missing.pt")
    assert r.returncode == 1 and "export.py: error: checkpoint not found" in r.stderr
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    r = run(tmp_path / "n.bin", "--checkpoint", tmp_path / "junk.pt")
    assert r.returncode == 1 and "is truncated or not a torch checkpoint" in r.stderr
    r = run(tmp_path / "n.bin", "--checkpoint", ck_path, "--format", "2024.10", "--quant", "q8")
    assert r.returncode == 0, r.stderr
    r = run(tmp_path / "n.bin", "--lora", ck_path)
    assert r.returncode == 1 and "not a LoRA adapter" in r.stderr


@pytest.mark.parametrize("option,named", [
    (dict(qk_norm=True), "qk_norm=True"), (dict(activation="relu2"), "activation=relu2"),
    (dict(logit_softcap=15.0), "logit_softcap=15.0"),
    (dict(qk_norm=True, activation="relu2", zero_init=True), "qk_norm=True, activation=relu2"),
])
def test_recipe_options_the_engines_lack_are_refused_by_name(tmp_path, option, named):
    # (issue #34) the C and browser engines, and Hugging Face's Llama, would compute another model
    ck = checkpoint(**option)
    for fmt in ("2026.11", "2024.10"):
        with pytest.raises(ExportError, match=f"this model uses {named}, which the C and browser engines do not compute"):
            export.write_model(str(tmp_path / "x.bin"), ck, "fp32", 64, fmt)
    ck_path = tmp_path / "ck.pt"
    torch.save(ck, ck_path)
    with pytest.raises(ExportError, match=f"this model uses {named}, which Hugging Face"):
        export.write_hf(str(tmp_path / "hf"), str(ck_path))
    assert not (tmp_path / "x.bin").exists() and not (tmp_path / "hf" / "model.safetensors").exists()
    r = subprocess.run([sys.executable, str(ROOT / "export.py"), str(tmp_path / "x.bin"), "--checkpoint", str(ck_path)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0 and r.stderr.startswith("export.py: error: this model uses") and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1


def test_zero_init_is_only_a_start_and_exports(tmp_path):
    # zero_init changes the first weights, not the forward: a trained zero_init model is a plain model
    ck = checkpoint(zero_init=True)
    export.write_model(str(tmp_path / "z.bin"), ck)
    _, _, sd = read_model_2026((tmp_path / "z.bin").read_bytes())
    assert set(sd) == set(ck["model"])
    for name, w in ck["model"].items():
        np.testing.assert_array_equal(sd[name], w.numpy(), err_msg=name)
    assert not sd["layers.1.attn.wo.weight"].any() and not sd["layers.0.ffn.w2.weight"].any()
