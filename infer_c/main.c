/*
 * main.c: the command-line front end of the C engine (nano.c): one-shot generation, an
 * interactive chat, and testing aids (--tokenize, --dump-logits) that let the Python tests
 * compare the engine with PyTorch.
 */
#define _POSIX_C_SOURCE 200809L
#include "nano.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Sampling defaults, the same in infer.py and in the browser page (README, "Talk to it"). */
#define DEFAULT_TEMPERATURE 0.8f
#define DEFAULT_TOP_P 0.95f
#define DEFAULT_SEED 0
#define DEFAULT_MAX_NEW 256

static void usage(FILE *f)
{
    fprintf(f,
            "usage: infer model.bin [options]\n"
            "  -l adapter.bin   attach a LoRA adapter (refused if it was made for another base model)\n"
            "  -i \"prompt\"      instruct mode: <|bos|><|instruct_mark|>prompt<|response_mark|>, until <|eos|>\n"
            "  -g \"prompt\"      continue mode: <|bos|>prompt, then continue the text (the prompt is echoed)\n"
            "                   (2024.10 files are framed as the original engine did: no <|bos|>)\n"
            "                   (with neither: an interactive REPL like infer.py's, one fresh prompt per\n"
            "                   message; /help lists its commands)\n"
            "  -t temp          temperature >= 0, 0 = greedy (default %g)\n"
            "  -k top_k         keep the k most likely tokens, >= 0, 0 = off (default 0)\n"
            "  -p top_p         nucleus sampling, in (0, 1], 1 = off (default %g)\n"
            "  -r penalty       repetition penalty over the context's tokens, > 0, 1 = off (default 1)\n"
            "  -n max_new       new tokens at most (default %d)\n"
            "  -s seed          random seed in [0, 2147483647] (default %d; the REPL reseeds every message)\n"
            "  -j threads       OpenMP threads at most (default: OMP_NUM_THREADS or all cores); the engine\n"
            "                   switches to one thread while that is faster (a busy machine);\n"
            "                   NANO_TUNE_THREADS=0 keeps the count fixed\n"
            "  --no-verify      skip the file's CRC-32 check (2026.11 files) for a faster start\n"
            "  --info           print the model's configuration and exit\n"
            "testing aids:\n"
            "  --tokenize TEXT       print the token ids of TEXT and exit\n"
            "  --tokenize-file PATH  the same for the bytes of a file\n"
            "  --ids 2,17,9          prompt given as token ids (no template); generates, or with\n"
            "  --dump-logits OUT     writes float32 logits [T, vocab] for every prompt position, each\n"
            "                        computed one token at a time through the KV cache\n"
            "  --dump-prefill-logits OUT  the same, computed as one batch (nano_prefill_logits, as the\n"
            "                        prompt is read)\n"
            "  --print-ids           print generated token ids instead of text\n"
            "  --ignore-eos          do not stop at <|eos|> (benchmarks)\n",
            DEFAULT_TEMPERATURE, DEFAULT_TOP_P, DEFAULT_MAX_NEW, DEFAULT_SEED);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int parse_int(const char *s, long lo, long hi, long *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) return -1;
    *out = v;
    return 0;
}

/* any number strtod reads, inf and nan included: check_sampling says what is out of range */
static int parse_float(const char *s, float *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || *end) return -1;
    *out = (float)v;
    return 0;
}

/* "error: ..." on stderr; returns 2, the exit status of a bad command line */
static int option_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    return 2;
}

/* The sampling ranges and messages of infer.py's check_sampling (the browser page's too): 0 when
 * all values are valid, else 2 after naming the first one that is not. */
static int check_sampling(float temperature, long top_k, float top_p, float rep, long max_new, long seed)
{
    const float values[] = {temperature, top_p, rep};
    const char *names[] = {"-t: temperature", "-p: top_p", "-r: repetition penalty"};
    for (int i = 0; i < 3; i++)
        if (!isfinite(values[i])) return option_error("%s must be a finite number, got %g", names[i], values[i]);
    if (temperature < 0) return option_error("-t: temperature must be >= 0 (0 = greedy), got %g", temperature);
    if (top_k < 0) return option_error("-k: top_k must be >= 0 (0 = off), got %ld", top_k);
    if (!(top_p > 0 && top_p <= 1)) return option_error("-p: top_p must be in (0, 1] (1 = off), got %g", top_p);
    if (!(rep > 0)) return option_error("-r: repetition penalty must be > 0 (1 = off), got %g", rep);
    if (max_new < 0) return option_error("-n: max new tokens must be >= 0, got %ld", max_new);
    if (seed < 0 || seed > 0x7fffffffL) return option_error("-s: seed must be in [0, 2147483647], got %ld", seed);
    return 0;
}

