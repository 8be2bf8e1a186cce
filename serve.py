"""
Serve a Nano model over an OpenAI-compatible HTTP API.

    python serve.py -m checkpoint/sft/best.pt                          # http://127.0.0.1:8000/v1
    python serve.py -m base.pt -l checkpoint/lora/adapter.pt --api-key KEY --port 8001

Endpoints: GET /v1/models, POST /v1/chat/completions (a conversation, framed as infer.py's instruct
mode frames it: infer.chat_ids), POST /v1/completions (a continuation, infer.py's continuation mode),
both plain JSON or server-sent events (`stream: true`); GET /health (no key needed) counts the slots.

Several clients are served at once by one model: the scheduler (the main thread; the HTTP server runs
in another) owns the model and a KV cache of --max-batch rows. A request joins the running batch in a
free row (its prompt is prefilled into that row alone), then every step decodes one token for all
running rows in one forward, each row at its own position (model.Decoder: the decode loop that
model.generate runs too), and samples each row with its own settings and generator; a row is freed
at <|eos|>, at a stop string, at max_tokens, or as soon as its client goes away. With the same settings and seed an answer is infer.py's answer: the
same framing, sampling and decoding rules.

Bad requests get OpenAI's error JSON ({"error": {"message", "type", "param", "code"}}) with status
400 (bad parameters, malformed JSON, a prompt past the context), 401 (missing or wrong key), 404
(unknown model or path), 413 (body over --max-body) or 503 (over --max-waiting requests already wait
for a row); nothing else changes, and the next request is served as usual.
"""

import argparse
import asyncio
import hmac
import json
import os
import queue
import random
import socket
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path
from types import SimpleNamespace

import torch
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from files import NanoError
from infer import StreamPrinter, chat_ids, check_sampling, load, prompt_ids, stop_ids
from model import Decoder, sample_next

# Nano's sampling defaults, as infer.py's (a request without a seed gets a fresh one, as OpenAI's do)
DEFAULTS = dict(temperature=0.8, top_k=0, top_p=0.95, repetition_penalty=1.0)
# OpenAI parameters Nano does not implement: accepted only at their no-op values
UNSUPPORTED = {"n": (1,), "best_of": (1,), "presence_penalty": (0,), "frequency_penalty": (0,),
               "logprobs": (False, 0), "echo": (False,), "tools": ([],)}
MAX_STOP = 4  # stop strings per request, as OpenAI allows
# characters per stop string: the scheduler thread checks each new token's text against the stop
# strings for every running row, so their length bounds that work (a 250,000-character stop string
# once stalled every client for seconds)
MAX_STOP_CHARS = 1000


# ---------------------------------------------------------------------------
# Errors: OpenAI's JSON, never a stack trace


class APIError(NanoError):
    """A refused request: the HTTP status and OpenAI's error fields (the handler in make_app writes them)."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_response(status, message, param=None, code=None, kind="invalid_request_error"):
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


# ---------------------------------------------------------------------------
# Reading a request: the JSON body, the sampling settings, the prompt


async def read_json(request, max_body, timeout=30.0):
    """The body as a JSON object; 413 past max_body bytes (announced or actually sent), 408 when it has
    not all arrived within `timeout` seconds (a client that sends half a body and waits holds a
    connection), else 400. The routes read their bodies here and check the fields themselves (no
    pydantic models), so that every refusal names its parameter in OpenAI's terms and none is FastAPI's 422."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body:
        raise APIError(413, f"the request body is {declared} bytes; this server takes at most {max_body}",
                       code="request_too_large")

    async def receive():
        body = b""
        async for piece in request.stream():  # a chunked body has no Content-Length: count what arrives
            body += piece
            if len(body) > max_body:
                raise APIError(413, f"the request body is over {max_body} bytes, the most this server takes",
                               code="request_too_large")
        return body

    try:
        body = await asyncio.wait_for(receive(), timeout)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s", code="request_timeout") from None
    except ClientDisconnect:  # went away mid-body: nobody to answer, nothing to log
        raise APIError(400, "the client went away before its request body arrived") from None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    except RecursionError:  # (Python's parser recurses once per bracket)
        raise APIError(400, "the request body nests too deeply to read") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    return data


KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def get(body, name, kind, default):
    """body[name] if it is of `kind` (int, float, str or bool; an int is a float too), else a 400
    naming it; null is the same as absent."""
    value = body.get(name)
    if value is None:
        return default
    number = isinstance(value, (int, float)) and not isinstance(value, bool)  # JSON true is no number
    if not {int: number and isinstance(value, int), float: number}.get(kind, isinstance(value, kind)):
        raise APIError(400, f"{name} must be {KINDS[kind]}, got {json.dumps(value)[:40]}", param=name)
    return float(value) if kind is float else value


