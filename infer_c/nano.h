/*
 * nano.h: the C inference core of Nano (nano.c). No main(), no printing: the CLI (main.c) and a
 * future browser build (wasm32-wasi) drive it through this API.
 *
 * Reads two file layouts: Nano's 2026.11 (docs/FORMAT.md) and the original 2024.10
 * (../shared/docs/nano-bin-2024.10.md), fp32 and Q8_0, base models and LoRA adapters.
 * Numerics follow model.py; sampling follows model.sample_next; the tokenizers follow
 * tokenizer.TrieTokenizer (greedy longest match over code points) and tiktoken's byte-level BPE
 * (GPT-2's encoding, and the Llama-3 and Qwen2 pre-tokenization patterns).
 *
 * Errors: loaders return NULL and write a message into `err` (NANO_ERRLEN bytes). Nothing in here
 * aborts or exits on bad input.
 */
#ifndef NANO_H
#define NANO_H

#include <stddef.h>
#include <stdint.h>

#define NANO_ERRLEN 256
/* temperatures below this are greedy, in every engine (model.MIN_TEMPERATURE): dividing the logits by
   a tinier one overflows to infinity, and sampling from infinities is noise */
#define NANO_MIN_TEMPERATURE 1e-6f
#define NANO_QUANT_F32 0
#define NANO_QUANT_Q8 800

/* Nano's special tokens, as indices into NanoConfig.special (which holds their ids). The trie
 * tokenizer has them at ids 0..5 (tokenizer.py); a BPE tokenizer names their ids in its section. */
enum { NANO_PAD = 0, NANO_UNK = 1, NANO_BOS = 2, NANO_EOS = 3, NANO_INSTRUCT = 4, NANO_RESPONSE = 5, NANO_N_SPECIAL = 6 };

/* tokenizer kinds (the header's field at 96) */
enum { NANO_TOK_TRIE = 1, NANO_TOK_BPE = 2, NANO_TOK_LLAMA2C = 3 };

/* the header's bias field: which linear layers have a bias (q, k, v only: Qwen2; the bias is added
 * before RoPE rotates q and k, as model.py does) */
enum { NANO_BIAS_NONE = 0, NANO_BIAS_ALL = 1, NANO_BIAS_QKV = 2 };

/* return codes of nano_feed and friends */
enum { NANO_OK = 0, NANO_ERR = -1, NANO_FULL = 2 };

typedef struct {
    int major, minor;       /* file layout: 2026.11 or 2024.10 */
    int block_size, vocab_size, n_layer, n_embd, n_head, n_kv_head, n_hidden, head_dim;
    int shared_classifier;  /* output head = token embedding */
    int quant, group_size;  /* NANO_QUANT_*; group size actually used */
    int use_rope, is_causal, bias; /* bias: NANO_BIAS_* */
    double rope_theta, norm_eps;
    int tok_kind;           /* NANO_TOK_TRIE, NANO_TOK_BPE or NANO_TOK_LLAMA2C */
    int tok_vocab;          /* tokenizer size (<= vocab_size) */
    int special[NANO_N_SPECIAL]; /* id of <|padding|>, <|unknown|>, <|bos|>, <|eos|>, <|instruct_mark|>,
                                  * <|response_mark|> (index NANO_PAD ...); -1 where the tokenizer has none */
    int has_fingerprint;    /* 2026.11 files carry the base model's SHA-256 */
    uint8_t fingerprint[32];
} NanoConfig;

typedef struct {
    float temperature;      /* < NANO_MIN_TEMPERATURE (0, say): greedy */
    int top_k;              /* 0: off */
    float top_p;            /* >= 1: off */
    float rep_penalty;      /* 1: off */
    uint64_t rng;           /* xorshift64* state; nano_sampler_seed sets it */
} NanoSampler;

typedef struct Nano Nano;
typedef struct NanoLora NanoLora;

/* -- loading ------------------------------------------------------------------------------- */
/* verify: check the 2026.11 CRC-32 of the whole file (cheap next to loading; 0 skips it).
 * nano_load_buffer does not copy: `data` must outlive the model. */
Nano *nano_load_file(const char *path, int verify, char err[NANO_ERRLEN]);
Nano *nano_load_buffer(const void *data, size_t size, int verify, char err[NANO_ERRLEN]);
void nano_free(Nano *m);
const NanoConfig *nano_config(const Nano *m);
const char *nano_kernel_name(void); /* which SIMD kernels the dispatcher picked */

/* -- tokenizer ----------------------------------------------------------------------------- */
/* Encodes `len` bytes of UTF-8 (invalid bytes become U+FFFD like Python's errors="replace"; special
 * token strings in the text become their ids). Writes at most max_ids ids and returns how many the
 * text needs (call again with more room); (size_t)-1 when memory for a huge BPE piece ran out. */
