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
    # a token that holds a space after a letter: joins reach across words (encode then merges the text whole)
    across = Llama2cTokenizer({"tokens": pieces + ["a ", "a b"], "scores": scores + [-0.5, -0.1]})
    assert [across.tokens[i] for i in across.encode("ca b")] == [" ", "c", "a b"]
    assert [tok.tokens[i] for i in tok.encode("ca b")] == [" ", "c", "a", " ", "b"]


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
    # a document longer than data.py's pieces (about 1M characters): the same ids as the whole, one space in front
    long_doc = " ".join(stories) * (2 ** 20 // len(" ".join(stories)) + 2)
    (tmp_path / "long.txt").write_text(long_doc)
    prepare_pretrain([str(tmp_path / "long.txt")], str(tmp_path / "long"), tokenizer=str(TOKENIZER), val_ratio=0.0,
                     workers=1, progress=False)
    got = np.fromfile(tmp_path / "long" / "train.bin", dtype=np.uint16).tolist()
    assert got == [tok.bos_id] + tok.encode(long_doc) + [tok.eos_id]
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


# ---------------------------------------------------------------------------
# export


def test_export_to_hugging_face_gives_transformers_logits(tmp_path, ck, tok):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    r = subprocess.run([sys.executable, "export.py", str(out), "--checkpoint", str(MODEL), "--format", "hf"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    text = shared(GOLDEN).read_text()[:400]
    ids = hf_tok(text).input_ids
    assert ids == [1] + tok.encode(text)  # transformers frames the text as Nano does: <s> first
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].double()
    got = nano_logits(ck, ids)
    assert torch.allclose(got, want, atol=2e-4, rtol=1e-4), (got - want).abs().max()
    back = hf.load_checkpoint(str(out))  # and back: the same checkpoint
    assert back["tokenizer"] == ck["tokenizer"] and back["model_config"] == ck["model_config"]
    assert all(torch.equal(back["model"][k], v) for k, v in ck["model"].items())


def test_export_to_nano_bin_round_trips_the_tokenizer(tmp_path, ck):
    import export
    path = tmp_path / "s.bin"
    fields = export.write_model(str(path), str(MODEL))
    assert fields["tokenizer_kind"] == export.TOKENIZER_LLAMA2C and fields["tokenizer_vocab"] == VOCAB
    data = path.read_bytes()
    off = export.HEADER_SIZE
    size, n, version, reserved, *special = struct.unpack_from("<4I6i", data, off)
    assert (n, version, reserved, special) == (VOCAB, 1, 0, [-1, 0, 1, 2, -1, -1])
    p, tokens, scores = off + export.LLAMA2C_HEADER, [], []
    for _ in range(n):
        score, length = struct.unpack_from("<fI", data, p)
        tokens.append(data[p + 8:p + 8 + length].decode())
        scores.append(score)
        p += 8 + length
    assert p == off + size and {"type": "llama2c", "tokens": tokens, "scores": scores} == ck["tokenizer"]
    tb = read_llama2c_tokenizer(TOKENIZER)  # the tokenizer.bin's own pieces and scores
    assert tokens == tb.tokens and scores == tb.scores
    with pytest.raises(export.ExportError, match="2024.10 layout cannot represent this model: the llama2.c tokenizer"):
        export.write_model(str(tmp_path / "old.bin"), str(MODEL), fmt="2024.10")


# ---------------------------------------------------------------------------
# broken files: one line each


def one_line_error(path, match=None):
    """hf.load_checkpoint's ConfigError (one line), and infer.py's `error: ...` (one line, exit 2, no traceback)."""
    with pytest.raises(ConfigError) as e:
        hf.load_checkpoint(str(path))
    message = str(e.value)
    assert "\n" not in message
    if match:
        assert match in message, message
    return message


def model_dir(tmp_path, data, tokenizer=None, name="model.bin"):
    d = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
    d.mkdir()
    (d / name).write_bytes(data)
    (d / "tok512.bin").write_bytes(TOKENIZER.read_bytes() if tokenizer is None else tokenizer)
    return d / name


def test_truncated_and_grown_files(tmp_path):
    data = shared(MODEL).read_bytes()
    for cut in (0, 3, 27, 28, 100, 4096, len(data) // 2, len(data) - 4, len(data) - 1):
        one_line_error(model_dir(tmp_path, data[:cut]),
                       "shorter than a llama2.c header" if cut < 28 else "the sizes do not add up")
    one_line_error(model_dir(tmp_path, data + bytes(4)), "the sizes do not add up")
    # the classifier flag flipped: an untied classifier would need vocab x dim more floats
    untied = struct.pack("<i", -VOCAB)
    one_line_error(model_dir(tmp_path, data[:20] + untied + data[24:]), "a classifier of its own")
    v1 = bytearray(256)
    struct.pack_into("<Ii7iB", v1, 0, 0x616B3432, 1, DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB, SEQ, 1)
    for cut in (8, 100, 255):
        one_line_error(model_dir(tmp_path, bytes(v1[:cut])), "cut short inside its 256-byte header")
    one_line_error(model_dir(tmp_path, bytes(v1) + bytes(1000)), "the sizes do not add up")


def test_wrong_magic_and_versions(tmp_path):
    data = shared(MODEL).read_bytes()
    for version, match in ((2, "version-2 (Q8_0"), (0, "header version 0"), (3, "header version 3"),
                           (-1, "header version -1")):
        head = struct.pack("<Ii7iB", 0x616B3432, version, DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB, SEQ, 1)
        one_line_error(model_dir(tmp_path, head.ljust(256, b"\0") + data[28:]), match)
    head = struct.pack("<Ii7iB", 0x616B3432, 1, DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB, SEQ, 7)
    one_line_error(model_dir(tmp_path, head.ljust(256, b"\0")), "shared_classifier byte is 7")
    # other files named .bin: not read as llama2.c models by mistake
    one_line_error(model_dir(tmp_path, b"PK\x03\x04" + bytes(100)), "not a torch checkpoint")
    nano_bin = struct.pack("<II", 0x42443453, 0x55524C4D) + bytes(300)
    assert not llama2c.is_llama2c(str(model_dir(tmp_path, nano_bin)))


def test_hostile_header_numbers(tmp_path):
    """Every header number out of range or inconsistent is named before anything is allocated (a 2^31 dim would
    otherwise ask for exabytes)."""
    good = [DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB, SEQ]
    names = ["dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"]
    body = shared(MODEL).read_bytes()[28:]
    for i, name in enumerate(names):
        for bad in (0, -7, 2 ** 31 - 1, 2 ** 25):
            if name == "vocab_size" and bad < 0:
                continue  # negative: the untied flag (tested above)
            ints = list(good)
            ints[i] = bad
            one_line_error(model_dir(tmp_path, struct.pack("<7i", *ints) + body), f"header {name} is {bad}")
    for ints in ([DIM, HIDDEN, LAYERS, 7, KV_HEADS, VOCAB, SEQ],  # 64 is no multiple of 7 heads
                 [DIM, HIDDEN, LAYERS, HEADS, 3, VOCAB, SEQ],  # 8 heads cannot share 3 kv heads
                 [66, HIDDEN, LAYERS, 6, 3, VOCAB, SEQ]):  # a head size of 11: RoPE turns pairs
        one_line_error(model_dir(tmp_path, struct.pack("<7i", *ints) + body), "do not make a model")
    # huge but in range: the size check refuses it without allocating (a GiB-scale model would be read otherwise)
    one_line_error(model_dir(tmp_path, struct.pack("<7i", 4096, 11008, 32, 32, 32, 32000, 4096) + body),
                   "the sizes do not add up")


def garbled_tokenizers():
    good = shared(TOKENIZER).read_bytes()
    entries, off = [], 4
    while off < len(good):
        score, n = struct.unpack_from("<fi", good, off)
        entries.append((score, good[off + 8:off + 8 + n]))
        off += 8 + n

    def build(es, max_len=7):
        return struct.pack("<i", max_len) + b"".join(struct.pack("<fi", s, len(b)) + b for s, b in es)

    swapped = list(entries)
    swapped[3], swapped[4] = swapped[4], swapped[3]
    return [
        (b"", "shorter than its header"),
        (good[:2], "shorter than its header"),
        (good[:-3], "truncated inside token 511"),
        (good[:4 + 5], "truncated inside token 0"),
        (struct.pack("<i", 0) + good[4:], "max_token_length is 0"),
        (struct.pack("<i", -1) + good[4:], "max_token_length is -1"),
        (build(entries[:-1]), "holds 511 tokens, the model 512"),
        (build(entries + [(0.0, b"zz")]), "holds 513 tokens, the model 512"),
        (build(entries[:5] + [(0.0, b"\xff\xfe")] + entries[6:]), "token 5 is not UTF-8"),
        (build(entries[:300] + [(float("nan"), entries[300][1])] + entries[301:]), "token 300 has the score nan"),
        (build(entries[:300] + [(0.0, b"")] + entries[301:]), "token 300 is 0 bytes long"),
        (build(entries[:300] + [(0.0, b"x" * 9)] + entries[301:]), "token 300 is 9 bytes long"),
        (build(swapped), "token 3 is '<0x01>'"),
        (build(entries[:300] + [entries[301]] + entries[301:]), "are both"),
        (build([(s, b"_" if b == b" " else b) for s, b in entries]), "no ' ' token"),
        (good[:8] + struct.pack("<i", 2 ** 31 - 1) + good[12:], "token 0 is 2147483647 bytes"),
        (good[:8] + struct.pack("<i", -5) + good[12:], "token 0 is -5 bytes"),
    ]


def test_missing_and_garbled_tokenizer(tmp_path):
    data = shared(MODEL).read_bytes()
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "stories260K.bin").write_bytes(data)
    msg = one_line_error(lone / "stories260K.bin", "its tokenizer is not beside it")
    assert "tok512.bin and tokenizer.bin" in msg and "--tokenizer" in msg
    for garbled, match in garbled_tokenizers():
        one_line_error(model_dir(tmp_path, data, tokenizer=garbled), match)
    # found as tokenizer.bin too, and tok{vocab}.bin first
    d = tmp_path / "both"
    d.mkdir()
    (d / "m.bin").write_bytes(data)
    (d / "tokenizer.bin").write_bytes(b"garbage")
    (d / "tok512.bin").write_bytes(TOKENIZER.read_bytes())
    assert hf.load_checkpoint(str(d / "m.bin"))["tokenizer"]["type"] == "llama2c"
    (d / "tok512.bin").unlink()
    one_line_error(d / "m.bin", "tokenizer.bin: not a llama2.c tokenizer.bin")


def test_cli_errors_are_one_line(tmp_path):
    data = shared(MODEL).read_bytes()
    cases = [(model_dir(tmp_path, data[:1000]), "the sizes do not add up"),
             (model_dir(tmp_path, data, tokenizer=b"\x07\0\0\0junk"), "truncated inside token 0")]
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "s.bin").write_bytes(data)
    cases.append((lone / "s.bin", "its tokenizer is not beside it"))
    for path, match in cases:
        for script in (["infer.py", "-m", str(path), "--prompt", "x"], ["export.py", str(tmp_path / "o.bin"),
                                                                        "--checkpoint", str(path)],
                       ["llama2c.py", "import", str(path), str(tmp_path / "o.pt")]):
            r = subprocess.run([sys.executable, *script], cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and "error: " in lines[0] and match in lines[0], (script, r.stderr)
    qa = tmp_path / "qa.jsonl"  # no instruct marks: question/answer data cannot be framed, one line
    qa.write_text(json.dumps({"question": "hi there", "answer": "yes it is"}) + "\n")
    r = subprocess.run([sys.executable, "data.py", "sft", "--input", str(qa), "--tokenizer", str(TOKENIZER), "--out",
                        str(tmp_path / "sft")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: this tokenizer has no <|instruct_mark|> or <|response_mark|> token, so Nano cannot frame "
        "question/answer samples for it: fine-tune its model on text (python data.py --tokenizer ...)"], r.stderr
    r = infer_cli("-m", MODEL, "--prompt", "x", "-i")  # and no instruct mode
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: this model's tokenizer has no <|instruct_mark|> or <|response_mark|> token, so instruct (chat) mode "
        "cannot frame the prompt: use continuation mode"]


def test_llama2c_import_with_a_tokenizer_given(tmp_path, ck):
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "s.bin").write_bytes(shared(MODEL).read_bytes())
    r = subprocess.run([sys.executable, "llama2c.py", "import", str(lone / "s.bin"), str(tmp_path / "s.pt"),
                        "--tokenizer", str(TOKENIZER)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    back = hf.load_checkpoint(str(tmp_path / "s.pt"))
    assert back["tokenizer"] == ck["tokenizer"] and all(torch.equal(back["model"][k], v) for k, v in ck["model"].items())
    assert load_tokenizer(str(TOKENIZER)).to_dict() == ck["tokenizer"]  # data.py's --tokenizer tok512.bin
    with pytest.raises(TokenizerError, match="not a llama2.c tokenizer.bin"):
        load_tokenizer(str(MODEL))  # the model where its tokenizer belongs


def test_serve_continues_a_llama2c_model(tok):
    """serve.py on the model file: a completion is run.c's text, a chat is refused with a 400 that says why."""
    import httpx
    from test_serve import Server
    golden = shared(GOLDEN).read_text()
    server = Server(MODEL)
    try:
        r = httpx.post(server.url + "/v1/completions", timeout=120,
                       json={"model": server.health().get("model", "nano"), "prompt": PROMPT, "max_tokens": 40,
                             "temperature": 0})
        assert r.status_code == 200, r.text
        text = r.json()["choices"][0]["text"]
        assert len(text) > 100 and golden.startswith(PROMPT + text)
        r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                       json={"model": server.health().get("model", "nano"), "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and "no <|instruct_mark|>" in r.json()["error"]["message"]
    finally:
        log = server.stop()
    assert "Traceback" not in log, log