/* "2,17,9" or "2 17 9" -> ids; returns the count, or -1 for anything else: an empty item
 * ("1,,2", a leading or trailing comma), a negative or non-integer id */
static int parse_ids(const char *s, int **out)
{
    size_t cap = 16, n = 0;
    int *ids = malloc(cap * sizeof *ids);
    int need_id = 1; /* at the start and after a comma an id must follow */
    while (ids) {
        while (*s == ' ') s++;
        if (!*s) break;
        if (*s == ',') {
            if (need_id) break; /* an empty item */
            need_id = 1;
            s++;
            continue;
        }
        char *end;
        errno = 0;
        long v = strtol(s, &end, 10);
        if (errno || end == s || *s == '-' || *s == '+' || v > 0x7fffffff || (*end && *end != ',' && *end != ' '))
            break;
        if (n == cap) {
            int *more = realloc(ids, 2 * cap * sizeof *ids);
            if (!more) break;
            ids = more;
            cap *= 2;
        }
        ids[n++] = (int)v;
        need_id = 0;
        s = end;
    }
    if (!ids || *s || need_id || n > 0x7fffffff) {
        free(ids);
        return -1;
    }
    *out = ids;
    return (int)n;
}

/* encode into a fresh array with `pre` room in front and `post` after; returns the text's count */
static int *encode_alloc(const Nano *m, const char *text, size_t len, int pre, int post, int *n)
{
    size_t need = nano_encode(m, text, len, NULL, 0);
    if (need > 0x7fffff00) return NULL;
    int *ids = malloc((need + pre + post + 1) * sizeof *ids);
    if (!ids) return NULL;
    nano_encode(m, text, len, ids + pre, need);
    *n = (int)need;
    return ids;
}

typedef struct {
    int max_new, print_ids, ignore_eos;
    uint64_t seed; /* every REPL message starts from it, as in infer.py */
    NanoSampler sampler;
    NanoUtf8Stream text; /* a byte-level BPE token can end inside a character: held back until complete */
} GenOpts;

static void emit(const Nano *m, GenOpts *o, int tok, int first)
{
    if (o->print_ids) {
        printf(first ? "%d" : " %d", tok);
    } else {
        size_t len;
        const char *s = nano_token_text(m, tok, &len);
        char out[NANO_UTF8_OUT(256)];
        for (size_t i = 0; i < len; i += 256) /* in slices: the buffer stays small (wasm's stack) */
            fwrite(out, 1, nano_utf8_stream(&o->text, s + i, len - i < 256 ? len - i : 256, out), stdout);
    }
    fflush(stdout);
}

/* Sample until <|eos|>, max_new tokens, or a full context (model.generate's loop). The context
 * must hold the prompt already. Returns the last sampled token (EOS when it stopped there). */
static int generate(Nano *m, GenOpts *o, double *t_decode, int *n_out)
{
    double t0 = now_s();
    int last = -1, n = 0;
    for (int i = 0; i < o->max_new; i++) {
        int tok = nano_sample(m, &o->sampler);
        last = tok;
        if (tok < 0 || (nano_is_stop(m, tok) && !o->ignore_eos)) break;
        emit(m, o, tok, n == 0);
        n++;
        if (nano_feed(m, tok) != NANO_OK) break;
    }
    char tail[3];
    fwrite(tail, 1, nano_utf8_finish(&o->text, tail), stdout); /* an unfinished character: U+FFFD */
    *t_decode = now_s() - t0;
    *n_out = n;
    if (n == 0 && last == NANO_EOS) /* else the answer is a bare blank line, which looks like a fault */
        fprintf(stderr, "[no text: the model's first token was <|eos|> (end of text)]\n");
    return last;
}

static int g_threads = 1; /* the -j count (or OpenMP's default): the engine may use one thread for a while */

