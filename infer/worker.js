/*
 * worker.js: runs the C engine (nano.wasm) off the page's thread, so the page stays responsive.
 *
 * Protocol (postMessage; page -> worker):
 *   {type: 'load', kind: 'model' | 'adapter', file: File}   read the file into wasm memory and load it
 *   {type: 'attach', on: bool}                               attach / detach the loaded adapter
 *   {type: 'generate', id, text, mode: 'instruct' | 'continue', settings}
 *   {type: 'stop', id}                                       stop generation `id` after the current token
 * worker -> page:
 *   ready {kernels} | fatal {message}
 *   loading {kind, name, loaded, total} | loaded {kind, name, info, warning} | adapter {on, warning}
 *   error {kind, message}                  kind: 'model', 'adapter', 'attach' or 'generate'
 *   prompt {id, text, tokens, kept}        the user's text as the model sees it (decoded ids)
 *   progress {id, done, total}             prefill
 *   token {id, text}                       one generated token, streamed as it is made
 *   done {id, tokens, tok_s, prefill_tok_s, reason, seed}  reason: eos, max, full, stopped
 *
 * Stopping: a 'stop' message can only be handled when this worker's event loop gets control,
 * so generation yields every ~25 ms (one MessageChannel round trip: no setTimeout clamping).
 * A SharedArrayBuffer flag would avoid that; it needs cross-origin isolation (COOP/COEP
 * headers), which serve.py sends, but this single-threaded build does not use one yet.
 *
 * Strings cross into wasm as UTF-8 bytes (TextEncoder.encodeInto) and come back as UTF-8
 * (TextDecoder, in streaming mode so that a token ending inside a character would wait for the
 * rest): emoji and other characters outside the BMP survive, unlike with UTF-16 code units.
 */
'use strict';

const NANO_OK = 0;
const VERIFY = 1; // check the CRC-32 of 2026.11 files: cheap next to reading them
const PREFILL_SLICE = 64; // prompt tokens per wa_feed_batch: one batch of the engine (nano.c, PREFILL_ROWS)

let E = null;               // the wasm exports
let model = 0, adapter = 0; // WModel* / WLora* (0: none)
let modelInfo = null;
let adapterOn = false; // attached, or (with no model yet) to be attached when a model arrives
let stopId = null;
let queue = Promise.resolve(); // messages other than 'stop' are handled one at a time, in order

const post = (msg) => self.postMessage(msg);
const u8 = () => new Uint8Array(E.memory.buffer); // a fresh view: growing memory detaches old ones
const ptr = (p) => p >>> 0; // wasm returns i32; addresses above 2 GiB must not turn negative

function cstr(p) {
    p = ptr(p);
    const mem = u8();
    let end = p;
    while (mem[end]) end++;
    return new TextDecoder().decode(mem.subarray(p, end));
}

/* The C messages were written for the CLI; drop or translate its hints for the page. */
function browserMessage(msg) {
    return msg
        .replace(' (--no-verify skips this check)', '')
        .replace(' (attach it to its base model with -l)', ': load it with the adapter picker instead');
}

/* wasi_snapshot_preview1 for a library that never does I/O: the three stdio functions the
 * linker kept are stubs; anything else (there is nothing else today) answers ENOSYS. */
function wasiImports(module) {
    const ENOSYS = 52;
    const imports = {};
    for (const imp of WebAssembly.Module.imports(module)) {
        if (imp.module !== 'wasi_snapshot_preview1' || imp.kind !== 'function') continue;
        imports[imp.name] = () => ENOSYS;
    }
    imports.fd_write = (fd, iovs, iovsLen, nwrittenPtr) => { // debugging output, if any ever appears
        const view = new DataView(E.memory.buffer);
        let text = '', total = 0;
        for (let i = 0; i < iovsLen; i++) {
            const base = view.getUint32(iovs + 8 * i, true), len = view.getUint32(iovs + 8 * i + 4, true);
            text += new TextDecoder().decode(u8().subarray(base, base + len));
            total += len;
        }
        console.log(`[nano.wasm fd ${fd}] ${text}`);
        view.setUint32(nwrittenPtr, total, true);
        return 0;
    };
    imports.proc_exit = (code) => { throw new Error(`nano.wasm exited with code ${code}`); };
    return {wasi_snapshot_preview1: imports};
}

