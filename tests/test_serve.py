"""
serve.py against real clients on localhost: the official `openai` package and plain httpx, talking to
a live server (a subprocess) on a tiny random model. Its answers are infer.py's for the same prompt and
settings; bad requests get OpenAI's error JSON and leave the server serving; 8 streaming clients at
once get their single-client answers; a client that leaves mid-stream frees its row at once; --api-key.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import infer  # noqa: E402
from test_infer_c import TRAIN_TEXT, make_checkpoint  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
BLOCK = 2048  # long enough that a client can leave while its answer still has far to go
PROMPTS = ["the fox", "Once upon a time", "river", "cold water", "a little fox", "slept", "home", "tree"]


def tiny_checkpoint(path):
    """A random model whose greedy answers are varied text (weights of std 0.3: with the usual 0.02 the
    tied head repeats the last token), saved as train.py saves one."""
    ck = make_checkpoint(TRAIN_TEXT, block_size=BLOCK, seed=0)
    g = torch.Generator().manual_seed(0)
    for tensor in ck["model"].values():
        if tensor.dim() == 2:
            tensor.normal_(0, 0.3, generator=g)
    torch.save(ck, path)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, checkpoint, *extra):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "-m", str(checkpoint),
                                      "--port", str(self.port), *extra],
                                     cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve.py exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("serve.py did not answer /health within 60 s")

    def health(self):
        return httpx.get(self.url + "/health", timeout=5).json()

    def stop(self, sig=signal.SIGKILL):
        self.proc.send_signal(sig)
        self.proc.wait(timeout=10)
        return self.proc.stdout.read()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "ck.pt"
    tiny_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def server(checkpoint):
    s = Server(checkpoint, "--max-body", "65536")
    yield s
    log = s.stop()
    assert "Traceback" not in log, log  # no request, good or bad, made the server fail


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(checkpoint):
    """infer.py's generation, in process: (model, tok) and a function giving its text and token ids."""
    model, tok, _ = infer.load(SimpleNamespace(model=str(checkpoint), lora=None, device="cpu"))

    def answer(prompt, n, instruct=True, temperature=0.0, seed=0, top_k=0, top_p=0.95, repetition_penalty=1.0):
        args = SimpleNamespace(max_new_tokens=n, temperature=temperature, top_k=top_k, top_p=top_p,
                               repetition_penalty=repetition_penalty, seed=seed, profile=False)
        text = infer.generate_text(model, tok, prompt, args, instruct, stream=False)
        ids = infer.prompt_ids(tok, prompt, instruct)
        out = model.generate(ids, n, temperature, top_k, top_p, repetition_penalty, tok.eos_id,
                             generator=torch.Generator().manual_seed(seed))
        assert tok.decode(out) == text
        return text, len(ids), len(out)

    return answer


def chat(client, prompt, stream=False, **kw):
    """(text, finish_reason, usage) of one chat request through the openai client."""
    kw.setdefault("temperature", 0)
    messages = [{"role": "user", "content": prompt}]
    if not stream:
        r = client.chat.completions.create(model="nano-ck", messages=messages, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage
    text, finish, usage = "", None, None
    for chunk in client.chat.completions.create(model="nano-ck", messages=messages, stream=True, **kw):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    return text, finish, usage


# ---------------------------------------------------------------------------
# The answers are infer.py's


def test_chat_and_completion_equal_infer_py_command_line(client, checkpoint):
    def cli(*args):
        r = subprocess.run([sys.executable, "infer.py", "-m", str(checkpoint), *args, "-t", "0", "-n", "24"],
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert r.stdout.endswith("\n")
        return r.stdout[:-1]

    expected = cli("-i", "--prompt", "the fox")
    assert len(expected) > 10
    assert chat(client, "the fox", max_tokens=24)[0] == expected
    assert chat(client, "the fox", stream=True, max_tokens=24)[0] == expected

    printed = cli("--prompt", "Once upon a time")  # continuation mode prints the prompt first
    assert printed.startswith("Once upon a time")
    continuation = printed[len("Once upon a time"):]
    r = client.completions.create(model="nano-ck", prompt="Once upon a time", temperature=0, max_tokens=24)
    assert r.choices[0].text == continuation and len(continuation) > 10
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="nano-ck", prompt="Once upon a time", temperature=0, max_tokens=24, stream=True) if c.choices)
    assert streamed == continuation