static void report(int n_prompt, double t_prompt, int n_new, double t_decode)
{
    int threads = g_threads;
    fprintf(stderr, "\n[prompt: %d tokens, %.1f tok/s | generated: %d tokens, %.2f tok/s | %d threads, %s kernels]\n",
            n_prompt, t_prompt > 0 ? n_prompt / t_prompt : 0.0, n_new, t_decode > 0 ? n_new / t_decode : 0.0, threads,
            nano_kernel_name());
}

static char *read_line(FILE *f)
{
    size_t cap = 256, n = 0;
    char *buf = malloc(cap);
    int c;
    while (buf && (c = fgetc(f)) != EOF) {
        if (n + 1 == cap) {
            char *more = cap < (1u << 24) ? realloc(buf, cap * 2) : NULL;
            if (!more) break;
            buf = more;
            cap *= 2;
        }
        if (c == '\n') break;
        buf[n++] = (char)c;
    }
    if (!buf || (n == 0 && c == EOF)) {
        free(buf);
        return NULL;
    }
    if (n && buf[n - 1] == '\r') n--;
    buf[n] = 0;
    return buf;
}

/* The prompt's ids in the framing of the model's layout (nano_encode_prompt), with the special ids of
 * the model's tokenizer; NULL (with a message) when out of memory or when the tokenizer lacks one of
 * the tokens the framing needs */
static int *prompt_ids(const Nano *m, const char *text, size_t len, int instruct, int *n_ids)
{
    const int *sp = nano_config(m)->special;
    if (instruct && (sp[NANO_INSTRUCT] < 0 || sp[NANO_RESPONSE] < 0)) {
        /* a Hugging Face model's chat template is not in the file: its chat prompts come from infer.py */
        fprintf(stderr, "error: the model's tokenizer has no <|instruct_mark|> or <|response_mark|> token, so instruct "
                        "mode cannot frame the prompt: use -g, or give the prompt as --ids\n");
        return NULL;
    }
    size_t need = nano_encode_prompt(m, text, len, instruct, NULL, 0);
    int *ids = need > 0x7fffff00 ? NULL : malloc((need + 1) * sizeof *ids);
    if (!ids) {
        fprintf(stderr, "error: out of memory\n");
        return NULL;
    }
    *n_ids = (int)nano_encode_prompt(m, text, len, instruct, ids, need);
    int context = nano_config(m)->block_size;
    if (*n_ids > context) /* nano_prefill keeps the most recent ids: say so, as infer.py does */
        fprintf(stderr, "[prompt is %d tokens; only the last %d fit the context]\n", *n_ids, context);
    return ids;
}

static const char CHAT_COMMANDS[] = "/mode              switch instruct <-> continue\n"
                                   "/lora              adapter on/off\n"
                                   "/lora adapter.bin  load and attach another adapter\n"
                                   "/quit              leave (or Ctrl-D)\n"
                                   "//text             send \"/text\" to the model\n";

/* A REPL line that starts with '/' (but not "//"): runs the command; returns 1 to leave. An unknown
 * command is reported, never sent to the model as a prompt. */
static int chat_command(Nano *m, const char *line, int *instruct, NanoLora **lora, int *lora_on, int verify)
{
    char err[NANO_ERRLEN];
    if (!strcmp(line, "/quit") || !strcmp(line, "/exit")) return 1;
    if (!strcmp(line, "/help")) {
        fputs(CHAT_COMMANDS, stderr);
    } else if (!strcmp(line, "/mode")) {
        *instruct = !*instruct;
        fprintf(stderr, "[%s mode]\n", *instruct ? "instruct" : "continue");
    } else if (!strcmp(line, "/lora")) { /* toggle the adapter of -l (or of the last /lora PATH) */
        if (!*lora) {
            fprintf(stderr, "no adapter loaded: start with -l adapter.bin or use /lora adapter.bin\n");
        } else {
            if (*lora_on) nano_lora_detach(m);
            else nano_lora_attach(m, *lora, err); /* it was checked when loaded */
            *lora_on = !*lora_on;
            fprintf(stderr, "[adapter %s]\n", *lora_on ? "on" : "off");
        }
    } else if (!strncmp(line, "/lora ", 6)) {
        NanoLora *a = nano_lora_load_file(line + 6, verify, err);
        int r = a ? nano_lora_attach(m, a, err) : -1;
        if (r < 0) {
            fprintf(stderr, "error: %s\n", err);
            nano_lora_free(a);
        } else {
            if (r > 0) fprintf(stderr, "%s\n", err);
            nano_lora_free(*lora); /* attach replaced it */
            *lora = a;
            *lora_on = 1;
            fprintf(stderr, "[adapter %s on]\n", line + 6);
        }
    } else {
        fprintf(stderr, "unknown command %s (not sent to the model); the commands are:\n%s", line, CHAT_COMMANDS);
    }
    return 0;
}

