"""
Issue #22, the engines' items: the C CLI's argument ranges (6), the 2024.10 prompt framing against
the layout's documented template (7), data.py's leftovers and memory (8), .bin files and broken
checkpoints given to infer.py and adapter headers checked against the base (9b), the page's
server headers (10), threads beside busy processes (13), REPL and CLI details (14).

Real processes on tiny models; the slowest parts (a few MB through data.py, decoding beside busy
processes) take seconds each.
"""

import os
import re
import signal
import statistics
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))
sys.path.append(str(ROOT / "infer"))

import data  # noqa: E402
import export  # noqa: E402
import import_bin  # noqa: E402
import infer  # noqa: E402
from files import read_json  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from test_infer_c import TRAIN_TEXT, make_adapter, make_checkpoint  # noqa: E402
from tokenizer import SPECIAL_TOKENS, BPETokenizer, TrieTokenizer  # noqa: E402
from locked_make import make  # noqa: E402

ENGINE = ROOT / "infer_c" / "infer"


@pytest.fixture(scope="module")
def engine():
    r = make("-C", str(ENGINE.parent), "infer")
    assert r.returncode == 0 and "warning" not in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
    return str(ENGINE)


def c_run(*args, input=None, env=None, check=True):
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    r = subprocess.run([str(ENGINE), *map(str, args)], capture_output=True, input=input, env=full_env, timeout=120)
    assert r.returncode >= 0, f"killed by signal {-r.returncode}"
    if check:
        assert r.returncode == 0, r.stderr.decode(errors="replace")
    return r


def c_ids(*args, **kw):
    return [int(t) for t in c_run(*args, "--print-ids", **kw).stdout.split()]


