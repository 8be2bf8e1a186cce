"""
The browser engine (infer/): the committed nano.wasm against a fresh build, and the chat page in
headless Chromium (driven by Playwright) against the C engine's CLI (infer_c/infer).

Needs clang-14 + wasi-libc (the build check), and /usr/bin/chromium + the playwright package (the
page); Playwright drives the system's Chromium, its own browser downloads are never used. Without
them the tests skip, except under CI=true, where they fail: CI installs all of it (.ci/run).

Every page runs in a fresh browser context; each test checks that every request the page and its
worker made went to the local test server, and that no script error occurred. A screenshot of a
reply is saved to test-artifacts/browser_reply.png.
"""

import base64
import importlib.util
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bpe_models  # noqa: E402  (tests/: tiny GPT-2-BPE models)
import export  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from tokenizer import BPETokenizer, TrieTokenizer  # noqa: E402
from locked_make import make  # noqa: E402

INFER = ROOT / "infer"
# the page's server, infer/serve.py, loaded by its path: a plain "import serve" is the API server, serve.py
_spec = importlib.util.spec_from_file_location("page_serve", INFER / "serve.py")
serve = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve)

ENGINE_DIR = ROOT / "infer_c"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = os.environ.get("NANO_CHROMIUM", "/usr/bin/chromium")
IN_CI = os.environ.get("CI", "").lower() == "true"
# the flags of the issue: no GPU, no network services of the browser's own
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

TRAIN_TEXT = ("Once upon a time there was a little fox who lived in the forest. "
              "Every morning the fox ran to the river and drank the cold water. "
              "Then the fox went home and slept under the old tree. ") * 40
MULTILINGUAL = ("The quick brown fox jumps over the lazy dog. Naïve café, résumé. 你好，世界！我们在测试分词器。"
                "こんにちは、世界。 Привет, мир! Emoji: 😀🎉👍🏽 and CJK extension B: 𠀀𠀁𪚥. <b>bold</b> & <i>x</i> ")
TIMEOUT_MS = 30_000


def need(ok, why):
    """Skip when something is missing, but fail under CI, which installs everything."""
    if not ok:
        if IN_CI:
            pytest.fail(f"{why} (CI=true: .ci/run must install it)")
        pytest.skip(why)


# ---------------------------------------------------------------------------
# models (tiny, made here)


def trained_checkpoint():
    """A tiny model trained for ~2 s on repetitive text: confident, readable greedy output."""
    tok = TrieTokenizer.build([TRAIN_TEXT], 96)
    data = torch.tensor(tok.encode(TRAIN_TEXT))
    period = tok.encode(".")[0]
    starts = torch.tensor([0] + [i + 1 for i in range(len(data) - 70) if data[i] == period])
    cfg = ModelConfig(block_size=64, vocab_size=96, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, n_hidden=128)
    torch.manual_seed(0)
    model = Transformer(cfg)
    # windows that start with <|bos|> then a sentence, as the page's prompts do
    bpe_models.train_on_windows(model, data, starts, torch.tensor([tok.bos_id]), 100)
    return {"model_config": cfg.to_dict(), "model": model.state_dict(), "tokenizer": tok.to_dict()}


def random_checkpoint(text, seed=0, **kw):
    tok = TrieTokenizer.build([text], 10_000, min_word_count=1)
    cfg_kw = dict(block_size=48, vocab_size=len(tok.tokens) + 3, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                  n_hidden=96)
    cfg_kw.update(kw)
    cfg = ModelConfig(**cfg_kw)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    return {"model_config": cfg.to_dict(), "model": model.state_dict(), "tokenizer": tok.to_dict()}


