/*
 * app.js: the chat page. All inference happens in worker.js; this file only wires the UI.
 *
 * Safety rule: text from the model, from files (names, error messages) and from the user goes
 * into the page as text (textContent / text nodes), never as HTML.
 */
'use strict';

const $ = (id) => document.getElementById(id);
const ui = {
    modelFile: $('model-file'), adapterFile: $('adapter-file'), dropzone: $('dropzone'),
    modelName: $('model-name'), modelInfo: $('model-info'), adapterName: $('adapter-name'),
    adapterOn: $('adapter-on'), loadProgress: $('load-progress'), notice: $('notice'),
    conversation: $('conversation'), composer: $('composer'), prompt: $('prompt'),
    send: $('send'), stop: $('stop'), clear: $('clear'), status: $('status'),
    prefill: $('prefill-progress'),
};

const state = {ready: false, model: false, loading: 0, genId: 0, running: null, kernels: ''};

/* ---------------------------------------------------------------------------------------------
 * helpers */

function el(tag, className, text) {
    const e = document.createElement(tag);
    if (className) e.className = className;
    if (text !== undefined) e.textContent = text;
    return e;
}

function setStatus(text, kind) {
    ui.status.textContent = text;
    ui.status.className = kind || '';
}

function showNotice(text, kind) {
    ui.notice.textContent = text;
    ui.notice.className = kind || 'error';
    ui.notice.hidden = !text;
}

function rate(r) {
    return `${r.toFixed(r < 100 ? 1 : 0)} tok/s`;
}

function mib(n) {
    return n >= 2 ** 30 ? `${(n / 2 ** 30).toFixed(2)} GiB` : `${(n / 2 ** 20).toFixed(1)} MiB`;
}

function updateControls() {
    const idle = state.ready && !state.running && !state.loading;
    ui.send.disabled = !(idle && state.model);
    ui.prompt.disabled = !state.model;
    ui.prompt.placeholder = state.model ? 'Type a message (Enter sends, Shift+Enter for a new line)'
        : 'Load a model, then type here';
    ui.stop.disabled = !state.running;
    ui.modelFile.disabled = ui.adapterFile.disabled = !!state.running;
    ui.adapterOn.disabled = !(idle && state.model && ui.adapterName.dataset.loaded === '1');
}

/* The settings as typed; an empty field takes its default (the value index.html gives it). */
function readSettings() {
    const num = (id) => {
        const v = parseFloat($(id).value);
        return Number.isFinite(v) ? v : parseFloat($(id).defaultValue);
    };
    return {
        temperature: num('temperature'),
        top_k: num('top-k'),
        top_p: num('top-p'),
        rep_penalty: num('rep-penalty'),
        max_new: num('max-new'),
        seed: $('seed').value.trim() === '' ? null : num('seed'), // null: a random seed, shown with the reply
    };
}

/* The ranges of the CLIs, with their messages (infer.py's check_sampling, infer_c/main.c), or ''. */
function settingsProblem(s) {
    const integer = [['top_k', s.top_k], ['max new tokens', s.max_new], ...(s.seed === null ? [] : [['seed', s.seed]])];
    for (const [name, v] of integer) if (!Number.isInteger(v)) return `${name} must be an integer, got ${v}`;
    if (s.temperature < 0) return `temperature must be >= 0 (0 = greedy), got ${s.temperature}`;
    if (s.top_k < 0) return `top_k must be >= 0 (0 = off), got ${s.top_k}`;
    if (!(s.top_p > 0 && s.top_p <= 1)) return `top_p must be in (0, 1] (1 = off), got ${s.top_p}`;
    if (!(s.rep_penalty > 0)) return `repetition penalty must be > 0 (1 = off), got ${s.rep_penalty}`;
    if (s.max_new < 0) return `max new tokens must be >= 0, got ${s.max_new}`;
    if (s.seed !== null && !(s.seed >= 0 && s.seed <= 2147483647)) return `seed must be in [0, 2147483647], got ${s.seed}`;
    return '';
}

