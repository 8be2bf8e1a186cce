/*
 * wasm_api.c: the browser's entry points into the C engine (../infer_c/nano.c), for worker.js.
 *
 * The model code is nano.c itself, unchanged. It is #included here rather than linked next to
 * this file for one reason: its kernel table (g_rows_f32, g_wsum, g_q8_256: the runtime dispatch
 * of section 2) is static, and nano.c has kernels for x86 only, so under wasm it would run its
 * scalar ones. The SIMD128 kernels below plug into that table; everything else (loading and
 * validation, tokenizer, forward pass, sampler, LoRA) is nano.c's code; the prompt's matrix
 * products (nano.c's generic kernel for CPUs without matrix-matrix ones) run the SIMD128 row
 * kernels over tiles of rows. Should nano.c gain a wasm_simd128.h path of its own, this file goes
 * back to linking it.
 *
 * The rest adapts nano.h to what JavaScript can call through WebAssembly: i32/f32/f64
 * arguments, pointers as offsets into the linear memory, strings as UTF-8 bytes (never UTF-16:
 * worker.js encodes with TextEncoder and decodes with TextDecoder, so characters outside the
 * BMP survive the boundary).
 *
 * Ownership: JS copies a file into a buffer from wa_malloc and hands it to wa_model_load or
 * wa_lora_load, which own it from then on (nano_load_buffer keeps pointers into it); it is
 * freed with the model or adapter, or at once when loading fails.
 *
 * Only the functions marked EXPORT are visible to JS; the linker drops the rest, nano.c's file
 * loaders (fopen) included, which keeps the WASI imports to three stubs (fd_write, fd_seek,
 * fd_close: stdio's, never called).
 */
#include "../infer_c/nano.c"

#include <wasm_simd128.h>

#define EXPORT(name) __attribute__((export_name(#name))) name

typedef struct WLora WLora;

typedef struct {
    Nano *m;
    void *buf; /* the file's bytes: the weights live in it */
    NanoSampler sampler;
    WLora *lora; /* attached adapter or NULL */
} WModel;

struct WLora {
    NanoLora *a;
    void *buf;
    WModel *on; /* model it is attached to, or NULL: freeing either side unlinks the other */
};

/* -- SIMD128 kernels ------------------------------------------------------------------------
 * Same contracts as nano.c's scalar ones (rows_f32_fn, wsum_fn, dot_q8_fn). SIMD128 has no FMA
 * (relaxed-simd has one; clang-14 does not), so mul + add; four accumulators hide the add latency.
 * There is no prefetch instruction in wasm either. */

static float hsum_f32x4(v128_t v)
{
    return (wasm_f32x4_extract_lane(v, 0) + wasm_f32x4_extract_lane(v, 1)) +
           (wasm_f32x4_extract_lane(v, 2) + wasm_f32x4_extract_lane(v, 3));
}

static float row_f32_simd128(const float *w, const float *x, int n)
{
    v128_t s0 = wasm_f32x4_splat(0.0f), s1 = s0, s2 = s0, s3 = s0;
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = wasm_f32x4_add(s0, wasm_f32x4_mul(wasm_v128_load(w + i), wasm_v128_load(x + i)));
        s1 = wasm_f32x4_add(s1, wasm_f32x4_mul(wasm_v128_load(w + i + 4), wasm_v128_load(x + i + 4)));
        s2 = wasm_f32x4_add(s2, wasm_f32x4_mul(wasm_v128_load(w + i + 8), wasm_v128_load(x + i + 8)));
        s3 = wasm_f32x4_add(s3, wasm_f32x4_mul(wasm_v128_load(w + i + 12), wasm_v128_load(x + i + 12)));
    }
    for (; i + 4 <= n; i += 4) s0 = wasm_f32x4_add(s0, wasm_f32x4_mul(wasm_v128_load(w + i), wasm_v128_load(x + i)));
    float s = hsum_f32x4(wasm_f32x4_add(wasm_f32x4_add(s0, s1), wasm_f32x4_add(s2, s3)));
    for (; i < n; i++) s += w[i] * x[i];
    return s;
}