@pytest.mark.parametrize("prompt", ["river", "forest"])  # forest's greedy answer ends at <|eos|> (9 tokens)
def test_usage_and_finish_reason(client, reference, prompt):
    text, prompt_tokens, completion_tokens = reference(prompt, 30)
    for stream in (False, True):
        got, finish, usage = chat(client, prompt, stream=stream, max_tokens=30)
        assert got == text
        assert (usage.prompt_tokens, usage.completion_tokens) == (prompt_tokens, completion_tokens)
        assert usage.total_tokens == prompt_tokens + completion_tokens
        assert finish == ("length" if completion_tokens == 30 else "stop")
    assert prompt != "forest" or completion_tokens < 30


def test_sampling_with_a_seed_and_nano_extensions_equal_infer_py(client, reference):
    extensions = dict(top_k=20, repetition_penalty=1.3)
    # a seed whose answer does not end at once (an empty answer would make the equalities weak)
    seed = next(s for s in range(1234, 1334) if reference("a little fox", 30, temperature=0.9, top_p=0.8, seed=s,
                                                          **extensions)[0])
    settings = dict(temperature=0.9, top_p=0.8, seed=seed)
    text = reference("a little fox", 30, **settings, **extensions)[0]
    for stream in (False, True):
        assert chat(client, "a little fox", stream=stream, max_tokens=30, extra_body=extensions, **settings)[0] == text
    other_seed = reference("a little fox", 30, **{**settings, "seed": 99}, **extensions)[0]
    assert other_seed != text  # the seed matters, so the equality above is not luck
    r = client.completions.create(model="nano-ck", prompt="cold", max_tokens=20, extra_body=extensions, **settings)
    assert r.choices[0].text == reference("cold", 20, instruct=False, **settings, **extensions)[0]


def test_max_tokens_defaults_to_and_is_capped_by_the_context(client, reference, server):
    long_prompt = "the fox ran to the river " * 300  # 1,801 tokens of a 2,048-token context
    text, prompt_tokens, completion_tokens = reference(long_prompt, 10 ** 6, instruct=False)
    assert completion_tokens == BLOCK - prompt_tokens + 1  # as model.generate: up to a full context
    for max_tokens in (None, 10 ** 6):
        r = client.completions.create(model="nano-ck", prompt=long_prompt, temperature=0, max_tokens=max_tokens)
        assert r.choices[0].text == text
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_tokens, completion_tokens)
        assert r.choices[0].finish_reason == "length"


def test_max_tokens_0_is_answered_at_once_by_an_idle_server(client, server):
    """An empty answer takes no row; on an idle server it was sent only when another request woke the
    scheduler (an outside probe's hang)."""
    deadline = time.monotonic() + 10
    while server.health()["active"] or server.health()["waiting"]:  # idle: nothing else would wake it
        assert time.monotonic() < deadline
        time.sleep(0.05)
    quick = client.with_options(timeout=10)
    r = quick.completions.create(model="nano-ck", prompt="the fox", max_tokens=0)
    assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == ("", "length", 0)
    for stream in (False, True):
        text, finish, usage = chat(quick, "the fox", stream=stream, max_tokens=0)
        assert (text, finish, usage.completion_tokens) == ("", "length", 0)


def test_stop_strings_cut_the_answer_streaming_or_not(client, reference):
    full = reference("tree", 40)[0]
    stop = full[12:15]
    cut = full[:full.find(stop)]
    for stream in (False, True):
        text, finish, usage = chat(client, "tree", stream=stream, max_tokens=40, stop=[stop, "never in it"])
        assert (text, finish) == (cut, "stop")
        assert usage.completion_tokens < 40
    assert chat(client, "tree", max_tokens=40, stop="never in it") == chat(client, "tree", max_tokens=40)


def test_conversation_with_system_and_assistant_turns_is_framed_as_chat_ids(client, checkpoint, server):
    model, tok, _ = infer.load(SimpleNamespace(model=str(checkpoint), lora=None, device="cpu"))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the fox"},
                {"role": "assistant", "content": "ran"}, {"role": "user", "content": "where?"}]
    ids = infer.chat_ids(tok, messages, model.prompt_format)
    out = model.generate(ids, 20, temperature=0, eos_id=tok.eos_id)
    r = client.chat.completions.create(model="nano-ck", messages=messages, temperature=0, max_tokens=20)
    assert r.choices[0].message.content == tok.decode(out)
    assert r.usage.prompt_tokens == len(ids)


def test_models_endpoint(client, server):
    assert [m.id for m in client.models.list().data] == ["nano-ck"]
    assert client.models.retrieve("nano-ck").id == "nano-ck"


# ---------------------------------------------------------------------------
# Bad requests: OpenAI's error JSON, and the server goes on serving