def random_adapter(ck, rank=4, alpha=8.0, seed=1):
    cfg = ModelConfig.from_dict(ck["model_config"])
    gen = torch.Generator().manual_seed(seed)
    ad = {}
    for i in range(cfg.n_layer):
        for name, out_f, in_f in export._linears(cfg):
            ad[f"layers.{i}.{name}.lora_A"] = torch.randn(rank, in_f, generator=gen) * 0.3
            ad[f"layers.{i}.{name}.lora_B"] = torch.randn(out_f, rank, generator=gen) * 0.3
    return {"format": "nano-lora", "lora_config": {"rank": rank, "alpha": alpha, "targets": list(export.LORA_TARGETS)},
            "base": {"model_config": ck["model_config"],
                     "fingerprint": export.base_fingerprint(ck["model_config"], ck["model"])},
            "adapter": ad}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("browser")
    trained = trained_checkpoint()
    multi = random_checkpoint(MULTILINGUAL)
    # long context, so that a generation lasts long enough to be stopped, and a prompt long
    # enough to show prefill progress
    long_ctx = random_checkpoint(TRAIN_TEXT, seed=5, block_size=4096, n_layer=4, n_embd=128, n_hidden=256)
    out = {
        "fp32": d / "fox.fp32.bin", "q8": d / "fox.q8.bin", "adapter": d / "fox_adapter.bin",
        "multi": d / "multi.bin", "multi_adapter": d / "multi_adapter.bin", "long": d / "long.bin",
        "tok_multi": TrieTokenizer(multi["tokenizer"]["tokens"]),
        "tok_long": TrieTokenizer(long_ctx["tokenizer"]["tokens"]),
    }
    export.write_model(str(out["fp32"]), trained, "fp32")
    export.write_model(str(out["q8"]), trained, "q8")
    export.write_lora(str(out["adapter"]), random_adapter(trained))
    export.write_model(str(out["multi"]), multi, "fp32")
    export.write_lora(str(out["multi_adapter"]), random_adapter(multi))
    export.write_model(str(out["long"]), long_ctx, "q8")
    out["bpe_ck"] = bpe_models.trained_bpe_checkpoint()  # GPT-2's tokenizer (byte-level BPE)
    for quant in ("fp32", "q8"):
        out[f"bpe_{quant}"] = d / f"fox_bpe.{quant}.bin"
        export.write_model(str(out[f"bpe_{quant}"]), out["bpe_ck"], quant)
    data = bytearray(out["fp32"].read_bytes())
    data[len(data) // 2] ^= 0x5A  # one flipped byte in the weights: the CRC-32 catches it
    out["corrupt"] = d / "fox.corrupt.bin"
    out["corrupt"].write_bytes(data)
    out["old"] = d / "fox.2024.bin"  # the original layout: framed without <|bos|>
    export.write_model(str(out["old"]), trained, "fp32", fmt="2024.10")
    out["tok_fox"] = TrieTokenizer(trained["tokenizer"]["tokens"])
    # a hostile file name: if the page ever parsed names as HTML, this would run a script
    out["hostile"] = d / '<img src=x onerror="window.__pwned=1">.bin'
    out["hostile"].write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(300))
    return out


# ---------------------------------------------------------------------------
# the C engine, the server, the browser


@pytest.fixture(scope="module")
def cli():
    need(shutil.which("make") and (shutil.which("cc") or shutil.which("gcc")), "no C compiler")
    r = make("-C", str(ENGINE_DIR), "infer")
    assert r.returncode == 0, r.stdout + r.stderr
    binary = str(ENGINE_DIR / "infer")

    def generate(model, prompt, mode="instruct", n=40, temperature=0.0, top_k=0, top_p=1.0, rep=1.0, seed=0,
                 adapter=None, env=None):
        args = [binary, str(model), "-i" if mode == "instruct" else "-g", prompt, "-n", str(n), "-t", str(temperature),
                "-k", str(top_k), "-p", str(top_p), "-r", str(rep), "-s", str(seed), "-j", "1"]
        if adapter:
            args += ["-l", str(adapter)]
        r = subprocess.run(args, capture_output=True, timeout=60, env=dict(os.environ, **(env or {})))
        assert r.returncode == 0, r.stderr.decode(errors="replace")
        assert r.stdout.endswith(b"\n")
        out = r.stdout[:-1].decode()  # the CLI ends the reply with a newline of its own
        if mode != "instruct":  # -g prints the prompt first; the page shows it apart from the reply
            assert out.startswith(prompt)
            out = out[len(prompt):]
        return out

    return generate


