"""
llama2.c's model files in (llama2c.py, tokenizer.Llama2cTokenizer): Karpathy's stories260K with its tok512.bin
continues "Once upon a time" exactly as llama2.c's run.c does (../shared/data/llama2c/, the golden file is
run.c's own output); the tokenizer against the `tokenizers` library; version-1 and untied-classifier files
written here from the legacy file's raw floats; fine-tuning from one; export to Hugging Face against
transformers; and every kind of broken file as one line. (The C engine and the page: tests/test_infer_c.py
and tests/test_browser.py.)
"""

import json
import math
import os
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import hf  # noqa: E402
import llama2c  # noqa: E402
from files import ConfigError  # noqa: E402
from model import model_from_checkpoint  # noqa: E402
from tokenizer import Llama2cTokenizer, TokenizerError, load_tokenizer, read_llama2c_tokenizer  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "llama2c"
MODEL, TOKENIZER, GOLDEN = SHARED / "stories260K.bin", SHARED / "tok512.bin", SHARED / "greedy_once_upon_a_time.txt"
PROMPT = "Once upon a time"
STEPS = 200  # run.c's -n 200: positions, the <s> and the prompt included
DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB, SEQ = 64, 172, 5, 8, 4, 512, 512


def shared(path):
    if not path.exists():
        pytest.fail(f"{path} is missing: the llama2.c tests need ../shared/data/llama2c/ (see ../shared/README.md)")
    return path


def run_steps_new_tokens(n_prompt_ids):
    """run.c forwards STEPS positions and prints the token each one gives; the prompt's ids (with the <s>) take
    the first len - 1 of them: the rest are new tokens."""
    return STEPS - n_prompt_ids + 1


def legacy_floats():
    """The legacy file's header ints and its floats, read here without llama2c.py."""
    data = shared(MODEL).read_bytes()
    return struct.unpack_from("<7i", data), np.frombuffer(data, dtype="<f4", offset=28)