def py_run(*args, input=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, input=input, env=env,
                          cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults_engines")
    ck = make_checkpoint(tokens_text=TRAIN_TEXT)
    out = {"dir": d, "ck": ck, "tok": TrieTokenizer(ck["tokenizer"]["tokens"]), "pt": d / "ck.pt",
           "new": d / "m.2026.bin", "old": d / "m.2024.bin", "old_q8": d / "m.2024.q8.bin"}
    torch.save(ck, out["pt"])
    export.write_model(str(out["new"]), ck)
    export.write_model(str(out["old"]), ck, fmt="2024.10")
    export.write_model(str(out["old_q8"]), ck, "q8", fmt="2024.10")
    return out


# ---------------------------------------------------------------------------
# 6. the C CLI's argument ranges: those of infer.py, with its messages

BAD_SAMPLING = [
    (["-p", "0"], "-p: top_p must be in (0, 1] (1 = off), got 0"),
    (["-p", "-1"], "-p: top_p must be in (0, 1] (1 = off), got -1"),
    (["-p", "1.5"], "-p: top_p must be in (0, 1] (1 = off), got 1.5"),
    (["-t", "-1"], "-t: temperature must be >= 0 (0 = greedy), got -1"),
    (["-t", "inf"], "-t: temperature must be a finite number, got inf"),
    (["-r", "0"], "-r: repetition penalty must be > 0 (1 = off), got 0"),
    (["-r", "-1"], "-r: repetition penalty must be > 0 (1 = off), got -1"),
    (["-r", "nan"], "-r: repetition penalty must be a finite number, got nan"),
    (["-k", "-1"], "-k: top_k must be >= 0 (0 = off), got -1"),
    (["-n", "-5"], "-n: max new tokens must be >= 0, got -5"),
    (["-s", "-1"], "-s: seed must be in [0, 2147483647], got -1"),
    (["-s", "2147483648"], "-s: seed must be in [0, 2147483647], got 2147483648"),
]


@pytest.mark.parametrize("args,message", BAD_SAMPLING, ids=[" ".join(a) for a, _ in BAD_SAMPLING])
def test_c_cli_refuses_what_infer_py_refuses_with_its_message(engine, files, capsys, args, message):
    r = c_run(files["new"], "-g", "the fox", *args, check=False)
    assert r.returncode == 2 and r.stderr.decode() == f"error: {message}\n"
    with pytest.raises(SystemExit) as e:
        infer.parse_args(["-m", "x.pt", *args])
    assert e.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(f": error: {message}")


def test_c_cli_ids_must_be_a_clean_list(engine, files):
    for bad in ("1,,2", ",1", "1,", "1,-2", "+1", "1;2", "a", ""):
        r = c_run(files["new"], "--ids", bad, "-n", 2, check=False)
        assert r.returncode == 2 and b"--ids wants comma-separated non-negative integers" in r.stderr, bad
    want = c_ids(files["new"], "--ids", "2,10,11", "-n", 5, "-t", 0)
    assert c_ids(files["new"], "--ids", "2, 10 ,11", "-n", 5, "-t", 0) == want
    assert c_ids(files["new"], "--ids", "2 10 11", "-n", 5, "-t", 0) == want
    # the edges of the ranges are accepted
    c_run(files["new"], "--ids", "2", "-n", 3, "-t", 0, "-p", 1, "-r", 0.5, "-k", 0, "-s", 2147483647)


# ---------------------------------------------------------------------------
# 14. one set of defaults, echo, REPL commands, an answer that ends at once


def test_one_set_of_defaults_in_every_engine(engine, files):
    d = infer.parse_args(["-m", "x.pt"])
    assert (d.temperature, d.top_k, d.top_p, d.repetition_penalty, d.seed, d.max_new_tokens) == (0.8, 0, 0.95, 1.0,
                                                                                                  0, 256)
    plain = c_ids(files["new"], "--ids", "2,10", "-n", 40, "--ignore-eos")
    explicit = c_ids(files["new"], "--ids", "2,10", "-n", 40, "--ignore-eos", "-t", d.temperature, "-k", d.top_k,
                     "-p", d.top_p, "-r", d.repetition_penalty, "-s", d.seed)
    assert plain == explicit
    assert plain != c_ids(files["new"], "--ids", "2,10", "-n", 40, "--ignore-eos", "-t", 1, "-p", 1, "-s", 0)
    # continue mode prints the prompt first, as infer.py does (tests/test_train.py checks infer.py's)
    out = c_run(files["new"], "-g", "the fox", "-n", 5, "--ignore-eos").stdout.decode()
    assert out.startswith("the fox") and len(out) > len("the fox\n")
    # the page's defaults are checked in tests/test_browser.py; README and the CLI's help name them
    assert "(default 0.8)" in c_run("--help").stdout.decode() and "(default 0.95)" in c_run("--help").stdout.decode()


def test_repl_reports_unknown_commands_and_reseeds(engine, files):
    r = c_run(files["new"], "-n", 8, "-t", 1.5, input=b"/bogus\n//the fox\nthe fox\nthe fox\n/quit\n")
    err, out = r.stderr.decode(), r.stdout.decode()
    assert "unknown command /bogus (not sent to the model); the commands are:" in err and "/mode" in err
    assert err.count("tok/s]") == 3  # //the fox, the fox, the fox: three replies; /bogus none
    replies = [t.strip() for t in out.split("\n> ")][1:]
    assert replies[-1] == replies[-2]  # every message starts from the seed, as in infer.py
    r = py_run("infer.py", "-m", files["pt"], "-n", 4, "--profile", input="/bogus\n//the fox\n")
    assert r.returncode == 0, r.stderr
    assert "unknown command /bogus (not sent to the model)" in r.stdout and r.stderr.count("[profile]") == 1


def eos_checkpoint(ck):
    """Every prediction is <|eos|>: the residual stream is the token embedding (the attention and
    FFN outputs are zero), the final norm keeps only dimension 0, where every row is positive and
    <|eos|>'s row largest."""
    sd = {k: v.clone() for k, v in ck["model"].items()}
    for k in sd:
        if k.endswith("wo.weight") or k.endswith("w2.weight"):
            sd[k].zero_()
    sd["norm.weight"].zero_()[0] = 1.0
    sd["tok_embeddings.weight"][:, 0] = 1.0
    sd["tok_embeddings.weight"][3, 0] = 100.0
    return dict(ck, model=sd)


def test_an_answer_that_ends_at_once_says_so(engine, files):
    ck = eos_checkpoint(files["ck"])
    path, pt = files["dir"] / "eos.bin", files["dir"] / "eos.pt"
    export.write_model(str(path), ck)
    torch.save(ck, pt)
    message = "[no text: the model's first token was <|eos|> (end of text)]"
    for mode in ("-g", "-i"):
        r = c_run(path, mode, "the fox", "-n", 5)
        assert message in r.stderr.decode(), mode
    r = c_run(path, "-n", 5, input=b"the fox\n")
    assert message in r.stderr.decode()
    r = py_run("infer.py", "-m", pt, "--prompt", "the fox", "-n", 5)
    assert r.returncode == 0 and message in r.stderr and r.stdout == "the fox\n"


def test_gitignore_covers_the_model_files_the_readme_writes():
    readme = (ROOT / "README.md").read_text()
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", readme, re.S))
    # the model files the commands name inside the repository (those under ../ are inputs from outside it)
    found = re.findall(r"(?<![\w/.-])([\w./-]+\.(?:bin|gguf))\b", blocks)
    paths = {os.path.normpath(p) for p in found if not p.startswith("../")}
    assert {"model.bin", "adapter.bin", "model.gguf"} <= paths, paths
    r = subprocess.run(["git", "check-ignore", *sorted(paths)], cwd=ROOT, capture_output=True, text=True)
    assert sorted(r.stdout.split()) == sorted(paths), r.stdout


def test_sft_data_with_no_validation_rows_is_refused_when_written(tmp_path, capsys):
    # train.py cannot evaluate without held-out rows: data.py says so (and why) instead of writing it
    tok = TrieTokenizer.build(["What is one plus one? Two. Name a colour. Red."], 100, min_word_count=1)
    tok.save(str(tmp_path / "tok.json"))
    rows = tmp_path / "qa.jsonl"
    rows.write_text('{"question": "What is one plus one?", "answer": "Two."}\n'
                    '{"question": "Name a colour.", "answer": "Red."}\n')
    with pytest.raises(data.DataError, match="no usable validation samples .* 0 of them held out .val_ratio 0.0"):
        data.prepare_sft([rows], str(tmp_path / "sft"), str(tmp_path / "tok.json"), block_size=32, val_ratio=0.0)
    assert not (tmp_path / "sft" / "meta.json").exists()
    # every sample longer than the rows (the outside probe's --block-size 8): one line from the command, exit 2
    r = subprocess.run([sys.executable, "data.py", "sft", "--input", str(rows), "--tokenizer", str(tmp_path / "tok.json"),
                        "--block-size", "4", "--out", str(tmp_path / "sft4")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "longer than block_size 4" in r.stderr and "Traceback" not in r.stderr, r.stderr
    # --workers 0 is refused, not taken as "all cores"
    r = subprocess.run([sys.executable, "data.py", "--input", str(rows), "--workers", "0", "--out", str(tmp_path / "p")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "workers >= 1" in r.stderr and "Traceback" not in r.stderr, r.stderr


# ---------------------------------------------------------------------------
# 7. 2024.10 files are framed as the original engine did: docs/FORMAT.md's templates


def documented_templates():
    text = (ROOT / "docs" / "FORMAT.md").read_text()
    found = {(layout, mode): t for layout, mode, t in
             re.findall(r"^\* (2026\.11|2024\.10), (continue|instruct) mode: `([^`]+)`", text, re.M)}
    assert len(found) == 4, found
    shared = ROOT.parent / "shared" / "docs" / "nano-bin-2024.10.md"
    if shared.exists():  # the original layout's own words (the shared folder may be absent)
        words = " ".join(shared.read_text().split())
        assert "wraps what the user types as `<|instruct_mark|>` + text + `<|response_mark|>`" in words
        assert "there is no `<|bos|>` (id 2) in front" in words
    assert found[("2024.10", "instruct")] == "<|instruct_mark|>TEXT<|response_mark|>"
    assert found[("2024.10", "continue")] == "TEXT"
    return found


def template_ids(template, text_ids):
    ids = []
    for part in re.split(r"(<\|[a-z_]+\|>|TEXT)", template):
        if part == "TEXT":
            ids += text_ids
        elif part:
            ids.append(SPECIAL_TOKENS.index(part))
    return ids


def test_c_engine_frames_prompts_by_the_files_layout(engine, files):
    tok, text = files["tok"], "Every morning the fox"
    sampling = ("-n", 25, "-t", 1.5, "-p", 1, "-s", 3, "--ignore-eos")
    for (layout, mode), template in documented_templates().items():
        want = template_ids(template, tok.encode(text))
        for path in ((files["new"],) if layout == "2026.11" else (files["old"], files["old_q8"])):
            r = c_run(path, "-i" if mode == "instruct" else "-g", text, "--print-ids", *sampling)
            assert f"[prompt: {len(want)} tokens".encode() in r.stderr, (path, mode, r.stderr)
            assert [int(t) for t in r.stdout.split()] == c_ids(path, "--ids", ",".join(map(str, want)), *sampling)
    r = c_run(files["old"], "-g", "", check=False)
    assert r.returncode == 2 and b"2024.10 model is continued without a <|bos|>" in r.stderr


def test_infer_py_frames_imported_2024_models_as_the_original(engine, files, tmp_path):
    templates, tok, text = documented_templates(), files["tok"], "Every morning the fox"
    for fmt in ("2026.11", "2024.10"):
        for mode in ("continue", "instruct"):
            framing = "2024.10" if fmt == "2024.10" else None
            assert infer.prompt_ids(tok, text, mode == "instruct", framing) == template_ids(templates[(fmt, mode)],
                                                                                            tok.encode(text))
    # import: the fp32 weights exactly, the Q8 ones as the engine multiplies by them; the framing recorded
    imported = import_bin.read_2024(str(files["old"]))
    assert imported["prompt_format"] == "2024.10" and imported["tokenizer"] == files["ck"]["tokenizer"]
    assert all(torch.equal(imported["model"][k], v.float()) for k, v in files["ck"]["model"].items())
    q8 = import_bin.read_2024(str(files["old_q8"]))["model"]
    for k, v in files["ck"]["model"].items():
        assert (q8[k] - v).abs().max() <= v.abs().max() / 127 * 0.51 + 1e-7, k
    pt = tmp_path / "imported.pt"
    r = py_run("import_bin.py", files["old"], pt)
    assert r.returncode == 0 and pt.exists(), r.stderr
    for mode, extra in (("continue", []), ("instruct", ["-i"])):
        want = template_ids(templates[("2024.10", mode)], tok.encode(text))
        r = py_run("infer.py", "-m", pt, "--prompt", text, "-t", 0, "-n", 6, "--profile", *extra)
        assert r.returncode == 0 and f"[profile] prompt {len(want)} tokens" in r.stderr, r.stderr
        # the same greedy continuation as the C engine on the 2024.10 file
        c_out = c_run(files["old"], "-i" if extra else "-g", text, "-t", 0, "-n", 6).stdout.decode()
        assert r.stdout.strip() == c_out.strip(), mode
    r = py_run("infer.py", "-m", pt, "--prompt", "")
    assert r.returncode == 2 and "2024.10 model is continued without a <|bos|>" in r.stderr
    r = py_run("import_bin.py", files["new"], tmp_path / "x.pt")
    assert r.returncode == 2 and "only 2024.10 files are imported" in r.stderr


# ---------------------------------------------------------------------------
# 9b. infer.py and .bin files or broken checkpoints; adapter headers against the base


def test_infer_py_points_bin_files_to_the_c_engine(files, tmp_path):
    apath = tmp_path / "ad.bin"
    export.write_lora(str(apath), make_adapter(files["ck"], ["wq"]))
    for args, words in (([files["new"]], "is a Nano .bin model (layout 2026.11)"),
                        ([files["old"]], "python import_bin.py"),
                        ([files["pt"], "-l", apath], "is a Nano .bin LoRA adapter (layout 2026.11)")):
        r = py_run("infer.py", "-m", *args, "--prompt", "x")
        assert r.returncode == 2 and words in r.stderr and "./infer_c/infer" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and "weights_only" not in r.stderr
    ck = dict(files["ck"], model={k: torch.full_like(v, float("nan")) for k, v in files["ck"]["model"].items()})
    torch.save(ck, tmp_path / "nan.pt")
    r = py_run("infer.py", "-m", tmp_path / "nan.pt", "--prompt", "x")
    assert r.returncode == 2 and "holds NaN or inf values" in r.stderr and "Traceback" not in r.stderr


def patched_2026(path, out, **fields):
    """A copy of a 2026.11 file with header fields changed (export.HEADER_FIELDS names) and the CRC redone."""
    data = bytearray(Path(path).read_bytes())
    offsets = {name: (off, fmt) for off, fmt, name in export.HEADER_FIELDS}
    for name, value in fields.items():
        off, fmt = offsets[name]
        struct.pack_into("<" + fmt, data, off, value)
    struct.pack_into("<I", data, export.CRC_OFFSET, 0)
    struct.pack_into("<I", data, export.CRC_OFFSET, zlib.crc32(bytes(data[:256]), zlib.crc32(bytes(data[256:]))))
    Path(out).write_bytes(bytes(data))
    return out


def test_adapter_header_fields_are_checked_against_the_base(engine, files, tmp_path):
    ck = files["ck"]
    apath = tmp_path / "ad.bin"
    export.write_lora(str(apath), make_adapter(ck, ["wq", "w2"]))
    c_run(files["new"], "-l", apath, "--ids", "2", "-n", 2)  # the adapter as written attaches
    cfg = ck["model_config"]
    refused = [
        (dict(vocab_size=cfg["vocab_size"] + 1), "its base has vocab_size"),
        (dict(block_size=cfg["block_size"] * 2), "its base has block_size"),
        (dict(is_causal=0), "its base has is_causal 0"),
        (dict(norm_eps=1e-6), "norm_eps"),
        (dict(rope_theta=500.0), "rope_theta"),
        (dict(quant_type=800, group_size=64), "adapters are fp32"),
        (dict(tokenizer_offset=256), "tokenizer fields are set"),
        (dict(tokenizer_kind=1, tokenizer_vocab=10), "tokenizer fields are set"),
    ]
    for i, (fields, words) in enumerate(refused):
        bad = patched_2026(apath, tmp_path / f"bad{i}.bin", **fields)
        r = c_run(files["new"], "-l", bad, "--ids", "2", "-n", 2, check=False)
        assert r.returncode == 1 and words.encode() in r.stderr, (fields, r.stderr)
    # two 2024.10 files of the same shapes: nothing can tell them apart, and the engine says so
    other = make_checkpoint(tokens_text=TRAIN_TEXT, seed=7)
    old_ad = tmp_path / "ad.2024.bin"
    export.write_lora(str(old_ad), make_adapter(other, ["wq"]), "2024.10")
    r = c_run(files["old"], "-l", old_ad, "--ids", "2", "-n", 2)
    assert b"warning: neither file has a base fingerprint" in r.stderr


# ---------------------------------------------------------------------------
# 10. the page's server


def test_page_server_headers_and_no_listing(tmp_path):
    from test_browser import serve  # infer/serve.py, loaded there by its path (serve.py is the API server)
    folder = tmp_path / "page"
    (folder / "sub").mkdir(parents=True)
    (folder / "index.html").write_text((ROOT / "infer" / "index.html").read_text())
    (folder / "worker.js").write_text("'use strict';\n")
    httpd = serve.make_server(port=0, folder=str(folder), quiet=True)
    assert httpd.server_address[0] == "127.0.0.1"  # this machine only, unless told otherwise
    import threading
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        with urllib.request.urlopen(f"{base}/worker.js", timeout=10) as resp:
            h = resp.headers
        assert h["Content-Security-Policy"] == serve.page_policy(str(folder))
        assert h["Content-Security-Policy"].startswith("default-src 'none'; script-src 'self' 'wasm-unsafe-eval'")
        assert (h["X-Content-Type-Options"], h["Cross-Origin-Opener-Policy"], h["Cross-Origin-Embedder-Policy"]) == (
            "nosniff", "same-origin", "require-corp")
        assert h["Content-Type"].startswith("text/javascript")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{base}/sub/", timeout=10)
        assert e.value.code == 404
    finally:
        httpd.shutdown()
        httpd.server_close()
    readme = (ROOT / "README.md").read_text() + (ROOT / "infer" / "README.md").read_text()
    assert "python infer/serve.py" in readme and "python -m http.server" not in readme


# ---------------------------------------------------------------------------
# 13. threads beside busy processes


def test_threads_do_not_collapse_beside_busy_processes(engine, tmp_path):
    """Beside as many busy processes as there are cores, the default thread count decodes at a fair
    share of -j 1's speed (before: 2-6%, as libgomp's spinning waits kept the threads off the cores).
    Medians of 3 interleaved runs; the bound is far from both the old and the new figures."""
    cfg = ModelConfig.from_dict(read_json(str(ROOT / "config" / "model.json")))
    torch.manual_seed(0)
    path = tmp_path / "default_shape.bin"
    export.write_model(str(path), {"model_config": cfg.to_dict(), "model": Transformer(cfg).state_dict(),
                                   "tokenizer": {"type": "trie", "tokens": SPECIAL_TOKENS + list("abc ")}})
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "NANO_TUNE_THREADS", "OMP_WAIT_POLICY")}

    def rate(*extra):
        r = subprocess.run([str(ENGINE), str(path), "--ids", "2", "-n", "200", "-t", "0", "--ignore-eos", *extra],
                           capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr
        return float(re.search(r"generated: \d+ tokens, ([\d.]+) tok/s", r.stderr).group(1))

    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        time.sleep(0.5)
        default, single = [], []
        for _ in range(3):
            default.append(rate())
            single.append(rate("-j", "1"))
    finally:
        for p in busy:
            p.send_signal(signal.SIGKILL)
            p.wait()
    assert statistics.median(default) >= 0.2 * statistics.median(single), (default, single)


# ---------------------------------------------------------------------------
# 8. data.py: long documents in exact pieces, bounded memory, no leftovers


def long_line(n_chars, seed=0):
    """One line of words, numbers, punctuation, runs of spaces, special-token strings and non-ASCII."""
    rng = np.random.default_rng(seed)
    words = ["the", "fox", "ran", "Lord's", "don't", "42", "3.14", "naïve", "café", "你好", "世界", "<|bos|>",
             "<|eos|>", "  ", "   ", ",", ".", "!?", "'", "_x_", "ab", "a", "b", "é"]
    out, size = [], 0
    while size < n_chars:
        w = words[rng.integers(len(words))] + (" " if rng.random() < 0.8 else "")
        out.append(w)
        size += len(w)
    return "".join(out)


def test_pieces_of_a_long_line_tokenize_like_the_whole(monkeypatch):
    """The cut rules of _cut_finder, on texts many pieces long: the pieces give the whole's ids
    (trie, a vocabulary with awkward tokens, GPT-2 BPE) and the whole's vocabulary counts."""
    monkeypatch.setattr(data, "PIECE_CHARS", 64)
    text = long_line(20_000)
    awkward = TrieTokenizer(SPECIAL_TOKENS + sorted(set(text)) + ["a b", " b", "ab ", "  ", "'s", "x_ ", "é ", "你好 "])
    built = TrieTokenizer.build([text], 300, min_word_count=1)
    for tok in (built, awkward, BPETokenizer()):
        pieces = list(data._pieces([[text]], data._cut_finder(tok)))
        assert len(pieces) > 100 and "".join(p for p, _, _ in pieces) == text
        assert [i for p, _, _ in pieces for i in tok.encode(p)] == tok.encode(text), type(tok)
    pieces = [p for p, _, _ in data._pieces([[text]], data._cut_finder(None))]
    assert len(pieces) > 100 and TrieTokenizer.build(pieces, 300, min_word_count=1).tokens == built.tokens


def test_a_long_line_goes_through_data_py_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "PIECE_CHARS", 256)  # reading and cutting in parts of 256 characters
    text = long_line(40_000, seed=1)
    (tmp_path / "one.txt").write_text(text)
    for name, spec in (("trie", "trie"), ("bpe", "bpe")):
        meta = data.prepare_pretrain([tmp_path / "one.txt"], str(tmp_path / name), spec, 300, val_ratio=0,
                                     workers=1, progress=False)
        tok = data.load_tokenizer(str(tmp_path / name / "tokenizer.json"))
        if name == "trie":
            assert tok.tokens == TrieTokenizer.build([text], 300).tokens  # counted in pieces, the same vocabulary
        ids = np.fromfile(tmp_path / name / "train.bin", dtype=meta["dtype"]).tolist()
        assert ids == [tok.bos_id] + tok.encode(text) + [tok.eos_id], name


def test_a_long_line_is_tokenized_in_bounded_memory(tmp_path):
    """Peak RSS of data.py on a 12 MiB document without newlines, over that of a 0.1 MiB one: before,
    the whole line was read and tokenized at once (+200 MiB here; 1.16-1.3 GB at 60 MB)."""
    import bench_data_memory as bdm
    peaks = {}
    for mb in (0.1, 12):
        doc = tmp_path / f"doc{mb}.txt"
        bdm.write_document(doc, mb)
        peaks[mb], _ = bdm.peak_rss(doc, tmp_path / f"out{mb}")
    assert peaks[12] - peaks[0.1] < 64 * 2 ** 20, {k: v / 2 ** 20 for k, v in peaks.items()}


def test_a_run_killed_outright_leaves_nothing_behind(tmp_path):
    doc = tmp_path / "big.txt"
    doc.write_text((long_line(200_000, seed=2) + "\n") * 30)  # ~6 MB: pass 2 takes a while
    out = tmp_path / "ds"
    args = ["--input", str(doc), "--out", str(out), "--workers", "1"]
    assert py_run("data.py", *args).returncode == 0
    proc = subprocess.Popen([sys.executable, "data.py", *args, "--force"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    deadline = time.time() + 300
    while not (out / "val.bin.tmp").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # kill -9 while the part files are being written
    proc.wait()
    assert (out / "parts.tmp").exists() and (out / "val.bin.tmp").exists(), "the run ended before it could be killed"
    r = py_run("data.py", *args)
    assert r.returncode == 0 and "is up to date" in r.stdout, r.stdout + r.stderr
    assert "removed what an interrupted run left" in r.stderr
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    # --val-tail's split.tmp is not left behind by an up-to-date run either
    small = tmp_path / "small.txt"
    small.write_text(long_line(5000, seed=3))
    for _ in range(2):
        data.prepare_pretrain([small], str(tmp_path / "tail"), val_tail=0.1, workers=1, progress=False)
    assert not (tmp_path / "tail" / "split.tmp").exists()