/* The REPL of infer.py: every message is a fresh prompt (no history), in instruct or continue mode,
 * sampled from the same seed. */
static int chat(Nano *m, GenOpts *o, NanoLora **lora, int verify)
{
    const int *sp = nano_config(m)->special;
    /* instruct mode where the tokenizer has its marks (not a Hugging Face model's: continue mode) */
    int instruct = sp[NANO_INSTRUCT] >= 0 && sp[NANO_RESPONSE] >= 0, lora_on = *lora != NULL; /* main attached -l */
    fprintf(stderr, "Nano chat, %s mode. /help lists the commands; /quit or Ctrl-D leaves.\n",
            instruct ? "instruct" : "continue");
    for (;;) {
        printf(instruct ? "\n> " : "\nprompt> ");
        fflush(stdout);
        char *line = read_line(stdin);
        if (!line) break;
        if (!line[0]) {
            free(line);
            continue;
        }
        if (line[0] == '/' && line[1] != '/') {
            int leave = chat_command(m, line, &instruct, lora, &lora_on, verify);
            free(line);
            if (leave) break;
            continue;
        }
        const char *text = line[0] == '/' ? line + 1 : line; /* "//text" sends "/text" */
        int n;
        int *ids = prompt_ids(m, text, strlen(text), instruct, &n);
        free(line);
        if (!ids) return 1;
        int r = nano_prefill(m, ids, n);
        free(ids);
        if (r != NANO_OK) {
            fprintf(stderr, "error: forward pass failed on the prompt\n");
            return 1;
        }
        double t;
        int n_new;
        nano_sampler_seed(&o->sampler, o->seed);
        generate(m, o, &t, &n_new);
        fprintf(stderr, "\n[%d tokens, %.1f tok/s]", n_new, t > 0 ? n_new / t : 0.0);
    }
    printf("\n");
    return 0;
}

/* every position's logits, token by token (nano_forward) or as the batched prompt (batch) */
static int dump_logits(Nano *m, const int *ids, int n, const char *path, int batch)
{
    const NanoConfig *c = nano_config(m);
    if (!c->is_causal) {
        fprintf(stderr, "error: bidirectional models are not supported by the C engine (it decodes through a causal "
                        "KV cache); use PyTorch (model.one_pass)\n");
        return 1;
    }
    if (n > c->block_size) {
        fprintf(stderr, "error: %d ids exceed the context of %d\n", n, c->block_size);
        return 1;
    }
    FILE *f = fopen(path, "wb");
    if (!f) {
        fprintf(stderr, "error: cannot write %s: %s\n", path, strerror(errno));
        return 1;
    }
    float *all = batch ? malloc(((size_t)n ? (size_t)n : 1) * (size_t)c->vocab_size * sizeof(float)) : NULL;
    if (batch && n > 0 && (!all || nano_prefill_logits(m, ids, n, all) != NANO_OK)) {
        fprintf(stderr, "error: %s\n", all ? "forward pass failed on the prompt" : "out of memory");
        free(all);
        fclose(f);
        return 1;
    }
    for (int t = 0; t < n; t++) {
        const float *logits = batch ? all + (size_t)t * c->vocab_size : nano_forward(m, ids[t], t);
        if (!logits || fwrite(logits, sizeof(float), (size_t)c->vocab_size, f) != (size_t)c->vocab_size) {
            fprintf(stderr, "error: forward pass or write failed at position %d\n", t);
            free(all);
            fclose(f);
            return 1;
        }
    }
    free(all);
    if (fclose(f)) {
        fprintf(stderr, "error: cannot write %s\n", path);
        return 1;
    }
    return 0;
}