def sampling(body):
    """The request's settings, refused where infer.py refuses them (infer.check_sampling)."""
    for name, noop in UNSUPPORTED.items():
        if body.get(name) is not None and body[name] not in noop:
            raise APIError(400, f"{name}: Nano supports only {json.dumps(noop[0])}", param=name)
    s = SimpleNamespace(**{k: get(body, k, type(v), v) for k, v in DEFAULTS.items()})
    s.max_new_tokens = get(body, "max_completion_tokens", int, None)  # OpenAI's newer name comes first
    if s.max_new_tokens is None:
        s.max_new_tokens = get(body, "max_tokens", int, None)
    s.seed = get(body, "seed", int, None)
    checked = SimpleNamespace(**{**vars(s), "max_new_tokens": s.max_new_tokens or 0,
                                 "seed": 0 if s.seed is None else s.seed})
    problem = check_sampling(checked)
    if problem:  # "-t: temperature must be >= 0 ..." -> the API's parameter name and the message
        flag, message = problem.split(": ", 1)
        param = {"-t": "temperature", "-k": "top_k", "-p": "top_p", "-r": "repetition_penalty",
                 "-n": "max_tokens", "-s": "seed"}[flag]
        raise APIError(400, message.replace("max new tokens", "max_tokens"), param=param)
    if s.seed is None:
        s.seed = random.randrange(2 ** 31)
    s.stop = stop_strings(body)
    s.ignore_eos = get(body, "ignore_eos", bool, False)  # benchmarks: a fixed length (vLLM's name)
    s.stream = get(body, "stream", bool, False)
    return s


def stop_strings(body):
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, f"stop must be a non-empty string or a list of at most {MAX_STOP} of them", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise APIError(400, f"stop strings must be at most {MAX_STOP_CHARS} characters long", param="stop")
    return stop