/* ---------------------------------------------------------------------------------------------
 * the worker */

/* Browsers do not start workers from file:// pages; the controls then stay disabled. */
const worker = location.protocol === 'file:' ? null : new Worker('worker.js');
if (!worker) {
    setStatus('Open this page through its local web server: python infer/serve.py in the repository, ' +
              'then http://localhost:8000/ (browsers do not run workers from file://).', 'error');
} else {
    worker.onerror = (e) => setStatus(`The engine failed: ${e.message || 'unknown error'}`, 'error');
}

const handlers = {
    ready(m) {
        state.ready = true;
        state.kernels = m.kernels;
        setStatus(`Engine ready (${m.kernels} kernels). Load a model to start.`);
        updateControls();
    },
    fatal(m) {
        setStatus(m.message, 'error');
    },
    loading(m) {
        ui.loadProgress.hidden = false;
        ui.loadProgress.max = m.total;
        ui.loadProgress.value = m.loaded;
        setStatus(`Reading ${m.kind} “${m.name}”: ${mib(m.loaded)} of ${mib(m.total)}`);
    },
    loaded(m) {
        state.loading = Math.max(0, state.loading - 1);
        pendingNames[m.kind].shift();
        ui.loadProgress.hidden = true;
        if (m.kind === 'model') {
            state.model = true;
            ui.modelName.textContent = m.name;
            const c = m.info;
            ui.modelInfo.textContent = `${c.quant}${c.quant === 'q8' ? ` (groups of ${c.group_size})` : ''}, ` +
                `${c.n_layer} layers × ${c.n_embd}, ${c.n_head} heads (${c.n_kv_head} KV), ` +
                `vocab ${c.tok_vocab}${c.tokenizer === 'bpe' ? ' (byte-level BPE)' : ''}, ` +
                `context ${c.block_size}, layout ${c.layout}`;
            setStatus(`Model “${m.name}” loaded (${state.kernels} kernels). Type a message.`);
        } else {
            ui.adapterName.textContent = m.name;
            ui.adapterName.dataset.loaded = '1';
            setStatus(`Adapter “${m.name}” loaded${state.model ? ' and attached' : ': load a model to use it'}.`);
        }
        showNotice(m.warning || '', 'warning');
        updateControls();
    },
    adapter(m) {
        ui.adapterOn.checked = m.on;
        if (m.warning) showNotice(m.warning, 'warning');
        updateControls();
    },
    error(m) {
        const what = {model: 'Could not load the model', adapter: 'Could not load the adapter',
                      attach: 'Could not attach the adapter', generate: 'Generation failed'}[m.kind] || 'Error';
        const name = m.kind === 'model' || m.kind === 'adapter' ? pendingNames[m.kind].shift() : null;
        if (m.kind === 'model' || m.kind === 'adapter') {
            state.loading = Math.max(0, state.loading - 1);
            ui.loadProgress.hidden = true;
        }
        showNotice(`${what}${name ? ` “${name}”` : ''}: ${m.message}`, 'error');
        if (m.kind === 'model') {
            setStatus(state.model ? 'Ready: the model loaded before is still in use.' : 'Load a model to start.');
        } else if (m.kind === 'adapter') {
            setStatus(ui.adapterName.dataset.loaded === '1' ? 'Ready: the adapter loaded before is still there.'
                : 'Ready.');
        }
        updateControls();
    },
    prompt(m) { // the user's text as the model sees it: characters outside its vocabulary show
        const turn = turns.get(m.id); // as <|unknown|>, and a note says so
        if (!turn) return;
        if (m.text !== turn.user.textContent) {
            turn.userBox.append(el('div', 'meta', 'Shown as the model reads it: some characters are not in its ' +
                                   'vocabulary (<|unknown|>).'));
        }
        turn.user.textContent = m.text;
        if (turn.echo) turn.echo.textContent = m.text;
        turn.meta.textContent = m.kept < m.tokens
            ? `prompt ${m.tokens} tokens: only the last ${m.kept} fit the context`
            : `prompt ${m.tokens} tokens`;
    },
    progress(m) {
        if (m.id !== state.running) return;
        ui.prefill.hidden = m.done >= m.total;
        ui.prefill.max = m.total;
        ui.prefill.value = m.done;
        setStatus(m.done < m.total ? `Reading the prompt: ${m.done} / ${m.total} tokens` : 'Generating…');
        const turn = turns.get(m.id);
        if (turn && m.done >= m.total) turn.t0 = performance.now(); // the live rate counts from here
    },
    token(m) {
        const turn = turns.get(m.id);
        if (!turn) return;
        turn.pending += m.text;
        turn.count++;
        scheduleRender(turn);
    },
    done(m) {
        const turn = turns.get(m.id);
        if (turn) {
            renderTokens(turn);
            turn.box.classList.remove('running');
            const why = {eos: 'end of text', max: 'max new tokens', full: 'context full', stopped: 'stopped',
                         error: 'error'}[m.reason] || m.reason;
            turn.meta.textContent += ` · ${m.tokens} new tokens · ${rate(m.tok_s)} (prompt ${rate(m.prefill_tok_s)})` +
                ` · ${why}` +
                (m.seed !== undefined ? ` · seed ${m.seed}` : '');
            turn.box.dataset.reason = m.reason;
            turn.box.dataset.tokS = m.tok_s.toFixed(3);
        }
        if (m.id === state.running) {
            state.running = null;
            ui.prefill.hidden = true;
            setStatus(`Done: ${m.tokens} tokens at ${rate(m.tok_s)}${m.reason === 'stopped' ? ' (stopped)' : ''}.`);
        }
        updateControls();
        if (!state.running) ui.prompt.focus();
    },
};