def legacy_tensors():
    """{name: array} of stories260K in llama2.c's own names, by the legacy layout (llama2.c's export.py)."""
    (dim, hidden, layers, heads, kv, vocab, seq), f = legacy_floats()
    hd, kvd = dim // heads, dim // heads * kv
    sizes = [("tok", vocab * dim), ("rms_att", layers * dim), ("wq", layers * dim * dim), ("wk", layers * kvd * dim),
             ("wv", layers * kvd * dim), ("wo", layers * dim * dim), ("rms_ffn", layers * dim),
             ("w1", layers * hidden * dim), ("w2", layers * dim * hidden), ("w3", layers * hidden * dim),
             ("rms_final", dim), ("freq_real", seq * hd // 2), ("freq_imag", seq * hd // 2)]
    out, at = {}, 0
    for name, n in sizes:
        out[name] = f[at:at + n]
        at += n
    assert at == len(f), "stories260K.bin is not the tied legacy file the tests expect"
    return out


def write_legacy(path, t, wcls=None):
    header = struct.pack("<7i", DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, -VOCAB if wcls is not None else VOCAB, SEQ)
    order = ["tok", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3", "rms_final", "freq_real", "freq_imag"]
    Path(path).write_bytes(header + b"".join(np.asarray(t[n], "<f4").tobytes() for n in order)
                           + (b"" if wcls is None else np.asarray(wcls, "<f4").tobytes()))


def write_v1(path, t, wcls=None):
    """llama2.c's version1_export: magic, version, the 7 ints, the shared byte, zeros to 256, then the norms
    first and no RoPE tables."""
    header = struct.pack("<Ii7iB", 0x616B3432, 1, DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB, SEQ, int(wcls is None))
    order = ["rms_att", "rms_ffn", "rms_final", "tok", "wq", "wk", "wv", "wo", "w1", "w2", "w3"]
    Path(path).write_bytes(header.ljust(256, b"\0") + b"".join(np.asarray(t[n], "<f4").tobytes() for n in order)
                           + (b"" if wcls is None else np.asarray(wcls, "<f4").tobytes()))


@pytest.fixture(scope="module")
def ck():
    return llama2c.load_llama2c(shared(MODEL), shared(TOKENIZER))


@pytest.fixture(scope="module")
def tok(ck):
    return Llama2cTokenizer(ck["tokenizer"])


def infer_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "infer.py", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))


# ---------------------------------------------------------------------------
# the golden text


def test_infer_cli_continues_as_run_c_does(tok):
    golden = shared(GOLDEN).read_text()
    n = run_steps_new_tokens(1 + len(tok.encode(PROMPT)))
    r = infer_cli("-m", MODEL, "--prompt", PROMPT, "-t", "0", "-n", n)  # tok512.bin lies beside it
    assert r.returncode == 0, r.stderr
    assert r.stdout == golden


def test_prompt_ids_and_the_header(ck, tok):
    cfg = ck["model_config"]
    assert (cfg["n_embd"], cfg["n_hidden"], cfg["n_layer"], cfg["n_head"], cfg["n_kv_head"], cfg["vocab_size"],
            cfg["block_size"]) == (DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB, SEQ)
    assert cfg["tie_embeddings"] and cfg["norm_eps"] == 1e-5 and cfg["rope_theta"] == 10000.0
    # the pieces of the prompt: the dummy-prefix space joined into " Once", as SentencePiece makes them
    assert [tok.tokens[i] for i in tok.encode(PROMPT)] == [" Once", " upon", " a", " time"]
    assert tok.encode("") == [] and tok.bos_id == 1 and tok.eos_id == 2 and tok.stop_ids == [1, 2]
    # decoding: <0xNN> tokens are bytes; right after <s> a token loses its leading space (run.c's decode)
    snowman = tok.encode("☃")  # not a token of tok512: byte fallback
    assert [tok.tokens[i] for i in snowman[-3:]] == ["<0xE2>", "<0x98>", "<0x83>"]
    assert tok.decode(snowman) == " ☃" and tok.decode([1] + tok.encode(PROMPT))[-len(PROMPT):] == PROMPT
    assert tok.decode([1, tok.encode(PROMPT)[0]]) == "\n<s>\nOnce"


# ---------------------------------------------------------------------------
# the tokenizer against an independent implementation


def random_texts(n, seed):
    rng = random.Random(seed)
    alphabet = list("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJ.,!?;:'\"-\n\t0123456789") + list("éüßçñ☃€😀👍🏽你好Привет\u0301")
    golden_words = shared(GOLDEN).read_text().split(" ")
    out = []
    for _ in range(n):
        if rng.random() < 0.5:
            out.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))))
        else:  # story text, where the merges do most
            k = rng.randint(0, len(golden_words) - 1)
            out.append(" ".join(golden_words[k:k + rng.randint(1, 30)]))
    return out + ["", " ", "  ", "\n", "Once upon a time", "  leading and trailing  ", "a" * 300, "<0x41>", "<s>",
                  "\n<s>\n", "<unk>", "\ufffd", "x\x00y", "日本語のテキスト"]


def test_tokenizer_ids_equal_the_tokenizers_library(tok):
    """The `tokenizers` library's BPE with byte fallback (its own merge algorithm, Llama 2's configuration) on
    the Hugging Face form of tok512 (llama2c.hf_tokenizer_files) gives the same ids on 3,000+ texts."""
    from tokenizers import Tokenizer
    ref = Tokenizer.from_str(llama2c.hf_tokenizer_files(tok)["tokenizer.json"])
    texts = random_texts(3000, 0)
    bad = [(t, tok.encode(t), ref.encode(t).ids) for t in texts if [1] + tok.encode(t) != ref.encode(t).ids]
    # the one difference: the library finds the special tokens' names in the text (as Llama 2's Hugging Face
    # tokenizer does), run.c spells them out like any text
    assert sorted(t for t, _, _ in bad) == ["\n<s>\n", "<s>", "<unk>"], f"{len(bad)} of {len(texts)} differ: {bad[:3]}"
    for t in texts:  # and decoding gives the text back, after the dummy prefix
        assert tok.decode(tok.encode(t)) == (" " + t if t else "")