def chat_messages(body):
    """messages as chat_ids takes them: [{"role", "content": str}]; OpenAI's text parts are joined."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a role and a content", param="messages")
        content = m.get("content")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string (or a list of text parts)", param="messages")
        role = "system" if m["role"] == "developer" else m["role"]  # OpenAI's newer name for the system role
        out.append({"role": role, "content": content})
    return out


def check_model(body, name):
    model = body.get("model")
    if not isinstance(model, str):
        raise APIError(400, "model must be given: the name GET /v1/models lists", param="model")
    if model != name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {name!r}",
                       param="model", code="model_not_found")


def fit_context(ids, s, block_size):
    """Refuse a prompt that leaves no room for an answer; cap max_tokens as model.generate caps it
    (the last token is the one predicted from a full context)."""
    if len(ids) >= block_size:
        raise APIError(400, f"the prompt is {len(ids)} tokens; this model's context is {block_size} tokens "
                            "(the prompt must be shorter, to leave room for an answer)",
                       param="messages", code="context_length_exceeded")
    room = block_size - len(ids) + 1
    s.max_new_tokens = room if s.max_new_tokens is None else min(s.max_new_tokens, room)


# ---------------------------------------------------------------------------
# One request in the scheduler


class Answer:
    """A reply's text as its tokens arrive. infer.StreamPrinter holds back an unfinished character
    (it writes complete text here, its `out`); this holds back an end that could begin a stop string
    and cuts the reply before the first stop string."""

    def __init__(self, tok, stop):
        self.printer, self.stop = StreamPrinter(tok, out=self), stop
        self.text, self.sent, self.stopped = "", 0, False

    def write(self, text):  # StreamPrinter's output
        self.text += text

    def flush(self):
        pass

    def add(self, token_id):
        """The new text that is safe to send."""
        self.printer(token_id)
        return self._release(final=False)

    def finish(self):
        """The rest: what was held back (a reply ending inside a character ends in U+FFFD, as infer.py's)."""
        self.printer.finish()
        return self._release(final=True)

    def _release(self, final):
        # a stop string cannot begin in text already sent (_held kept back every end that could begin
        # one), so only the unsent text is searched: the work per token is bounded by the stop strings'
        # length, not by the reply's
        cuts = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if cuts:
            self.text, self.stopped = self.text[:min(cuts)], True
        end = len(self.text) if final or self.stopped else len(self.text) - self._held()
        delta, self.sent = self.text[self.sent:end], end
        return delta

    def _held(self):
        """The length of the longest end of the unsent text that is the start of a stop string."""
        tail = self.text[self.sent:]
        for i in range(len(tail)):  # the earliest start is the longest end
            if any(s.startswith(tail[i:]) for s in self.stop):
                return len(tail) - i
        return 0


class Job:
    """A request: its ids (prompt + reply: the repetition penalty reads both, as in model.generate), its
    settings and generator, its reply, and the asyncio queue its HTTP handler reads events from."""

    def __init__(self, ids, settings, tok, loop):
        self.ids, self.prompt_tokens, self.s = list(ids), len(ids), settings
        self.generator = torch.Generator().manual_seed(settings.seed)  # sample_next samples on the CPU
        self.answer = Answer(tok, settings.stop)
        self.events, self.loop = asyncio.Queue(), loop
        self.cancelled = False  # set by the HTTP side when the client is gone; the scheduler frees the row

    @property
    def completion_tokens(self):
        return len(self.ids) - self.prompt_tokens

    def usage(self):
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": len(self.ids)}


# ---------------------------------------------------------------------------
# The scheduler: one model, one batch that requests join and leave


class Scheduler:
    """Runs in the main thread, the HTTP server in another: torch's CPU threads (OpenMP) ran a batch 2-3x
    slower when driven from a second thread after the main one had used them (loading the model)."""

    def __init__(self, model, tok, max_batch, context=None):
        self.model, self.tok, self.max_batch = model, tok, max_batch
        self.context = min(context or model.cfg.block_size, model.cfg.block_size)
        self.stop_ids = set(stop_ids(tok))  # <|eos|>, or an imported model's end-of-turn tokens
        self.decoder = Decoder(model, max_batch, self.context)
        self.rows = []  # the running jobs: rows[r] decodes in cache row r (kept packed at the front)
        self.waiting = queue.Queue()
        self.outbox = []  # (job, event) made since the last deliver()

    def submit(self, job):
        self.waiting.put(job)

    def run(self):
        with torch.inference_mode():
            while True:
                try:
                    self.admit()
                    self.step()
                except Exception as e:  # a bug must not stop the server: fail the running requests only
                    traceback.print_exc()
                    for job in self.rows:
                        self.send(job, "error", f"internal error while decoding: {type(e).__name__}: {e}")
                    self.rows = []
                self.deliver()

    def send(self, job, *event):
        self.outbox.append((job, event))

    def deliver(self):
        """Hand the events made so far to the HTTP side's event loop: one wake-up for all rows (each
        wake-up is a system call, and one per row and token cost as much as sampling)."""
        if self.outbox:
            events, self.outbox = self.outbox, []
            events[0][0].loop.call_soon_threadsafe(put_events, events)

    def admit(self):
        """Move waiting jobs into free rows, each prompt prefilled into its own row; sleep while idle."""
        while len(self.rows) < self.max_batch:
            try:
                job = self.waiting.get(block=not self.rows)
            except queue.Empty:
                return
            if job.cancelled:
                continue
            if job.s.max_new_tokens == 0:
                self.send(job, "end", "length", job.usage())
                self.deliver()  # now: with no running rows the next get() blocks until another request
                continue
            r = len(self.rows)
            self.rows.append(job)  # before the forward: should it fail, run() tells this job too
            self.take(r, self.decoder.prefill([job.ids], r)[0])
            self.deliver()  # its first token now, not after the other admissions

    def step(self):
        """One forward for all running rows, each at its own position, then one token for each."""
        for r in reversed(range(len(self.rows))):
            if self.rows[r].cancelled:
                self.free(r)
        if not self.rows:
            return
        logits = self.decoder.step([job.ids[-1] for job in self.rows], [len(job.ids) - 1 for job in self.rows])
        for r in reversed(range(len(self.rows))):  # backwards: freeing row r moves a row already done into it
            self.take(r, logits[r])

    def take(self, r, logits):
        """Sample row r's next token, as model.generate does, and send what text it completes."""
        job, s = self.rows[r], self.rows[r].s
        token = sample_next(logits, s.temperature, s.top_k, s.top_p, s.repetition_penalty, job.ids, job.generator)
        if token in self.stop_ids and not s.ignore_eos:
            return self.finish(r, "stop")
        job.ids.append(token)
        delta = job.answer.add(token)
        if delta:
            self.send(job, "text", delta)
        if job.answer.stopped:
            self.finish(r, "stop")
        elif job.completion_tokens >= s.max_new_tokens:  # capped to the context (fit_context)
            self.finish(r, "length")

    def finish(self, r, reason):
        job = self.rows[r]
        if not job.answer.stopped:
            delta = job.answer.finish()
            if delta:
                self.send(job, "text", delta)
        self.send(job, "end", reason, job.usage())
        self.free(r)

    def free(self, r):
        """Drop row r: the last running row moves into it (its cache too), so the rows stay packed."""
        last = len(self.rows) - 1
        if r != last:
            self.decoder.move(last, r, len(self.rows[last].ids))
            self.rows[r] = self.rows[last]
        self.rows.pop()


# ---------------------------------------------------------------------------
# The HTTP side: routes, replies, streams


def put_events(events):  # in the event loop
    for job, event in events:
        job.events.put_nowait(event)


async def next_events(job):
    """The job's events that have arrived, at least one: text that piled up goes out as one chunk.
    An "end" or "error" event is always a job's last."""
    events = [await job.events.get()]
    while not job.events.empty():
        events.append(job.events.get_nowait())
    return "".join(e[1] for e in events if e[0] == "text"), events[-1]


def new_id(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def choice(chat, stream, text, finish=None):
    if chat and stream:
        return {"index": 0, "delta": {} if text is None else {"content": text}, "finish_reason": finish,
                "logprobs": None}
    if chat:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                "logprobs": None}
    return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}