static void print_info(const Nano *m)
{
    const NanoConfig *c = nano_config(m);
    printf("layout %d.%d, %s", c->major, c->minor, c->quant == NANO_QUANT_Q8 ? "Q8_0" : "fp32");
    if (c->quant == NANO_QUANT_Q8) printf(" (group size %d)", c->group_size);
    printf(", %s tokenizer", c->tok_kind == NANO_TOK_BPE ? "byte-level BPE" : "trie");
    printf("\nblock_size %d vocab_size %d (tokenizer %d) n_layer %d n_embd %d n_head %d n_kv_head %d head_dim %d "
           "n_hidden %d\n%s (theta %g), norm_eps %g, %s, bias %d, tied head %d, kernels %s\n",
           c->block_size, c->vocab_size, c->tok_vocab, c->n_layer, c->n_embd, c->n_head, c->n_kv_head, c->head_dim,
           c->n_hidden, c->use_rope ? "RoPE" : "learned positions", c->rope_theta, c->norm_eps,
           c->is_causal ? "causal" : "bidirectional", c->bias, c->shared_classifier, nano_kernel_name());
}

int main(int argc, char **argv)
{
    const char *model_path = NULL, *lora_path = NULL, *instruct = NULL, *cont = NULL, *ids_arg = NULL;
    const char *dump = NULL, *tok_text = NULL, *tok_file = NULL;
    float temperature = DEFAULT_TEMPERATURE, top_p = DEFAULT_TOP_P, rep = 1.0f;
    long top_k = 0, max_new = DEFAULT_MAX_NEW, threads = 0, seed = DEFAULT_SEED;
    int verify = 1, info = 0, dump_batch = 0;
    GenOpts o = {0};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *val = i + 1 < argc ? argv[i + 1] : NULL;
        int bad = 0, takes = 1;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(stdout); return 0; }
        else if (!strcmp(a, "--no-verify")) { verify = 0; takes = 0; }
        else if (!strcmp(a, "--print-ids")) { o.print_ids = 1; takes = 0; }
        else if (!strcmp(a, "--ignore-eos")) { o.ignore_eos = 1; takes = 0; }
        else if (!strcmp(a, "--info")) { info = 1; takes = 0; }
        else if (a[0] != '-' && !model_path) { model_path = a; takes = 0; }
        else if (!val) bad = 1;
        else if (!strcmp(a, "-l")) lora_path = val;
        else if (!strcmp(a, "-i")) instruct = val;
        else if (!strcmp(a, "-g")) cont = val;
        else if (!strcmp(a, "-t")) bad = parse_float(val, &temperature);
        else if (!strcmp(a, "-k")) bad = parse_int(val, LONG_MIN, 0x7fffffff, &top_k);
        else if (!strcmp(a, "-p")) bad = parse_float(val, &top_p);
        else if (!strcmp(a, "-r")) bad = parse_float(val, &rep);
        else if (!strcmp(a, "-n")) bad = parse_int(val, LONG_MIN, 0x7fffffff, &max_new);
        else if (!strcmp(a, "-s")) bad = parse_int(val, LONG_MIN, LONG_MAX, &seed);
        else if (!strcmp(a, "-j")) bad = parse_int(val, 1, 1024, &threads);
        else if (!strcmp(a, "--ids")) ids_arg = val;
        else if (!strcmp(a, "--dump-logits")) dump = val;
        else if (!strcmp(a, "--dump-prefill-logits")) { dump = val; dump_batch = 1; }
        else if (!strcmp(a, "--tokenize")) tok_text = val;
        else if (!strcmp(a, "--tokenize-file")) tok_file = val;
        else bad = 1;
        if (bad) {
            fprintf(stderr, "error: bad or incomplete option %s%s%s\n\n", a, val && takes ? " " : "", val && takes ? val : "");
            usage(stderr);
            return 2;
        }
        i += takes;
    }
    if (!model_path) {
        usage(stderr);
        return 2;
    }
    if ((instruct != NULL) + (cont != NULL) + (ids_arg != NULL) > 1) {
        fprintf(stderr, "error: give one of -i, -g and --ids\n");
        return 2;
    }
    if (dump && !ids_arg) {
        fprintf(stderr, "error: --dump-logits and --dump-prefill-logits need --ids\n");
        return 2;
    }
    int rc = check_sampling(temperature, top_k, top_p, rep, max_new, seed);
    if (rc) return rc;
    int *ids = NULL, n_ids = 0;
    if (ids_arg && (n_ids = parse_ids(ids_arg, &ids)) < 0)
        return option_error("--ids wants comma-separated non-negative integers, got \"%s\"", ids_arg);
#ifdef _OPENMP
    if (threads > 0) omp_set_num_threads((int)threads);
    g_threads = omp_get_max_threads();