size_t nano_encode(const Nano *m, const char *text, size_t len, int *ids, size_t max_ids);
/* The bytes of a token; ids outside the tokenizer give "<|unknown|>". Trie tokens are whole UTF-8
 * characters; a byte-level BPE token may end inside a character: print through a NanoUtf8Stream. */
const char *nano_token_text(const Nano *m, int id, size_t *len);
/* Whether generation ends at this token: the tokenizer's <|eos|>, and for llama2.c's tokenizer also its
 * <s> (bos), which begins the next text in llama2.c's data and where llama2.c's run.c stops. */
int nano_is_stop(const Nano *m, int token);

/* -- text streams: the bytes of consecutive tokens -> text ---------------------------------- */
/* A partial UTF-8 sequence at the end of what was fed is held back until it is complete (like
 * infer.py's StreamPrinter); ill-formed bytes become U+FFFD exactly as Python's
 * bytes.decode("utf-8", errors="replace") makes them, so the text streamed token by token is the
 * text of all the bytes decoded at once. Start from a zeroed struct. */
typedef struct {
    uint8_t held[3];
    int n_held;
} NanoUtf8Stream;
#define NANO_UTF8_OUT(n) (3 * ((size_t)(n) + 3)) /* room `out` needs for n input bytes */
/* feeds n bytes; writes the text that is complete into out; returns its length in bytes */
size_t nano_utf8_stream(NanoUtf8Stream *s, const char *in, size_t n, char *out);
/* end of the stream: a held-back partial sequence becomes U+FFFD (writes 0 or 3 bytes) */
size_t nano_utf8_finish(NanoUtf8Stream *s, char *out);
/* The ids a prompt is fed as, in the framing of the model's layout (docs/FORMAT.md, "Prompt framing"):
 *   2026.11: <|bos|>text, instruct <|bos|><|instruct_mark|>text<|response_mark|>  (infer.py, data.py)
 *   2024.10: text,        instruct <|instruct_mark|>text<|response_mark|>  (the original engine: no <|bos|>)
 * Same contract as nano_encode: writes at most max_ids ids, returns how many the prompt needs. */
size_t nano_encode_prompt(const Nano *m, const char *text, size_t len, int instruct, int *ids, size_t max_ids);

/* -- forward ------------------------------------------------------------------------------- */
/* One token at position pos through the KV cache (causal models); returns logits[vocab_size]
 * (owned by m, valid until the next call) or NULL for a bad token/pos or a bidirectional model. */
const float *nano_forward(Nano *m, int token, int pos);

/* -- generation context (the semantics of model.Transformer.generate) ------------------------ */
void nano_reset(Nano *m);                          /* empty context */
/* With OpenMP, nano_feed times its tokens and runs them on one thread or on the omp_get_max_threads()
 * of load time, whichever is faster (nano.c, ThreadTuner: a machine whose cores other processes
 * use); it sets the count with omp_set_num_threads. NANO_TUNE_THREADS=0 keeps the count fixed. */
int nano_feed(Nano *m, int token);                 /* append + forward; NANO_FULL when no room */
/* Appends n ids to the context and forwards them as a batch: blocks of up to 64 positions
 * (NANO_PREFILL_ROWS at load changes it) go through each layer as matrix-matrix products, filling the
 * KV cache, on all the threads of load time; the output head runs for the last position only, or
 * for every one into `logits` (n rows of vocab_size floats; NULL: none). Then nano_sample draws the
 * next token as after nano_feed: the same ids and logits as feeding the ids one by one, within
 * float rounding. NANO_FULL (nothing done) when they do not fit in the context; NANO_ERR for ids
 * outside the vocabulary, n < 1 or a bidirectional model. */
int nano_feed_batch(Nano *m, const int *ids, int n, float *logits);
/* reset, then nano_feed_batch the last block_size ids (a longer prompt keeps its most recent ones) */
int nano_prefill(Nano *m, const int *ids, int n);
/* nano_prefill with every position's logits: min(n, block_size) rows of vocab_size floats */
int nano_prefill_logits(Nano *m, const int *ids, int n, float *logits);
int nano_context_len(const Nano *m);               /* tokens forwarded so far (= next position) */
void nano_sampler_seed(NanoSampler *s, uint64_t seed);
int nano_sample(Nano *m, NanoSampler *s);          /* next id from the last logits, or -1 */

/* -- LoRA adapters ------------------------------------------------------------------------- */
NanoLora *nano_lora_load_file(const char *path, int verify, char err[NANO_ERRLEN]);
NanoLora *nano_lora_load_buffer(const void *data, size_t size, int verify, char err[NANO_ERRLEN]);
void nano_lora_free(NanoLora *a);
/* Checks the adapter against the base (shapes, and the base fingerprint when both files have one).
 * Returns 0 on success, 1 on success with a warning in err, -1 (message in err) when refused.
 * Attaching or detaching resets the generation context (the KV cache was computed without it). */
int nano_lora_attach(Nano *m, NanoLora *a, char err[NANO_ERRLEN]);
void nano_lora_detach(Nano *m);

#endif
