"""
The C engine (infer_c/) against PyTorch: logits, tokenizer ids, sampling semantics, LoRA,
both file layouts, and robustness (AddressSanitizer + UBSan, fuzzed files).

Everything runs on tiny models so the whole file takes well under a minute on 2 cores.
"""

import os
import random
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import export  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from tokenizer import SPECIAL_TOKENS, TrieTokenizer  # noqa: E402
from locked_make import make  # noqa: E402

ENGINE_DIR = ROOT / "infer_c"
MULTILINGUAL = (
    "The quick brown fox jumps over the lazy dog. Naïve café, résumé, façade, Ærøskøbing. "
    "你好，世界！我们在测试分词器。こんにちは、世界。カタカナとひらがな。 Привет, мир! "
    "Emoji: 😀🎉👍🏽 and CJK extension B: 𠀀𠀁𪚥. Specials inline: <|bos|>hello<|eos|> <|instruct_mark|>q<|response_mark|>. "
)
TRAIN_TEXT = ("Once upon a time there was a little fox who lived in the forest. "
              "Every morning the fox ran to the river and drank the cold water. "
              "Then the fox went home and slept under the old tree. ") * 40


# ---------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="session")
def engine():
    if shutil.which(os.environ.get("CC", "cc")) is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    for target in ("infer", "asan"):
        r = make("-C", str(ENGINE_DIR), target)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "warning" not in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
    return {"release": str(ENGINE_DIR / "infer"), "asan": str(ENGINE_DIR / "infer_asan")}


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("infer_c")


def run(binary, *args, check=True, input=None, env=None, timeout=120):
    full_env = dict(os.environ, OMP_NUM_THREADS="2", **(env or {}))
    if "asan" in str(binary):
        full_env["ASAN_OPTIONS"] = "detect_leaks=1:abort_on_error=0"
    argv = [a if isinstance(a, bytes) else str(a) for a in args]
    r = subprocess.run([binary, *argv], capture_output=True, input=input, env=full_env, timeout=timeout)
    err = r.stderr.decode(errors="replace")
    assert "AddressSanitizer" not in err and "runtime error" not in err and "LeakSanitizer" not in err, err
    assert r.returncode >= 0, f"killed by signal {-r.returncode}: {err}"
    if check:
        assert r.returncode == 0, err
    return r


def make_checkpoint(tokens_text=MULTILINGUAL, vocab=None, seed=0, **cfg_kw):
    tok = TrieTokenizer.build([tokens_text], 10_000, min_word_count=1)
    kw = dict(block_size=48, vocab_size=len(tok.tokens) + 5, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, n_hidden=96)
    kw.update(cfg_kw)
    if vocab:
        kw["vocab_size"] = vocab
    cfg = ModelConfig(**kw)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():  # norms and biases away from their init so that the test sees them
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return {"model_config": cfg.to_dict(), "model": model.state_dict(), "tokenizer": tok.to_dict()}


def load_model(ck, dtype=torch.float64):
    model = Transformer(ModelConfig.from_dict(ck["model_config"]))
    model.load_state_dict(ck["model"])
    return model.to(dtype).eval()


def reference_logits(ck, ids, dtype=torch.float64):
    with torch.no_grad():
        return load_model(ck, dtype)(torch.tensor([ids]))[0][0].float().numpy()


def engine_logits(binary, path, ids, out, *extra, env=None):
    run(binary, path, "--ids", ",".join(map(str, ids)), "--dump-logits", out, *extra, env=env)
    return np.fromfile(out, dtype=np.float32).reshape(len(ids), -1)


def engine_ids(binary, path, *args, env=None):
    r = run(binary, path, "--print-ids", *args, env=env)
    return [int(t) for t in r.stdout.split()]


def export_model(workdir, name, ck, quant="fp32", fmt="2026.11"):
    path = workdir / f"{name}.{quant}.{fmt}.bin"
    if not path.exists():
        export.write_model(str(path), ck, quant, 64, fmt)
    return str(path)


def torch_generate(ck, ids, n, **kw):
    model = load_model(ck, torch.float32)
    return model.generate(ids, max_new_tokens=n, **kw)


# the random models: RoPE + GQA, learned positions + bias, MQA with odd eps/theta, a width whose
# Q8 group size falls to 16 (scalar kernel), one where it falls to 1, padding rows beyond the tokenizer
RANDOM_MODELS = {
    "rope_gqa": dict(),
    "learned_bias": dict(use_rope=False, bias=True, n_kv_head=4),
    "mqa_eps_theta": dict(n_kv_head=1, norm_eps=1e-6, rope_theta=500.0, n_layer=3),
    "narrow": dict(n_embd=48, n_head=3, n_kv_head=1, n_hidden=80),
    "odd_widths": dict(n_embd=30, n_head=3, n_kv_head=1, n_hidden=45),
    "padded_vocab": dict(vocab=300, n_layer=1),
}


@pytest.fixture(scope="session")
def random_models():
    return {name: make_checkpoint(seed=i, **kw) for i, (name, kw) in enumerate(RANDOM_MODELS.items())}


@pytest.fixture(scope="session")
def trained():
    """A tiny model trained for a few seconds on repetitive text: confident predictions."""
    tok = TrieTokenizer.build([TRAIN_TEXT], 96)
    data = torch.tensor(tok.encode(TRAIN_TEXT))
    cfg = ModelConfig(block_size=64, vocab_size=96, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, n_hidden=128)
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(250):
        ix = torch.randint(len(data) - cfg.block_size - 1, (16,))
        x = torch.stack([data[i:i + cfg.block_size] for i in ix])
        y = torch.stack([data[i + 1:i + cfg.block_size + 1] for i in ix])
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.5, f"the tiny model did not learn (loss {loss.item():.2f})"
    return {"model_config": cfg.to_dict(), "model": model.state_dict(), "tokenizer": tok.to_dict()}, tok


# ---------------------------------------------------------------------------
# logits