#endif
    char err[NANO_ERRLEN];
    Nano *m = nano_load_file(model_path, verify, err);
    if (!m) {
        fprintf(stderr, "error: %s: %s\n", model_path, err);
        free(ids);
        return 1;
    }
    const NanoConfig *c = nano_config(m);
    NanoLora *lora = NULL;
    if (info) {
        print_info(m);
        goto done;
    }
    if (lora_path) {
        lora = nano_lora_load_file(lora_path, verify, err);
        int r = lora ? nano_lora_attach(m, lora, err) : -1;
        if (r < 0) {
            fprintf(stderr, "error: %s: %s\n", lora_path, err);
            rc = 1;
            goto done;
        }
        if (r > 0) fprintf(stderr, "%s\n", err);
    }
    if (tok_text || tok_file) {
        char *buf = NULL;
        size_t len = 0;
        if (tok_file) {
            FILE *f = fopen(tok_file, "rb");
            if (!f) {
                fprintf(stderr, "error: cannot open %s: %s\n", tok_file, strerror(errno));
                rc = 1;
                goto done;
            }
            size_t cap = 4096;
            buf = malloc(cap);
            while (buf) {
                len += fread(buf + len, 1, cap - len, f);
                if (len < cap) break;
                char *more = realloc(buf, cap * 2);
                if (!more) { free(buf); buf = NULL; break; }
                buf = more;
                cap *= 2;
            }
            fclose(f);
            if (!buf) {
                fprintf(stderr, "error: out of memory\n");
                rc = 1;
                goto done;
            }
        }
        const char *text = tok_file ? buf : tok_text;
        free(ids); /* of --ids, if given too */
        ids = encode_alloc(m, text, tok_file ? len : strlen(tok_text), 0, 0, &n_ids);
        free(buf);
        if (!ids) {
            fprintf(stderr, "error: out of memory\n");
            rc = 1;
            goto done;
        }
        for (int i = 0; i < n_ids; i++) printf(i ? " %d" : "%d", ids[i]);
        printf("\n");
        goto done;
    }
    if (!c->is_causal) {
        fprintf(stderr, "error: this model is bidirectional (is_causal = 0); the C engine generates only with causal "
                        "models\n");
        rc = 1;
        goto done;
    }
    if (ids_arg) {
        for (int i = 0; i < n_ids; i++)
            if (ids[i] >= c->vocab_size) {
                fprintf(stderr, "error: id %d is outside the vocabulary (%d)\n", ids[i], c->vocab_size);
                rc = 1;
                goto done;
            }
        if (dump) {
            rc = dump_logits(m, ids, n_ids, dump, dump_batch);
            goto done;
        }
    }
    o.max_new = (int)max_new;
    o.sampler.temperature = temperature;
    o.sampler.top_k = (int)top_k;
    o.sampler.top_p = top_p;
    o.sampler.rep_penalty = rep;
    o.seed = (uint64_t)seed;
    nano_sampler_seed(&o.sampler, o.seed);
    if (!instruct && !cont && !ids_arg) {
        rc = chat(m, &o, &lora, verify);
        goto done;
    }
    if (!ids_arg) {
        const char *text = instruct ? instruct : cont;
        ids = prompt_ids(m, text, strlen(text), instruct != NULL, &n_ids);
        if (!ids) {
            rc = 1;
            goto done;
        }
        if (n_ids == 0) { /* only where the framing adds nothing: -g "" on a 2024.10 model or one without <|bos|> */
            fprintf(stderr, "error: the prompt is empty, and %s is continued without a <|bos|> in front: give -g some "
                            "text\n", nano_config(m)->major == 2024 ? "a 2024.10 model" : "this model (its tokenizer has none)");
            rc = 2;
            goto done;
        }
        if (cont && !o.print_ids) { /* continue mode prints the whole text, prompt first (as infer.py does) */
            fputs(cont, stdout);
            fflush(stdout);
        }
    }
    double t0 = now_s();
    if (nano_prefill(m, ids, n_ids) != NANO_OK) {
        fprintf(stderr, "error: forward pass failed on the prompt\n");
        rc = 1;
        goto done;
    }
    double t_prompt = now_s() - t0, t_decode;
    int n_prompt = nano_context_len(m), n_new;
    generate(m, &o, &t_decode, &n_new);
    printf("\n");
    report(n_prompt, t_prompt, n_new, t_decode);
done:
    free(ids);
    nano_free(m);
    nano_lora_free(lora);
    return rc;
}