if (worker) {
    worker.onmessage = (ev) => {
        const h = handlers[ev.data.type];
        if (h) h(ev.data);
    };
}

/* ---------------------------------------------------------------------------------------------
 * files: pickers and drag-and-drop */

const pendingNames = {model: [], adapter: []}; // names of loads in flight, for error messages

function loadFile(file, kind) {
    if (!worker) return;
    state.loading++;
    pendingNames[kind].push(file.name);
    showNotice('');
    setStatus(`Reading ${kind} “${file.name}”…`);
    updateControls();
    worker.postMessage({type: 'load', kind, file}); // a File is cheap to send: the worker reads it
}

/* Nano .bin header: magic (8 bytes), version (8), model type at 16: 0 = model, 10 = LoRA adapter.
 * Anything else goes to the model loader, whose message says what is wrong. */
async function kindOf(file) {
    try {
        const head = new DataView(await file.slice(0, 20).arrayBuffer());
        if (head.byteLength >= 20 && head.getUint32(0, true) === 0x42443453 && head.getUint32(4, true) === 0x55524C4D &&
            head.getInt32(16, true) === 10) return 'adapter';
    } catch (e) { /* unreadable: the loader reports it */ }
    return 'model';
}

ui.modelFile.addEventListener('change', () => {
    if (ui.modelFile.files.length) loadFile(ui.modelFile.files[0], 'model');
    ui.modelFile.value = ''; // picking the same file again still fires 'change'
});
ui.adapterFile.addEventListener('change', () => {
    if (ui.adapterFile.files.length) loadFile(ui.adapterFile.files[0], 'adapter');
    ui.adapterFile.value = '';
});

// a file dropped anywhere else must not make the browser navigate away to it
for (const type of ['dragover', 'drop']) window.addEventListener(type, (e) => e.preventDefault());
ui.dropzone.addEventListener('dragover', (e) => {
    e.preventDefault();
    ui.dropzone.classList.add('over');
});
ui.dropzone.addEventListener('dragleave', () => ui.dropzone.classList.remove('over'));
ui.dropzone.addEventListener('drop', async (e) => {
    e.preventDefault();
    ui.dropzone.classList.remove('over');
    if (state.running) return;
    const files = Array.from(e.dataTransfer.files);
    const kinds = await Promise.all(files.map(kindOf));
    // models first, so that an adapter dropped with its model is checked against it
    files.forEach((f, i) => kinds[i] === 'model' && loadFile(f, 'model'));
    files.forEach((f, i) => kinds[i] === 'adapter' && loadFile(f, 'adapter'));
});