static void rows_f32_simd128(const float *w, const float *x, float *out, int rows, int n)
{
    for (int r = 0; r < rows; r++) out[r] = row_f32_simd128(w + (size_t)r * n, x, n);
}

/* out[i] = sum_t a[t] v[t n + i]: a 16-float slice of out stays in registers across the T rows */
static void wsum_simd128(float *out, const float *a, const float *v, int T, int n)
{
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        v128_t s0 = wasm_f32x4_splat(0.0f), s1 = s0, s2 = s0, s3 = s0;
        for (int t = 0; t < T; t++) {
            const float *p = v + (size_t)t * n + i;
            v128_t at = wasm_f32x4_splat(a[t]);
            s0 = wasm_f32x4_add(s0, wasm_f32x4_mul(at, wasm_v128_load(p)));
            s1 = wasm_f32x4_add(s1, wasm_f32x4_mul(at, wasm_v128_load(p + 4)));
            s2 = wasm_f32x4_add(s2, wasm_f32x4_mul(at, wasm_v128_load(p + 8)));
            s3 = wasm_f32x4_add(s3, wasm_f32x4_mul(at, wasm_v128_load(p + 12)));
        }
        wasm_v128_store(out + i, s0);
        wasm_v128_store(out + i + 4, s1);
        wasm_v128_store(out + i + 8, s2);
        wasm_v128_store(out + i + 12, s3);
    }
    for (; i + 4 <= n; i += 4) {
        v128_t s0 = wasm_f32x4_splat(0.0f);
        for (int t = 0; t < T; t++)
            s0 = wasm_f32x4_add(s0, wasm_f32x4_mul(wasm_f32x4_splat(a[t]), wasm_v128_load(v + (size_t)t * n + i)));
        wasm_v128_store(out + i, s0);
    }
    for (; i < n; i++) {
        float s0 = 0;
        for (int t = 0; t < T; t++) s0 += a[t] * v[(size_t)t * n + i];
        out[i] = s0;
    }
}

/* 16 int8 products summed into 4 int32 lanes. Each half is loaded already sign-extended to int16
 * (v128.load8x8_s: one pmovsxbw with a memory operand on x86), then i32x4.dot_i16x8_s multiplies
 * and adds adjacent pairs (pmaddwd). Faster in V8 than a 16-byte load + extend_low/high (the high
 * half costs an unpack and a shift) or extmul + extadd_pairwise. No overflow: |w|, |x| <= 128. */
static inline v128_t dot_i8x16(const int8_t *w, const int8_t *x)
{
    v128_t lo = wasm_i32x4_dot_i16x8(wasm_i16x8_load8x8(w), wasm_i16x8_load8x8(x));
    v128_t hi = wasm_i32x4_dot_i16x8(wasm_i16x8_load8x8(w + 8), wasm_i16x8_load8x8(x + 8));
    return wasm_i32x4_add(lo, hi);
}

/* gs % 16 == 0 (pick_q8 hands it multiples of 32) */
static float dot_q8_simd128(const int8_t *w, const float *ws, const int8_t *x, const float *xs, int n, int gs)
{
    v128_t acc = wasm_f32x4_splat(0.0f);
    for (int g = 0; g < n / gs; g++) {
        v128_t i0 = wasm_i32x4_splat(0), i1 = i0;
        int j = g * gs, end = j + gs;
        for (; j + 32 <= end; j += 32) {
            i0 = wasm_i32x4_add(i0, dot_i8x16(w + j, x + j));
            i1 = wasm_i32x4_add(i1, dot_i8x16(w + j + 16, x + j + 16));
        }
        if (j < end) i0 = wasm_i32x4_add(i0, dot_i8x16(w + j, x + j));
        acc = wasm_f32x4_add(acc, wasm_f32x4_mul(wasm_f32x4_convert_i32x4(wasm_i32x4_add(i0, i1)),
                                                 wasm_f32x4_splat(ws[g] * xs[g])));
    }
    return hsum_f32x4(acc);
}