def post(server, path, body=None, raw=None, **kw):
    content = raw if raw is not None else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json"},
                      timeout=30, **kw)


def good(**kw):
    return {"model": "nano-ck", "messages": [{"role": "user", "content": "the fox"}], "max_tokens": 5, **kw}


BAD = [  # (body or raw bytes, status, param, code)
    (b"{not json", 400, None, None),
    (b"[1, 2]", 400, None, None),
    (b"\xff\xfe", 400, None, None),
    (b"[" * 30_000 + b"]" * 30_000, 400, None, None),  # nested past Python's parser (under --max-body)
    (good(model="gpt-4"), 404, "model", "model_not_found"),
    ({"messages": [{"role": "user", "content": "x"}]}, 400, "model", None),
    (good(temperature=-1), 400, "temperature", None),
    (good(temperature="hot"), 400, "temperature", None),
    (good(top_p=0), 400, "top_p", None),
    (good(top_k=-3), 400, "top_k", None),
    (good(top_k=2.5), 400, "top_k", None),
    (good(repetition_penalty=0), 400, "repetition_penalty", None),
    (good(seed=-1), 400, "seed", None),
    (good(seed=2 ** 31), 400, "seed", None),
    (good(max_tokens=-1), 400, "max_tokens", None),
    (good(max_tokens=True), 400, "max_tokens", None),
    (good(n=2), 400, "n", None),
    (good(presence_penalty=0.5), 400, "presence_penalty", None),
    (good(stop=["a", "b", "c", "d", "e"]), 400, "stop", None),
    (good(stop=[""]), 400, "stop", None),
    (good(stop=["x" * 1001]), 400, "stop", None),  # serve.MAX_STOP_CHARS: a bound on the scheduler's work
    (good(stop=["ok", "y" * 50_000]), 400, "stop", None),
    (good(stop=5), 400, "stop", None),
    (good(stream="yes"), 400, "stream", None),
    (good(messages=[]), 400, "messages", None),
    (good(messages="hello"), 400, "messages", None),
    (good(messages=[{"role": "robot", "content": "hi"}]), 400, "messages", None),
    (good(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]), 400, "messages", None),
    (good(messages=[{"role": "user", "content": 5}]), 400, "messages", None),
    (good(messages=[{"role": "user", "content": "fox " * 3000}]), 400, "messages", "context_length_exceeded"),
]