def test_merges_follow_scores_leftmost_first():
    """run.c's rule on a made-up vocabulary: the highest score joins first, ties join leftmost, a pair joins
    only when its joined text is a token, scores at or below -1e10 never join."""
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    pieces = ["<unk>", "\n<s>\n", "\n</s>\n"] + bytes_ + [" ", "a", "b", "c", "ab", "bc", "abc", " a", "cc", "ccc"]
    scores = [0.0] * 259 + [-1, -1, -1, -1, -5, -2, -3, -9, -4, -1e10]
    tok = Llama2cTokenizer({"tokens": pieces, "scores": scores})
    names = lambda text: [tok.tokens[i] for i in tok.encode(text)]  # noqa: E731
    assert names("abc") == [" ", "abc"]  # "bc" (-2) before "ab" (-5), then "a" + "bc" = "abc" (-3) before " a" (-9)
    assert names("ab") == [" ", "ab"]  # "ab" (-5) before " a" (-9)
    assert names("a") == [" a"]
    assert names("bab") == [" ", "b", "ab"]  # " b" and "ba" are no tokens
    assert names("cccc") == [" ", "cc", "cc"]  # three "cc" pairs tie: the leftmost joins first
    assert names("ccc") == [" ", "cc", "c"]  # "ccc" scores -1e10: never made
    assert names("abcc") == [" ", "abc", "c"]
    assert names("é") == [" ", "<0xC3>", "<0xA9>"]  # byte fallback


# ---------------------------------------------------------------------------
# the layouts