async def reply(request, job, chat, name):
    """The whole reply as one JSON object; the row is freed if the client leaves before it is done."""
    parts, watch = [], asyncio.create_task(watch_disconnect(request, job))
    try:
        while True:
            text, (kind, *rest) = await next_events(job)
            parts.append(text)
            if kind == "error":
                return error_response(500, rest[0], kind="server_error")
            if kind == "end":
                finish, usage = rest
                break
    finally:
        watch.cancel()
        job.cancelled = True  # no-op once the job has ended
    body = {"id": new_id("chatcmpl" if chat else "cmpl"), "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": name, "choices": [choice(chat, False, "".join(parts), finish)],
            "usage": usage}
    return JSONResponse(body)


async def watch_disconnect(request, job):
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)
    job.cancelled = True


async def stream(job, chat, name, timeout=30.0):
    """Server-sent events: `data: {chunk}` lines, the last chunk with finish_reason and usage, then
    `data: [DONE]`. A client that goes away cancels this generator, which frees the row; so does one
    that takes no event for `timeout` seconds (a client that never reads would hold its row, and
    every token it is sent, until its answer ended)."""
    sending_since = [None]  # when the event being sent was handed over (None: not sending)

    async def watch_sending():
        while sending_since[0] is None or time.monotonic() - sending_since[0] < timeout:
            await asyncio.sleep(min(1.0, timeout / 4))
        job.cancelled = True
    meta = {"id": new_id("chatcmpl" if chat else "cmpl"),
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": name}

    def event(data):
        return f"data: {json.dumps(data)}\n\n"  # json.dumps: the model's text only ever as a JSON string

    def sent(data):  # what the generator yields: each yield returns once the client has taken it
        sending_since[0] = time.monotonic()
        return data

    watch = asyncio.create_task(watch_sending())
    try:
        if chat:  # OpenAI's first chunk names the role
            yield sent(event({**meta, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                   "finish_reason": None, "logprobs": None}]}))
        while True:
            sending_since[0] = None
            text, (kind, *rest) = await next_events(job)
            if text:
                yield sent(event({**meta, "choices": [choice(chat, True, text)]}))
            if kind == "error":
                yield sent(event({"error": {"message": rest[0], "type": "server_error", "param": None, "code": None}}))
                break
            elif kind == "end":
                yield sent(event({**meta, "choices": [choice(chat, True, None, rest[0])], "usage": rest[1]}))
                break
        yield "data: [DONE]\n\n"
    finally:
        watch.cancel()
        job.cancelled = True