async function init() {
    try {
        const resp = await fetch('nano.wasm');
        if (!resp.ok) throw new Error(`nano.wasm: HTTP ${resp.status}`);
        // compile from bytes: instantiateStreaming would insist on the application/wasm MIME type
        const module = await WebAssembly.compile(await resp.arrayBuffer());
        const instance = await WebAssembly.instantiate(module, wasiImports(module));
        E = instance.exports;
        E._initialize(); // reactor module: runs the constructors (nano.c's kernel choice)
        post({type: 'ready', kernels: cstr(E.wa_kernel_name())});
    } catch (e) {
        post({type: 'fatal', message: `could not start the engine: ${e.message || e}. This browser needs ` +
              'WebAssembly with SIMD (Chrome/Edge 91+, Firefox 89+, Safari 16.4+).'});
        throw e;
    }
}
const ready = init();

/* ---------------------------------------------------------------------------------------------
 * loading */

/* Copies a File into a fresh wasm buffer, 16 MiB at a time (no second full-size copy in JS). */
async function fileToWasm(file, kind) {
    const size = file.size;
    if (size > 0xFFFFFFFF - (64 << 20)) throw new Error('the file is larger than the 4 GiB a browser engine can address');
    const p = ptr(E.wa_malloc(size));
    if (!p) throw new Error(`out of memory: the browser would not give ${(size / 2 ** 20).toFixed(0)} MiB to the engine`);
    try {
        const CHUNK = 16 << 20;
        for (let off = 0; off < size; off += CHUNK) {
            const bytes = new Uint8Array(await file.slice(off, Math.min(size, off + CHUNK)).arrayBuffer());
            u8().set(bytes, p + off);
            post({type: 'loading', kind, name: file.name, loaded: off + bytes.length, total: size});
        }
    } catch (e) {
        E.wa_free(p);
        throw new Error(`cannot read the file: ${e.message || e}`);
    }
    return p;
}

async function load({kind, file}) {
    let p;
    try {
        p = await fileToWasm(file, kind);
    } catch (e) {
        post({type: 'error', kind, message: e.message});
        return;
    }
    if (kind === 'model') {
        const m = ptr(E.wa_model_load(p, file.size, VERIFY)); // owns p from here, success or not
        if (!m) {
            post({type: 'error', kind, message: browserMessage(cstr(E.wa_error()))});
            return; // the previous model (if any) stays loaded and usable
        }
        if (!E.wa_is_causal(m)) {
            E.wa_model_free(m);
            post({type: 'error', kind, message: 'this model is bidirectional (is_causal = 0): the engine generates ' +
                  'only with causal models'});
            return;
        }
        if (model) E.wa_model_free(model);
        model = m;
        modelInfo = JSON.parse(cstr(E.wa_model_info(m)));
        let warning = '';
        if (adapter && adapterOn) { // keep the adapter on if it fits the new model
            const r = E.wa_lora_attach(model, adapter);
            if (r < 0) {
                adapterOn = false;
                warning = `adapter detached: ${browserMessage(cstr(E.wa_error()))}`;
            } else if (r > 0) {
                warning = cstr(E.wa_error());
            }
        }
        post({type: 'loaded', kind, name: file.name, info: modelInfo, warning});
        post({type: 'adapter', on: adapterOn, loaded: !!adapter});
    } else {
        const a = ptr(E.wa_lora_load(p, file.size, VERIFY));
        if (!a) {
            post({type: 'error', kind, message: browserMessage(cstr(E.wa_error()))});
            return;
        }
        let warning = '';
        if (model) { // check it against the model now, so that a mismatch is reported at once
            const r = E.wa_lora_attach(model, a);
            if (r < 0) {
                const message = browserMessage(cstr(E.wa_error()));
                E.wa_lora_free(a); // the previous adapter (if any) stays
                post({type: 'error', kind, message});
                return;
            }
            if (r > 0) warning = cstr(E.wa_error());
        }
        if (adapter) E.wa_lora_free(adapter);
        adapter = a;
        adapterOn = true;
        post({type: 'loaded', kind, name: file.name, info: null, warning});
        post({type: 'adapter', on: !!model, loaded: true});
    }
}