@pytest.mark.parametrize("name", list(RANDOM_MODELS))
def test_fp32_logits_random_models(engine, workdir, random_models, name):
    ck = random_models[name]
    tok = TrieTokenizer(ck["tokenizer"]["tokens"])
    ids = ([2] + tok.encode(MULTILINGUAL))[:ck["model_config"]["block_size"]]
    ref = reference_logits(ck, ids)
    got = engine_logits(engine["release"], export_model(workdir, name, ck), ids, workdir / "l.f32")
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4
    # Q8_0 (any group size, down to 1): documented tolerance, 2% of the logit range
    q8 = engine_logits(engine["release"], export_model(workdir, name, ck, "q8"), ids, workdir / "l8.f32")
    assert np.abs(q8 - ref).max() <= 0.02 * (ref.max() - ref.min())
    assert (q8.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("kernels", ["scalar", "avx2", "avx512"])
def test_fp32_and_q8_kernels_agree(engine, workdir, trained, kernels):
    """Every kernel path (runtime dispatch capped by NANO_SIMD) gives the reference logits."""
    ck, tok = trained
    ids = [2] + tok.encode(TRAIN_TEXT[:200])[:40]
    ref = reference_logits(ck, ids)
    env = {"NANO_SIMD": kernels}
    got = engine_logits(engine["release"], export_model(workdir, "trained", ck), ids, workdir / "k.f32", env=env)
    assert np.abs(got - ref).max() <= 1e-4
    q8 = engine_logits(engine["release"], export_model(workdir, "trained", ck, "q8"), ids, workdir / "k8.f32", env=env)
    assert (q8.argmax(-1) == ref.argmax(-1)).mean() >= 0.95
    # documented tolerance for Q8_0 (weights and activations in int8): within 2% of the logit range
    assert np.abs(q8 - ref).max() <= 0.02 * (ref.max() - ref.min())


def test_fp32_logits_trained_both_layouts(engine, workdir, trained):
    ck, tok = trained
    ids = [2] + tok.encode(TRAIN_TEXT)[:63]
    ref = reference_logits(ck, ids)
    for fmt in ("2026.11", "2024.10"):
        got = engine_logits(engine["release"], export_model(workdir, "trained", ck, "fp32", fmt), ids, workdir / "t.f32")
        assert np.abs(got - ref).max() <= 1e-4, fmt


def test_2024_untied_output_head(engine, workdir, random_models):
    """2024.10 files may carry a separate output head (shared classifier = 0): after the RoPE tables
    in fp32 files, after the other matrices (before the tables) in Q8 files."""
    ck = random_models["rope_gqa"]
    cfg = ModelConfig.from_dict(ck["model_config"])
    head = torch.randn(cfg.vocab_size, cfg.n_embd) * 0.05
    ids = [2, 10, 11, 12, 13, 14]
    model = load_model(ck)
    hidden = []
    model.norm.register_forward_hook(lambda mod, inp, out: hidden.append(out))
    with torch.no_grad():
        model(torch.tensor([ids]))
    ref = (hidden[0][0] @ head.double().T).float().numpy()
    for quant in ("fp32", "q8"):
        data = bytearray(Path(export_model(workdir, "rope_gqa", ck, quant, "2024.10")).read_bytes())
        data[52:56] = (0).to_bytes(4, "little")
        if quant == "fp32":
            data += head.numpy().astype("<f4").tobytes()
        else:  # insert the head's int8 values and scales before the two RoPE tables
            gs = 64
            while cfg.n_embd % gs:
                gs //= 2
            q, sc = export.quantize_q8(head, gs)
            tables = cfg.block_size * cfg.head_dim * 4
            data[len(data) - tables:len(data) - tables] = q.numpy().tobytes() + sc.numpy().astype("<f4").tobytes()
        path = workdir / f"untied_{quant}.bin"
        path.write_bytes(bytes(data))
        got = engine_logits(engine["asan"], path, ids, workdir / "u.f32")
        tol = 1e-4 if quant == "fp32" else 0.02 * (ref.max() - ref.min())
        assert np.abs(got - ref).max() <= tol, quant


def test_q8_greedy_equals_pytorch(engine, workdir, trained):
    ck, tok = trained
    prompt = [2] + tok.encode("Every morning the fox")
    want = torch_generate(ck, prompt, 32, temperature=0)
    assert len(want) == 32
    for fmt in ("2026.11", "2024.10"):
        for quant in ("fp32", "q8"):
            path = export_model(workdir, "trained", ck, quant, fmt)
            got = engine_ids(engine["release"], path, "--ids", ",".join(map(str, prompt)), "-n", 32, "-t", 0,
                             "--ignore-eos")
            assert got == want, (fmt, quant)


def test_wasm_build_runs_the_same(engine, workdir, trained):
    """The browser build: the same nano.c + main.c for wasm32-wasi, run under node's WASI."""
    tools = [shutil.which("clang"), shutil.which("node"), Path("/usr/lib/wasm32-wasi/libc.a").exists()]
    if not all(tools):
        pytest.skip("needs clang, a WASI sysroot (Debian wasi-libc) and node")
    r = make("-C", str(ENGINE_DIR), "wasm")
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    runner = workdir / "run_wasi.mjs"
    runner.write_text("import { readFile } from 'node:fs/promises'; import { WASI } from 'node:wasi';\n"
                      "const wasi = new WASI({version: 'preview1', args: process.argv.slice(2), preopens: {'/': '/'}});\n"
                      "const wasm = await WebAssembly.compile(await readFile(process.argv[2]));\n"
                      "process.exitCode = wasi.start(await WebAssembly.instantiate(wasm, wasi.getImportObject()));\n")
    ck, tok = trained
    path = export_model(workdir, "trained", ck, "q8")
    args = ["--ids", "2,10,11", "-n", "12", "-t", "0", "--print-ids", "--ignore-eos"]
    r = subprocess.run(["node", "--no-warnings", str(runner), str(ENGINE_DIR / "infer.wasm"), path, *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == run(engine["release"], path, *args).stdout.decode().split()


# ---------------------------------------------------------------------------
# tokenizer


def test_tokenizer_ids_equal_python(engine, workdir, random_models):
    ck = random_models["rope_gqa"]
    tok = TrieTokenizer(ck["tokenizer"]["tokens"])
    path = export_model(workdir, "rope_gqa", ck)
    text = MULTILINGUAL + " unknown: ☃ ∰ 𝄞 \t\n new line, 🙃 <|unknown|><|padding|> <| bos |>"
    for binary in (engine["release"], engine["asan"]):
        r = run(binary, path, "--tokenize", text)
        assert [int(t) for t in r.stdout.split()] == tok.encode(text)
    # invalid UTF-8 becomes U+FFFD as Python's errors="replace" would make it
    raw = text.encode() + b"\xff\xfe \xe2\x82 \xed\xa0\x80 \xf0\x9f\x98 \xc0\xaf x\x00y \xf4\x90\x80\x80 end\xe4"
    f = workdir / "raw.txt"
    f.write_bytes(raw)
    for binary in (engine["release"], engine["asan"]):
        r = run(binary, path, "--tokenize-file", f)
        assert [int(t) for t in r.stdout.split()] == tok.encode(raw.decode("utf-8", errors="replace"))


def test_tokenizer_longest_match_backtracks(engine, workdir):
    """Vocab with 'abc' and 'a' but not 'ab': 'abd' -> a, b, d; a char known only inside a longer token -> unknown."""
    tokens = SPECIAL_TOKENS + ["a", "b", "d", "abc", "xyz"]
    ck = make_checkpoint(vocab=16, n_layer=1)
    ck["tokenizer"] = {"type": "trie", "tokens": tokens}
    path = str(workdir / "bt.bin")
    export.write_model(path, ck)
    text = "abdabcabxyzxy<|eos|>x"
    r = run(engine["release"], path, "--tokenize", text)
    assert [int(t) for t in r.stdout.split()] == TrieTokenizer(tokens).encode(text)


# ---------------------------------------------------------------------------
# generation semantics (model.generate / sample_next)


def test_generation_modes_match_pytorch(engine, workdir, trained):
    ck, tok = trained
    path = export_model(workdir, "trained", ck)
    # instruct template and -g continuation, greedy, stopping at <|eos|> like generate(eos_id=3)
    msg = "the fox"
    want = torch_generate(ck, [2, 4] + tok.encode(msg) + [5], 20, temperature=0, eos_id=3)
    assert engine_ids(engine["release"], path, "-i", msg, "-n", 20, "-t", 0) == want
    want = torch_generate(ck, [2] + tok.encode(msg), 20, temperature=0, eos_id=3)
    assert engine_ids(engine["release"], path, "-g", msg, "-n", 20, "-t", 0) == want
    r = run(engine["release"], path, "-g", msg, "-n", 20, "-t", 0)
    assert r.stdout.decode().strip() == (msg + tok.decode(want)).strip()  # -g prints the prompt first
    assert b"tok/s" in r.stderr
    # repetition penalty, greedy
    want = torch_generate(ck, [2] + tok.encode(msg), 24, temperature=0, repetition_penalty=1.5)
    assert engine_ids(engine["release"], path, "-g", msg, "-n", 24, "-t", 0, "-r", 1.5, "--ignore-eos") == want
    # top-k 1 and a tiny top-p leave only the argmax, whatever the temperature and seed
    greedy = torch_generate(ck, [2] + tok.encode(msg), 16, temperature=0)
    for args in (("-k", 1), ("-p", 0.001), ("-k", 5, "-p", 1e-6)):
        got = engine_ids(engine["release"], path, "-g", msg, "-n", 16, "-t", 1.3, "-s", 7, "--ignore-eos", *args)
        assert got == greedy, args


def test_tiny_temperatures_are_greedy_in_both_engines(engine, workdir, trained):
    # below model.MIN_TEMPERATURE (= nano.h's NANO_MIN_TEMPERATURE) sampling is greedy, in PyTorch and in C
    # (the page runs the same nano.c): dividing by a tinier temperature overflowed to infinity, which
    # gave noise (1e-40: "youyouyou..." in PyTorch, <|bos|><|bos|>... in C) while 0 was greedy
    import model as model_py
    ck, tok = trained
    path = export_model(workdir, "trained", ck)
    ids = [2] + tok.encode("the fox")
    greedy = torch_generate(ck, ids, 16, temperature=0)
    for t in (1e-300, 1e-40, 1e-20, 9e-7, model_py.MIN_TEMPERATURE / 2):
        assert torch_generate(ck, ids, 16, temperature=t, generator=torch.Generator().manual_seed(1)) == greedy, t
        got = engine_ids(engine["release"], path, "--ids", ",".join(map(str, ids)), "-n", 16, "-t", t, "-s", 1,
                         "--ignore-eos")
        assert got == greedy, t
    # at the threshold it samples (a high-temperature-like spread is not asked for: a finite one is)
    logits = torch.tensor([0.0, 1e-7, 5.0])
    assert model_py.sample_next(logits, temperature=model_py.MIN_TEMPERATURE) == 2
    assert model_py.sample_next(logits, temperature=float("nan")) == 2  # NaN: greedy, never noise


def test_sampling_seeded_and_within_top_k(engine, workdir, trained):
    ck, tok = trained
    path = export_model(workdir, "trained", ck, "q8")
    args = ("--ids", "2", "-n", 40, "-t", 5.0, "--ignore-eos")
    a = engine_ids(engine["release"], path, *args, "-s", 1)
    assert a == engine_ids(engine["release"], path, *args, "-s", 1)
    assert a != engine_ids(engine["release"], path, *args, "-s", 2)
    # with top-k 3 every sampled token is among the 3 most likely at its step
    ids = engine_ids(engine["release"], path, "--ids", "2", "-n", 30, "-t", 5.0, "-k", 3, "-s", 3, "--ignore-eos")
    logits = engine_logits(engine["release"], path, [2] + ids[:-1], workdir / "s.f32")
    for step, t in enumerate(ids):
        assert t in np.argsort(-logits[step])[:3]


def allowed_tokens(logits, temperature, top_k, top_p):
    """The tokens model.sample_next can return (steps 2-4 of its rule), computed with torch."""
    logits = torch.tensor(logits) / temperature
    if 0 < top_k < logits.numel():
        logits[logits < torch.topk(logits, top_k).values[-1]] = -float("inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop[0] = False
        logits[order[drop]] = -float("inf")
    return set(torch.nonzero(torch.isfinite(logits)).flatten().tolist())


def test_top_k_top_p_sample_only_allowed_tokens(engine, workdir, trained):
    ck, tok = trained
    path = export_model(workdir, "trained", ck)
    prompt = [2] + tok.encode("the fox")
    logits = engine_logits(engine["release"], path, prompt, workdir / "tp.f32")[-1]
    for temperature, top_k, top_p in [(3.0, 0, 0.5), (3.0, 0, 0.9), (2.0, 6, 0.8), (1.0, 3, 1.0)]:
        allowed = allowed_tokens(logits, temperature, top_k, top_p)
        assert 2 <= len(allowed) < len(logits)
        seen = set()
        for seed in range(60):
            seen |= set(engine_ids(engine["release"], path, "--ids", ",".join(map(str, prompt)), "-n", 1,
                                   "-t", temperature, "-k", top_k, "-p", top_p, "-s", seed, "--ignore-eos"))
        assert seen <= allowed and len(seen) >= 2, (temperature, top_k, top_p, seen, allowed)


def test_context_full_stops_like_pytorch(engine, workdir, trained):
    ck, tok = trained
    path = export_model(workdir, "trained", ck)
    for n_prompt in (62, 64, 70):  # block_size 64: room for 2, 0 (prompt truncated) and 0
        prompt = ([2] + tok.encode(TRAIN_TEXT))[:n_prompt]
        want = torch_generate(ck, prompt, 10, temperature=0)
        got = engine_ids(engine["release"], path, "--ids", ",".join(map(str, prompt)), "-n", 10, "-t", 0, "--ignore-eos")
        assert got == want


def test_padded_vocab_is_sampled_and_decodes_unknown(engine, workdir):
    """Ids beyond the tokenizer (padding rows) are sampled like any other and print as <|unknown|>."""
    ck = make_checkpoint(vocab=300, n_layer=1)
    n_tok = len(ck["tokenizer"]["tokens"])
    sd = {k: v.clone() for k, v in ck["model"].items()}
    # the final norm keeps one dimension, and two padding rows point along it, one each way:
    # whatever the sign of the hidden state there, one of them has by far the largest logit
    sd["norm.weight"].zero_()[0] = 1.0
    sd["tok_embeddings.weight"][n_tok + 3] = 0.0
    sd["tok_embeddings.weight"][n_tok + 4] = 0.0
    sd["tok_embeddings.weight"][n_tok + 3, 0] = 50.0
    sd["tok_embeddings.weight"][n_tok + 4, 0] = -50.0
    ck = dict(ck, model=sd)
    path = export_model(workdir, "padded_rows", ck)
    prompt = [2] + TrieTokenizer(ck["tokenizer"]["tokens"]).encode("hello")
    want = torch_generate(ck, prompt, 4, temperature=0)
    assert all(t >= n_tok for t in want)
    args = ("--ids", ",".join(map(str, prompt)), "-n", 4, "-t", 0)
    assert engine_ids(engine["release"], path, *args) == want
    assert run(engine["release"], path, *args).stdout.decode().strip() == "<|unknown|>" * 4


def test_arbitrary_prompt_bytes_and_chat(engine, workdir, trained):
    ck, _ = trained
    path = export_model(workdir, "trained", ck, "q8")
    rng = random.Random(5)
    for _ in range(5):
        junk = bytes(rng.randrange(1, 256) for _ in range(rng.randrange(1, 200)))
        run(engine["asan"], path, "-g", junk, "-n", 5, "-s", 1)
    long_prompt = "the fox " * 200  # longer than the context: its end is kept
    run(engine["asan"], path, "-i", long_prompt, "-n", 5, "-t", 0)
    script = (b"hello fox\n/mode\n\xff\xfe broken utf8\n/lora /nonexistent.bin\n/lora\n" + b"fox " * 100 +
              b"\n/help\n/bogus\n")
    r = run(engine["asan"], path, "-n", 8, "-t", 0.7, "-s", 1, input=script)
    assert b"cannot open /nonexistent.bin" in r.stderr and b"no adapter loaded" in r.stderr


def test_bidirectional_model_is_refused(engine, workdir):
    ck = make_checkpoint(is_causal=False, n_layer=1)
    path = export_model(workdir, "bidir", ck)
    r = run(engine["release"], path, "--ids", "2,3", "--dump-logits", workdir / "b.f32", check=False)
    assert r.returncode == 1 and b"bidirectional" in r.stderr
    r = run(engine["release"], path, "-g", "hi", check=False)
    assert r.returncode == 1 and b"bidirectional" in r.stderr


# ---------------------------------------------------------------------------
# LoRA


def make_adapter(ck, targets, rank=4, alpha=8.0, seed=1):
    cfg = ModelConfig.from_dict(ck["model_config"])
    gen = torch.Generator().manual_seed(seed)
    ad = {}
    for i in range(cfg.n_layer):
        for name, out_f, in_f in export._linears(cfg):
            if name.split(".")[1] in targets:
                ad[f"layers.{i}.{name}.lora_A"] = torch.randn(rank, in_f, generator=gen) * 0.2
                ad[f"layers.{i}.{name}.lora_B"] = torch.randn(out_f, rank, generator=gen) * 0.2
    return {"format": "nano-lora", "lora_config": {"rank": rank, "alpha": alpha, "targets": list(targets)},
            "base": {"model_config": ck["model_config"],
                     "fingerprint": export.base_fingerprint(ck["model_config"], ck["model"])},
            "adapter": ad}


def merged(ck, adapter):
    lc = adapter["lora_config"]
    sd = {k: v.clone() for k, v in ck["model"].items()}
    for key, A in adapter["adapter"].items():
        if key.endswith("lora_A"):
            base = key[:-len(".lora_A")]
            B = adapter["adapter"][base + ".lora_B"]
            sd[base + ".weight"] += (lc["alpha"] / lc["rank"]) * (B.double() @ A.double()).float()
    return dict(ck, model=sd)


def test_lora_on_off_equals_pytorch(engine, workdir, random_models):
    ck = random_models["learned_bias"]
    ad = make_adapter(ck, export.LORA_TARGETS)
    base, apath = export_model(workdir, "learned_bias", ck), str(workdir / "ad.bin")
    export.write_lora(apath, ad)
    tok = TrieTokenizer(ck["tokenizer"]["tokens"])
    ids = ([2] + tok.encode(MULTILINGUAL))[:40]
    ref_on, ref_off = reference_logits(merged(ck, ad), ids), reference_logits(ck, ids)
    assert np.abs(ref_on - ref_off).max() > 1e-2  # the adapter does something
    for binary in (engine["release"], engine["asan"]):
        on = engine_logits(binary, base, ids, workdir / "on.f32", "-l", apath)
        off = engine_logits(binary, base, ids, workdir / "off.f32")
        assert np.abs(on - ref_on).max() <= 1e-4
        assert np.abs(off - ref_off).max() <= 1e-4
    # the Q8 export of the same checkpoint has the same fingerprint: the adapter attaches
    q8 = engine_logits(engine["release"], export_model(workdir, "learned_bias", ck, "q8"), ids, workdir / "q.f32",
                       "-l", apath)
    assert (q8.argmax(-1) == ref_on.argmax(-1)).mean() >= 0.9


def test_lora_from_model_py_and_chat_toggle(engine, workdir, trained):
    """An adapter made with model.py's own LoRA API (add_lora / adapter_checkpoint / weights_fingerprint),
    as train.py saves it; the engine with it equals PyTorch with the adapter enabled, and the chat's
    /lora toggles it like infer.py's."""
    from files import weights_fingerprint
    from model import LoRAConfig, add_lora, adapter_checkpoint, set_lora_enabled
    ck, tok = trained
    model = load_model(ck, torch.float32)
    add_lora(model, LoRAConfig(rank=4, alpha=8.0, targets=list(export.LORA_TARGETS)))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.5)
    adapter = adapter_checkpoint(model, ck["model_config"], weights_fingerprint(ck["model_config"], ck["model"]))
    apath = str(workdir / "trained_lora.bin")
    export.write_lora(apath, adapter)
    base = export_model(workdir, "trained", ck)
    ids = [2] + tok.encode(TRAIN_TEXT)[:40]
    model.double().eval()
    with torch.no_grad():
        ref_on = model(torch.tensor([ids]))[0][0].float().numpy()
        set_lora_enabled(model, False)
        ref_off = model(torch.tensor([ids]))[0][0].float().numpy()
    assert np.abs(engine_logits(engine["release"], base, ids, workdir / "m1.f32", "-l", apath) - ref_on).max() <= 1e-4
    assert np.abs(engine_logits(engine["release"], base, ids, workdir / "m2.f32") - ref_off).max() <= 1e-4
    # chat: on, /lora (off), /lora (on again); each turn a fresh instruct prompt, greedy
    msg = "the fox"
    on = run(engine["release"], base, "-i", msg, "-n", 12, "-t", 0, "-l", apath).stdout.decode().strip()
    off = run(engine["release"], base, "-i", msg, "-n", 12, "-t", 0).stdout.decode().strip()
    script = f"{msg}\n/lora\n{msg}\n/lora\n{msg}\n/quit\n".encode()
    r = run(engine["asan"], base, "-l", apath, "-n", 12, "-t", 0, input=script)
    replies = [t.strip() for t in r.stdout.decode().split("\n> ") if t.strip()]  # command lines print nothing
    assert replies == [on, off, on] and on != off


def test_lora_2024_layout(engine, workdir, random_models):
    ck = random_models["rope_gqa"]
    ad = make_adapter(ck, ["wq", "wv", "wo"], rank=3, alpha=6)
    old_base = export_model(workdir, "rope_gqa", ck, "fp32", "2024.10")
    apath = str(workdir / "ad_old.bin")
    export.write_lora(apath, ad, "2024.10")
    ids = [2, 10, 11, 12, 13, 14, 15, 16]
    ref = reference_logits(merged(ck, ad), ids)
    for binary in (engine["release"], engine["asan"]):
        got = engine_logits(binary, old_base, ids, workdir / "o.f32", "-l", apath)
        assert np.abs(got - ref).max() <= 1e-4
    # a 2024.10 adapter on a 2026.11 base: shapes only, with a warning
    r = run(engine["release"], export_model(workdir, "rope_gqa", ck), "--ids", "2,5", "-n", 2, "-l", apath)
    assert b"warning" in r.stderr


def test_mismatched_adapter_is_refused(engine, workdir, random_models):
    ck = random_models["rope_gqa"]
    other = make_checkpoint(seed=99)  # same shapes, other weights
    apath = str(workdir / "other.bin")
    export.write_lora(apath, make_adapter(other, ["wq", "w2"]))
    base = export_model(workdir, "rope_gqa", ck)
    for binary in (engine["release"], engine["asan"]):
        r = run(binary, base, "-g", "hi", "-l", apath, check=False)
        assert r.returncode == 1 and b"another base model" in r.stderr
    # other shapes
    small = make_checkpoint(n_layer=1, n_embd=32, n_head=2, n_kv_head=1, n_hidden=40)
    spath = str(workdir / "small.bin")
    export.write_lora(spath, make_adapter(small, ["wq"]))
    r = run(engine["release"], base, "-g", "hi", "-l", spath, check=False)
    assert r.returncode == 1 and b"does not match" in r.stderr
    # an adapter given as the model, and a model given as the adapter
    r = run(engine["release"], spath, "-g", "hi", check=False)
    assert r.returncode == 1 and b"LoRA adapter, not a model" in r.stderr
    r = run(engine["release"], base, "-g", "hi", "-l", base, check=False)
    assert r.returncode == 1 and b"not a LoRA adapter" in r.stderr


# ---------------------------------------------------------------------------
# robustness


def test_asan_parity_runs(engine, workdir, trained, random_models):
    """The sanitized build gives the release build's results on every layout and quantization."""
    ck, tok = trained
    ids = [2] + tok.encode(TRAIN_TEXT)[:30]
    for fmt in ("2026.11", "2024.10"):
        for quant in ("fp32", "q8"):
            path = export_model(workdir, "trained", ck, quant, fmt)
            a = engine_logits(engine["release"], path, ids, workdir / "r.f32")
            b = engine_logits(engine["asan"], path, ids, workdir / "a.f32")
            assert np.abs(a - b).max() <= 1e-4
            args = ("-g", "the fox", "-n", 20, "-t", 0.9, "-k", 20, "-p", 0.9, "-r", 1.1, "-s", 4)
            assert engine_ids(engine["release"], path, *args) == engine_ids(engine["asan"], path, *args)
    path = export_model(workdir, "narrow", random_models["narrow"], "q8")
    run(engine["asan"], path, "-g", "hello", "-n", 10, "-s", 2)


def _mutants(data, rng, n, header_only_share=0.4):
    """Truncations, bit flips (often in the header, where they change sizes and offsets), garbage."""
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            cut = rng.choice([0, 3, 100, 255, 256, 300, len(data) // 2, len(data) - 1, rng.randrange(len(data))])
            out.append(data[:cut])
        elif kind in (1, 2):
            b = bytearray(data)
            for _ in range(rng.choice([1, 1, 2, 8])):
                pos = rng.randrange(256 if rng.random() < header_only_share or kind == 1 else len(b))
                b[pos] ^= 1 << rng.randrange(8)
            out.append(bytes(b))
        else:
            b = bytearray(data[:rng.choice([256, len(data)])])
            start = rng.choice([8, 16, 24, 52, 96, 256])
            for j in range(start, min(len(b), start + rng.choice([4, 16, 64]))):
                b[j] = rng.randrange(256)
            out.append(bytes(b))
    return out


def test_fuzz_corrupted_files(engine, workdir, random_models):
    """Hundreds of damaged model and adapter files: every run ends in a clean error or a clean run."""
    ck = random_models["rope_gqa"]
    sources = {fmt + quant: Path(export_model(workdir, "rope_gqa", ck, quant, fmt)).read_bytes()
               for fmt in ("2026.11", "2024.10") for quant in ("fp32", "q8")}
    ad = make_adapter(ck, ["wq", "wk", "wv", "wo"])
    for fmt in ("2026.11", "2024.10"):
        export.write_lora(str(workdir / f"fz_ad_{fmt}.bin"), ad, fmt)
    lora_sources = {fmt: (workdir / f"fz_ad_{fmt}.bin").read_bytes() for fmt in ("2026.11", "2024.10")}
    base_new = export_model(workdir, "rope_gqa", ck)
    base_old = export_model(workdir, "rope_gqa", ck, "fp32", "2024.10")
    rng = random.Random(1234)
    jobs = []
    for name, data in sources.items():
        for j, m in enumerate(_mutants(data, rng, 70)):
            p = workdir / f"fz_{name}_{j}.bin"
            p.write_bytes(m)
            extra = ("--no-verify",) if j % 3 == 0 else ()  # exercise the validators behind the checksum too
            jobs.append(([p, "--ids", "2,5,9", "-n", 3, "-t", 0.8, "-s", 1, *extra], m == data))
    for fmt, data in lora_sources.items():
        base = base_new if fmt == "2026.11" else base_old
        for j, m in enumerate(_mutants(data, rng, 40)):
            p = workdir / f"fz_lora_{fmt}_{j}.bin"
            p.write_bytes(m)
            extra = ("--no-verify",) if j % 3 == 0 else ()
            jobs.append(([base, "-l", p, "--ids", "2,5", "-n", 2, "-t", 0, *extra], m == data))
    assert len(jobs) >= 300

    def one(job):
        args, _ = job
        return run(engine["asan"], *args, check=False, timeout=60)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(one, jobs))
    errors = 0
    for (args, unchanged), r in zip(jobs, results):
        err = r.stderr.decode(errors="replace")
        if r.returncode != 0:
            errors += 1
            assert r.returncode == 1 and err.startswith("error:"), (args, r.returncode, err)
    assert errors >= len(jobs) // 2  # most damage is detected (all of it in checksummed files)


def test_checksum_catches_weight_flips(engine, workdir, random_models):
    path = Path(export_model(workdir, "rope_gqa", random_models["rope_gqa"], "q8"))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    bad = workdir / "flip.bin"
    bad.write_bytes(bytes(data))
    r = run(engine["release"], bad, "-g", "hi", check=False)
    assert r.returncode == 1 and b"checksum mismatch" in r.stderr
    assert run(engine["release"], bad, "-g", "hi", "-n", 2, "--no-verify").returncode == 0


def test_cli_errors(engine, workdir):
    for args, msg in [((workdir / "missing.bin",), b"cannot open"),
                      ((__file__,), b"bad magic"),
                      ((workdir,), b"not a regular file")]:
        r = run(engine["release"], *args, "-g", "hi", check=False)
        assert r.returncode == 1 and msg in r.stderr, r.stderr
    short = workdir / "short.bin"
    short.write_bytes(b"SD4B")
    r = run(engine["release"], short, check=False)
    assert r.returncode == 1 and b"shorter than the 256-byte header" in r.stderr
    ver = bytearray(256)
    ver[0:16] = np.array([0x42443453, 0x55524C4D, 2023, 1], dtype="<u4").tobytes()
    (workdir / "ver.bin").write_bytes(bytes(ver))
    r = run(engine["release"], workdir / "ver.bin", check=False)
    assert r.returncode == 1 and b"unsupported file version 2023.1" in r.stderr
    r = run(engine["release"], workdir / "ver.bin", "-t", "abc", check=False)
    assert r.returncode == 2 and b"bad or incomplete option" in r.stderr
    assert b"--dump-logits" in run(engine["release"], "--help").stdout


# ---------------------------------------------------------------------------
# the prompt as a batch (nano_feed_batch: blocks of token rows through matrix-matrix kernels)
# against the same prompt fed one token at a time (nano_forward: the decode path)


def batch_and_stepwise_logits(binary, path, ids, workdir, *extra, env=None):
    step = engine_logits(binary, path, ids, workdir / "step.f32", *extra, env=env)
    run(binary, path, "--ids", ",".join(map(str, ids)), "--dump-prefill-logits", workdir / "batch.f32", *extra, env=env)
    return step, np.fromfile(workdir / "batch.f32", dtype=np.float32).reshape(len(ids), -1)


def assert_fp32_close(step, batch, what):
    """The two differ only in the order of float additions (the kernels' tiles): fp32 rounding"""
    assert step.shape == batch.shape, what
    assert np.abs(step - batch).max() <= 2e-5 * max(1.0, np.abs(step).max()), what


@pytest.mark.parametrize("kernels", ["scalar", "avx2", "avx512"])
def test_prefill_batch_equals_token_by_token(engine, workdir, random_models, kernels):
    """Every position's logits of the batched prompt equal those of feeding it token by token, fp32
    and Q8 (activations quantized per row and group, as decoding does), on every kernel path this CPU
    has (NANO_SIMD caps the dispatch), for the random models' shapes (learned positions and biases,
    MQA, widths that leave rows, columns and group sizes over from the tiles, a padded vocabulary),
    for one token, prompts of several blocks with a ragged last one, and a full context."""
    for name in ("rope_gqa", "learned_bias", "mqa_eps_theta", "odd_widths", "padded_vocab"):
        ck = random_models[name]
        block, vocab = ck["model_config"]["block_size"], ck["model_config"]["vocab_size"]
        rng = random.Random(name)
        for quant in ("fp32", "q8"):
            path = export_model(workdir, name, ck, quant)
            for rows, n in (("64", 1), ("5", 1), ("5", 17), ("5", block), ("64", block)):
                ids = [rng.randrange(vocab) for _ in range(n)]
                env = {"NANO_SIMD": kernels, "NANO_PREFILL_ROWS": rows}
                step, batch = batch_and_stepwise_logits(engine["release"], path, ids, workdir, env=env)
                assert_fp32_close(step, batch, (name, quant, rows, n))


def test_prefill_batch_with_lora_and_under_asan(engine, workdir, random_models):
    """The same with a LoRA adapter on every target (fp32 and Q8 bases), and under AddressSanitizer +
    UBSan (its build has the same SIMD kernels, without OpenMP) for a prompt that fills the context."""
    ck = random_models["learned_bias"]
    apath = str(workdir / "prefill_ad.bin")
    export.write_lora(apath, make_adapter(ck, export.LORA_TARGETS))
    block = ck["model_config"]["block_size"]
    ids = [random.Random(1).randrange(ck["model_config"]["vocab_size"]) for _ in range(block)]
    for quant in ("fp32", "q8"):
        path = export_model(workdir, "learned_bias", ck, quant)
        for binary in (engine["release"], engine["asan"]):
            for rows in ("5", "64"):
                env = {"NANO_PREFILL_ROWS": rows}
                on_step, on_batch = batch_and_stepwise_logits(binary, path, ids, workdir, "-l", apath, env=env)
                assert_fp32_close(on_step, on_batch, (quant, binary, rows, "lora"))
                off_step, off_batch = batch_and_stepwise_logits(binary, path, ids, workdir, env=env)
                assert_fp32_close(off_step, off_batch, (quant, binary, rows))
                assert np.abs(on_batch - off_batch).max() > 1e-2  # the adapter is applied in the batch too
    odd = random_models["odd_widths"]
    for quant in ("fp32", "q8"):
        path = export_model(workdir, "odd_widths", odd, quant)
        ids = [random.Random(2).randrange(odd["model_config"]["vocab_size"]) for _ in range(odd["model_config"]["block_size"])]
        step, batch = batch_and_stepwise_logits(engine["asan"], path, ids, workdir, env={"NANO_PREFILL_ROWS": "7"})
        assert_fp32_close(step, batch, ("asan odd_widths", quant))


def test_prefill_batch_greedy_text_unchanged(engine, workdir, trained):
    """Greedy generation after a batched prompt gives the ids of a prompt fed one row at a time
    (NANO_PREFILL_ROWS=1: each block is one token, nano_forward's path), and PyTorch's, for a prompt
    of several blocks, one token, and one longer than the context (its most recent ids are kept)."""
    ck, tok = trained
    prompt = TRAIN_TEXT[:70]
    ids = [2] + tok.encode(prompt)
    assert len(ids) > 2 * 7
    want = torch_generate(ck, ids, 20, temperature=0)
    for quant in ("fp32", "q8"):
        path = export_model(workdir, "trained", ck, quant)
        for binary in (engine["release"], engine["asan"]):
            for args in (("-g", prompt), ("--ids", "2"), ("--ids", ",".join(map(str, ids * 5)))):
                flags = (*args, "-n", 20, "-t", 0, "--ignore-eos")
                one = engine_ids(binary, path, *flags, env={"NANO_PREFILL_ROWS": "1"})
                for rows in ("7", "64"):
                    assert engine_ids(binary, path, *flags, env={"NANO_PREFILL_ROWS": rows}) == one, \
                        (quant, binary, args[0], rows)
                if quant == "fp32" and args[0] == "-g":
                    assert one == want


def test_prefill_rows_setting_is_checked(engine, workdir, trained):
    path = export_model(workdir, "trained", trained[0])
    for bad in ("0", "-3", "abc", "12abc", "", "4097", "99999999999999999999"):
        r = run(engine["release"], path, "-g", "hi", "-n", 2, env={"NANO_PREFILL_ROWS": bad}, check=False)
        assert r.returncode == 1 and b"NANO_PREFILL_ROWS must be a whole number from 1 to 4096" in r.stderr, (bad, r.stderr)
    assert run(engine["release"], path, "-g", "hi", "-n", 2, env={"NANO_PREFILL_ROWS": "4096"}).returncode == 0


# ---------------------------------------------------------------------------
# llama2.c models (llama2c.py): the tokenizer section of kind 3


LLAMA2C = ROOT.parent / "shared" / "data" / "llama2c"
LLAMA2C_PROMPT = "Once upon a time"


@pytest.fixture(scope="session")
def stories(workdir):
    """stories260K (with tok512.bin beside it) exported as a 2026.11 fp32 file, and its checkpoint."""
    import llama2c
    if not (LLAMA2C / "stories260K.bin").exists():
        pytest.fail(f"{LLAMA2C} is missing: the llama2.c tests need ../shared/data/llama2c/ (../shared/README.md)")
    ck = llama2c.load_llama2c(LLAMA2C / "stories260K.bin")
    path = workdir / "stories260K.fp32.bin"
    export.write_model(str(path), ck, "fp32")
    return path, ck


def test_llama2c_model_continues_as_run_c(engine, stories):
    """run.c's own output (-t 0 -n 200: 200 positions, the <s> and the prompt's tokens included)."""
    from tokenizer import Llama2cTokenizer
    path, ck = stories
    golden = (LLAMA2C / "greedy_once_upon_a_time.txt").read_bytes()
    n_new = 200 - (1 + len(Llama2cTokenizer(ck["tokenizer"]).encode(LLAMA2C_PROMPT))) + 1
    for binary in (engine["release"], engine["asan"]):
        r = run(binary, path, "-g", LLAMA2C_PROMPT, "-t", 0, "-n", n_new)
        assert r.stdout == golden


def test_llama2c_generation_stops_at_bos(engine, stories):
    """run.c stops where the model writes <s> (the start of the next story); with --ignore-eos it goes on."""
    path, _ = stories
    stopped = run(engine["release"], path, "-g", "The end", "-t", 0, "-n", 500, "--print-ids").stdout.split()
    going = run(engine["release"], path, "-g", "The end", "-t", 0, "-n", 500, "--print-ids", "--ignore-eos").stdout.split()
    assert 0 < len(stopped) < len(going) and going[:len(stopped)] == stopped and going[len(stopped)] == b"1"


def llama2c_texts(n, seed):
    rng = random.Random(seed)
    alphabet = list("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJ.,!?;:'\"-\n\t0123456789") + list("éüßçñ☃€😀👍🏽你好Привет\u0301")
    words = (LLAMA2C / "greedy_once_upon_a_time.txt").read_text().split(" ")
    out = []
    for _ in range(n):
        if rng.random() < 0.5:
            out.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))))
        else:
            k = rng.randint(0, len(words) - 1)
            out.append(" ".join(words[k:k + rng.randint(1, 30)]))
    return out + ["", " ", "\n", "<0x41>", "<s>", "\n<s>\n", "<unk>", "\ufffd", "x\x00y", "a" * 5000, MULTILINGUAL]