ui.adapterOn.addEventListener('change', () => {
    worker.postMessage({type: 'attach', on: ui.adapterOn.checked});
    setStatus(ui.adapterOn.checked ? 'Adapter attached.' : 'Adapter detached.');
});

/* ---------------------------------------------------------------------------------------------
 * conversation */

const turns = new Map();

function scrollDown() {
    ui.conversation.scrollTop = ui.conversation.scrollHeight;
}

/* Tokens reach the page faster than it should lay itself out (hundreds per second on a small
 * model): they are collected and shown at most every RENDER_MS, in an animation frame. Each layout
 * and paint here is CPU time that the worker, on a machine with few cores, would otherwise have. */
const RENDER_MS = 50;
function renderTokens(turn) {
    turn.frame = 0;
    if (!turn.pending) return;
    turn.gen.appendData(turn.pending); // a text node: model output is never parsed as HTML
    turn.pending = '';
    if (turns.get(state.running) === turn) {
        const secs = (performance.now() - turn.t0) / 1000;
        setStatus(`Generating… ${turn.count} tokens, ${rate(turn.count / secs)}`);
    }
    scrollDown();
}

function scheduleRender(turn) {
    if (turn.frame) return;
    turn.frame = setTimeout(() => requestAnimationFrame(() => renderTokens(turn)), RENDER_MS);
}

function send() {
    if (ui.send.disabled) return;
    const settings = readSettings();
    const problem = settingsProblem(settings);
    if (problem) { // nothing is sent: the message names the setting, as the CLIs do
        showNotice(`Settings: ${problem}`, 'error');
        return;
    }
    if (ui.notice.textContent.startsWith('Settings: ')) showNotice(''); // fixed now
    const text = ui.prompt.value;
    const mode = document.querySelector('input[name="mode"]:checked').value;
    const id = ++state.genId;
    const turn = {count: 0, t0: performance.now(), pending: '', frame: 0};
    const userBox = turn.userBox = el('div', 'msg user');
    userBox.append(el('div', 'who', mode === 'instruct' ? 'You' : 'Prompt'));
    turn.user = el('div', 'text', text);
    userBox.append(turn.user);
    turn.box = el('div', 'msg model running');
    turn.box.dataset.id = String(id);
    turn.box.append(el('div', 'who', ui.adapterOn.checked ? 'Nano + adapter' : 'Nano'));
    const body = el('div', 'text');
    if (mode === 'continue') { // a continuation reads on from the prompt
        turn.echo = el('span', 'echo', text);
        body.append(turn.echo);
    }
    const gen = el('span', 'gen');
    turn.gen = document.createTextNode('');
    gen.append(turn.gen);
    body.append(gen);
    turn.box.append(body);
    turn.meta = el('div', 'meta', '');
    turn.box.append(turn.meta);
    ui.conversation.append(userBox, turn.box);
    turns.set(id, turn);
    scrollDown();
    state.running = id;
    updateControls();
    setStatus('Reading the prompt…');
    worker.postMessage({type: 'generate', id, text, mode, settings});
    ui.prompt.value = '';
}

ui.composer.addEventListener('submit', (e) => {
    e.preventDefault();
    send();
});
ui.prompt.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) { // isComposing: CJK input methods use Enter
        e.preventDefault();
        send();
    }
});
ui.stop.addEventListener('click', () => {
    if (state.running) worker.postMessage({type: 'stop', id: state.running});
});
ui.clear.addEventListener('click', () => {
    if (state.running) return;
    ui.conversation.replaceChildren();
    turns.clear();
});

updateControls();