/* runs from _initialize(), before JS can load anything: pick_q8() reads g_q8_256 at load time */
__attribute__((constructor)) static void use_simd128_kernels(void)
{
    simd_init(); /* sets its "done" flag: nothing overrides the choice below later */
    g_rows_f32 = rows_f32_simd128;
    g_wsum = wsum_simd128;
    g_q8_256 = dot_q8_simd128; /* pick_q8 takes it for group sizes that are multiples of 32 */
    g_kernel_name = "wasm-simd128";
}

static char g_err[NANO_ERRLEN];
static char g_info[1024];
static size_t g_tok_len;

/* -- memory and errors -------------------------------------------------------------------- */

void *EXPORT(wa_malloc)(size_t n) { return malloc(n ? n : 1); }
void EXPORT(wa_free)(void *p) { free(p); }
/* the last error (or warning) message, NUL-terminated UTF-8 */
const char *EXPORT(wa_error)(void) { return g_err; }
const char *EXPORT(wa_kernel_name)(void) { return nano_kernel_name(); }

/* -- models -------------------------------------------------------------------------------- */

/* Takes ownership of buf (size bytes). NULL on failure, message in wa_error(). */
WModel *EXPORT(wa_model_load)(void *buf, size_t size, int verify)
{
    g_err[0] = 0;
    WModel *w = calloc(1, sizeof *w);
    if (!w) {
        snprintf(g_err, sizeof g_err, "out of memory");
        free(buf);
        return NULL;
    }
    w->m = nano_load_buffer(buf, size, verify, g_err);
    if (!w->m) {
        free(w);
        free(buf);
        return NULL;
    }
    w->buf = buf;
    /* the defaults of the CLIs (infer_c/main.c, infer.py); worker.js sets the page's before each reply */
    w->sampler.temperature = 0.8f;
    w->sampler.top_p = 0.95f;
    w->sampler.rep_penalty = 1.0f;
    nano_sampler_seed(&w->sampler, 0);
    return w;
}

void EXPORT(wa_model_free)(WModel *w)
{
    if (!w) return;
    if (w->lora) w->lora->on = NULL;
    nano_free(w->m);
    free(w->buf);
    free(w);
}

/* The configuration as a JSON object (for the page's status line, and the special token ids of the
 * prompt templates: 2..5 for the trie tokenizer, after GPT-2's ids for BPE); valid until the next call. */
const char *EXPORT(wa_model_info)(const WModel *w)
{
    const NanoConfig *c = nano_config(w->m);
    snprintf(g_info, sizeof g_info,
             "{\"layout\":\"%d.%d\",\"quant\":\"%s\",\"group_size\":%d,\"block_size\":%d,\"vocab_size\":%d,"
             "\"tok_vocab\":%d,\"n_layer\":%d,\"n_embd\":%d,\"n_head\":%d,\"n_kv_head\":%d,\"n_hidden\":%d,"
             "\"head_dim\":%d,\"use_rope\":%d,\"is_causal\":%d,\"has_fingerprint\":%d,\"tokenizer\":\"%s\","
             "\"bos\":%d,\"eos\":%d,\"instruct\":%d,\"response\":%d}",
             c->major, c->minor, c->quant == NANO_QUANT_Q8 ? "q8" : "fp32", c->group_size, c->block_size,
             c->vocab_size, c->tok_vocab, c->n_layer, c->n_embd, c->n_head, c->n_kv_head, c->n_hidden, c->head_dim,
             c->use_rope, c->is_causal, c->has_fingerprint, c->tok_kind == NANO_TOK_BPE ? "bpe" : "trie",
             c->special[NANO_BOS], c->special[NANO_EOS], c->special[NANO_INSTRUCT], c->special[NANO_RESPONSE]);
    return g_info;
}

int EXPORT(wa_block_size)(const WModel *w) { return nano_config(w->m)->block_size; }
int EXPORT(wa_is_causal)(const WModel *w) { return nano_config(w->m)->is_causal; }

/* -- tokenizer ----------------------------------------------------------------------------- */

/* len bytes of UTF-8 -> at most max_ids ids; returns how many the text needs, or -1 when that is
 * more than a buffer of ids in wasm32's memory can hold (or a huge BPE piece ran out of memory) */