function attach({on}) {
    if (!adapter || !model) {
        adapterOn = !!adapter && on;
        post({type: 'adapter', on: false, loaded: !!adapter});
        return;
    }
    let warning = '';
    if (on) {
        const r = E.wa_lora_attach(model, adapter);
        if (r < 0) {
            post({type: 'error', kind: 'attach', message: browserMessage(cstr(E.wa_error()))});
            on = false;
        } else if (r > 0) {
            warning = cstr(E.wa_error());
        }
    } else {
        E.wa_lora_detach(model);
    }
    adapterOn = on;
    post({type: 'adapter', on, loaded: true, warning});
}

/* ---------------------------------------------------------------------------------------------
 * generation */

const channel = new MessageChannel();
const wakeups = [];
channel.port1.onmessage = () => wakeups.shift()();
/* Lets queued messages ('stop') run, then continues; no 4 ms timer clamp as with setTimeout. */
const yieldToEvents = () => new Promise((resolve) => {
    wakeups.push(resolve);
    channel.port2.postMessage(0);
});

/* UTF-8 of `text` -> token ids through nano.c (the same tokenizer as the CLI): the text alone, or
 * with instruct = true / false the whole prompt in the framing of the model's layout
 * (nano_encode_prompt: <|bos|> in front for 2026.11 files, none for 2024.10 ones). */
function encode(text, instruct = null) {
    const bytes = new TextEncoder().encode(text);
    const tp = ptr(E.wa_malloc(bytes.length));
    u8().set(bytes, tp);
    const run = (ip, max) => (instruct === null ? E.wa_encode(model, tp, bytes.length, ip, max)
        : E.wa_encode_prompt(model, tp, bytes.length, instruct ? 1 : 0, ip, max));
    const n = run(0, 0);
    const ip = n < 0 ? 0 : ptr(E.wa_malloc(4 * n));
    if (!ip) {
        E.wa_free(tp);
        throw new Error('out of memory: the prompt is too long for the engine');
    }
    run(ip, n);
    const ids = Array.from(new Int32Array(E.memory.buffer, ip, n));
    E.wa_free(tp);
    E.wa_free(ip);
    return ids;
}

function tokenBytes(id) {
    const p = ptr(E.wa_token_text(model, id));
    return u8().slice(p, p + E.wa_token_len());
}

function decode(ids) {
    const dec = new TextDecoder();
    let s = '';
    for (const id of ids) s += dec.decode(tokenBytes(id), {stream: true});
    return s + dec.decode();
}