@pytest.mark.parametrize("body, status, param, code", BAD)
def test_bad_chat_requests_get_openai_errors_and_the_server_keeps_serving(server, client, body, status, param, code):
    r = post(server, "/v1/chat/completions", raw=body) if isinstance(body, bytes) else \
        post(server, "/v1/chat/completions", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"]) == (param, code)
    assert "Traceback" not in r.text
    assert chat(client, "the fox", max_tokens=5)[1] in ("stop", "length")


def test_bad_completion_requests_and_unknown_paths(server, client):
    for body, param in (({"model": "nano-ck", "prompt": 5}, "prompt"), ({"model": "nano-ck"}, "prompt"),
                        ({"model": "nano-ck", "prompt": "x", "temperature": float("nan")}, "temperature")):
        r = post(server, "/v1/completions", body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = post(server, "/v1/completions", {"model": "nano-ck", "prompt": "fox " * 3000})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = post(server, "/v1/nothing", {})
    assert r.status_code == 404 and r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/chat/completions", timeout=10)
    assert r.status_code == 405 and r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError) as e:  # the client reads the error JSON
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "model_not_found"
    # still serving: greedy (a sampled first token may be <|eos|>: 0 tokens by chance), as chat() asks
    assert client.completions.create(model="nano-ck", prompt="x", max_tokens=3, temperature=0).usage.completion_tokens > 0


def test_oversize_bodies_get_413(server, client):
    big = json.dumps(good(messages=[{"role": "user", "content": "x" * 70_000}])).encode()
    assert post(server, "/v1/chat/completions", raw=big).status_code == 413  # announced by Content-Length

    def chunked():  # no Content-Length: the server counts what arrives
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]

    r = httpx.post(server.url + "/v1/chat/completions", content=chunked(), timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert chat(client, "the fox", max_tokens=5)[2].completion_tokens > 0


# ---------------------------------------------------------------------------
# Several clients at once


def test_eight_streaming_clients_get_their_single_client_answers_in_one_batch(server, client, reference):
    expected = {p: reference(p, 40)[0] for p in PROMPTS}
    most_active, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            most_active[0] = max(most_active[0], server.health()["active"])
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            got = dict(zip(PROMPTS, pool.map(
                lambda p: chat(client, p, stream=True, max_tokens=40)[0], PROMPTS)))
    finally:
        done.set()
        watcher.join()
    assert got == expected
    assert most_active[0] > 1  # decoded together, not one after another


def test_a_client_that_leaves_mid_stream_frees_its_row_and_stalls_no_one(server, client, reference):
    expected = {p: reference(p, 40)[0] for p in PROMPTS[:3]}
    body = {"model": "nano-ck", "prompt": "the fox", "temperature": 0, "max_tokens": 1900, "ignore_eos": True,
            "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body) as r:
            chunks = r.iter_lines()
            assert next(chunks).startswith("data: ") and next(chunks) == ""  # one event
            with ThreadPoolExecutor(3) as pool:
                others = pool.map(lambda p: chat(client, p, stream=True, max_tokens=40)[0], expected)
                assert server.health()["active"] >= 1
                left_at = time.monotonic()
                r.close()  # leave after the first chunk, ~1,900 tokens before the end
                assert dict(zip(expected, others)) == expected
    while server.health()["active"]:
        assert time.monotonic() - left_at < 5, "the row of a client that left is still decoding"
        time.sleep(0.01)
    freed_after = time.monotonic() - left_at
    # the same request run to its end takes far longer than the row took to be freed
    t0 = time.monotonic()
    r = client.completions.create(model="nano-ck", prompt="the fox", temperature=0, max_tokens=1900,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 1900
    whole_answer = time.monotonic() - t0
    assert freed_after < whole_answer / 2
    # a client that gives up waiting for a whole (non-streamed) reply frees its row too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, timeout=httpx.Timeout(30, read=0.3))
    left_at = time.monotonic()
    while server.health()["active"]:
        assert time.monotonic() - left_at < whole_answer / 2, "the row of a client that left is still decoding"
        time.sleep(0.01)


# ---------------------------------------------------------------------------
# --api-key, and the command line


def test_api_key_is_required_when_set(checkpoint):
    s = Server(checkpoint, "--api-key", "s3cret")
    try:
        url = s.url + "/v1/models"
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                        {"Authorization": "Basic s3cret"}):
            r = httpx.get(url, headers=headers, timeout=10)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", headers
        r = httpx.post(s.url + "/v1/chat/completions", json=good(), timeout=10)
        assert r.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0)
        assert ok.chat.completions.create(**good()).usage.prompt_tokens > 0
        assert httpx.get(s.url + "/health", timeout=10).status_code == 200  # health needs no key
    finally:
        log = s.stop(signal.SIGINT)  # Ctrl-C: a clean stop
        assert "Traceback" not in log and s.proc.returncode == 0, log


def test_requests_past_max_waiting_get_503_and_the_queue_moves_on(checkpoint):
    s = Server(checkpoint, "--max-batch", "1", "--max-waiting", "1")
    long = {"model": "nano-ck", "prompt": "the fox", "temperature": 0, "max_tokens": 1900, "ignore_eos": True,
            "stream": True}
    try:
        with httpx.Client(timeout=30) as a, httpx.Client(timeout=30) as b:
            with a.stream("POST", s.url + "/v1/completions", json=long) as first:
                chunks = first.iter_lines()  # (kept: a dropped iterator closes the stream)
                assert next(chunks).startswith("data: ")  # decoding: the one row is taken
                with b.stream("POST", s.url + "/v1/completions", json={**long, "max_tokens": 3}) as second:
                    assert s.health()["waiting"] == 1
                    r = post(s, "/v1/completions", {"model": "nano-ck", "prompt": "x", "max_tokens": 2})
                    assert r.status_code == 503, r.text
                    assert r.headers["retry-after"] == "1"  # the clients wait that long, then retry
                    error = r.json()["error"]
                    assert error["code"] == "server_overloaded" and "1 requests are waiting" in error["message"]
                    first.close()  # the row frees; the waiting request is served in full
                    lines = [line for line in second.iter_lines() if line.startswith("data: ")]
                    assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["usage"]["completion_tokens"] == 3
        # served in full: greedy and past <|eos|> (a sampled first token may be <|eos|>: 0 tokens by chance)
        r = post(s, "/v1/completions", {"model": "nano-ck", "prompt": "x", "max_tokens": 2, "temperature": 0,
                                        "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    finally:
        log = s.stop()
        assert "Traceback" not in log, log


def test_a_port_in_use_is_a_one_line_error(checkpoint):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = subprocess.run([sys.executable, "serve.py", "-m", str(checkpoint), "--port", str(taken.getsockname()[1])],
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "cannot listen on 127.0.0.1" in r.stderr.strip().splitlines()[-1], r.stderr


@pytest.mark.parametrize("args, message", [
    (["-m", "missing.pt"], "missing.pt"),
    (["-m", "CK", "-l", "CK"], "adapter"),
    (["-m", "CK", "--port", "70000"], "--port"),
    (["-m", "CK", "--device", "tpu"], "--device"),
    (["-m", "CK", "--max-waiting", "0"], "--max-waiting"),
])
def test_bad_command_lines_are_one_line_errors(checkpoint, args, message):
    args = [str(checkpoint) if a == "CK" else a for a in args]
    r = subprocess.run([sys.executable, "serve.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and message in r.stderr.strip().splitlines()[-1], r.stderr


def test_stop_strings_are_found_across_token_boundaries_from_the_unsent_text_alone():
    # Answer (serve.py) searches only the text it has not sent yet. Against the plain rule it replaces
    # (after each piece, search the whole text for every stop string and hold back every end that
    # begins one): the same pieces sent and the same stop, for stop strings that overlap each other
    # and themselves, cut anywhere by the token boundaries
    import random
    import serve

    def plain(pieces, stops):
        text, sent, out = "", 0, []
        for piece in pieces + [None]:
            text += piece or ""
            cuts = [k for k in (text.find(st) for st in stops) if k >= 0]
            if cuts:
                text = text[:min(cuts)]
            held = max((k for st in stops for k in range(1, len(st)) if text.endswith(st[:k])), default=0)
            end = len(text) if piece is None or cuts else len(text) - held
            out.append(text[sent:end])
            sent = end
            if cuts:
                return out, True
        return out, False

    rnd = random.Random(0)
    for _ in range(3000):
        stops = ["".join(rnd.choice("abc") for _ in range(rnd.randint(1, 5))) for _ in range(rnd.randint(1, 4))]
        pieces = ["".join(rnd.choice("abc") for _ in range(rnd.randint(1, 3))) for _ in range(rnd.randint(0, 12))]
        answer = serve.Answer.__new__(serve.Answer)  # (without a tokenizer: the text arrives as written)
        answer.stop, answer.text, answer.sent, answer.stopped = stops, "", 0, False
        out = []
        for piece in pieces:
            answer.write(piece)
            out.append(answer._release(final=False))
            if answer.stopped:
                break
        if not answer.stopped:
            out.append(answer._release(final=True))
        assert (out, answer.stopped) == plain(pieces, stops), (pieces, stops)


def test_hostile_connections_are_timed_out_and_leave_no_tracebacks(checkpoint):
    # the outside probe: connections that send half a body and leave (each a ClientDisconnect
    # traceback before), and a client that sends half a body and waits (never timed out before)
    s = Server(checkpoint, "--max-batch", "2", "--client-timeout", "2")
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    try:
        for _ in range(50):
            with socket.create_connection(("127.0.0.1", s.port)) as c:
                c.sendall(head + b'{"model": "nano-ck", ')
        with socket.create_connection(("127.0.0.1", s.port)) as waiting:
            waiting.sendall(head + b'{"mo')
            waiting.settimeout(20)
            start = time.monotonic()
            answer = waiting.recv(4096)
            assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer + waiting.recv(4096)
            assert 1.5 < time.monotonic() - start < 15
        r = post(s, "/v1/completions", {"model": "nano-ck", "prompt": "x", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200  # and it goes on serving
    finally:
        log = s.stop()
    assert "Traceback" not in log and len(log.splitlines()) < 5, log[-3000:]


def test_a_streaming_client_that_takes_nothing_frees_its_row():
    # serve.stream hands each event to the server and is resumed once the client has taken it; one
    # not taken within the timeout cancels the job, so the scheduler frees its row (a client that
    # never reads held it, and every token sent to it, until its answer ended). A reader that keeps
    # taking events keeps its row however long the answer.
    import asyncio
    import serve

    async def run(pause):
        job = SimpleNamespace(events=asyncio.Queue(), cancelled=False)
        for i in range(5):
            job.events.put_nowait(("text", f"t{i} "))
        job.events.put_nowait(("end", "length", {"completion_tokens": 5}))
        gen = serve.stream(job, False, "x", timeout=0.3)
        got = [await gen.__anext__()]
        await asyncio.sleep(pause)  # the event is "being sent": the client takes nothing
        cancelled_while_waiting = job.cancelled
        got += [piece async for piece in gen]
        return cancelled_while_waiting, got

    cancelled, _ = asyncio.run(run(1.0))
    assert cancelled
    cancelled, got = asyncio.run(run(0.05))
    assert not cancelled and got[-1] == "data: [DONE]\n\n"