@pytest.fixture(scope="module")
def server():
    # the page's own server (python infer/serve.py) on a free port of 127.0.0.1: the page runs
    # under its real headers (CSP for the worker too, cross-origin isolation)
    httpd = serve.make_server("127.0.0.1", 0, quiet=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        need(False, "the playwright package is not installed (pip install playwright)")
    need(os.path.exists(CHROMIUM), f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as p:
        # launch() gives every run a fresh temporary profile (user-data dir)
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    requests, errors = [], []
    context.on("request", lambda r: requests.append(r.url))  # the page's and its worker's
    pg = context.new_page()
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("console", lambda m: m.type == "error" and errors.append(m.text))
    pg.set_default_timeout(TIMEOUT_MS)
    # (predicates below are written as functions: a bare expression would be eval()ed in the page,
    # which its Content-Security-Policy forbids)
    pg.goto(f"{server}/index.html")
    pg.wait_for_function("() => document.getElementById('status').textContent.startsWith('Engine ready')")
    yield pg
    context.close()
    assert requests, "no request recorded"
    outside = [u for u in requests if not u.startswith(server + "/")]
    assert not outside, f"requests that left the test server: {outside}"
    assert not errors, errors


# ---------------------------------------------------------------------------
# page helpers


def load(page, path, kind="model", expect_error=False):
    """Picks a file with the model or adapter picker; waits for the result."""
    page.evaluate("document.getElementById('notice').hidden = true")
    page.set_input_files("#model-file" if kind == "model" else "#adapter-file", str(path))
    if expect_error:
        page.wait_for_selector("#notice.error:not([hidden])")
        return page.text_content("#notice")
    page.wait_for_function("([id, name]) => document.getElementById(id).textContent === name",
                           arg=[f"{kind}-name", Path(path).name])
    page.wait_for_function("() => !document.getElementById('send').disabled")
    return None


def ask(page, text, mode="instruct", temperature=0, top_k=0, top_p=1, rep=1, max_new=40, seed=0):
    """Sends a message with these settings; waits for the reply; returns the reply's fields."""
    page.check(f"input[name=mode][value={mode}]")
    for sel, v in (("#temperature", temperature), ("#top-k", top_k), ("#top-p", top_p), ("#rep-penalty", rep),
                   ("#max-new", max_new), ("#seed", seed)):
        page.fill(sel, str(v))
    n = page.locator(".msg.model").count()
    page.fill("#prompt", text)
    page.click("#send")
    page.wait_for_function(f"() => document.querySelectorAll('.msg.model[data-reason]').length > {n}")
    return page.evaluate("""() => {
        const box = [...document.querySelectorAll('.msg.model')].pop();
        const user = [...document.querySelectorAll('.msg.user .text')].pop();
        return {gen: box.querySelector('.gen').textContent, reason: box.dataset.reason,
                tok_s: parseFloat(box.dataset.tokS), meta: box.querySelector('.meta').textContent,
                user: user.textContent};
    }""")


def drop(page, path):
    """Drops a file on the drop zone as a user dragging it from the desktop would."""
    page.evaluate("""([b64, name]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], name));
        document.getElementById('dropzone').dispatchEvent(
            new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
    }""", [base64.b64encode(Path(path).read_bytes()).decode(), Path(path).name])


# ---------------------------------------------------------------------------
# the build


def test_committed_wasm_matches_a_fresh_build(tmp_path):
    need(shutil.which("clang-14") and Path("/usr/lib/wasm32-wasi/libc.a").exists(),
         "clang-14 and wasi-libc are not installed")
    out = tmp_path / "nano.wasm"
    r = make("-B", "-C", str(INFER), f"WASM={out}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "warning" not in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
    version = subprocess.run(["clang-14", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    assert out.read_bytes() == (INFER / "nano.wasm").read_bytes(), (
        "infer/nano.wasm differs from a fresh build: run make -C infer and commit the result (the committed "
        f"file comes from Debian 12's clang-14 14.0.6 and wasi-libc 0.0~git20220510; this is {version})")


# ---------------------------------------------------------------------------
# the page


@pytest.mark.parametrize("quant", ["fp32", "q8"])
def test_greedy_output_equals_the_c_engine(page, files, cli, quant):
    load(page, files[quant])
    assert quant in page.text_content("#model-info")
    prompt = "Once upon a time there was"
    for mode in ("instruct", "continue"):
        got = ask(page, prompt, mode=mode, max_new=40)
        assert got["gen"] == cli(files[quant], prompt, mode=mode, n=40), mode
        assert got["gen"] and got["reason"] in ("max", "eos", "full") and got["tok_s"] > 0
    if quant == "fp32":
        # sampling with every setting on: the same seed gives the same RNG stream as the CLI's
        kw = dict(temperature=0.9, top_k=12, top_p=0.9, rep=1.2, seed=1234)
        got = ask(page, prompt, mode="continue", max_new=50, **kw)
        ref = cli(files[quant], prompt, mode="continue", n=50, temperature=0.9, top_k=12, top_p=0.9, rep=1.2, seed=1234)
        assert got["gen"] == ref and "seed 1234" in got["meta"]
        # a temperature below model.MIN_TEMPERATURE is greedy in the page too (1e-40 gave noise before)
        for tiny in ("1e-40", "5e-7"):
            assert ask(page, prompt, mode="continue", max_new=40, temperature=tiny, seed=3)["gen"] == \
                cli(files[quant], prompt, mode="continue", n=40), tiny
        # a reply to look at
        page.click("#clear")
        ask(page, "Once upon a time", mode="continue", max_new=48)
        ask(page, "Where did the fox sleep?", mode="instruct", max_new=24)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "browser_reply.png"), full_page=True)


@pytest.mark.parametrize("quant", ["fp32", "q8"])
def test_bpe_model_greedy_output_equals_the_c_engine_and_pytorch(page, files, cli, quant):
    """A GPT-2-BPE model: its special ids come from the file, its replies hold characters that span
    several tokens (the worker's streaming TextDecoder joins them), and the text is PyTorch's."""
    load(page, files[f"bpe_{quant}"])
    assert "BPE" in page.text_content("#model-info")
    tok = BPETokenizer()
    model = Transformer(ModelConfig.from_dict(files["bpe_ck"]["model_config"]))
    model.load_state_dict(files["bpe_ck"]["model"])
    for prompt, mode in (("Every morning the fox", "continue"), ("the fox went home", "instruct")):
        got = ask(page, prompt, mode=mode, max_new=48)
        assert got["user"] == prompt  # byte-level BPE: every text round-trips
        assert got["gen"] == cli(files[f"bpe_{quant}"], prompt, mode=mode, n=48), mode
        prompt_ids = [tok.bos_id] + ([tok.instruct_id] if mode == "instruct" else []) + tok.encode(prompt) + \
            ([tok.response_id] if mode == "instruct" else [])
        ids = model.generate(prompt_ids, max_new_tokens=48, temperature=0, eos_id=tok.eos_id)
        assert got["gen"] == tok.decode(ids), mode


def test_batched_prompt_equals_the_c_engine_token_by_token(page, files, cli):
    """The page reads a prompt of several batches (wa_feed_batch, 64 tokens each) and answers as the CLI
    does when it feeds the prompt one token at a time (NANO_PREFILL_ROWS=1), and as its batched prefill."""
    load(page, files["long"])  # Q8, a 4096-token context
    prompt = TRAIN_TEXT[:800]  # ~190 tokens: three batches, the last one ragged
    assert len(files["tok_long"].encode(prompt)) > 2 * 64
    got = ask(page, prompt, mode="continue", max_new=30)
    assert got["gen"] == cli(files["long"], prompt, mode="continue", n=30, env={"NANO_PREFILL_ROWS": "1"})
    assert got["gen"] == cli(files["long"], prompt, mode="continue", n=30)
    assert got["gen"] and got["reason"] == "max"


def test_adapter_attach_changes_and_detach_restores(page, files, cli):
    load(page, files["fp32"])
    prompt = "Every morning the fox"
    base = ask(page, prompt, mode="continue")["gen"]
    drop(page, files["adapter"])  # routed to the adapter loader by its header
    page.wait_for_function("() => document.getElementById('adapter-name').textContent === 'fox_adapter.bin'")
    page.wait_for_function("() => document.getElementById('adapter-on').checked && !document.getElementById('adapter-on').disabled")
    with_adapter = ask(page, prompt, mode="continue")["gen"]
    assert with_adapter != base
    assert with_adapter == cli(files["fp32"], prompt, mode="continue", adapter=files["adapter"])
    page.uncheck("#adapter-on")
    page.wait_for_function("() => !document.getElementById('adapter-on').disabled")
    assert ask(page, prompt, mode="continue")["gen"] == base
    page.check("#adapter-on")
    page.wait_for_function("() => !document.getElementById('adapter-on').disabled")
    assert ask(page, prompt, mode="continue")["gen"] == with_adapter
    # the same adapter on the Q8 export of the same checkpoint (same base fingerprint): stays attached
    load(page, files["q8"])
    assert page.is_checked("#adapter-on")
    assert ask(page, prompt, mode="continue")["gen"] == cli(files["q8"], prompt, mode="continue",
                                                           adapter=files["adapter"])
    # adapter first, model second: attached as soon as the model is there
    page.reload()
    page.wait_for_function("() => document.getElementById('status').textContent.startsWith('Engine ready')")
    page.set_input_files("#adapter-file", str(files["adapter"]))
    page.wait_for_function("() => document.getElementById('status').textContent.includes('load a model to use it')")
    load(page, files["fp32"])
    assert page.is_checked("#adapter-on")
    assert ask(page, prompt, mode="continue")["gen"] == with_adapter


def test_bad_files_give_clear_errors_and_the_page_keeps_working(page, files, cli):
    # nothing loaded yet: a corrupt model is refused, then a good one loads
    msg = load(page, files["corrupt"], expect_error=True)
    assert "fox.corrupt.bin" in msg and "checksum mismatch" in msg and "corrupted" in msg
    assert "--no-verify" not in msg  # the CLI's hint means nothing here
    assert page.is_disabled("#send")
    load(page, files["fp32"])
    prompt = "Then the fox"
    ref = cli(files["fp32"], prompt)
    assert ask(page, prompt)["gen"] == ref
    # a file that is not a Nano .bin, with a name made to inject HTML: shown as text, refused
    msg = load(page, files["hostile"], expect_error=True)
    assert 'onerror="window.__pwned=1"' in msg and "not a Nano .bin file" in msg
    assert page.evaluate("document.querySelectorAll('img').length === 0 && window.__pwned === undefined")
    # an adapter in the model slot, a model in the adapter slot, an adapter made for another model
    assert "adapter picker" in load(page, files["adapter"], expect_error=True)
    assert "not a LoRA adapter" in load(page, files["fp32"], "adapter", expect_error=True)
    msg = load(page, files["multi_adapter"], "adapter", expect_error=True)
    assert "does not match the model" in msg
    # the model loaded first is still there and still gives the same reply
    assert page.text_content("#model-name") == "fox.fp32.bin"
    assert page.text_content("#adapter-name") == "none" and page.is_disabled("#adapter-on")
    assert ask(page, prompt)["gen"] == ref


def test_emoji_and_cjk_round_trip(page, files, cli):
    load(page, files["multi"])
    text = "Emoji 😀🎉👍🏽, CJK 你好，世界 and 𠀀𪚥 (outside the BMP), <b>not bold</b> & <i>x</i>"
    tok = files["tok_multi"]
    expected_echo = tok.decode(tok.encode(text))
    assert "😀" in expected_echo and "𪚥" in expected_echo and "你好" in expected_echo
    for mode in ("continue", "instruct"):
        got = ask(page, text, mode=mode, max_new=30)
        assert got["user"] == expected_echo  # what the model saw, decoded, as the page shows it
        assert got["gen"] == cli(files["multi"], text, mode=mode, n=30)
    # the random model's vocabulary is all of the text above: its output has such characters too
    assert page.evaluate("document.querySelectorAll('#conversation b, #conversation i').length") == 0


def test_stop_interrupts_and_prefill_shows_progress(page, files):
    load(page, files["long"])
    # the 20th streamed token clicks Stop at once (a Playwright click takes longer than the rest of
    # this generation, about 2700 tokens at a few thousand tokens/s)
    page.evaluate("""() => {
        window.__msgs = [];
        worker.addEventListener('message', (e) => {
            __msgs.push(e.data.type);
            if (e.data.type === 'token' && __msgs.filter((t) => t === 'token').length === 20) {
                document.getElementById('stop').click();
            }
        });
    }""")
    page.check("input[name=mode][value=continue]")
    page.fill("#temperature", "0")
    page.fill("#max-new", "4000")
    page.fill("#prompt", TRAIN_TEXT[:6000])  # ~1400 tokens: prefill takes long enough to report progress
    page.click("#send")
    page.wait_for_selector(".msg.model[data-reason]")
    assert page.locator(".msg.model").last.get_attribute("data-reason") == "stopped"
    msgs = page.evaluate("__msgs")
    assert "progress" in msgs[:msgs.index("token")]
    assert msgs.count("token") < 2000, msgs.count("token")  # the context would hold ~2680
    status = page.text_content("#status")
    assert status.startswith("Done: ") and "tok/s (stopped)" in status, status
    assert page.is_enabled("#send") and page.is_disabled("#stop")
    # and the next message works as usual
    got = ask(page, "Once upon a time", mode="continue", max_new=5)
    assert got["reason"] == "max" and got["gen"]


def test_settings_have_the_cli_defaults_and_ranges(page, files):
    """The page's defaults are infer.py's; out-of-range settings are refused with the CLIs' messages
    and nothing is sent to the engine."""
    import infer
    defaults = infer.parse_args(["-m", "x.pt"])
    for sel, want in (("#temperature", defaults.temperature), ("#top-k", defaults.top_k), ("#top-p", defaults.top_p),
                      ("#rep-penalty", defaults.repetition_penalty), ("#max-new", defaults.max_new_tokens),
                      ("#seed", defaults.seed)):
        assert float(page.input_value(sel)) == want, sel
    load(page, files["fp32"])
    cases = [("#top-p", "0", "top_p must be in (0, 1] (1 = off), got 0"),
             ("#top-p", "-1", "top_p must be in (0, 1] (1 = off), got -1"),
             ("#temperature", "-1", "temperature must be >= 0 (0 = greedy), got -1"),
             ("#rep-penalty", "0", "repetition penalty must be > 0 (1 = off), got 0"),
             ("#rep-penalty", "-1", "repetition penalty must be > 0 (1 = off), got -1"),
             ("#top-k", "-2", "top_k must be >= 0 (0 = off), got -2"),
             ("#seed", "-1", "seed must be in [0, 2147483647], got -1")]
    for sel, value, message in cases:
        page.reload()
        page.wait_for_function("() => document.getElementById('status').textContent.startsWith('Engine ready')")
        load(page, files["fp32"])
        page.fill(sel, value)
        page.fill("#prompt", "Then the fox")
        page.click("#send")
        page.wait_for_selector("#notice.error:not([hidden])")
        assert page.text_content("#notice") == f"Settings: {message}", sel
        assert page.locator(".msg").count() == 0  # nothing was sent
    # valid settings again: the message goes, the reply comes
    assert ask(page, "Then the fox", max_new=4, seed=5)["gen"]
    assert page.is_hidden("#notice")


def test_2024_layout_is_framed_like_the_original_engine(page, files):
    """A 2024.10 file: the page feeds <|instruct_mark|>text<|response_mark|> and text, no <|bos|>
    (../shared/docs/nano-bin-2024.10.md), exactly the ids that --ids gives the CLI."""
    load(page, files["old"])
    assert "layout 2024.10" in page.text_content("#model-info")
    tok, prompt = files["tok_fox"], "Every morning the fox"
    sampling = dict(temperature=1.5, top_k=0, top_p=1, rep=1, seed=77)
    for mode, ids in (("instruct", [4] + tok.encode(prompt) + [5]), ("continue", tok.encode(prompt))):
        got = ask(page, prompt, mode=mode, max_new=30, **sampling)
        r = subprocess.run([str(ENGINE_DIR / "infer"), str(files["old"]), "--ids", ",".join(map(str, ids)),
                            "-n", "30", "-t", "1.5", "-p", "1", "-s", "77", "-j", "1"], capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert got["gen"] == r.stdout.decode()[:-1], mode
        assert f"prompt {len(ids)} tokens" in got["meta"]
    page.check("input[name=mode][value=continue]")
    page.fill("#prompt", "")
    page.click("#send")  # an empty continuation has nothing to start from without <|bos|>
    page.wait_for_selector("#notice.error:not([hidden])")
    assert "2024.10 model is continued without a <|bos|>" in page.text_content("#notice")


def test_server_sends_the_policy_to_the_worker_and_isolates(browser, server):
    """infer/serve.py: CSP (from the page's <meta>), nosniff and cross-origin isolation on every
    response, so the worker runs under the page's policy too (http.server sends none of it)."""
    import urllib.request
    policy = serve.page_policy()
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
    for name, ctype in (("index.html", "text/html"), ("worker.js", "text/javascript"), ("app.js", "text/javascript"),
                        ("nano.wasm", "application/wasm"), ("style.css", "text/css")):
        with urllib.request.urlopen(f"{server}/{name}", timeout=10) as resp:
            h = resp.headers
        assert h["Content-Security-Policy"] == policy, name
        assert h["X-Content-Type-Options"] == "nosniff" and h["Content-Type"].startswith(ctype), name
        assert h["Cross-Origin-Opener-Policy"] == "same-origin" and h["Cross-Origin-Embedder-Policy"] == "require-corp"
    context = browser.new_context()
    try:
        pg = context.new_page()
        pg.goto(f"{server}/")
        pg.wait_for_function("() => document.getElementById('status').textContent.startsWith('Engine ready')")
        assert pg.evaluate("() => self.crossOriginIsolated")
        worker = pg.workers[0]
        assert worker.evaluate("() => self.crossOriginIsolated")
        # the worker runs under the policy too: a script from a data: URL and a request to another
        # origin are refused (Playwright's own evaluate() bypasses CSP, so look at the violations)
        got = worker.evaluate("""async () => {
            const seen = [];
            self.addEventListener('securitypolicyviolation', (e) => seen.push(e.violatedDirective));
            try { importScripts('data:text/javascript,self.__ran = 1'); } catch (e) { seen.push(e.name); }
            try { await fetch('http://127.0.0.1:9/'); } catch (e) { seen.push(e.name); }
            await new Promise((resolve) => setTimeout(resolve, 200));
            return {seen, ran: self.__ran === 1};
        }""")
        assert not got["ran"] and {"script-src-elem", "connect-src"} <= set(got["seen"]), got
    finally:
        context.close()


# ---------------------------------------------------------------------------
# a llama2.c model (llama2c.py): its tokenizer (kind 3) in the page


def test_llama2c_model_continues_as_run_c(page, cli, tmp_path):
    """stories260K (Karpathy's llama2.c, with tok512.bin), exported: the page's greedy continuation is run.c's own
    output (-t 0 -n 200: 200 positions, <s> and the prompt's tokens included), and it stops at <s> as run.c does."""
    import llama2c
    from tokenizer import Llama2cTokenizer
    shared = ROOT.parent / "shared" / "data" / "llama2c"
    if not (shared / "stories260K.bin").exists():
        pytest.fail(f"{shared} is missing: the llama2.c tests need ../shared/data/llama2c/ (../shared/README.md)")
    ck = llama2c.load_llama2c(shared / "stories260K.bin")
    path = tmp_path / "stories260K.bin"
    export.write_model(str(path), ck, "fp32")
    load(page, path)
    prompt = "Once upon a time"
    golden = (shared / "greedy_once_upon_a_time.txt").read_text()
    n_new = 200 - (1 + len(Llama2cTokenizer(ck["tokenizer"]).encode(prompt))) + 1
    got = ask(page, prompt, mode="continue", max_new=n_new)
    assert prompt + got["gen"] + "\n" == golden and got["reason"] == "max"
    # "The end" ends its story after 378 tokens, where the model writes <s>: the page stops there, as the CLI does
    got = ask(page, "The end", mode="continue", max_new=500)
    assert got["reason"] == "eos" and got["gen"] == cli(path, "The end", mode="continue", n=500)