def test_llama2c_tokenizer_ids_equal_python(engine, stories):
    """nano_encode (libnano.so, in-process) gives Llama2cTokenizer's ids on 3,000+ texts and on invalid UTF-8;
    the CLI under the sanitizers on a few; <0xNN> tokens print their byte."""
    import ctypes
    sys.path.insert(0, str(ENGINE_DIR))
    from nanolib import NanoLib
    from tokenizer import Llama2cTokenizer
    path, ck = stories
    tok = Llama2cTokenizer(ck["tokenizer"])
    lib = NanoLib()
    # and a vocabulary with a space inside a token ("e t", ranked high): joins then reach across words
    spec = dict(ck["tokenizer"], tokens=ck["tokenizer"]["tokens"][:-1] + ["e t"], scores=ck["tokenizer"]["scores"][:-1] + [5.0])
    across = Path(str(path).replace(".bin", ".across.bin"))
    export.write_model(str(across), dict(ck, tokenizer=spec), "fp32")
    across_tok, texts = Llama2cTokenizer(spec), llama2c_texts(3000, 1)
    assert across_tok.encode("the tree") != tok.encode("the tree")
    m = lib.load(across)
    try:
        bad = [t for t in texts[:800] if lib.encode(m, t.encode()) != across_tok.encode(t)]
        assert not bad, f"{len(bad)} differ, e.g. {bad[:3]!r}"
    finally:
        lib.free(m)
    m = lib.load(path)
    try:
        bad = [t for t in texts if lib.encode(m, t.encode()) != tok.encode(t)]
        assert not bad, f"{len(bad)} of {len(texts)} differ, e.g. {bad[:3]!r}"
        raw = b"ok \xff\xfe \xe2\x82 \xed\xa0\x80 \xf0\x9f\x98 \xc0\xaf x\x00y \xf4\x90\x80\x80 end\xe4"
        assert lib.encode(m, raw) == tok.encode(raw.decode("utf-8", errors="replace"))
        for i in range(tok.vocab_size):  # token bytes: the pieces, <0xNN> as the byte itself
            n = ctypes.c_size_t()
            p = lib.lib.nano_token_text(m, i, ctypes.byref(n))
            want = bytes([i - 3]) if 3 <= i < 259 else tok.tokens[i].encode()
            assert ctypes.string_at(p, n.value) == want, i
    finally:
        lib.free(m)
    for text in ("Once upon a time", "héllo ☃ 😀", ""):
        r = run(engine["asan"], path, "--tokenize", text)
        assert [int(t) for t in r.stdout.split()] == tok.encode(text)