int EXPORT(wa_encode)(const WModel *w, const char *text, size_t len, int *ids, int max_ids)
{
    size_t n = nano_encode(w->m, text, len, ids, max_ids > 0 ? (size_t)max_ids : 0);
    return n > 0x1fffffff ? -1 : (int)n;
}

/* the prompt's ids in the framing of the model's layout (nano_encode_prompt: no <|bos|> for 2024.10) */
int EXPORT(wa_encode_prompt)(const WModel *w, const char *text, size_t len, int instruct, int *ids, int max_ids)
{
    size_t n = nano_encode_prompt(w->m, text, len, instruct, ids, max_ids > 0 ? (size_t)max_ids : 0);
    return n > 0x7fffffff ? 0x7fffffff : (int)n;
}

/* UTF-8 of a token: the pointer, then its length from wa_token_len() */
const char *EXPORT(wa_token_text)(const WModel *w, int id) { return nano_token_text(w->m, id, &g_tok_len); }
int EXPORT(wa_token_len)(void) { return (int)g_tok_len; }

/* -- generation ---------------------------------------------------------------------------- */

void EXPORT(wa_reset)(WModel *w) { nano_reset(w->m); }
int EXPORT(wa_feed)(WModel *w, int token) { return nano_feed(w->m, token); }
int EXPORT(wa_prefill)(WModel *w, const int *ids, int n) { return nano_prefill(w->m, ids, n); }
/* n ids appended as one batch (nano_feed_batch): the page's prefill, a slice at a time */
int EXPORT(wa_feed_batch)(WModel *w, const int *ids, int n) { return nano_feed_batch(w->m, ids, n, NULL); }
int EXPORT(wa_context_len)(const WModel *w) { return nano_context_len(w->m); }
int EXPORT(wa_sample)(WModel *w) { return nano_sample(w->m, &w->sampler); }
/* 1 where generation ends at this token (nano_is_stop: <|eos|>, and llama2.c models' <s>) */
int EXPORT(wa_is_stop)(const WModel *w, int token) { return nano_is_stop(w->m, token); }

void EXPORT(wa_sampler_set)(WModel *w, float temperature, int top_k, float top_p, float rep_penalty)
{
    w->sampler.temperature = temperature;
    w->sampler.top_k = top_k > 0 ? top_k : 0;
    w->sampler.top_p = top_p;
    w->sampler.rep_penalty = rep_penalty;
}

/* a double carries any seed up to 2^53 exactly; the CLI's -s takes 0 .. 2^31-1 */
void EXPORT(wa_sampler_seed)(WModel *w, double seed)
{
    nano_sampler_seed(&w->sampler, seed >= 0 && seed < 18446744073709551616.0 ? (uint64_t)seed : 0);
}

/* -- LoRA adapters ------------------------------------------------------------------------- */

/* Takes ownership of buf. NULL on failure, message in wa_error(). */
WLora *EXPORT(wa_lora_load)(void *buf, size_t size, int verify)
{
    g_err[0] = 0;
    WLora *l = calloc(1, sizeof *l);
    if (!l) {
        snprintf(g_err, sizeof g_err, "out of memory");
        free(buf);
        return NULL;
    }
    l->a = nano_lora_load_buffer(buf, size, verify, g_err);
    if (!l->a) {
        free(l);
        free(buf);
        return NULL;
    }
    l->buf = buf;
    return l;
}

void EXPORT(wa_lora_detach)(WModel *w)
{
    if (w->lora) w->lora->on = NULL;
    w->lora = NULL;
    nano_lora_detach(w->m);
}

/* 0: attached; 1: attached with a warning in wa_error(); -1: refused (message in wa_error()) */
int EXPORT(wa_lora_attach)(WModel *w, WLora *l)
{
    g_err[0] = 0;
    if (l->on && l->on != w) wa_lora_detach(l->on);
    int r = nano_lora_attach(w->m, l->a, g_err);
    if (r < 0) return r;
    if (w->lora && w->lora != l) w->lora->on = NULL;
    w->lora = l;
    l->on = w;
    return r;
}

void EXPORT(wa_lora_free)(WLora *l)
{
    if (!l) return;
    if (l->on) wa_lora_detach(l->on);
    nano_lora_free(l->a);
    free(l->buf);
    free(l);
}
