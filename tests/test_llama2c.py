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