def test_llama2c_section_damage_is_one_line(engine, workdir, stories):
    """Each field of the section made wrong (the CRC-32 recomputed, so the section's own checks must catch it):
    one line and exit status 1 under the sanitizers."""
    import struct
    import zlib
    path, _ = stories
    data = path.read_bytes()
    off = export.HEADER_SIZE
    u32 = lambda at: struct.unpack_from("<I", data, at)[0]  # noqa: E731
    n = u32(off + 4)
    first = off + export.LLAMA2C_HEADER  # token 0's entry: f32 score, u32 length, "<unk>"

    def entry(i):
        p = first
        for _ in range(i):
            p += 8 + u32(p + 4)
        return p

    e300, e3, space = entry(300), entry(3), entry(410)
    twin = next(entry(j) for j in range(301, n) if u32(entry(j) + 4) == u32(e300 + 4))  # as long as token 300
    cases = [
        (off + 8, struct.pack("<I", 2), "section version 2"),
        (off + 12, struct.pack("<I", 9), "reserved field 9"),
        (off + 4, struct.pack("<I", 100), "has 100 tokens"),
        (off + 4, struct.pack("<I", n + 1), "has 513 tokens; expected 259 .. vocab_size (512)"),
        (entry(n - 1) + 4, struct.pack("<I", 1000), "token 511 runs past the section's end"),
        (off + 4, struct.pack("<I", n - 1), "bytes left after 511 tokens"),
        (off + 16 + 8, struct.pack("<i", 9999), "special token id 9999 out of range"),
        (e300, struct.pack("<f", float("nan")), "token 300's score is not a finite number"),
        (e300 + 4, struct.pack("<I", 0), "token 300 is empty"),
        (e300 + 4, struct.pack("<I", 0xFFFFFFFF), "token 300 runs past the section's end"),
        (e3 + 8, b"<0x07>", "token 3 is not the byte token <0x00>"),
        (twin + 8, data[e300 + 8:e300 + 8 + u32(e300 + 4)], "have the same text"),
        (space + 8, b"_", "no \" \" token"),
    ]
    assert data[space + 8:space + 9] == b" " and u32(space + 4) == 1
    for k, (at, patch, message) in enumerate(cases):
        bad = bytearray(data)
        bad[at:at + len(patch)] = patch
        bad[export.CRC_OFFSET:export.CRC_OFFSET + 4] = bytes(4)
        crc = zlib.crc32(bytes(bad[:export.HEADER_SIZE]), zlib.crc32(bytes(bad[export.HEADER_SIZE:])))
        bad[export.CRC_OFFSET:export.CRC_OFFSET + 4] = struct.pack("<I", crc)
        f = workdir / f"l2c_bad{k}.bin"
        f.write_bytes(bad)
        r = run(engine["asan"], f, "-g", "hi", "-n", 2, check=False)
        err = r.stderr.decode().strip().splitlines()
        assert r.returncode == 1 and len(err) == 1 and message in err[0], (message, r.stderr)