async function generate({id, text, mode, settings}) {
    if (!model) {
        post({type: 'error', kind: 'generate', message: 'load a model first'});
        post({type: 'done', id, tokens: 0, tok_s: 0, prefill_tok_s: 0, reason: 'error'});
        return;
    }
    const s = settings;
    const seed = Number.isFinite(s.seed) && s.seed >= 0 ? Math.floor(s.seed)
        : crypto.getRandomValues(new Uint32Array(1))[0] >>> 1; // the CLI's -s range: 0 .. 2^31-1
    E.wa_sampler_set(model, s.temperature, s.top_k, s.top_p, s.rep_penalty);
    E.wa_sampler_seed(model, seed);

    // infer.py's templates (<|bos|>text, or <|bos|><|instruct_mark|>text<|response_mark|>; no <|bos|>
    // for 2024.10 files), with the special ids of the model's tokenizer (wa_model_info: 2..5 for the
    // trie, after GPT-2's for BPE), framed by the engine (wa_encode_prompt)
    if (mode === 'instruct' && (modelInfo.instruct < 0 || modelInfo.response < 0)) {
        // a Hugging Face model's tokenizer: no Nano instruct marks, and its chat template is not in the file
        post({type: 'error', kind: 'generate', message: "this model's tokenizer has no <|instruct_mark|> or " +
              '<|response_mark|> token, so instruct mode cannot frame the prompt: use continue mode'});
        post({type: 'done', id, tokens: 0, tok_s: 0, prefill_tok_s: 0, reason: 'error', seed});
        return;
    }
    const textIds = encode(text);
    const ids = encode(text, mode === 'instruct');
    if (!ids.length) { // continue mode on a 2024.10 model or one without <|bos|>: nothing to start from
        post({type: 'error', kind: 'generate', message: 'the prompt is empty, and ' +
              (modelInfo.bos < 0 ? "this model (its tokenizer has none)" : 'a 2024.10 model') +
              ' is continued without a <|bos|> in front: type some text'});
        post({type: 'done', id, tokens: 0, tok_s: 0, prefill_tok_s: 0, reason: 'error', seed});
        return;
    }
    const block = modelInfo.block_size;
    const start = Math.max(0, ids.length - block); // nano_prefill keeps the end of a long prompt
    post({type: 'prompt', id, text: decode(textIds), tokens: ids.length, kept: ids.length - start});

    // nano_prefill(), as batches of PREFILL_SLICE tokens (wa_feed_batch) so that progress shows and Stop works
    const t0 = performance.now();
    let slice = t0, reason = 'max';
    E.wa_reset(model);
    const ip = ptr(E.wa_malloc(4 * PREFILL_SLICE));
    for (let i = start; i < ids.length; i += PREFILL_SLICE) {
        const part = ids.slice(i, i + PREFILL_SLICE);
        if (ip) new Int32Array(E.memory.buffer, ip, part.length).set(part);
        if (!ip || E.wa_feed_batch(model, ip, part.length) !== NANO_OK) {
            if (ip) E.wa_free(ip);
            post({type: 'error', kind: 'generate', message: 'the forward pass failed on the prompt'});
            post({type: 'done', id, tokens: 0, tok_s: 0, prefill_tok_s: 0, reason: 'error', seed});
            return;
        }
        if (performance.now() - slice > 25) {
            post({type: 'progress', id, done: i + part.length - start, total: ids.length - start});
            await yieldToEvents();
            slice = performance.now();
            if (stopId === id) {
                E.wa_free(ip);
                post({type: 'done', id, tokens: 0, tok_s: 0, prefill_tok_s: 0, reason: 'stopped', seed});
                return;
            }
        }
    }
    E.wa_free(ip);
    const t1 = performance.now();
    post({type: 'progress', id, done: ids.length - start, total: ids.length - start});

    // the CLI's generate(): sample; stop at <|eos|> (nano_is_stop); emit; feed (stop when the context is full)
    const dec = new TextDecoder();
    let n = 0;
    slice = performance.now();
    for (let i = 0; i < s.max_new; i++) {
        const tok = E.wa_sample(model);
        if (tok < 0 || E.wa_is_stop(model, tok)) {
            reason = tok < 0 ? 'error' : 'eos';
            break;
        }
        const piece = dec.decode(tokenBytes(tok), {stream: true});
        if (piece) post({type: 'token', id, text: piece});
        n++;
        if (E.wa_feed(model, tok) !== NANO_OK) {
            reason = 'full';
            break;
        }
        if (performance.now() - slice > 25) {
            await yieldToEvents();
            slice = performance.now();
            if (stopId === id) {
                reason = 'stopped';
                break;
            }
        }
    }
    const tail = dec.decode();
    if (tail) post({type: 'token', id, text: tail});
    const t2 = performance.now();
    post({type: 'done', id, tokens: n, reason, seed,
          tok_s: t2 > t1 ? n / ((t2 - t1) / 1000) : 0,
          prefill_tok_s: t1 > t0 ? (ids.length - start) / ((t1 - t0) / 1000) : 0});
}

/* ------------------------------------------------------------------------------------------- */

self.onmessage = (ev) => {
    const msg = ev.data;
    if (msg.type === 'stop') { // not queued: it must reach a generation that is running
        stopId = msg.id;
        return;
    }
    const handlers = {load, attach, generate};
    const handler = handlers[msg.type];
    if (!handler) return;
    queue = queue.then(() => ready).then(() => handler(msg)).catch((e) => {
        post({type: 'error', kind: msg.kind || msg.type, message: `internal error: ${e.message || e}`});
        if (msg.type === 'generate') post({type: 'done', id: msg.id, tokens: 0, tok_s: 0, prefill_tok_s: 0, reason: 'error'});
    });
};