def reference_logits(t, ids, wcls=None):
    """stories260K's logits computed here from llama2.c's own arrays, the way run.c computes them (RMSNorm
    eps 1e-5, RoPE on adjacent pairs with theta 10000, grouped-query attention, SwiGLU), in float64."""
    g = {k: torch.from_numpy(np.array(v, dtype=np.float64)) for k, v in t.items()}
    hd, kvd = DIM // HEADS, DIM // HEADS * KV_HEADS
    T = len(ids)
    x = g["tok"].view(VOCAB, DIM)[ids]
    pos = torch.arange(T, dtype=torch.float64)[:, None]
    angle = pos * 10000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)

    def rope(v):  # [T, heads, hd]: pairs (2i, 2i+1) turned as complex numbers
        c = torch.view_as_complex(v.reshape(*v.shape[:-1], hd // 2, 2).contiguous())
        return torch.view_as_real(c * torch.polar(torch.ones_like(angle), angle)[:, None, :]).reshape(v.shape)

    def norm(v, w):
        return v / torch.sqrt((v * v).mean(-1, keepdim=True) + 1e-5) * w

    for layer in range(LAYERS):
        w = lambda name, rows, cols: g[name].view(LAYERS, rows, cols)[layer]  # noqa: E731
        h = norm(x, g["rms_att"].view(LAYERS, DIM)[layer])
        q = rope((h @ w("wq", DIM, DIM).T).view(T, HEADS, hd))
        k = rope((h @ w("wk", kvd, DIM).T).view(T, KV_HEADS, hd)).repeat_interleave(HEADS // KV_HEADS, 1)
        v = (h @ w("wv", kvd, DIM).T).view(T, KV_HEADS, hd).repeat_interleave(HEADS // KV_HEADS, 1)
        att = torch.einsum("thd,shd->hts", q, k) / math.sqrt(hd)
        att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf")).softmax(-1)
        x = x + torch.einsum("hts,shd->thd", att, v).reshape(T, DIM) @ w("wo", DIM, DIM).T
        h = norm(x, g["rms_ffn"].view(LAYERS, DIM)[layer])
        a, b = h @ w("w1", HIDDEN, DIM).T, h @ w("w3", HIDDEN, DIM).T
        x = x + (a * torch.sigmoid(a) * b) @ w("w2", DIM, HIDDEN).T
    head = g["tok"].view(VOCAB, DIM) if wcls is None else torch.from_numpy(np.array(wcls, np.float64)).view(VOCAB, DIM)
    return norm(x, g["rms_final"]) @ head.T


def nano_logits(ck, ids):
    model = model_from_checkpoint(ck, "test").eval().double()
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0]


@pytest.mark.parametrize("layout", ["legacy", "v1"])
@pytest.mark.parametrize("classifier", ["tied", "untied"])
def test_layouts_load_the_same_model(tmp_path, tok, layout, classifier):
    """Files written here from the legacy file's floats (llama2.c's export.py orders): legacy and version 1,
    with the shared classifier and with one of their own (legacy: a negative vocab_size; version 1: the
    shared byte 0). Nano's logits equal those computed here from llama2.c's arrays."""
    t = legacy_tensors()
    wcls = None
    if classifier == "untied":  # a classifier that is not the embedding
        wcls = (np.random.default_rng(0).standard_normal(VOCAB * DIM) * 0.05).astype(np.float32)
    (tmp_path / "m").mkdir()
    path = tmp_path / "m" / "model.bin"
    (write_legacy if layout == "legacy" else write_v1)(path, t, wcls)
    shutil.copy(TOKENIZER, tmp_path / "m" / "tokenizer.bin")  # found as tokenizer.bin beside the model
    loaded = hf.load_checkpoint(str(path))
    assert loaded["model_config"]["tie_embeddings"] == (wcls is None)
    assert ("output.weight" in loaded["model"]) == (wcls is not None)
    ids = [1] + tok.encode(PROMPT + ", there was a little girl")
    got, want = nano_logits(loaded, ids), reference_logits(t, ids, wcls)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
    if layout == "legacy" and wcls is None:  # the file itself, rewritten: byte for byte the shared one
        assert path.read_bytes() == MODEL.read_bytes()


# ---------------------------------------------------------------------------
# fine-tuning from a llama2.c model


def test_lora_and_sft_start_from_a_llama2c_model(tmp_path, tok):
    """data.py tokenizes with the tokenizer.bin (what the model was trained with), train.py starts from the
    model file itself (init_from), a few steps of LoRA and of full fine-tuning lower the loss on the text,
    and infer.py runs the result."""
    from data import prepare_pretrain
    from train import TrainConfig, train
    stories = shared(GOLDEN).read_text().split("\n")
    docs = tmp_path / "stories.jsonl"
    docs.write_text("".join(json.dumps({"text": s}) + "\n" for s in stories * 10))
    meta = prepare_pretrain([str(docs)], str(tmp_path / "data"), tokenizer=str(TOKENIZER), val_ratio=0.2, workers=1,
                            progress=False)
    assert meta["vocab_size"] == VOCAB
    ids = np.fromfile(tmp_path / "data" / "train.bin", dtype=np.uint16)
    assert ids[0] == tok.bos_id and tok.eos_id in ids  # <s> text </s>, document after document
    windows = torch.from_numpy(ids[:8 * 65].astype(np.int64)).view(8, 65)

    def loss(model):
        with torch.no_grad():
            return model.eval()(windows[:, :-1], windows[:, 1:])[1].item()

    before = loss(model_from_checkpoint(hf.load_checkpoint(str(MODEL))))
    for mode in ("lora", "sft"):
        cfg = TrainConfig(mode=mode, init_from=str(MODEL), data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / mode),
                          batch_size=4, max_iters=15, learning_rate=3e-3, warmup_iters=1, eval_interval=15,
                          eval_iters=2, device="cpu", tensorboard=False, seq_len=64,
                          lora={"rank": 4, "alpha": 8} if mode == "lora" else None)
        tuned = train(None, cfg, quiet=True)
        assert loss(tuned) < 0.9 * before, mode
        out = tmp_path / mode
        args = (["-m", MODEL, "-l", out / "adapter.pt"] if mode == "lora" else ["-m", out / "last.pt"])
        r = infer_cli(*args, "--prompt", PROMPT, "-t", "0", "-n", "20")
        assert r.returncode == 0 and r.stdout.startswith(PROMPT) and len(r.stdout) > len(PROMPT) + 10, r.stderr