def make_app(model, tok, scheduler, name, api_key=None, max_body=2 ** 20, max_waiting=64, client_timeout=30.0):
    app = FastAPI(title="Nano", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(request, e):
        response = error_response(e.status, e.message, e.param, e.code, e.kind)
        if e.status == 503:
            response.headers["Retry-After"] = "1"  # a row frees as soon as any answer ends
        return response

    @app.exception_handler(HTTPException)  # unknown path (404), wrong method (405)
    async def http_error(request, e):
        return error_response(e.status_code, f"{e.detail}: {request.method} {request.url.path}",
                              code="unknown_url" if e.status_code == 404 else None)

    @app.exception_handler(Exception)  # a bug: the client gets JSON, the trace goes to the server's log
    async def server_error(request, e):
        return error_response(500, f"internal server error ({type(e).__name__})", kind="server_error")

    def authorize(request: Request):
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key: send the header Authorization: Bearer KEY",
                           code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])
    card = {"id": name, "object": "model", "created": int(time.time()), "owned_by": "nano"}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "active": len(scheduler.rows), "waiting": scheduler.waiting.qsize(),
                "max_batch": scheduler.max_batch}

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [card]}

    @v1.get("/models/{model_id:path}")
    async def model_card(model_id: str):
        if model_id != name:
            raise APIError(404, f"the model {model_id!r} does not exist; this server serves {name!r}",
                           param="model", code="model_not_found")
        return card

    async def complete(request, chat):
        body = await read_json(request, max_body, client_timeout)
        check_model(body, name)
        s = sampling(body)
        if chat:
            try:
                ids = chat_ids(tok, chat_messages(body), model.prompt_format)
            except ValueError as e:
                raise APIError(400, str(e), param="messages") from None
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:  # the clients send a prompt as a list of one
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise APIError(400, "prompt must be a string", param="prompt")
            ids = prompt_ids(tok, prompt, False, model.prompt_format)
            if not ids:
                raise APIError(400, "the prompt is empty, and this 2024.10 model is continued without a "
                                    "<|bos|> in front: give it some text", param="prompt")
        fit_context(ids, s, scheduler.context)
        if scheduler.waiting.qsize() >= max_waiting:  # a queue that only grows answers no one in time
            raise APIError(503, f"the server is overloaded: {max_waiting} requests are waiting for a free row; "
                                "retry later", code="server_overloaded", kind="server_error")
        job = Job(ids, s, tok, asyncio.get_running_loop())
        scheduler.submit(job)
        if s.stream:
            return StreamingResponse(stream(job, chat, name, client_timeout), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await reply(request, job, chat, name)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @v1.post("/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    app.include_router(v1)
    return app


# ---------------------------------------------------------------------------
# The command line


def default_model_name(path):
    """checkpoint/sft/best.pt -> nano-sft; my_model.pt -> nano-my_model."""
    p = Path(path)
    return "nano-" + (p.parent.name if p.stem in ("best", "last") and p.parent.name else p.stem)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Serve a Nano model over an OpenAI-compatible API")
    p.add_argument("-m", "--model", required=True, help="checkpoint (.pt) written by train.py, or a Hugging Face model directory")
    p.add_argument("-l", "--lora", help="LoRA adapter checkpoint to attach")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("NANO_API_KEY"),
                   help="require Authorization: Bearer KEY (default: $NANO_API_KEY; none = no key)")
    p.add_argument("--model-name", help="the model id clients ask for (default: from the checkpoint path)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (KV cache rows)")
    p.add_argument("--max-waiting", type=int, default=64,
                   help="requests queued for a free row; more get 503, which the clients retry (default 64)")
    p.add_argument("--max-body", type=int, default=2 ** 20, help="largest request body in bytes (default 1 MiB)")
    p.add_argument("--client-timeout", type=float, default=30.0,
                   help="seconds a client may take to send its request body (else 408), or to take the next piece "
                        "of a streamed answer (else its row is freed) (default 30)")
    p.add_argument("--context", type=int, help="tokens per request, prompt and answer (default and most: the model's "
                                               "block_size; the KV cache holds max-batch x this: imported models have 32k)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args(argv)
    if not 0 < args.port < 65536:
        p.error(f"--port must be in 1..65535, got {args.port}")
    if min(args.max_batch, args.max_body, args.max_waiting) < 1 or (args.context is not None and args.context < 2):
        p.error("--max-batch, --max-waiting and --max-body must be positive, --context at least 2")
    if not args.client_timeout > 0:  # (NaN too)
        p.error("--client-timeout must be a positive number of seconds")
    if args.api_key is not None and not args.api_key.strip():
        p.error("--api-key is empty")
    if args.device.split(":")[0] not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    args.model_name = args.model_name or default_model_name(args.model)
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        model, tok, _ = load(args)
    except (NanoError, ValueError) as e:  # as infer.py's main
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if not model.cfg.is_causal:
        print(f"error: {args.model} is a bidirectional model; serve.py generates with causal ones", file=sys.stderr)
        sys.exit(2)
    try:  # bind here, so that a port in use is one line too
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        sock = socket.create_server((args.host, args.port), family=family)
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        sys.exit(2)
    import uvicorn
    scheduler = Scheduler(model, tok, args.max_batch, args.context)
    app = make_app(model, tok, scheduler, args.model_name, args.api_key, args.max_body, args.max_waiting,
                   args.client_timeout)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="http").start()
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it", file=sys.stderr)
    print(f"serving {args.model_name} ({model.num_params() / 1e6:.1f}M parameters, context {scheduler.context}, "
          f"batch {args.max_batch}, {args.device}) at http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    try:
        scheduler.run()  # the model's thread: the main one (Scheduler says why)
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)


if __name__ == "__main__":
    main()
