/*
 * nano.c: Nano's C inference core. libc + libm, OpenMP when compiled with -fopenmp.
 *
 * Sections, in order:
 *   1. platform, errors, checked arithmetic, CRC-32
 *   2. SIMD kernels (fp32 and int8 dot products) with runtime dispatch and scalar fallbacks
 *   3. file loading and validation (2026.11 and 2024.10 layouts), weights, run state
 *   4. tokenizers: UTF-8; the trie (greedy longest match over code points); byte-level BPE
 *      (tiktoken's, with the GPT-2 and Llama-3 pre-tokenizers); text streams of token bytes
 *   5. forward pass (one token through the KV cache)
 *   6. generation context and sampler
 *   7. LoRA adapters
 *
 * Portability: mmap, OpenMP and x86 intrinsics sit behind #ifdefs, so the same file builds for
 * wasm32-wasi (single-threaded, scalar kernels that the compiler may vectorise with SIMD128).
 * The file formats are little-endian; so are x86-64, ARM64 and wasm.
 */
#define _POSIX_C_SOURCE 200809L
#define _DEFAULT_SOURCE /* MAP_ANONYMOUS, MADV_HUGEPAGE */
#include "nano.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if (defined(__unix__) || defined(__APPLE__)) && !defined(__wasi__) && !defined(NANO_NO_MMAP)
#define NANO_MMAP 1
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(NANO_NO_SIMD)
#define NANO_X86 1
#include <immintrin.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#define NANO_PRAGMA(x) _Pragma(#x)
#define OMP_FOR_IF(cond) NANO_PRAGMA(omp parallel for schedule(static) if (cond))
#else
#define OMP_FOR_IF(cond)
#endif

/* ============================================================================================
 * 1. platform, errors, checked arithmetic, CRC-32
 * ============================================================================================ */

#define MAGIC0 0x42443453u
#define MAGIC1 0x55524C4Du
#define HEADER_SIZE 256
#define ALIGN 64
#define TYPE_BASE 0
#define TYPE_LORA 10
#define CONFIG_LEN_2026 176
#define CONFIG_LEN_2024 32
#define CRC_OFFSET 144
#define N_TARGETS 7 /* wq wk wv wo w1 w2 w3: also the bit order of the LoRA targets mask */
enum { WQ, WK, WV, WO, W1, W2, W3 };
static const char *const TARGET_NAMES[N_TARGETS] = {"wq", "wk", "wv", "wo", "w1", "w2", "w3"};

/* sane bounds: they keep every product below in size_t and reject absurd headers early */
#define MAX_DIM (1 << 20)
#define MAX_VOCAB (1 << 24)
#define MAX_LAYERS 4096
#define MAX_STATE_BYTES ((uint64_t)8 << 30) /* run state (KV cache ...) above this is refused */

static int errf(char *err, const char *fmt, ...)
{
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, NANO_ERRLEN, fmt, ap);
        va_end(ap);
    }
    return -1;
}

/* a*b (and a*b*c) in size_t, or 0 on overflow after setting *ok = 0 */
static size_t mul2(size_t a, size_t b, int *ok)
{
    size_t r;
    if (__builtin_mul_overflow(a, b, &r)) {
        *ok = 0;
        return 0;
    }
    return r;
}
static size_t mul3(size_t a, size_t b, size_t c, int *ok) { return mul2(mul2(a, b, ok), c, ok); }
static size_t add2(size_t a, size_t b, int *ok)
{
    size_t r;
    if (__builtin_add_overflow(a, b, &r)) {
        *ok = 0;
        return 0;
    }
    return r;
}

static uint32_t rd_u32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static int32_t rd_i32(const uint8_t *p) { int32_t v; memcpy(&v, p, 4); return v; }
static uint64_t rd_u64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static double rd_f64(const uint8_t *p) { double v; memcpy(&v, p, 8); return v; }

/* CRC-32 (the zlib / IEEE 802.3 polynomial), slicing-by-8: about 1-2 GB/s */
static uint32_t crc_table[8][256];
static void crc_init(void)
{
    static int done;
    if (done) return;
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[0][i] = c;
    }
    for (int i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++) crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xFF];
    done = 1;
}
/* like zlib's crc32(crc, buf, len): pass the previous result to continue */
static uint32_t crc32_update(uint32_t crc, const uint8_t *p, size_t n)
{
    crc = ~crc;
    while (n >= 8) {
        uint32_t a = rd_u32(p) ^ crc, b = rd_u32(p + 4);
        crc = crc_table[7][a & 0xFF] ^ crc_table[6][(a >> 8) & 0xFF] ^ crc_table[5][(a >> 16) & 0xFF] ^
              crc_table[4][a >> 24] ^ crc_table[3][b & 0xFF] ^ crc_table[2][(b >> 8) & 0xFF] ^
              crc_table[1][(b >> 16) & 0xFF] ^ crc_table[0][b >> 24];
        p += 8;
        n -= 8;
    }
    while (n--) crc = crc_table[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

/* A file's bytes: mmapped, read into memory, or a caller's buffer. Plus heap copies the loader
 * had to make (misaligned fp32 tensors, dequantized matrices), freed with it. */
typedef struct {
    const uint8_t *data;
    size_t size;
    void *map;
    size_t map_len;
    uint8_t *heap;
    int map_writable;  /* the mapping is writable now (blob_seal makes it read-only again) */
    int map_anonymous; /* the mapping is anonymous memory (read_huge, blob_to_anonymous), not the file's */
    void **owned;
    size_t n_owned, cap_owned;
} Blob;

#ifdef NANO_MMAP
/* With NANO_HUGEPAGES=1 in the environment: the file is read into anonymous memory backed by
 * transparent huge pages (2 MiB) instead of mmapped. That gives 2 MiB pages even where the mmap
 * cannot have them (a page cache that holds the file in 4 KiB folios, see blob_open), at the cost
 * of zeroing and copying the file at load: 0.2-1.4 s for 440 MB on a KVM guest, hence opt-in.
 * Returns NULL (the caller falls back to mmap) when not asked for, or on any failure. *len gets the
 * mapping's length for munmap. */
/* anonymous memory for size bytes in a 2 MiB-aligned window advised MADV_HUGEPAGE; *len: its length */
static uint8_t *huge_alloc(size_t size, size_t *len)
{
#if defined(MADV_HUGEPAGE) && defined(MAP_ANONYMOUS)
    const size_t huge = (size_t)2 << 20;
    size_t want = (size + huge - 1) / huge * huge, over = want + huge;
    if (want < size || over < want) return NULL;
    uint8_t *raw = mmap(NULL, over, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) return NULL;
    /* keep a 2 MiB-aligned window: huge pages need aligned virtual addresses */
    uint8_t *p = (uint8_t *)(((uintptr_t)raw + huge - 1) & ~(uintptr_t)(huge - 1));
    if (p > raw) munmap(raw, (size_t)(p - raw));
    if (raw + over > p + want) munmap(p + want, (size_t)(raw + over - (p + want)));
    madvise(p, want, MADV_HUGEPAGE);
    *len = want;
    return p;
#else
    (void)size, (void)len;
    return NULL;
#endif
}

static void *read_huge(int fd, size_t size, size_t *len)
{
    const char *env = getenv("NANO_HUGEPAGES");
    if (!env || !*env || !strcmp(env, "0")) return NULL;
    size_t want;
    uint8_t *p = huge_alloc(size, &want);
    if (!p) return NULL;
    for (size_t done = 0; done < size;) {
        ssize_t r = pread(fd, p + done, size - done, (off_t)done);
        if (r <= 0) {
            if (r < 0 && errno == EINTR) continue;
            munmap(p, want);
            return NULL;
        }
        done += (size_t)r;
    }
    mprotect(p, want, PROT_READ);
    *len = want;
    return p;
}
#endif

static int blob_open(Blob *b, const char *path, char *err)
{
    memset(b, 0, sizeof *b);
#ifdef NANO_MMAP
    int fd = open(path, O_RDONLY);
    if (fd < 0) return errf(err, "cannot open %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return errf(err, "%s is not a regular file", path);
    }
    if (st.st_size < HEADER_SIZE) {
        close(fd);
        return errf(err, "%s: file is %lld bytes, shorter than the 256-byte header (truncated, or not a Nano .bin)",
                    path, (long long)st.st_size);
    }
    if ((unsigned long long)st.st_size > (size_t)-1) {
        close(fd);
        return errf(err, "%s: file too large for this address space", path);
    }
    size_t size = (size_t)st.st_size;
    void *p = read_huge(fd, size, &b->map_len);
    b->map_anonymous = p != NULL;
    if (!p) {
        p = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
        b->map_len = size;
#ifdef MADV_HUGEPAGE
        /* Huge pages for the mapping where the kernel can: Linux 6.x maps a file's page cache with
         * 2 MiB entries when its folios are that large, and with this advice it reads the pages in
         * 2 MiB folios when they are not cached yet (pages cached already, e.g. by whatever wrote
         * the file, keep their size until they are evicted). Fewer TLB misses: +9-13% fp32 decode. */
        if (p != MAP_FAILED) madvise(p, size, MADV_HUGEPAGE);
#endif
    }
    close(fd);
    if (p == MAP_FAILED) return errf(err, "cannot mmap %s: %s", path, strerror(errno));
    b->map = p;
    b->data = p;
    b->size = (size_t)st.st_size;
    return 0;
#else
    FILE *f = fopen(path, "rb");
    if (!f) return errf(err, "cannot open %s", path);
    size_t cap = 1 << 20, n = 0;
    uint8_t *buf = malloc(cap);
    while (buf) {
        n += fread(buf + n, 1, cap - n, f);
        if (n < cap) break;
        uint8_t *nb = cap > ((size_t)-1) / 2 ? NULL : realloc(buf, cap * 2);
        if (!nb) { free(buf); buf = NULL; break; }
        buf = nb;
        cap *= 2;
    }
    int bad = ferror(f);
    fclose(f);
    if (!buf || bad) { free(buf); return errf(err, "cannot read %s", path); }
    if (n < HEADER_SIZE) { free(buf); return errf(err, "%s: file is %zu bytes, shorter than the 256-byte header", path, n); }
    b->heap = buf;
    b->data = buf;
    b->size = n;
    return 0;
#endif
}

static void blob_close(Blob *b)
{
    for (size_t i = 0; i < b->n_owned; i++) free(b->owned[i]);
    free(b->owned);
#ifdef NANO_MMAP
    if (b->map) munmap(b->map, b->map_len);
#endif
    free(b->heap);
    memset(b, 0, sizeof *b);
}

/* Before anything points into it: an mmapped file's bytes moved to anonymous memory on huge pages
 * (huge_alloc), for a Q8 file whose matrices the loader repacks. Written in place, the file's private
 * mapping would turn into 4 KiB copy-on-write pages, and their TLB misses cost 110M-shape Q8 decode a
 * third of its speed (on the 2-core Zen 4 guest: 127-137 tokens/s against 197-211). One copy all the
 * same: the mapping's pages go as they are copied, and then the mapping. On failure the blob stays
 * as it was (then blob_writable writes into the mapping). */
static void blob_to_anonymous(Blob *b)
{
#ifdef NANO_MMAP
    if (!b->map || b->map_anonymous) return;
    size_t len;
    uint8_t *p = huge_alloc(b->size, &len);
    if (!p) return;
    const size_t step = (size_t)2 << 20; /* the mapping's pages let go as they are copied: one copy at a time */
    for (size_t off = 0; off < b->size; off += step) {
        size_t n = b->size - off < step ? b->size - off : step;
        memcpy(p + off, b->data + off, n);
        madvise((uint8_t *)b->map + off, n, MADV_DONTNEED);
    }
    munmap(b->map, b->map_len);
    b->map = p;
    b->map_len = len;
    b->data = p;
    b->map_anonymous = b->map_writable = 1;
#else
    (void)b;
#endif
}

/* The file's bytes at p, writable in place (the loader repacks Q8 matrices where they are): a mapping
 * is private, so its written pages become the process's own copies and the file is not changed. NULL
 * for a caller's buffer, which must not be written. */
static uint8_t *blob_writable(Blob *b, const uint8_t *p)
{
    size_t off = (size_t)(p - b->data);
#ifdef NANO_MMAP
    if (b->map) {
        if (!b->map_writable && mprotect(b->map, b->map_len, PROT_READ | PROT_WRITE) != 0) return NULL;
        b->map_writable = 1;
        return (uint8_t *)b->map + off;
    }
#endif
    return b->heap ? b->heap + off : NULL;
}

/* after loading: the mapping read-only again, as the engine only reads it */
static void blob_seal(Blob *b)
{
#ifdef NANO_MMAP
    if (b->map_writable) mprotect(b->map, b->map_len, PROT_READ);
#endif
    b->map_writable = 0;
}

static void *blob_own(Blob *b, size_t bytes)
{
    if (b->n_owned == b->cap_owned) {
        size_t cap = b->cap_owned ? b->cap_owned * 2 : 16;
        void **o = realloc(b->owned, cap * sizeof *o);
        if (!o) return NULL;
        b->owned = o;
        b->cap_owned = cap;
    }
    void *p = malloc(bytes ? bytes : 1);
    if (p) b->owned[b->n_owned++] = p;
    return p;
}

/* ============================================================================================
 * 2. SIMD kernels
 * ============================================================================================ */

/* out[i] = sum_t a[t] v[t n + i] over T rows of n (attention's weighted sum of the value rows) */
typedef void (*wsum_fn)(float *out, const float *a, const float *v, int T, int n);
/* int8 dot over n elements in groups of gs: sum_g (sum_i w_i x_i) * ws[g] * xs[g] */
typedef float (*dot_q8_fn)(const int8_t *w, const float *ws, const int8_t *x, const float *xs, int n, int gs);

static float dot_f32_scalar(const float *a, const float *b, int n)
{
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += a[i] * b[i];
        s1 += a[i + 1] * b[i + 1];
        s2 += a[i + 2] * b[i + 2];
        s3 += a[i + 3] * b[i + 3];
    }
    for (; i < n; i++) s0 += a[i] * b[i];
    return (s0 + s1) + (s2 + s3);
}

static void wsum_scalar(float *out, const float *a, const float *v, int T, int n)
{
    for (int i = 0; i < n; i++) out[i] = 0;
    for (int t = 0; t < T; t++)
        for (int i = 0; i < n; i++) out[i] += a[t] * v[(size_t)t * n + i];
}

/* x[i] = softmax(scale * x)[i] (attention's scores) */
typedef void (*softmax_fn)(float *x, int n, float scale);
/* g[i] = silu(g[i]) * h[i] = g / (1 + e^-g) * h (SwiGLU) */
typedef void (*swiglu_fn)(float *g, const float *h, int n);

static void softmax_scalar(float *x, int n, float scale)
{
    float mx = -INFINITY, sum = 0;
    for (int i = 0; i < n; i++) {
        x[i] *= scale;
        mx = x[i] > mx ? x[i] : mx;
    }
    for (int i = 0; i < n; i++) sum += (x[i] = expf(x[i] - mx));
    for (int i = 0; i < n; i++) x[i] /= sum;
}

static void swiglu_scalar(float *g, const float *h, int n)
{
    for (int i = 0; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * h[i];
}

static float dot_q8_scalar(const int8_t *w, const float *ws, const int8_t *x, const float *xs, int n, int gs)
{
    float sum = 0;
    for (int g = 0; g < n / gs; g++) {
        int32_t isum = 0;
        for (int i = g * gs; i < (g + 1) * gs; i++) isum += (int32_t)w[i] * x[i];
        sum += (float)isum * (ws[g] * xs[g]); /* the packed kernels' arithmetic, to the bit (section 2) */
    }
    return sum;
}

#ifdef NANO_X86
__attribute__((target("avx2,fma"))) static float hsum256(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(s);
}

/* Weight rows (matvec) stream from memory, and the hardware prefetchers lose the stream at every
 * 4 KiB page and every matrix: the fp32 row kernels below also prefetch the line PREFETCH_AHEAD
 * bytes ahead of each one they load. Rows are contiguous, so that runs on into the next row (and
 * often the next matrix) of the same thread; prefetching past the end of a mapping is harmless.
 * On a Zen 5 guest, one thread: +13% fp32 decode for the 56M shape, +1-4% for the 110M one
 * (longer rows), +17% at two threads; 4 KiB ahead beat 2 KiB by 1-5% and matched 6-8 KiB; the
 * L2 (T1) and non-temporal hints, and a second, farther prefetch into L2, did no better. */
#define PREFETCH_AHEAD 4096
#define PREFETCH(p) _mm_prefetch((const char *)(p) + PREFETCH_AHEAD, _MM_HINT_T0)

__attribute__((target("avx2,fma"))) static float row_f32_avx2(const float *w, const float *x, int n)
{
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 32 <= n; i += 32) { /* 32 floats = 2 cache lines */
        PREFETCH(w + i);
        PREFETCH(w + i + 16);
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 16), _mm256_loadu_ps(x + i + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 24), _mm256_loadu_ps(x + i + 24), s3);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), s0);
    float s = hsum256(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    for (; i < n; i++) s += w[i] * x[i];
    return s;
}

__attribute__((target("avx2,fma"))) static void rows_f32_avx2(const float *w, const float *x, float *out, int rows, int n)
{
    for (int r = 0; r < rows; r++) out[r] = row_f32_avx2(w + (size_t)r * n, x, n);
}

__attribute__((target("avx512f"))) static inline float row_f32_avx512(const float *w, const float *x, int n)
{
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps();
    int i = 0;
    for (; i + 64 <= n; i += 64) { /* 64 floats = 4 cache lines */
        PREFETCH(w + i);
        PREFETCH(w + i + 16);
        PREFETCH(w + i + 32);
        PREFETCH(w + i + 48);
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 16), _mm512_loadu_ps(x + i + 16), s1);
        s2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 32), _mm512_loadu_ps(x + i + 32), s2);
        s3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 48), _mm512_loadu_ps(x + i + 48), s3);
    }
    for (; i + 16 <= n; i += 16) {
        PREFETCH(w + i);
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), s0);
    }
    if (i < n) {
        __mmask16 k = (__mmask16)((1u << (n - i)) - 1);
        s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, w + i), _mm512_maskz_loadu_ps(k, x + i), s1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
}

__attribute__((target("avx512f"))) static void rows_f32_avx512(const float *w, const float *x, float *out, int rows, int n)
{
    for (int r = 0; r < rows; r++) out[r] = row_f32_avx512(w + (size_t)r * n, x, n);
}
#endif

static void rows_f32_scalar(const float *w, const float *x, float *out, int rows, int n)
{
    for (int r = 0; r < rows; r++) out[r] = dot_f32_scalar(w + (size_t)r * n, x, n);
}

#ifdef NANO_X86
/* the sums stay in registers across the T rows: one 64-float (AVX-512) or 32-float (AVX2) slice of
 * the output at a time, which covers a whole head for head_dim 64 */
__attribute__((target("avx2,fma"))) static void wsum_avx2(float *out, const float *a, const float *v, int T, int n)
{
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
        for (int t = 0; t < T; t++) {
            const float *p = v + (size_t)t * n + i;
            __m256 at = _mm256_set1_ps(a[t]);
            s0 = _mm256_fmadd_ps(at, _mm256_loadu_ps(p), s0);
            s1 = _mm256_fmadd_ps(at, _mm256_loadu_ps(p + 8), s1);
            s2 = _mm256_fmadd_ps(at, _mm256_loadu_ps(p + 16), s2);
            s3 = _mm256_fmadd_ps(at, _mm256_loadu_ps(p + 24), s3);
        }
        _mm256_storeu_ps(out + i, s0);
        _mm256_storeu_ps(out + i + 8, s1);
        _mm256_storeu_ps(out + i + 16, s2);
        _mm256_storeu_ps(out + i + 24, s3);
    }
    for (; i + 8 <= n; i += 8) {
        __m256 s0 = _mm256_setzero_ps();
        for (int t = 0; t < T; t++) s0 = _mm256_fmadd_ps(_mm256_set1_ps(a[t]), _mm256_loadu_ps(v + (size_t)t * n + i), s0);
        _mm256_storeu_ps(out + i, s0);
    }
    for (; i < n; i++) {
        float s0 = 0;
        for (int t = 0; t < T; t++) s0 = fmaf(a[t], v[(size_t)t * n + i], s0);
        out[i] = s0;
    }
}

__attribute__((target("avx512f"))) static void wsum_avx512(float *out, const float *a, const float *v, int T, int n)
{
    int i = 0;
    for (; i + 64 <= n; i += 64) {
        __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps();
        for (int t = 0; t < T; t++) {
            const float *p = v + (size_t)t * n + i;
            __m512 at = _mm512_set1_ps(a[t]);
            s0 = _mm512_fmadd_ps(at, _mm512_loadu_ps(p), s0);
            s1 = _mm512_fmadd_ps(at, _mm512_loadu_ps(p + 16), s1);
            s2 = _mm512_fmadd_ps(at, _mm512_loadu_ps(p + 32), s2);
            s3 = _mm512_fmadd_ps(at, _mm512_loadu_ps(p + 48), s3);
        }
        _mm512_storeu_ps(out + i, s0);
        _mm512_storeu_ps(out + i + 16, s1);
        _mm512_storeu_ps(out + i + 32, s2);
        _mm512_storeu_ps(out + i + 48, s3);
    }
    if (i + 32 <= n) { /* head_dim 32 */
        __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
        for (int t = 0; t < T; t++) {
            const float *p = v + (size_t)t * n + i;
            __m512 at = _mm512_set1_ps(a[t]);
            s0 = _mm512_fmadd_ps(at, _mm512_loadu_ps(p), s0);
            s1 = _mm512_fmadd_ps(at, _mm512_loadu_ps(p + 16), s1);
        }
        _mm512_storeu_ps(out + i, s0);
        _mm512_storeu_ps(out + i + 16, s1);
        i += 32;
    }
    for (; i < n; i += 16) {
        __mmask16 k = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        __m512 s0 = _mm512_setzero_ps();
        for (int t = 0; t < T; t++)
            s0 = _mm512_fmadd_ps(_mm512_set1_ps(a[t]), _mm512_maskz_loadu_ps(k, v + (size_t)t * n + i), s0);
        _mm512_mask_storeu_ps(out + i, k, s0);
    }
}

/* e^x on 16 or 8 lanes, for the softmax and SwiGLU loops (libm's expf one element at a time cost
 * about 1% of a token): x = n ln2 + r with |r| <= ln2/2 (ln2 in two parts, so n ln2 is exact),
 * e^r by Cephes' expf polynomial, times 2^n; within 2 ulp of expf. Inputs are clamped first (NaN
 * kept: max/min return their second operand for NaN); out-of-range inputs give inf or 0 like expf:
 * vscalefps does that on AVX-512, AVX2 blends. */
#define EXP_POLY(F, r)                                                                              \
    F##fmadd_ps(F##fmadd_ps(F##fmadd_ps(F##fmadd_ps(F##fmadd_ps(F##set1_ps(1.9875691500e-4f), r,      \
    F##set1_ps(1.3981999507e-3f)), r, F##set1_ps(8.3334519073e-3f)), r, F##set1_ps(4.1665795894e-2f)), \
    r, F##set1_ps(1.6666665459e-1f)), r, F##set1_ps(5.0000001201e-1f))

__attribute__((target("avx512f"))) static inline __m512 exp512(__m512 x)
{
    x = _mm512_min_ps(_mm512_set1_ps(100.0f), _mm512_max_ps(_mm512_set1_ps(-110.0f), x));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = EXP_POLY(_mm512_, r);
    __m512 y = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(y, n);
}

__attribute__((target("avx2,fma"))) static inline __m256 exp256(__m256 x)
{
    /* above ln(FLT_MAX): inf; below ln of the smallest denormal / 2: 0 */
    __m256 hi = _mm256_set1_ps(88.7228394f), lo = _mm256_set1_ps(-103.972f);
    __m256 big = _mm256_cmp_ps(x, hi, _CMP_GT_OQ), tiny = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    __m256 xc = _mm256_min_ps(hi, _mm256_max_ps(lo, x));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = EXP_POLY(_mm256_, r);
    __m256 y = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    /* 2^n as two normal powers of two (n is in [-150, 128]), so results near overflow and denormal
     * results come out right */
    __m256i e = _mm256_cvtps_epi32(n), e1 = _mm256_srai_epi32(e, 1), e2 = _mm256_sub_epi32(e, e1);
    __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e1, _mm256_set1_epi32(127)), 23));
    __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e2, _mm256_set1_epi32(127)), 23));
    y = _mm256_mul_ps(_mm256_mul_ps(y, s1), s2);
    y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), big);
    return _mm256_blendv_ps(y, _mm256_setzero_ps(), tiny);
}

__attribute__((target("avx512f"))) static void softmax_avx512(float *x, int n, float scale)
{
    __m512 sc = _mm512_set1_ps(scale), mx = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
    int i;
    for (i = 0; i < n; i += 16) {
        __mmask16 k = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + i), sc);
        _mm512_mask_storeu_ps(x + i, k, v);
        mx = _mm512_mask_max_ps(mx, k, v, mx); /* skips NaN, like the scalar loop; exp passes it on */
    }
    __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    for (i = 0; i < n; i += 16) {
        __mmask16 k = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), m));
        _mm512_mask_storeu_ps(x + i, k, e);
        sum = _mm512_mask_add_ps(sum, k, sum, e);
    }
    __m512 inv = _mm512_set1_ps(_mm512_reduce_add_ps(sum));
    for (i = 0; i < n; i += 16) {
        __mmask16 k = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(x + i, k, _mm512_div_ps(_mm512_maskz_loadu_ps(k, x + i), inv));
    }
}

__attribute__((target("avx2,fma"))) static void softmax_avx2(float *x, int n, float scale)
{
    __m256 sc = _mm256_set1_ps(scale), mx = _mm256_set1_ps(-INFINITY), sum = _mm256_setzero_ps();
    float mxs = -INFINITY, sums = 0;
    int i = 0, n8 = n / 8 * 8;
    for (; i < n8; i += 8) {
        __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + i), sc);
        _mm256_storeu_ps(x + i, v);
        mx = _mm256_max_ps(v, mx);
    }
    for (; i < n; i++) {
        x[i] *= scale;
        mxs = x[i] > mxs ? x[i] : mxs;
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    float m = _mm_cvtss_f32(h) > mxs ? _mm_cvtss_f32(h) : mxs;
    for (i = 0; i < n8; i += 8) {
        __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), _mm256_set1_ps(m)));
        _mm256_storeu_ps(x + i, e);
        sum = _mm256_add_ps(sum, e);
    }
    for (; i < n; i++) sums += (x[i] = expf(x[i] - m));
    float total = hsum256(sum) + sums;
    for (i = 0; i < n8; i += 8) _mm256_storeu_ps(x + i, _mm256_div_ps(_mm256_loadu_ps(x + i), _mm256_set1_ps(total)));
    for (; i < n; i++) x[i] /= total;
}

__attribute__((target("avx512f"))) static void swiglu_avx512(float *g, const float *h, int n)
{
    for (int i = 0; i < n; i += 16) {
        __mmask16 k = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        __m512 x = _mm512_maskz_loadu_ps(k, g + i);
        __m512 d = _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), x)));
        _mm512_mask_storeu_ps(g + i, k, _mm512_mul_ps(_mm512_div_ps(x, d), _mm512_maskz_loadu_ps(k, h + i)));
    }
}

__attribute__((target("avx2,fma"))) static void swiglu_avx2(float *g, const float *h, int n)
{
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(g + i);
        __m256 d = _mm256_add_ps(_mm256_set1_ps(1.0f), exp256(_mm256_sub_ps(_mm256_setzero_ps(), x)));
        _mm256_storeu_ps(g + i, _mm256_mul_ps(_mm256_div_ps(x, d), _mm256_loadu_ps(h + i)));
    }
    swiglu_scalar(g + i, h + i, n - i);
}

/* gs % 32 == 0. maddubs multiplies unsigned by signed bytes, so feed it |x| and w*sign(x);
 * both fit because the quantizers never produce -128. Pair sums stay below 2*127*127 < 32767. */
__attribute__((target("avx2,fma"))) static float dot_q8_avx2(const int8_t *w, const float *ws, const int8_t *x,
                                                              const float *xs, int n, int gs)
{
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    for (int g = 0; g < n / gs; g++) {
        __m256i isum = _mm256_setzero_si256();
        for (int j = g * gs; j < (g + 1) * gs; j += 32) {
            __m256i wv = _mm256_loadu_si256((const __m256i *)(w + j));
            __m256i xv = _mm256_loadu_si256((const __m256i *)(x + j));
            __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(xv, xv), _mm256_sign_epi8(wv, xv));
            isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p, ones));
        }
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(ws[g] * xs[g]), acc);
    }
    return hsum256(acc);
}

/* dot_q8_avx2 over `rows` consecutive rows, Q8_ROWS at a time: each 32-byte slice of x, its absolute
 * value and sign are made once for them, and the per-row costs (the group count, the horizontal sums)
 * are shared. That matters for short rows: the output head of a small model with a large vocabulary
 * (GPT-2's 50,304 rows of 256 bytes). Each row's arithmetic is dot_q8_avx2's, in the same order. */
#define Q8_ROWS 4
__attribute__((target("avx2,fma"))) static void rows_q8_avx2(const int8_t *w, const float *ws, const int8_t *x,
                                                              const float *xs, float *out, int rows, int n, int gs)
{
    const __m256i ones = _mm256_set1_epi16(1);
    const int groups = n / gs;
    int r = 0;
    for (; r + Q8_ROWS <= rows; r += Q8_ROWS) {
        const int8_t *wr = w + (size_t)r * n; /* row r + k starts at wr + k n, its scales at sr + k groups */
        const float *sr = ws + (size_t)r * groups;
        __m256 acc[Q8_ROWS];
        for (int k = 0; k < Q8_ROWS; k++) acc[k] = _mm256_setzero_ps();
        for (int g = 0; g < groups; g++) {
            __m256i isum[Q8_ROWS];
            for (int k = 0; k < Q8_ROWS; k++) isum[k] = _mm256_setzero_si256();
            for (int j = g * gs; j < (g + 1) * gs; j += 32) {
                __m256i xv = _mm256_loadu_si256((const __m256i *)(x + j)), ax = _mm256_sign_epi8(xv, xv);
                for (int k = 0; k < Q8_ROWS; k++) {
                    const int8_t *p = wr + (size_t)k * n + j;
                    PREFETCH(p);
                    __m256i wv = _mm256_loadu_si256((const __m256i *)p);
                    __m256i pairs = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(wv, xv));
                    isum[k] = _mm256_add_epi32(isum[k], _mm256_madd_epi16(pairs, ones));
                }
            }
            for (int k = 0; k < Q8_ROWS; k++)
                acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[k]), _mm256_set1_ps(sr[k * groups + g] * xs[g]), acc[k]);
        }
        for (int k = 0; k < Q8_ROWS; k++) out[r + k] = hsum256(acc[k]);
    }
    for (; r < rows; r++) out[r] = dot_q8_avx2(w + (size_t)r * n, ws + (size_t)r * groups, x, xs, n, gs);
}

#endif

/* -- matrix times a block of rows (prefill) ---------------------------------------------------
 * out[t ldo + r] = w[r] . x[t ldx] for r < rows, t < T: the prompt's T token rows against a weight
 * matrix. A tile of R weight rows by TT token rows keeps its R x TT sums in registers, so each
 * weight vector is loaded once per TT tokens and each token vector once per R rows (a matvec loads
 * every weight once per token; the prompt is compute-bound instead). Rows go outermost: a row
 * tile's weights stay in L1 while the block's token rows (a few hundred KiB) come from L2. */

/* the tiling every kernel below shares: R x TT tiles, then the leftover tokens with R rows, then the
 * leftover rows; TILE(r, t, R, TT) computes one tile */
#define MM_TILES(rows, T, R_, TT_, TILE)                                  \
    do {                                                                  \
        int r_ = 0, t_;                                                   \
        for (; r_ + (R_) <= (rows); r_ += (R_)) {                         \
            for (t_ = 0; t_ + (TT_) <= (T); t_ += (TT_)) TILE(r_, t_, R_, TT_); \
            for (; t_ < (T); t_++) TILE(r_, t_, R_, 1);                   \
        }                                                                 \
        for (; r_ < (rows); r_++) {                                       \
            for (t_ = 0; t_ + (TT_) <= (T); t_ += (TT_)) TILE(r_, t_, 1, TT_); \
            for (; t_ < (T); t_++) TILE(r_, t_, 1, 1);                    \
        }                                                                 \
    } while (0)
#define MM_MAX 4 /* the largest R and TT: the tiles' register arrays are declared this big */
#define Q8_PACK_ROWS 16 /* rows per tile of the packed Q8 layout (below) */

/* where a CPU has no kernels of this kind (scalar, wasm), mat_block runs the row kernel over tiles of
 * weight rows this large (they stay in L1), for one token row after another */
#define MM_GENERIC_TILE_BYTES 16384

typedef void (*mm_f32_fn)(const float *w, const float *x, int ldx, float *out, int ldo, int rows, int n, int T);
typedef void (*mm_q8_fn)(const int8_t *w, const float *ws, const int8_t *x, const float *xs, int ldx, float *out,
                         int ldo, int rows, int n, int gs, int T);

#ifdef NANO_X86
/* A tile's sums are horizontal sums of its R x TT registers; one at a time they cost a third of a
 * 15M-shape prompt (n = 288: 18 steps of the loop per 16 reductions). These sum 4 rows' registers
 * for a token or two at once, transposing as they add, and store each token's 4 sums together. */
__attribute__((target("avx512f"), always_inline)) static inline void store_tile4x4_avx512(float *out, int ldo,
                                                                                          __m512 a[MM_MAX][MM_MAX])
{
    __m512 s[8], u[4];
    for (int i = 0; i < 8; i++) { /* 512 -> 256 bits: a register and the next (r-major) share one */
        __m512 x = a[2 * i / 4][2 * i % 4], y = a[(2 * i + 1) / 4][(2 * i + 1) % 4];
        s[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x44), _mm512_shuffle_f32x4(x, y, 0xEE));
    }
    for (int i = 0; i < 4; i++) /* -> 128 bits: 128-bit lane k of u[i] sums a[i][k] */
        u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], 0xDD));
    __m512 v0 = _mm512_add_ps(_mm512_unpacklo_ps(u[0], u[2]), _mm512_unpackhi_ps(u[0], u[2]));
    __m512 v1 = _mm512_add_ps(_mm512_unpacklo_ps(u[1], u[3]), _mm512_unpackhi_ps(u[1], u[3]));
    float sums[16]; /* lane 4t + r: the sum of a[r][t] */
    _mm512_storeu_ps(sums, _mm512_add_ps(_mm512_unpacklo_ps(v0, v1), _mm512_unpackhi_ps(v0, v1)));
    for (int t = 0; t < 4; t++) memcpy(out + (size_t)t * ldo, sums + 4 * t, 4 * sizeof(float));
}

/* The sums of a[0..3][t] (and of a[0..3][t + 1] when two) into out[0..3] (and out[ldo ..]), each
 * added in hsum256's order: the two 128-bit halves, then (0 + 1) + (2 + 3). A Q8 sum is then
 * bit for bit the decode kernel's (rows_q8_avx2): the prompt quantizes the activations that come out
 * of it, and one rounding step apart there would move a logit by more than float rounding. */
__attribute__((target("avx2,fma"), always_inline)) static inline void store_rows4_avx2(float *out, int ldo,
                                                                                       __m256 a[MM_MAX][MM_MAX], int t,
                                                                                       int two)
{
    __m256 h[2];
    for (int k = 0; k <= two; k++) { /* 128-bit lane 0: rows 0 and 2, lane 1: rows 1 and 3, in pairs */
        __m256 s01 = _mm256_add_ps(_mm256_permute2f128_ps(a[0][t + k], a[1][t + k], 0x20),
                                   _mm256_permute2f128_ps(a[0][t + k], a[1][t + k], 0x31));
        __m256 s23 = _mm256_add_ps(_mm256_permute2f128_ps(a[2][t + k], a[3][t + k], 0x20),
                                   _mm256_permute2f128_ps(a[2][t + k], a[3][t + k], 0x31));
        h[k] = _mm256_hadd_ps(s01, s23);
    }
    __m256 g = _mm256_hadd_ps(h[0], two ? h[1] : h[0]); /* lane 0: rows 0, 2 of t, t + 1; lane 1: rows 1, 3 */
    __m128 even = _mm256_castps256_ps128(g), odd = _mm256_extractf128_ps(g, 1);
    _mm_storeu_ps(out, _mm_unpacklo_ps(even, odd));
    if (two) _mm_storeu_ps(out + ldo, _mm_unpackhi_ps(even, odd));
}

/* every sum of an R x TT tile of 256-bit registers into out[t ldo + r] */
__attribute__((target("avx2,fma"), always_inline)) static inline void store_tile_avx2(float *out, int ldo,
                                                                                      __m256 a[MM_MAX][MM_MAX],
                                                                                      const int R, const int TT)
{
    if (R == 4) {
        int t = 0;
        for (; t + 2 <= TT; t += 2) store_rows4_avx2(out + (size_t)t * ldo, ldo, a, t, 1);
        if (t < TT) store_rows4_avx2(out + (size_t)t * ldo, ldo, a, t, 0);
        return;
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < TT; t++) out[(size_t)t * ldo + r] = hsum256(a[r][t]);
}

__attribute__((target("avx512f"), always_inline)) static inline void tile_f32_avx512(const float *w, const float *x,
                                                                                      int ldx, float *out, int ldo,
                                                                                      int n, const int R, const int TT)
{
    __m512 acc[MM_MAX][MM_MAX];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < TT; t++) acc[r][t] = _mm512_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) { /* unmasked: 10-16% faster than masking every step (n = 288, 768) */
        __m512 xv[MM_MAX];
        for (int t = 0; t < TT; t++) xv[t] = _mm512_loadu_ps(x + (size_t)t * ldx + i);
        for (int r = 0; r < R; r++) {
            __m512 wv = _mm512_loadu_ps(w + (size_t)r * n + i);
            for (int t = 0; t < TT; t++) acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
        }
    }
    if (i < n) { /* the last n % 16 columns, in the same lanes and order */
        __mmask16 k = (__mmask16)((1u << (n - i)) - 1);
        __m512 xv[MM_MAX];
        for (int t = 0; t < TT; t++) xv[t] = _mm512_maskz_loadu_ps(k, x + (size_t)t * ldx + i);
        for (int r = 0; r < R; r++) {
            __m512 wv = _mm512_maskz_loadu_ps(k, w + (size_t)r * n + i);
            for (int t = 0; t < TT; t++) acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
        }
    }
    if (R == 4 && TT == 4) {
        store_tile4x4_avx512(out, ldo, acc);
        return;
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < TT; t++) out[(size_t)t * ldo + r] = _mm512_reduce_add_ps(acc[r][t]);
}

__attribute__((target("avx512f"))) static void mm_f32_avx512(const float *w, const float *x, int ldx, float *out,
                                                              int ldo, int rows, int n, int T)
{
#define TILE(r, t, R, TT) tile_f32_avx512(w + (size_t)(r) * n, x + (size_t)(t) * ldx, ldx, out + (size_t)(t) * ldo + (r), ldo, n, R, TT)
    MM_TILES(rows, T, 4, 4, TILE);
#undef TILE
}

/* AVX2 has 16 registers: 4 x 2 tiles (8 sums, 2 token vectors, a weight vector) */
__attribute__((target("avx2,fma"), always_inline)) static inline void tile_f32_avx2(const float *w, const float *x,
                                                                                     int ldx, float *out, int ldo,
                                                                                     int n, const int R, const int TT)
{
    __m256 acc[MM_MAX][MM_MAX];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < TT; t++) acc[r][t] = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 xv[MM_MAX];
        for (int t = 0; t < TT; t++) xv[t] = _mm256_loadu_ps(x + (size_t)t * ldx + i);
        for (int r = 0; r < R; r++) {
            __m256 wv = _mm256_loadu_ps(w + (size_t)r * n + i);
            for (int t = 0; t < TT; t++) acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
        }
    }
    store_tile_avx2(out, ldo, acc, R, TT);
    for (int r = 0; r < R; r++) /* n % 8 leftover columns */
        for (int t = 0; t < TT; t++)
            for (int j = i; j < n; j++) out[(size_t)t * ldo + r] += w[(size_t)r * n + j] * x[(size_t)t * ldx + j];
}

__attribute__((target("avx2,fma"))) static void mm_f32_avx2(const float *w, const float *x, int ldx, float *out,
                                                             int ldo, int rows, int n, int T)
{
#define TILE(r, t, R, TT) tile_f32_avx2(w + (size_t)(r) * n, x + (size_t)(t) * ldx, ldx, out + (size_t)(t) * ldo + (r), ldo, n, R, TT)
    MM_TILES(rows, T, 4, 2, TILE);
#undef TILE
}

/* Q8 tiles, gs % 32 == 0, in 32-byte slices: rows_q8_avx2's arithmetic (the sign trick, |x| times
 * w*sign(x); one 8-lane int32 sum per weight row and token row for each group, then scaled by both
 * groups' scales), for the matrices decoding runs through rows_q8_avx2: 4 x 2 tiles. */
__attribute__((target("avx2,fma"), always_inline)) static inline void tile_q8_avx2(const int8_t *w, const float *ws,
                                                                                    const int8_t *x, const float *xs,
                                                                                    int ldx, float *out, int ldo, int n,
                                                                                    int gs, const int R, const int TT)
{
    const int groups = n / gs;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[MM_MAX][MM_MAX];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < TT; t++) acc[r][t] = _mm256_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m256i isum[MM_MAX][MM_MAX];
        for (int r = 0; r < R; r++)
            for (int t = 0; t < TT; t++) isum[r][t] = _mm256_setzero_si256();
        for (int j = g * gs; j < (g + 1) * gs; j += 32) {
            __m256i xv[MM_MAX], ax[MM_MAX];
            for (int t = 0; t < TT; t++) {
                xv[t] = _mm256_loadu_si256((const __m256i *)(x + (size_t)t * ldx + j));
                ax[t] = _mm256_sign_epi8(xv[t], xv[t]);
            }
            for (int r = 0; r < R; r++) {
                __m256i wv = _mm256_loadu_si256((const __m256i *)(w + (size_t)r * n + j));
                for (int t = 0; t < TT; t++) {
                    __m256i pairs = _mm256_maddubs_epi16(ax[t], _mm256_sign_epi8(wv, xv[t]));
                    isum[r][t] = _mm256_add_epi32(isum[r][t], _mm256_madd_epi16(pairs, ones));
                }
            }
        }
        __m256 xsc[MM_MAX];
        for (int t = 0; t < TT; t++) xsc[t] = _mm256_set1_ps(xs[(size_t)t * ldx + g]);
        for (int r = 0; r < R; r++) {
            __m256 wsc = _mm256_set1_ps(ws[(size_t)r * groups + g]);
            for (int t = 0; t < TT; t++)
                acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r][t]), _mm256_mul_ps(wsc, xsc[t]), acc[r][t]);
        }
    }
    store_tile_avx2(out, ldo, acc, R, TT);
}

__attribute__((target("avx2,fma"))) static void mm_q8_avx2(const int8_t *w, const float *ws, const int8_t *x,
                                                            const float *xs, int ldx, float *out, int ldo, int rows,
                                                            int n, int gs, int T)
{
#define TILE(r, t, R, TT) \
    tile_q8_avx2(w + (size_t)(r) * n, ws + (size_t)(r) * (n / gs), x + (size_t)(t) * ldx, xs + (size_t)(t) * ldx, \
                 ldx, out + (size_t)(t) * ldo + (r), ldo, n, gs, R, TT)
    MM_TILES(rows, T, 4, 2, TILE);
#undef TILE
}

/* -- Q8 repacked for AVX-512 VNNI (q8_pack, section 3, lays it out) ------------------------------
 * A matrix's rows go in tiles of Q8_PACK_ROWS = 16 (the last tile may be shorter: h rows). For each
 * tile and group of gs columns come gs / 4 chunks, each the group's next 4 bytes of every row of the
 * tile in turn (row i's at 4 i), stored unsigned (w + 128), then the h rows' float scales for the
 * group. So one vpdpbusd multiplies a 64-byte chunk by 4 bytes of a token broadcast to every lane
 * and adds each row's 4 products into that row's lane: the 16 rows' sums stay in the 16 lanes of
 * one register, with no sign operations (vpdpbusd takes unsigned x signed bytes) and no horizontal
 * sums, and one convert-scale-add per group serves 16 rows. The + 128 adds 128 x the group's sum of
 * the token's bytes to every row; starting the sums from -128 x that (quantize_act computes it) takes
 * it off again, in integers, exactly. A row's result is then dot_q8_scalar's to the bit: the same
 * int32 sums, converted, scaled by ws * xs and added group after group (a multiply and an add, not an
 * FMA: dot_q8_scalar compiles without contraction). The layout takes the bytes of the int8 values
 * and scales it replaces, so the loader repacks in place. On the 2-core Zen 4 guest, against the
 * kernels on the file's layout (sign trick, 4 x 4 and 4 x 2 tiles, horizontal sums): a third of the
 * operations per product in prefill, and the 110M shape's weights read at 16-23 GB/s as a matvec. */
#define Q8_PACK_TOKENS 4 /* token rows per prefill tile; on the Zen 4 guest 4 beat 8 and 12 by 10-30% */

/* rows [0, h) of a packed tile (w: its first group) against TT token rows (ldx apart in x, xs and
 * xsum: the quantized tokens, their scales and group sums) into out[t ldo + i] */
__attribute__((target("avx512f,avx512bw,avx512vnni"), always_inline)) static inline void
tile_q8_packed(const uint8_t *w, const int h, const int8_t *x, const float *xs, const int32_t *xsum, int ldx,
               float *out, int ldo, int n, int gs, const int TT)
{
    const int groups = n / gs, chunks = gs / 4;
    const __mmask16 lanes = (__mmask16)((1u << h) - 1);
    const size_t chunk_bytes = (size_t)4 * h, group_bytes = (size_t)h * (gs + 4);
    __m512 acc[Q8_PACK_TOKENS];
    for (int t = 0; t < TT; t++) acc[t] = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++, w += group_bytes) {
        __m512i isum[Q8_PACK_TOKENS], odd = _mm512_setzero_si512();
        for (int t = 0; t < TT; t++) isum[t] = _mm512_set1_epi32(-128 * xsum[(size_t)t * ldx + g]);
        const int8_t *xg = x + (size_t)g * gs;
        int c = 0;
        int32_t four; /* 4 bytes of a token, as vpdpbusd's broadcast operand */
        if (TT == 1) /* one token (a matvec): two chains of vpdpbusd, or their latency bounds the loop */
            for (; c + 2 <= chunks; c += 2) {
                memcpy(&four, xg + 4 * c, 4);
                isum[0] = _mm512_dpbusd_epi32(isum[0], _mm512_maskz_loadu_epi32(lanes, w + c * chunk_bytes),
                                              _mm512_set1_epi32(four));
                memcpy(&four, xg + 4 * c + 4, 4);
                odd = _mm512_dpbusd_epi32(odd, _mm512_maskz_loadu_epi32(lanes, w + (c + 1) * chunk_bytes),
                                          _mm512_set1_epi32(four));
            }
        for (; c < chunks; c++) {
            __m512i wv = _mm512_maskz_loadu_epi32(lanes, w + c * chunk_bytes);
            for (int t = 0; t < TT; t++) {
                memcpy(&four, xg + (size_t)t * ldx + 4 * c, 4);
                isum[t] = _mm512_dpbusd_epi32(isum[t], wv, _mm512_set1_epi32(four));
            }
        }
        if (TT == 1) isum[0] = _mm512_add_epi32(isum[0], odd);
        __m512 wsc = _mm512_maskz_loadu_ps(lanes, w + (size_t)h * gs);
        for (int t = 0; t < TT; t++) {
            __m512 scale = _mm512_mul_ps(wsc, _mm512_set1_ps(xs[(size_t)t * ldx + g]));
            acc[t] = _mm512_add_ps(acc[t], _mm512_mul_ps(_mm512_cvtepi32_ps(isum[t]), scale));
        }
    }
    for (int t = 0; t < TT; t++) _mm512_mask_storeu_ps(out + (size_t)t * ldo, lanes, acc[t]);
}

/* out[t ldo + r] = w[r] . x[t ldx] for r < rows, t < T, w packed (its first tile); T = 1 is the
 * matvec. Row tiles go outermost: a tile (16 rows) stays in L1 while the block's tokens pass it. */
__attribute__((target("avx512f,avx512bw,avx512vnni"))) static void
mm_q8_packed_avx512(const uint8_t *w, const int8_t *x, const float *xs, const int32_t *xsum, int ldx, float *out, int ldo,
                    int rows, int n, int gs, int T)
{
    const size_t tile_bytes = (size_t)Q8_PACK_ROWS * (n + 4 * (n / gs));
    for (int r = 0; r < rows; r += Q8_PACK_ROWS, w += tile_bytes) {
        const int h = rows - r < Q8_PACK_ROWS ? rows - r : Q8_PACK_ROWS;
        int t = 0;
#define TILE(H, TT) \
    tile_q8_packed(w, H, x + (size_t)t * ldx, xs + (size_t)t * ldx, xsum + (size_t)t * ldx, ldx, \
                   out + (size_t)t * ldo + r, ldo, n, gs, TT)
        if (h == Q8_PACK_ROWS) { /* the full tiles, with h a constant: unmasked loads */
            for (; t + Q8_PACK_TOKENS <= T; t += Q8_PACK_TOKENS) TILE(Q8_PACK_ROWS, Q8_PACK_TOKENS);
            for (; t < T; t++) TILE(Q8_PACK_ROWS, 1);
        } else {
            for (; t + Q8_PACK_TOKENS <= T; t += Q8_PACK_TOKENS) TILE(h, Q8_PACK_TOKENS);
            for (; t < T; t++) TILE(h, 1);
        }
#undef TILE
    }
}
#endif

/* -- activation quantization (Q8 files): quantize_group's arithmetic on one group -----------------
 * Returns the group's scale and writes its int8 values, bit for bit quantize_group's (section 5):
 * the largest |x| as the largest bit pattern (NaN skipped), 127 / that, the products clamped to
 * +-127 (NaN to 0), rounded half away from zero. gs a multiple of the lane count. In scalar code
 * this was a quarter of a 15M-shape Q8 prompt. */
typedef float (*quant_group_fn)(int8_t *q, const float *x, int gs);

#ifdef NANO_X86
__attribute__((target("avx512f"))) static float quant_group_avx512(int8_t *q, const float *x, int gs)
{
    const __m512i abs_bits = _mm512_set1_epi32(0x7FFFFFFF), inf_bits = _mm512_set1_epi32(0x7F800000);
    __m512i top = _mm512_setzero_si512();
    for (int i = 0; i < gs; i += 16) {
        __m512i b = _mm512_and_si512(_mm512_loadu_si512((const void *)(x + i)), abs_bits);
        top = _mm512_max_epu32(top, _mm512_maskz_mov_epi32(_mm512_cmple_epu32_mask(b, inf_bits), b));
    }
    uint32_t topb = _mm512_reduce_max_epu32(top);
    float amax;
    memcpy(&amax, &topb, 4);
    float inv = amax > 0 && amax < INFINITY ? 127.0f / amax : 0.0f;
    const __m512 vinv = _mm512_set1_ps(inv), lim = _mm512_set1_ps(127.0f), nlim = _mm512_set1_ps(-127.0f);
    const __m512 half = _mm512_set1_ps(0.5f);
    const __m512i one = _mm512_castps_si512(_mm512_set1_ps(1.0f)), sign = _mm512_set1_epi32((int)0x80000000u);
    for (int i = 0; i < gs; i += 16) {
        __m512 v = _mm512_mul_ps(_mm512_loadu_ps(x + i), vinv);
        __mmask16 num = _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q);
        v = _mm512_maskz_mov_ps(num, _mm512_min_ps(lim, _mm512_max_ps(nlim, v)));
        __m512 t = _mm512_roundscale_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
        __m512 away = _mm512_castsi512_ps(_mm512_or_si512(_mm512_and_si512(_mm512_castps_si512(v), sign), one));
        __mmask16 up = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_sub_ps(v, t)), half, _CMP_GE_OQ);
        t = _mm512_mask_add_ps(t, up, t, away);
        _mm_storeu_si128((__m128i *)(q + i), _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(t)));
    }
    return amax / 127.0f;
}

__attribute__((target("avx2,fma"))) static float quant_group_avx2(int8_t *q, const float *x, int gs)
{
    const __m256i abs_bits = _mm256_set1_epi32(0x7FFFFFFF), inf_bits = _mm256_set1_epi32(0x7F800000);
    __m256i top = _mm256_setzero_si256();
    for (int i = 0; i < gs; i += 8) {
        __m256i b = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(x + i)), abs_bits);
        top = _mm256_max_epu32(top, _mm256_andnot_si256(_mm256_cmpgt_epi32(b, inf_bits), b)); /* both >= 0 */
    }
    uint32_t lanes[8], topb = 0;
    _mm256_storeu_si256((__m256i *)lanes, top);
    for (int k = 0; k < 8; k++) topb = lanes[k] > topb ? lanes[k] : topb;
    float amax;
    memcpy(&amax, &topb, 4);
    float inv = amax > 0 && amax < INFINITY ? 127.0f / amax : 0.0f;
    const __m256 vinv = _mm256_set1_ps(inv), lim = _mm256_set1_ps(127.0f), nlim = _mm256_set1_ps(-127.0f);
    const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    for (int i = 0; i < gs; i += 8) {
        __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + i), vinv);
        __m256 num = _mm256_cmp_ps(v, v, _CMP_ORD_Q);
        v = _mm256_and_ps(num, _mm256_min_ps(lim, _mm256_max_ps(nlim, v)));
        __m256 t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
        __m256 away = _mm256_or_ps(_mm256_and_ps(v, sign), one);
        __m256 up = _mm256_cmp_ps(_mm256_andnot_ps(sign, _mm256_sub_ps(v, t)), half, _CMP_GE_OQ);
        t = _mm256_add_ps(t, _mm256_and_ps(up, away));
        __m256i i32 = _mm256_cvttps_epi32(t);
        __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
        _mm_storel_epi64((__m128i *)(q + i), _mm_packs_epi16(i16, i16));
    }
    return amax / 127.0f;
}
#endif

/* out[r] = w[r] . x for `rows` consecutive rows of n floats (the matvec kernel) */
typedef void (*rows_f32_fn)(const float *w, const float *x, float *out, int rows, int n);
static rows_f32_fn g_rows_f32 = rows_f32_scalar;
static wsum_fn g_wsum = wsum_scalar;
static softmax_fn g_softmax = softmax_scalar;
static swiglu_fn g_swiglu = swiglu_scalar;
static dot_q8_fn g_q8_256; /* NULL where the CPU lacks it */
/* Q8 over a range of rows (the matvec kernel); NULL: call the dot_q8_fn row by row */
typedef void (*rows_q8_fn)(const int8_t *w, const float *ws, const int8_t *x, const float *xs, float *out, int rows,
                           int n, int gs);
static rows_q8_fn g_rows_q8_256; /* paired with g_q8_256 */
/* matrix times a block of token rows (prefill); NULL: the generic one over the row kernels */
static mm_f32_fn g_mm_f32;
static mm_q8_fn g_mm_q8_256; /* paired with g_q8_256 */
/* Q8 repacked (Q8_PACK_ROWS-row tiles) against T >= 1 token rows (x: int8, xs: scales, xsum: group
 * sums, ldx apart); non-NULL: the loader repacks every Q8 matrix whose group size is a multiple of 4 */
typedef void (*mm_q8_packed_fn)(const uint8_t *w, const int8_t *x, const float *xs, const int32_t *xsum, int ldx,
                                float *out, int ldo, int rows, int n, int gs, int T);
static mm_q8_packed_fn g_q8_packed;
static quant_group_fn g_quant_group; /* NULL: quantize_group */
static int g_quant_lanes;
static const char *g_kernel_name = "scalar";

/* Pick kernels once. NANO_SIMD=scalar|avx2|avx512 caps the choice (tests compare the paths). */
static void simd_init(void)
{
    static int done;
    if (done) return;
    done = 1;
#ifdef NANO_X86
    const char *cap = getenv("NANO_SIMD");
    int allow2 = !cap || strcmp(cap, "scalar") != 0;
    int allow512 = !cap || strcmp(cap, "avx512") == 0;
    __builtin_cpu_init();
    if (allow2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        g_rows_f32 = rows_f32_avx2;
        g_wsum = wsum_avx2;
        g_softmax = softmax_avx2;
        g_swiglu = swiglu_avx2;
        g_q8_256 = dot_q8_avx2;
        g_rows_q8_256 = rows_q8_avx2;
        g_mm_f32 = mm_f32_avx2;
        g_mm_q8_256 = mm_q8_avx2;
        g_quant_group = quant_group_avx2;
        g_quant_lanes = 8;
        g_kernel_name = "avx2";
    }
    if (allow512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vnni")) {
        g_rows_f32 = rows_f32_avx512;
        g_wsum = wsum_avx512;
        g_softmax = softmax_avx512;
        g_swiglu = swiglu_avx512;
        g_q8_packed = mm_q8_packed_avx512;
        g_mm_f32 = mm_f32_avx512;
        g_quant_group = quant_group_avx512;
        g_quant_lanes = 16;
        g_kernel_name = "avx512-vnni";
    }
#endif
}

const char *nano_kernel_name(void)
{
    simd_init();
    return g_kernel_name;
}

static dot_q8_fn pick_q8(int gs)
{
    if (gs % 32 == 0 && g_q8_256) return g_q8_256;
    return dot_q8_scalar;
}

/* ============================================================================================
 * 3. structures, loading and validation
 * ============================================================================================ */

typedef struct {
    int type, rows, cols, gs; /* type: NANO_QUANT_F32 or NANO_QUANT_Q8 */
    dot_q8_fn kq;             /* Q8: the row kernel for this group size */
    rows_q8_fn kr;            /* Q8: a kernel over a range of rows, or NULL (then kq, row by row) */
    mm_q8_fn km;              /* Q8: the kernel against a block of token rows, or NULL (the generic one) */
    const float *w;           /* fp32 [rows*cols] */
    const int8_t *q;          /* q8 [rows*cols] (NULL when packed) */
    const float *s;           /* q8 scales [rows*cols/gs]; groups never span rows (NULL when packed) */
    const uint8_t *pk;        /* Q8 repacked for g_q8_packed (q8_pack), or NULL */
} Mat;

typedef struct {
    const float *attn_norm, *ffn_norm;
    Mat mat[N_TARGETS];
    const float *bias[N_TARGETS]; /* NULL without biases */
} Layer;

/* a slot of the BPE tokenizer's bytes -> token map: all that a probe reads, in 16 bytes */
typedef struct {
    uint32_t hash; /* the low 32 bits of the token bytes' hash: most mismatches end here */
    uint32_t id1;  /* token id + 1; 0 marks an empty slot */
    uint32_t rank; /* the token's merge rank */
    uint32_t len;  /* its length in bytes */
} BpeSlot;

#define BPE_MAX_STOP 16 /* tokens a BPE section may flag as ending generation (Llama 3 has 2, Qwen2 2) */

typedef struct {
    int kind;             /* NANO_TOK_TRIE or NANO_TOK_BPE (the header's tokenizer kind) */
    int n;                /* tokens */
    char *text;           /* the bytes of every token, back to back (trie: UTF-8) */
    size_t *text_off;     /* [n+1] */
    /* trie */
    int32_t *node_token;  /* trie node -> token id ending there, or -1; node 0 is the root */
    size_t n_nodes;
    uint64_t *hkeys;      /* edge hash: key = (node << 21 | code point) + 1, 0 = empty slot */
    int32_t *hvals;       /* child node */
    size_t hmask;
    /* byte-level BPE (section 4b) */
    int pattern;          /* BPE_GPT2, BPE_LLAMA3, BPE_QWEN2 */
    int whole_first;      /* a piece that is a token is taken whole (tiktoken's rule) */
    uint32_t *rank;       /* [n] merge rank; BPE_NO_RANK for special tokens */
    BpeSlot *map;         /* bytes -> merged token, open addressing (linear probing) */
    size_t map_mask;
    int32_t byte_id[256]; /* the token of each single byte */
    /* llama2.c (section 4c; its merge ranks in rank, its texts in map) */
    int space_id;          /* the " " token put before the text */
    int l2c_words;         /* no token holds a space after another byte: words merge apart (l2c_encode) */
    uint8_t raw_byte[256]; /* raw_byte[b] = b: what the byte token <0xNN> decodes to */
    uint8_t joins[8192];  /* bit a << 8 | b: some token holds byte a then byte b (a merge can join them) */
    int32_t *special;     /* special token ids, sorted by first byte */
    int n_special;
    int32_t special_from[257]; /* special[special_from[b] .. special_from[b + 1]) start with byte b */
    int32_t stop[BPE_MAX_STOP]; /* BPE section version 2: the tokens flagged as ending generation */
    int n_stop;
} Tokenizer;

#ifdef _OPENMP
/* Threads on a shared machine. The forward pass runs about five OpenMP parallel loops per layer, and
 * a thread that finishes its share first waits for the others by spinning on its core (libgomp
 * spins ~300,000 turns before it sleeps). When other processes want the cores too, the thread it
 * waits for is off its core and the spinning keeps it there: on a busy 2-core machine 2 threads
 * decoded 12-72 tokens/s where 1 thread made over 1,000. Waiting passively (OMP_WAIT_POLICY=passive)
 * avoids that but makes every loop pay a wake-up: 4-5x slower than spinning on a quiet machine
 * (docs/BENCHMARKS.md, "Threads on a shared machine"). So the engine keeps the spinning and
 * measures instead. It starts on one thread; after a window of tokens it times TUNE_PROBE tokens
 * with the other choice (all threads, or one) and keeps whichever was faster per token. The two
 * mistakes do not cost the same: all threads where one is better can be 100 times slower, one
 * thread where all are better about 2 times. So all threads must win by a margin (TUNE_MARGIN), a
 * probe of them ends at its first token that is more than twice as slow, and while they are in use
 * any token slower than TUNE_GUARD times one thread's goes back to one thread at once. A probe that
 * loses makes the next window longer: twice as long, and at least TUNE_COST times the probe's loss,
 * so that asking costs at most about 1/TUNE_COST of the time; one that wins starts over from
 * TUNE_WINDOW_MIN tokens. */
#define TUNE_PROBE 3
#define TUNE_WINDOW_MIN 8
#define TUNE_WINDOW_MAX 1024
#define TUNE_COST 10
#define TUNE_MARGIN 0.95 /* 5%: above a probe's noise. At 0.8 (25%) a memory-bound model whose second thread
                            * adds 10-15% (110M fp32 decode) stayed on one thread: 63.6 against 66.9 tok/s */
#define TUNE_GUARD 4
typedef struct {
    int full;       /* the thread count OpenMP was given (-j, OMP_NUM_THREADS or all cores); < 2: off */
    int use_full;   /* between probes: 1 = `full` threads, 0 = one thread */
    int window, n;  /* tokens between probes; tokens since the last one */
    int probe_left; /* > 0 while probing the other choice */
    int probe_n;    /* probe tokens so far */
    double t_use;   /* seconds of the window's last TUNE_PROBE tokens */
    double t_probe; /* seconds of the probe's tokens so far */
    double t_worst; /* the probe's slowest token */
    double t_one;   /* seconds per token on one thread, last measured (0: not yet) */
} ThreadTuner;
#endif

struct NanoLora {
    Blob blob;
    int major, minor, n_layer, n_embd, n_head, n_kv_head, n_hidden, head_dim, rank, targets;
    double alpha;
    float scale; /* alpha / rank */
    int has_fingerprint;
    uint8_t fingerprint[32];
    int has_base_config; /* 2026.11: `base` holds all of the base model's header fields; 2024.10: shapes only */
    NanoConfig base;
    const float **A, **B; /* [n_layer * N_TARGETS]; NULL where a matrix is not targeted */
    float *tmp; /* [rank] */
};

struct Nano {
    NanoConfig c;
    Blob blob;
    Mat tok_emb, head;
    const float *pos_emb, *final_norm;
    Layer *layers;
    Tokenizer tok;
    /* run state, all allocated at load. x .. v, aq and as hold a block of prefill_rows token rows, ld
     * apart (a token's forward uses row 0; the prompt goes through in blocks: forward_block) */
    float *x, *xb, *xb2, *hb, *hb2, *q, *k, *v, *att, *logits, *kcache, *vcache, *rope_cos, *rope_sin;
    int8_t *aq;    /* activation quantized for Q8 matmuls */
    float *as;     /* its scales, ld apart too */
    int32_t *asum; /* its groups' sums of int8 values (for the packed kernels), ld apart too */
    int prefill_rows, ld;
    /* generation context */
    int *ids, n_ids, pos, has_logits;
    uint8_t *seen;
    int *distinct, n_distinct;
    float *work, *probs;
    int *order;
    NanoLora *lora;
#ifdef _OPENMP
    ThreadTuner tune;
#endif
};

const NanoConfig *nano_config(const Nano *m) { return &m->c; }

/* A read cursor over [pos, end) of a blob: every tensor is checked against the end before use. */
typedef struct {
    Blob *b;
    size_t pos, end;
    char *err;
} Cur;

static const uint8_t *take(Cur *c, size_t count, size_t elsize, size_t align, const char *what, int layer)
{
    int ok = 1;
    size_t nbytes = mul2(count, elsize, &ok);
    size_t p = align > 1 ? mul2((add2(c->pos, align - 1, &ok)) / align, align, &ok) : c->pos;
    if (!ok) {
        errf(c->err, "%s (layer %d): size overflows", what, layer);
        return NULL;
    }
    if (p > c->end || c->end - p < nbytes) {
        errf(c->err, "%s (layer %d): %zu bytes at offset %zu run past the end of the data (%zu bytes): "
             "file truncated or header corrupted", what, layer, nbytes, p, c->end);
        return NULL;
    }
    c->pos = p + nbytes;
    return c->b->data + p;
}

/* fp32 tensor; copied to the heap when the file puts it off a 4-byte boundary (2024.10 Q8 files
 * can, and so can a caller's buffer), because float loads must be aligned in C */
static const float *take_f32(Cur *c, size_t count, size_t align, const char *what, int layer)
{
    const uint8_t *p = take(c, count, 4, align, what, layer);
    if (!p) return NULL;
    if (((uintptr_t)p & 3) == 0) return (const float *)(const void *)p;
    float *copy = blob_own(c->b, count * 4);
    if (!copy) {
        errf(c->err, "out of memory");
        return NULL;
    }
    memcpy(copy, p, count * 4);
    return copy;
}

/* Byte offset of row r0 (a multiple of Q8_PACK_ROWS) in a packed matrix: the tiles before it hold
 * r0 rows of cols int8 values and cols / gs scales each. */
static size_t q8_packed_offset(int r0, int cols, int gs)
{
    return (size_t)r0 * ((size_t)cols + 4 * (size_t)(cols / gs));
}

/* A Q8 matrix (q, s: the file's layout) into the layout of section 2's packed kernels at dst:
 * rows * (cols + 4 cols / gs) bytes, as many as q and s take together. gs % 4 == 0. */
static void q8_pack(uint8_t *dst, const int8_t *q, const float *s, int rows, int cols, int gs)
{
    const int groups = cols / gs;
    for (int r0 = 0; r0 < rows; r0 += Q8_PACK_ROWS) {
        const int h = rows - r0 < Q8_PACK_ROWS ? rows - r0 : Q8_PACK_ROWS;
        uint8_t *b = dst + q8_packed_offset(r0, cols, gs);
        for (int g = 0; g < groups; g++, b += (size_t)h * (gs + 4)) {
            for (int c = 0; c < gs / 4; c++)
                for (int i = 0; i < h; i++) { /* 4 bytes + 128 each: their top bits flipped */
                    uint32_t four;
                    memcpy(&four, q + (size_t)(r0 + i) * cols + (size_t)g * gs + 4 * c, 4);
                    four ^= 0x80808080u;
                    memcpy(b + ((size_t)c * h + i) * 4, &four, 4);
                }
            for (int i = 0; i < h; i++) memcpy(b + (size_t)h * gs + 4 * i, s + (size_t)(r0 + i) * groups + g, 4);
        }
    }
}

/* Row `row` of a packed matrix, dequantized (int8 value times its group's scale, as for the file's
 * layout): the token embedding's lookup. */
static void q8_packed_row(float *x, const Mat *M, int row)
{
    const int gs = M->gs, r0 = row / Q8_PACK_ROWS * Q8_PACK_ROWS, i = row - r0;
    const int h = M->rows - r0 < Q8_PACK_ROWS ? M->rows - r0 : Q8_PACK_ROWS;
    const uint8_t *b = M->pk + q8_packed_offset(r0, M->cols, gs);
    for (int g = 0; g < M->cols / gs; g++, b += (size_t)h * (gs + 4)) {
        float scale;
        memcpy(&scale, b + (size_t)h * gs + 4 * i, 4);
        for (int c = 0; c < gs / 4; c++)
            for (int j = 0; j < 4; j++)
                x[g * gs + 4 * c + j] = (float)((int)b[((size_t)c * h + i) * 4 + j] - 128) * scale;
    }
}

/* M's int8 values and scales (at q in the file, c's position just past the scales) repacked in their
 * own bytes: the region from q to the end of the scales holds at least the packed size (more when
 * alignment left a gap). A caller's buffer cannot be written: then the packed copy is the heap's. */
static int pack_mat(Cur *c, Mat *M, const uint8_t *q)
{
    size_t n = (size_t)M->rows * M->cols, groups = n / M->gs;
    uint8_t *dst = blob_writable(c->b, q);
    if (!dst) dst = blob_own(c->b, n + 4 * groups);
    int8_t *vals = malloc(n ? n : 1);
    float *scales = malloc(groups ? 4 * groups : 1);
    if (!dst || !vals || !scales) {
        free(vals);
        free(scales);
        return errf(c->err, "out of memory");
    }
    memcpy(vals, M->q, n);
    memcpy(scales, M->s, 4 * groups);
    q8_pack(dst, vals, scales, M->rows, M->cols, M->gs);
    free(vals);
    free(scales);
    M->pk = dst;
    M->q = NULL;
    M->s = NULL;
    M->kq = NULL;
    M->kr = NULL;
    M->km = NULL;
    return 0;
}

static int take_mat(Cur *c, Mat *M, int rows, int cols, int quant, int gs, size_t align, const char *what, int layer)
{
    int ok = 1;
    size_t n = mul2((size_t)rows, (size_t)cols, &ok);
    M->rows = rows;
    M->cols = cols;
    M->gs = gs;
    M->type = quant;
    if (!ok) return errf(c->err, "%s: size overflows", what);
    if (quant == NANO_QUANT_F32) {
        M->w = take_f32(c, n, align, what, layer);
        return M->w ? 0 : -1;
    }
    if (n % (size_t)gs) return errf(c->err, "%s: %zu elements are not a multiple of the group size %d", what, n, gs);
    M->kq = pick_q8(gs);
    M->kr = M->kq == g_q8_256 ? g_rows_q8_256 : NULL;
    M->km = M->kq == g_q8_256 ? g_mm_q8_256 : NULL; /* the same sums as kr */
    M->q = (const int8_t *)take(c, n, 1, align, what, layer);
    if (!M->q) return -1;
    M->s = take_f32(c, n / gs, align, what, layer);
    if (!M->s) return -1;
    if (g_q8_packed && cols % gs == 0 && gs % 4 == 0) return pack_mat(c, M, (const uint8_t *)M->q);
    if (cols % gs) {
        /* 2024.10 files may have groups that span rows (the writer only made n_embd divisible):
         * the row kernels cannot use those, so this matrix becomes fp32 */
        float *w = blob_own(c->b, n * sizeof(float));
        if (!w) return errf(c->err, "out of memory");
        for (size_t i = 0; i < n; i++) w[i] = (float)M->q[i] * M->s[i / gs];
        M->type = NANO_QUANT_F32;
        M->w = w;
    }
    return 0;
}

static int check_magic(const uint8_t *d, size_t size, int *major, int *minor, int *type, char *err)
{
    if (size < HEADER_SIZE)
        return errf(err, "file is %zu bytes, shorter than the 256-byte header (truncated, or not a Nano .bin)", size);
    if (rd_u32(d) != MAGIC0 || rd_u32(d + 4) != MAGIC1)
        return errf(err, "bad magic 0x%08x 0x%08x (expected 0x%08x 0x%08x): not a Nano .bin file", rd_u32(d),
                    rd_u32(d + 4), MAGIC0, MAGIC1);
    *major = rd_i32(d + 8);
    *minor = rd_i32(d + 12);
    *type = rd_i32(d + 16);
    if (!((*major == 2026 && *minor == 11) || (*major == 2024 && *minor == 10)))
        return errf(err, "unsupported file version %d.%d (this engine reads 2026.11 and 2024.10)", *major, *minor);
    if (*type != TYPE_BASE && *type != TYPE_LORA) return errf(err, "unknown model type %d (0 = model, 10 = LoRA)", *type);
    return 0;
}

/* 2026.11: the file-size field and the CRC-32 over payload then header (with the CRC field zeroed) */
static int check_2026_integrity(const uint8_t *d, size_t size, int verify, char *err)
{
    if (rd_i32(d + 20) != CONFIG_LEN_2026)
        return errf(err, "config length %d, expected %d for layout 2026.11 (corrupted header?)", rd_i32(d + 20),
                    CONFIG_LEN_2026);
    uint64_t fsize = rd_u64(d + 136);
    if (fsize != size)
        return errf(err, "file is %zu bytes but its header says %llu: truncated or corrupted", size,
                    (unsigned long long)fsize);
    if (verify) {
        uint8_t head[HEADER_SIZE];
        memcpy(head, d, HEADER_SIZE);
        memset(head + CRC_OFFSET, 0, 4);
        crc_init();
        uint32_t crc = crc32_update(crc32_update(0, d + HEADER_SIZE, size - HEADER_SIZE), head, HEADER_SIZE);
        if (crc != rd_u32(d + CRC_OFFSET))
            return errf(err, "checksum mismatch (CRC-32 0x%08x, header says 0x%08x): the file is corrupted "
                        "(--no-verify skips this check)", crc, rd_u32(d + CRC_OFFSET));
    }
    return 0;
}

static int check_dims(const NanoConfig *c, char *err)
{
    if (c->n_layer < 1 || c->n_layer > MAX_LAYERS) return errf(err, "n_layer %d out of range [1, %d]", c->n_layer, MAX_LAYERS);
    if (c->vocab_size < 6 || c->vocab_size > MAX_VOCAB) return errf(err, "vocab_size %d out of range", c->vocab_size);
    if (c->block_size < 1 || c->block_size > MAX_VOCAB) return errf(err, "block_size %d out of range", c->block_size);
    int dims[] = {c->n_embd, c->n_head, c->n_kv_head, c->n_hidden, c->head_dim};
    const char *names[] = {"n_embd", "n_head", "n_kv_head", "n_hidden", "head_dim"};
    for (int i = 0; i < 5; i++)
        if (dims[i] < 1 || dims[i] > MAX_DIM) return errf(err, "%s %d out of range [1, %d]", names[i], dims[i], MAX_DIM);
    if ((long long)c->n_head * c->head_dim != c->n_embd)
        return errf(err, "n_embd %d != n_head %d x head_dim %d", c->n_embd, c->n_head, c->head_dim);
    if (c->n_head % c->n_kv_head) return errf(err, "n_head %d is not a multiple of n_kv_head %d", c->n_head, c->n_kv_head);
    if (c->use_rope && c->head_dim % 2) return errf(err, "RoPE needs an even head_dim, got %d", c->head_dim);
    return 0;
}

/* 2026.11 config fields (shared by models and adapters) */
static int read_config_2026(const uint8_t *d, NanoConfig *c, char *err)
{
    c->major = 2026;
    c->minor = 11;
    c->block_size = rd_i32(d + 24);
    c->vocab_size = rd_i32(d + 28);
    c->n_layer = rd_i32(d + 32);
    c->n_embd = rd_i32(d + 36);
    c->n_head = rd_i32(d + 40);
    c->n_kv_head = rd_i32(d + 44);
    c->n_hidden = rd_i32(d + 48);
    c->shared_classifier = rd_i32(d + 52);
    c->quant = rd_i32(d + 56);
    c->group_size = rd_i32(d + 60);
    c->head_dim = rd_i32(d + 64);
    c->use_rope = rd_i32(d + 68);
    c->is_causal = rd_i32(d + 72);
    c->bias = rd_i32(d + 76);
    c->rope_theta = rd_f64(d + 80);
    c->norm_eps = rd_f64(d + 88);
    c->tok_vocab = rd_i32(d + 100);
    memcpy(c->fingerprint, d + 152, 32);
    for (int i = 0; i < 32; i++) c->has_fingerprint |= c->fingerprint[i] != 0;
    int flags[] = {c->shared_classifier, c->use_rope, c->is_causal};
    const char *names[] = {"shared_classifier", "use_rope", "is_causal"};
    for (int i = 0; i < 3; i++)
        if (flags[i] != 0 && flags[i] != 1) return errf(err, "header field %s is %d, expected 0 or 1", names[i], flags[i]);
    /* 2 came later (Qwen2-style models): files with 0 or 1 read as they always did, and an older
     * engine refuses a 2 by name instead of misreading the parameters */
    if (c->bias < NANO_BIAS_NONE || c->bias > NANO_BIAS_QKV)
        return errf(err, "header field bias is %d, expected 0 (none), 1 (every linear layer) or 2 (q, k, v only)",
                    c->bias);
    if (!(c->norm_eps > 0 && c->norm_eps < 1)) return errf(err, "norm_eps %g out of range", c->norm_eps);
    if (c->use_rope && !(c->rope_theta > 0 && c->rope_theta < 1e30)) return errf(err, "rope_theta %g out of range", c->rope_theta);
    return check_dims(c, err);
}

/* Tokenizer sections (section 4); fill m->tok. The trie section (both layouts) starts at off, the
 * byte-level BPE one (2026.11, tokenizer kind 2) is [off, off + size). */
static int tok_build(Nano *m, size_t off, char *err);
static int bpe_build(Nano *m, size_t off, size_t size, char *err);
static int l2c_build(Nano *m, size_t off, size_t size, char *err);

static int alloc_state(Nano *m, char *err);

/* 2026.11 model; check_2026_integrity has run */
static int load_2026(Nano *m, char *err)
{
    const uint8_t *d = m->blob.data;
    size_t size = m->blob.size;
    NanoConfig *c = &m->c;
    if (read_config_2026(d, c, err)) return -1;
    if (c->quant == NANO_QUANT_Q8) {
        if (c->group_size < 1 || c->n_embd % c->group_size || c->n_hidden % c->group_size)
            return errf(err, "Q8 group size %d does not divide n_embd %d and n_hidden %d", c->group_size, c->n_embd,
                        c->n_hidden);
    } else if (c->quant != NANO_QUANT_F32) {
        return errf(err, "unknown quant type %d (0 = fp32, 800 = Q8_0)", c->quant);
    }
    c->tok_kind = rd_i32(d + 96);
    if (c->tok_kind != NANO_TOK_TRIE && c->tok_kind != NANO_TOK_BPE && c->tok_kind != NANO_TOK_LLAMA2C)
        return errf(err, "unknown tokenizer kind %d (1 = trie, 2 = byte-level BPE, 3 = llama2.c)", c->tok_kind);
    uint64_t tok_off = rd_u64(d + 104), tok_size = rd_u64(d + 112), par_off = rd_u64(d + 120), par_size = rd_u64(d + 128);
    if (tok_off != HEADER_SIZE || tok_size < 8 || tok_size > size - HEADER_SIZE || par_off % ALIGN ||
        par_off < tok_off + tok_size || par_off > size || par_size != size - par_off)
        return errf(err, "section offsets out of range (tokenizer %llu+%llu, parameters %llu+%llu, file %zu bytes)",
                    (unsigned long long)tok_off, (unsigned long long)tok_size, (unsigned long long)par_off,
                    (unsigned long long)par_size, size);
    if (rd_u32(d + tok_off) != tok_size) return errf(err, "tokenizer section size %u disagrees with the header's %llu",
                                                    rd_u32(d + tok_off), (unsigned long long)tok_size);
    if (c->tok_kind == NANO_TOK_TRIE          ? tok_build(m, (size_t)tok_off, err)
        : c->tok_kind == NANO_TOK_BPE         ? bpe_build(m, (size_t)tok_off, (size_t)tok_size, err)
                                              : l2c_build(m, (size_t)tok_off, (size_t)tok_size, err))
        return -1;
    if (m->tok.n != c->tok_vocab) return errf(err, "tokenizer has %d tokens, header says %d", m->tok.n, c->tok_vocab);

    Cur cur = {&m->blob, (size_t)par_off, size, err};
    int D = c->n_embd, Q = c->n_head * c->head_dim, KV = c->n_kv_head * c->head_dim, H = c->n_hidden;
    int q = c->quant, gs = c->group_size;
    int rows[N_TARGETS] = {Q, KV, KV, D, H, D, H}, cols[N_TARGETS] = {D, D, D, Q, D, H, D};
    if (take_mat(&cur, &m->tok_emb, c->vocab_size, D, q, gs, ALIGN, "token embedding", -1)) return -1;
    if (!c->use_rope && !(m->pos_emb = take_f32(&cur, (size_t)c->block_size * D, ALIGN, "position embedding", -1)))
        return -1;
    for (int l = 0; l < c->n_layer; l++) {
        Layer *L = &m->layers[l];
        for (int t = 0; t < N_TARGETS; t++) {
            if (t == WQ && !(L->attn_norm = take_f32(&cur, D, ALIGN, "attn_norm", l))) return -1;
            if (t == W1 && !(L->ffn_norm = take_f32(&cur, D, ALIGN, "ffn_norm", l))) return -1;
            if (take_mat(&cur, &L->mat[t], rows[t], cols[t], q, gs, ALIGN, TARGET_NAMES[t], l)) return -1;
            int has_bias = c->bias == NANO_BIAS_ALL || (c->bias == NANO_BIAS_QKV && t <= WV);
            if (has_bias && !(L->bias[t] = take_f32(&cur, rows[t], ALIGN, "bias", l))) return -1;
        }
    }
    if (!(m->final_norm = take_f32(&cur, D, ALIGN, "final norm", -1))) return -1;
    if (c->shared_classifier) m->head = m->tok_emb;
    else if (take_mat(&cur, &m->head, c->vocab_size, D, q, gs, ALIGN, "output head", -1)) return -1;
    if ((cur.pos + ALIGN - 1) / ALIGN * ALIGN != size)
        return errf(err, "%zu unexpected bytes after the parameters (corrupted header?)", size - cur.pos);
    return 0;
}

static int load_2024(Nano *m, char *err)
{
    const uint8_t *d = m->blob.data;
    size_t size = m->blob.size;
    NanoConfig *c = &m->c;
    if (rd_i32(d + 20) != CONFIG_LEN_2024)
        return errf(err, "config length %d, expected 32 for layout 2024.10", rd_i32(d + 20));
    c->major = 2024;
    c->minor = 10;
    c->block_size = rd_i32(d + 24);
    c->vocab_size = rd_i32(d + 28);
    c->n_layer = rd_i32(d + 32);
    c->n_embd = rd_i32(d + 36);
    c->n_head = rd_i32(d + 40);
    c->n_kv_head = rd_i32(d + 44);
    c->n_hidden = rd_i32(d + 48);
    c->shared_classifier = rd_i32(d + 52);
    c->quant = rd_i32(d + 56);
    int gs = rd_i32(d + 60);
    /* implied by the layout */
    c->use_rope = 1;
    c->is_causal = 1;
    c->bias = 0;
    c->rope_theta = 10000.0;
    c->norm_eps = 1e-5;
    if (c->n_head < 1 || c->n_embd % c->n_head) return errf(err, "n_embd %d is not a multiple of n_head %d", c->n_embd, c->n_head);
    c->head_dim = c->n_embd / c->n_head;
    if (check_dims(c, err)) return -1;
    if (c->shared_classifier != 0 && c->shared_classifier != 1)
        return errf(err, "shared classifier flag is %d, expected 0 or 1", c->shared_classifier);
    if (c->quant == NANO_QUANT_Q8) {
        if (gs < 1) return errf(err, "Q8 group size %d must be positive", gs);
        while (c->n_embd % gs) gs /= 2; /* the original writer's rule (see the 2024.10 doc) */
        c->group_size = gs;
    } else if (c->quant == NANO_QUANT_F32) {
        c->group_size = 0;
    } else {
        return errf(err, "unknown quant type %d (0 = fp32, 800 = Q8_0)", c->quant);
    }
    c->tok_kind = NANO_TOK_TRIE;
    if (tok_build(m, HEADER_SIZE, err)) return -1;
    c->tok_vocab = m->tok.n;

    Cur cur = {&m->blob, HEADER_SIZE + (size_t)rd_u32(d + HEADER_SIZE), size, err};
    int D = c->n_embd, Q = c->n_head * c->head_dim, KV = c->n_kv_head * c->head_dim, H = c->n_hidden, L = c->n_layer;
    int rows[N_TARGETS] = {Q, KV, KV, D, H, D, H}, cols[N_TARGETS] = {D, D, D, Q, D, H, D};
    size_t rope_n = (size_t)c->block_size * (c->head_dim / 2);
    if (c->quant == NANO_QUANT_F32) {
        if (take_mat(&cur, &m->tok_emb, c->vocab_size, D, 0, 0, 1, "token embedding", -1)) return -1;
        for (int l = 0; l < L; l++)
            if (!(m->layers[l].attn_norm = take_f32(&cur, D, 1, "attn_norm", l))) return -1;
        for (int t = WQ; t <= WO; t++)
            for (int l = 0; l < L; l++)
                if (take_mat(&cur, &m->layers[l].mat[t], rows[t], cols[t], 0, 0, 1, TARGET_NAMES[t], l)) return -1;
        for (int l = 0; l < L; l++)
            if (!(m->layers[l].ffn_norm = take_f32(&cur, D, 1, "ffn_norm", l))) return -1;
        for (int t = W1; t <= W3; t++)
            for (int l = 0; l < L; l++)
                if (take_mat(&cur, &m->layers[l].mat[t], rows[t], cols[t], 0, 0, 1, TARGET_NAMES[t], l)) return -1;
        if (!(m->final_norm = take_f32(&cur, D, 1, "final norm", -1))) return -1;
        /* the stored RoPE tables are skipped: the engine computes the same ones (rope_tables) */
        if (!take(&cur, rope_n * 2, 4, 1, "RoPE tables", -1)) return -1;
        if (!c->shared_classifier && take_mat(&cur, &m->head, c->vocab_size, D, 0, 0, 1, "output head", -1)) return -1;
    } else {
        for (int l = 0; l < L; l++)
            if (!(m->layers[l].attn_norm = take_f32(&cur, D, 1, "attn_norm", l))) return -1;
        for (int l = 0; l < L; l++)
            if (!(m->layers[l].ffn_norm = take_f32(&cur, D, 1, "ffn_norm", l))) return -1;
        if (!(m->final_norm = take_f32(&cur, D, 1, "final norm", -1))) return -1;
        if (take_mat(&cur, &m->tok_emb, c->vocab_size, D, c->quant, gs, 1, "token embedding", -1)) return -1;
        for (int t = 0; t < N_TARGETS; t++)
            for (int l = 0; l < L; l++)
                if (take_mat(&cur, &m->layers[l].mat[t], rows[t], cols[t], c->quant, gs, 1, TARGET_NAMES[t], l)) return -1;
        if (!c->shared_classifier && take_mat(&cur, &m->head, c->vocab_size, D, c->quant, gs, 1, "output head", -1))
            return -1;
        if (!take(&cur, rope_n * 2, 4, 1, "RoPE tables", -1)) return -1;
    }
    if (c->shared_classifier) m->head = m->tok_emb;
    if (cur.pos != size)
        return errf(err, "file is %zu bytes but its header implies %zu: corrupted header or trailing data", size, cur.pos);
    return 0;
}

static void *zalloc(size_t n, size_t el, int *ok)
{
    if (!*ok) return NULL;
    void *p = calloc(n ? n : 1, el);
    if (!p) *ok = 0;
    return p;
}

/* The prompt goes through the layers PREFILL_ROWS token rows at a time (forward_block): enough rows
 * that each weight, loaded once per tile of rows, serves many tokens; few enough that a block's
 * activations stay in L2 (64 rows of a 2048-wide hidden layer: 512 KiB). */
#define PREFILL_ROWS 64
#define PREFILL_ROWS_MAX 4096

static int alloc_state(Nano *m, char *err)
{
    const NanoConfig *c = &m->c;
    size_t D = c->n_embd, Q = (size_t)c->n_head * c->head_dim, KV = (size_t)c->n_kv_head * c->head_dim;
    size_t H = c->n_hidden, V = c->vocab_size, B = c->block_size, L = c->n_layer;
    size_t wide = D > Q ? D : Q;
    if (H > wide) wide = H;
    int ok = 1;
    size_t kv = mul3(L, KV, B, &ok);
    size_t rope = c->use_rope ? mul2(B, c->head_dim / 2, &ok) : 0;
    /* prefill block rows: PREFILL_ROWS, or NANO_PREFILL_ROWS (tests: short blocks, so that their small
     * models' prompts span several), at most the context */
#ifdef __wasi__
    const char *rows_env = NULL; /* the page gives wasm no environment: wasi-libc's getenv would exit */
#else
    const char *rows_env = getenv("NANO_PREFILL_ROWS");
#endif
    char *end = NULL;
    long PB = rows_env ? strtol(rows_env, &end, 10) : PREFILL_ROWS;
    if (rows_env && (end == rows_env || *end || PB < 1 || PB > PREFILL_ROWS_MAX))
        return errf(err, "NANO_PREFILL_ROWS must be a whole number from 1 to %d, got \"%.40s\"", PREFILL_ROWS_MAX,
                    rows_env);
    if ((size_t)PB > B) PB = (long)B;
    m->prefill_rows = (int)PB;
    m->ld = (int)wide;
    size_t block = mul2(wide, (size_t)PB, &ok);
    size_t floats = add2(add2(mul2(kv, 2, &ok), mul2(rope, 2, &ok), &ok), mul2((size_t)c->n_head, B, &ok), &ok);
    floats = add2(floats, add2(mul2(V, 3, &ok), mul2(block, 10, &ok), &ok), &ok); /* asum: int32 */
    size_t bytes = add2(add2(mul2(floats, 4, &ok), mul2(V, 5, &ok), &ok), block, &ok);
    if (!ok || (uint64_t)bytes > MAX_STATE_BYTES)
        return errf(err, "run state (KV cache and buffers) would take %s%llu MiB, over the %llu MiB limit",
                    ok ? "" : "over ", (unsigned long long)(bytes >> 20), (unsigned long long)(MAX_STATE_BYTES >> 20));
    m->x = zalloc(block, 4, &ok);
    m->xb = zalloc(block, 4, &ok);
    m->xb2 = zalloc(block, 4, &ok);
    m->hb = zalloc(block, 4, &ok);
    m->hb2 = zalloc(block, 4, &ok);
    m->q = zalloc(block, 4, &ok);
    m->k = zalloc(block, 4, &ok);
    m->v = zalloc(block, 4, &ok);
    m->att = zalloc((size_t)c->n_head * B, 4, &ok);
    m->logits = zalloc(V, 4, &ok);
    m->kcache = zalloc(kv, 4, &ok);
    m->vcache = zalloc(kv, 4, &ok);
    m->aq = zalloc(block, 1, &ok);
    m->as = zalloc(block, 4, &ok);
    m->asum = zalloc(block, 4, &ok);
    m->ids = zalloc(B + 1, sizeof(int), &ok);
    m->distinct = zalloc(B + 1, sizeof(int), &ok);
    m->seen = zalloc(V, 1, &ok);
    m->work = zalloc(V, 4, &ok);
    m->probs = zalloc(V, 4, &ok);
    m->order = zalloc(V, sizeof(int), &ok);
    if (c->use_rope) {
        m->rope_cos = zalloc(rope, 4, &ok);
        m->rope_sin = zalloc(rope, 4, &ok);
    }
    if (!ok) return errf(err, "out of memory allocating the run state (%zu MiB)", bytes >> 20);
    if (c->use_rope) {
        /* as model.rope_tables: angles in double, then rounded to float */
        int half = c->head_dim / 2;
        for (int i = 0; i < half; i++) {
            double inv = 1.0 / pow(c->rope_theta, (double)(2 * i) / c->head_dim);
            for (size_t t = 0; t < B; t++) {
                double a = (double)t * inv;
                m->rope_cos[t * half + i] = (float)cos(a);
                m->rope_sin[t * half + i] = (float)sin(a);
            }
        }
    }
    return 0;
}

static void tok_free(Tokenizer *t)
{
    void *bufs[] = {t->text, t->text_off, t->node_token, t->hkeys, t->hvals, t->rank, t->map, t->special};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) free(bufs[i]);
}

void nano_free(Nano *m)
{
    if (!m) return;
    void *bufs[] = {m->x, m->xb, m->xb2, m->hb, m->hb2, m->q, m->k, m->v, m->att, m->logits, m->kcache, m->vcache,
                    m->rope_cos, m->rope_sin, m->aq, m->as, m->asum, m->ids, m->distinct, m->seen, m->work, m->probs,
                    m->order, m->layers};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) free(bufs[i]);
    tok_free(&m->tok);
    blob_close(&m->blob);
    free(m);
}

static Nano *load(Nano *m, int verify, char *err)
{
    int major = 0, minor = 0, type = 0; /* set by check_magic (zeros: no false "maybe uninitialized" warning) */
    simd_init();
    if (check_magic(m->blob.data, m->blob.size, &major, &minor, &type, err)) goto fail;
    if (type == TYPE_LORA) {
        errf(err, "this file is a LoRA adapter, not a model (attach it to its base model with -l)");
        goto fail;
    }
    if (major == 2026 && check_2026_integrity(m->blob.data, m->blob.size, verify, err)) goto fail;
    if (g_q8_packed && rd_i32(m->blob.data + 56) == NANO_QUANT_Q8) blob_to_anonymous(&m->blob); /* both layouts */
    /* layers are counted before the config is fully checked; bound the allocation by MAX_LAYERS */
    int nl = rd_i32(m->blob.data + 32);
    if (nl < 1 || nl > MAX_LAYERS) {
        errf(err, "n_layer %d out of range [1, %d]", nl, MAX_LAYERS);
        goto fail;
    }
    m->layers = calloc((size_t)nl, sizeof(Layer));
    if (!m->layers) {
        errf(err, "out of memory");
        goto fail;
    }
    if ((major == 2026 ? load_2026(m, err) : load_2024(m, err)) || alloc_state(m, err)) goto fail;
    blob_seal(&m->blob);
    nano_reset(m);
#ifdef _OPENMP
    const char *tune = getenv("NANO_TUNE_THREADS");
    m->tune.full = tune && !strcmp(tune, "0") ? 1 : omp_get_max_threads();
    m->tune.window = TUNE_PROBE; /* one thread for the first tokens, then the first probe */
    if (m->tune.full > 1) omp_set_num_threads(1);
#endif
    return m;
fail:
    nano_free(m);
    return NULL;
}

Nano *nano_load_file(const char *path, int verify, char err[NANO_ERRLEN])
{
    Nano *m = calloc(1, sizeof *m);
    if (!m) {
        errf(err, "out of memory");
        return NULL;
    }
    if (blob_open(&m->blob, path, err)) {
        free(m);
        return NULL;
    }
    return load(m, verify, err);
}

Nano *nano_load_buffer(const void *data, size_t size, int verify, char err[NANO_ERRLEN])
{
    Nano *m = calloc(1, sizeof *m);
    if (!m) {
        errf(err, "out of memory");
        return NULL;
    }
    m->blob.data = data;
    m->blob.size = size;
    return load(m, verify, err);
}

/* ============================================================================================
 * 4. tokenizers (4a: UTF-8 and the trie; 4b: byte-level BPE and text streams)
 * ============================================================================================ */

static const char UNKNOWN_TEXT[] = "<|unknown|>";

static size_t utf8_put(uint32_t cp, char *out)
{
    if (cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) cp = 0xFFFD; /* not encodable */
    if (cp < 0x80) { out[0] = (char)cp; return 1; }
    if (cp < 0x800) { out[0] = (char)(0xC0 | cp >> 6); out[1] = (char)(0x80 | (cp & 0x3F)); return 2; }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | cp >> 12);
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | cp >> 18);
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Next code point of s[0..n), n >= 1. An ill-formed sequence yields U+FFFD for its maximal
 * well-formed prefix (or one byte), exactly like Python's bytes.decode("utf-8", "replace"). */
static size_t utf8_next(const uint8_t *s, size_t n, uint32_t *cp)
{
    uint8_t b0 = s[0], lo = 0x80, hi = 0xBF;
    int need;
    uint32_t c;
    if (b0 < 0x80) { *cp = b0; return 1; }
    if (b0 >= 0xC2 && b0 <= 0xDF) { need = 1; c = b0 & 0x1F; }
    else if (b0 >= 0xE0 && b0 <= 0xEF) {
        need = 2;
        c = b0 & 0x0F;
        if (b0 == 0xE0) lo = 0xA0;
        if (b0 == 0xED) hi = 0x9F;
    } else if (b0 >= 0xF0 && b0 <= 0xF4) {
        need = 3;
        c = b0 & 0x07;
        if (b0 == 0xF0) lo = 0x90;
        if (b0 == 0xF4) hi = 0x8F;
    } else { *cp = 0xFFFD; return 1; }
    for (int k = 1; k <= need; k++) {
        if ((size_t)k >= n || s[k] < lo || s[k] > hi) { *cp = 0xFFFD; return (size_t)k; }
        lo = 0x80;
        hi = 0xBF;
        c = (c << 6) | (s[k] & 0x3F);
    }
    *cp = c;
    return (size_t)need + 1;
}

static uint64_t hash64(uint64_t k)
{
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    return k;
}

static int trie_child(const Tokenizer *t, size_t node, uint32_t cp)
{
    uint64_t key = ((uint64_t)node << 21 | cp) + 1;
    for (size_t h = hash64(key) & t->hmask;; h = (h + 1) & t->hmask) {
        if (t->hkeys[h] == key) return t->hvals[h];
        if (t->hkeys[h] == 0) return -1;
    }
}

static int tok_build(Nano *m, size_t off, char *err)
{
    const uint8_t *d = m->blob.data;
    size_t size = m->blob.size;
    Tokenizer *t = &m->tok;
    if (off > size || size - off < 8) return errf(err, "tokenizer section: file truncated at offset %zu", off);
    size_t sec = rd_u32(d + off), n = rd_u32(d + off + 4);
    if (sec < 8 || sec > size - off)
        return errf(err, "tokenizer section of %zu bytes at offset %zu does not fit in the %zu-byte file", sec, off, size);
    if (n < 6 || n > (size_t)m->c.vocab_size)
        return errf(err, "tokenizer has %zu tokens; expected 6 .. vocab_size (%d)", n, m->c.vocab_size);
    /* pass 1: validate every entry and count code points */
    size_t p = off + 8, end = off + sec, total = 0;
    for (size_t i = 0; i < n; i++) {
        if (end - p < 8) return errf(err, "tokenizer section: token %zu runs past the section's end", i);
        size_t len = d[p];
        if (rd_u32(d + p + 4) != i) return errf(err, "tokenizer section: entry %zu has id %u (corrupted)", i, rd_u32(d + p + 4));
        p += 8;
        if ((end - p) / 4 < len) return errf(err, "tokenizer section: token %zu runs past the section's end", i);
        for (size_t j = 0; j < len; j++)
            if (rd_u32(d + p + 4 * j) > 0x10FFFF)
                return errf(err, "tokenizer section: token %zu holds an invalid code point 0x%x", i, rd_u32(d + p + 4 * j));
        p += 4 * len;
        total += len;
    }
    if (p != end) return errf(err, "tokenizer section: %zu bytes left after %zu tokens (corrupted)", end - p, n);
    /* pass 2: trie (an edge hash) and the UTF-8 text of every token */
    size_t cap = 16;
    while (cap < 2 * (total + 1)) cap *= 2;
    t->n = (int)n;
    t->hmask = cap - 1;
    t->node_token = malloc((total + 1) * sizeof *t->node_token);
    t->hkeys = calloc(cap, sizeof *t->hkeys);
    t->hvals = malloc(cap * sizeof *t->hvals);
    t->text = malloc(total * 4 + 1);
    t->text_off = malloc((n + 1) * sizeof *t->text_off);
    if (!t->node_token || !t->hkeys || !t->hvals || !t->text || !t->text_off) return errf(err, "out of memory (tokenizer)");
    t->node_token[0] = -1;
    t->n_nodes = 1;
    size_t tp = 0;
    p = off + 8;
    for (size_t i = 0; i < n; i++) {
        size_t len = d[p], node = 0;
        p += 8;
        t->text_off[i] = tp;
        for (size_t j = 0; j < len; j++) {
            uint32_t cp = rd_u32(d + p + 4 * j);
            tp += utf8_put(cp, t->text + tp);
            int child = trie_child(t, node, cp);
            if (child < 0) {
                uint64_t key = ((uint64_t)node << 21 | cp) + 1;
                size_t h = hash64(key) & t->hmask;
                while (t->hkeys[h]) h = (h + 1) & t->hmask;
                t->hkeys[h] = key;
                t->hvals[h] = child = (int)t->n_nodes;
                t->node_token[t->n_nodes++] = -1;
            }
            node = (size_t)child;
        }
        if (len) t->node_token[node] = (int32_t)i; /* a repeated string maps to its last id, as a Python dict would */
        p += 4 * len;
    }
    t->text_off[n] = tp;
    for (int i = 0; i < NANO_N_SPECIAL; i++) m->c.special[i] = i; /* tokenizer.py's fixed ids */
    t->kind = NANO_TOK_TRIE;
    return 0;
}

static size_t trie_encode(const Tokenizer *t, const uint8_t *s, size_t len, int *ids, size_t max_ids)
{
    size_t i = 0, count = 0;
    while (i < len) {
        /* greedy: walk the trie as far as the text allows, remember the last complete token */
        size_t j = i, node = 0, best_end = i;
        int best = -1;
        while (j < len) {
            uint32_t cp;
            size_t adv = utf8_next(s + j, len - j, &cp);
            int child = trie_child(t, node, cp);
            if (child < 0) break;
            node = (size_t)child;
            j += adv;
            if (t->node_token[node] >= 0) {
                best = t->node_token[node];
                best_end = j;
            }
        }
        if (best < 0) { /* no token starts here: one code point becomes <|unknown|> */
            uint32_t cp;
            best = NANO_UNK;
            best_end = i + utf8_next(s + i, len - i, &cp);
        }
        if (count < max_ids) ids[count] = best;
        count++;
        i = best_end;
    }
    return count;
}

/* --------------------------------------------------------------------------------------------
 * 4b. byte-level BPE (tokenizer kind 2), tiktoken's algorithm
 *
 * Encoding a text:
 *   1. special token strings are found first (the leftmost; the longest if several start there),
 *      and the text between two of them is encoded on its own, as if it were the whole text;
 *   2. the pre-tokenizer splits that text into pieces with the model's pattern (the regular
 *      expressions below, written out as matchers: no regex engine);
 *   3. each piece's UTF-8 bytes are merged: one token per byte to start with, then, again and
 *      again, the adjacent pair whose joined bytes are the token of lowest merge rank is joined
 *      (the leftmost such pair on a tie), until no adjacent pair joins into a token. With
 *      whole_first (tiktoken's rule) a piece that is itself a token becomes that token at once.
 * The text reaches step 1 as valid UTF-8: ill-formed bytes are replaced by U+FFFD first, as
 * Python's errors="replace" (tokenizer.py encodes str, never bytes).
 * ------------------------------------------------------------------------------------------ */

#include "unicode_tables.h" /* UC_START, UC_CLASS, UC_ASCII: made by gen_unicode.py */

enum { UC_OTHER = 0, UC_LETTER = 1, UC_NUMBER = 2, UC_SPACE = 3 }; /* as gen_unicode.py numbers them */
enum { BPE_GPT2 = 1, BPE_LLAMA3 = 2, BPE_QWEN2 = 3, BPE_SMOLLM = 4 }; /* pre-tokenization patterns */
#define BPE_NO_RANK 0xFFFFFFFFu /* special tokens: never made by merging */
#define BPE_FLAG_WHOLE 1u       /* section flag: whole_first */
#define BPE_HEADER 48           /* section bytes before the first token entry */
#define BPE_ENTRY 8             /* bytes of an entry before the token's own bytes */
#define BPE_ENTRY_STOP 1u       /* entry flag (section version 2): generation ends at this token */
#define PIECE_STACK 128         /* pieces of up to this many bytes merge in stack memory (merge_short) */

static uint32_t rd_u16(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8; }

/* Class of a code point: the run of the table it falls in (binary search). The tables follow the
 * Unicode version of the Python that generated them (UC_UNICODE_VERSION); a code point assigned in a
 * later version is UC_OTHER here even where a newer regex engine (tiktoken's) calls it a letter or
 * number, so text with such characters can pre-tokenize differently (gen_unicode.py says more). */
static int uc_class(uint32_t cp)
{
    if (cp < 128) return UC_ASCII[cp];
    int lo = 0, hi = UC_RUNS - 1; /* the last run that starts at or before cp */
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (UC_START[mid] <= cp) lo = mid;
        else hi = mid - 1;
    }
    return UC_CLASS[lo];
}

typedef struct {
    uint32_t cp;
    int cls, len; /* len: bytes */
} Ch;

/* the character at s[i], i < n, in valid UTF-8 */
static Ch ch_at(const uint8_t *s, size_t n, size_t i)
{
    Ch c;
    if (s[i] < 0x80) {
        c.cp = s[i];
        c.len = 1;
        c.cls = UC_ASCII[s[i]];
        return c;
    }
    c.len = (int)utf8_next(s + i, n - i, &c.cp);
    c.cls = uc_class(c.cp);
    return c;
}

/* the end of the run of characters of class cls that starts at i; at most max of them (0: any) */
static size_t run_end(const uint8_t *s, size_t n, size_t i, int cls, int max)
{
    for (int count = 0; i < n && (max == 0 || count < max); count++) {
        if (s[i] < 0x80) {
            if (UC_ASCII[s[i]] != cls) break;
            i++;
        } else {
            Ch c = ch_at(s, n, i);
            if (c.cls != cls) break;
            i += (size_t)c.len;
        }
    }
    return i;
}

/* bytes of the contraction 's 'd 'm 't 'll 've 're at s[i] (an apostrophe), or 0. GPT-2's pattern
 * takes them in lower case; Llama-3's (?i:...) in any case, which under Unicode case folding lets
 * the long s (U+017F) stand for 's' as well. */
static size_t contraction(const uint8_t *s, size_t n, size_t i, int any_case)
{
    if (i + 1 >= n) return 0;
    uint8_t a = s[i + 1], b = i + 2 < n ? s[i + 2] : 0;
    if (any_case) {
        if (a == 0xC5 && b == 0xBF) return 3; /* 'ſ */
        a = a >= 'A' && a <= 'Z' ? a + 32 : a;
        b = b >= 'A' && b <= 'Z' ? b + 32 : b;
    }
    if (a == 's' || a == 'd' || a == 'm' || a == 't') return 2;
    if ((a == 'l' && b == 'l') || (a == 'v' && b == 'e') || (a == 'r' && b == 'e')) return 3;
    return 0;
}

/* From a space character at i: with with_newlines (Llama-3) and a line break in the run of spaces,
 * the end of \s*[\r\n]+ (just after the run's last line break); else that of \s+(?!\S)|\s+ (the
 * run, less its last character when a non-space follows, since that one joins the next piece;
 * a single space before a non-space is a piece of its own). */
static size_t space_end(const uint8_t *s, size_t n, size_t i, int with_newlines)
{
    size_t j = i, last = i, nl_end = 0;
    while (j < n) {
        Ch c = ch_at(s, n, j);
        if (c.cls != UC_SPACE) break;
        if (c.cp == '\r' || c.cp == '\n') nl_end = j + 1;
        last = j;
        j += (size_t)c.len;
    }
    if (with_newlines && nl_end) return nl_end;
    return j == n || last == i ? j : last;
}

/* GPT-2 (and, within the stretches between digits, SmolLM: see pretokenize_text):
 *   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 * Returns the end of the piece that starts at i. */
static size_t pre_gpt2(const uint8_t *s, size_t n, size_t i)
{
    Ch c = ch_at(s, n, i);
    size_t k;
    if (c.cp == '\'' && (k = contraction(s, n, i, 0))) return i + k;
    if (c.cls != UC_SPACE) return run_end(s, n, i, c.cls, 0); /* letters, numbers or others */
    if (c.cp == ' ' && i + 1 < n) {                           /* " ?" before one of those runs */
        Ch d = ch_at(s, n, i + 1);
        if (d.cls != UC_SPACE) return run_end(s, n, i + 1, d.cls, 0);
    }
    return space_end(s, n, i, 0);
}

/* Llama-3 (max_digits 3) and Qwen2 (max_digits 1):
 *   (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|
 *   \s*[\r\n]+|\s+(?!\S)|\s+
 * The alternatives are tried in this order, as the regex does. */
static size_t pre_llama3(const uint8_t *s, size_t n, size_t i, int max_digits)
{
    Ch c = ch_at(s, n, i);
    size_t k;
    if (c.cp == '\'' && (k = contraction(s, n, i, 1))) return i + k;
    if (c.cls == UC_LETTER) return run_end(s, n, i, UC_LETTER, 0);
    /* one character that is not a line break, letter or number, then letters: " word", "(word" */
    if (c.cls != UC_NUMBER && c.cp != '\r' && c.cp != '\n' && i + (size_t)c.len < n &&
        ch_at(s, n, i + (size_t)c.len).cls == UC_LETTER)
        return run_end(s, n, i + (size_t)c.len, UC_LETTER, 0);
    if (c.cls == UC_NUMBER) return run_end(s, n, i, UC_NUMBER, max_digits);
    /* " ?[^\s\p{L}\p{N}]+[\r\n]*": others (after one space, if there is one), then any line breaks */
    size_t j = c.cp == ' ' && i + 1 < n && ch_at(s, n, i + 1).cls == UC_OTHER ? i + 1 : i;
    if (j > i || c.cls == UC_OTHER) {
        j = run_end(s, n, j, UC_OTHER, 0);
        while (j < n && (s[j] == '\r' || s[j] == '\n')) j++;
        return j;
    }
    return space_end(s, n, i, 1);
}

static size_t pretokenize(int pattern, const uint8_t *s, size_t n, size_t i)
{
    if (pattern == BPE_GPT2) return pre_gpt2(s, n, i);
    return pre_llama3(s, n, i, pattern == BPE_LLAMA3 ? 3 : 1);
}

static size_t tok_len(const Tokenizer *t, int id) { return t->text_off[id + 1] - t->text_off[id]; }

/* The first special token in s[i..n): its id, and where it starts in *at (-1 and n: none). */
static int find_special(const Tokenizer *t, const uint8_t *s, size_t n, size_t i, size_t *at)
{
    for (; t->n_special && i < n; i++) {
        int best = -1;
        size_t best_len = 0;
        for (int k = t->special_from[s[i]]; k < t->special_from[s[i] + 1]; k++) {
            int id = t->special[k];
            size_t len = tok_len(t, id);
            if (len > best_len && len <= n - i && !memcmp(s + i, t->text + t->text_off[id], len)) {
                best = id;
                best_len = len;
            }
        }
        if (best >= 0) {
            *at = i;
            return best;
        }
    }
    *at = n;
    return -1;
}

static uint64_t hash_bytes(const uint8_t *p, size_t n)
{
    uint64_t h = 0x9E3779B97F4A7C15ULL ^ n, w;
    for (; n >= 8; p += 8, n -= 8) {
        memcpy(&w, p, 8);
        h = hash64(h ^ w);
    }
    w = 0;
    memcpy(&w, p, n);
    return hash64(h ^ w);
}

/* the slot of the merged (kind 0) token whose bytes are p[0..n), or NULL */
static const BpeSlot *map_find(const Tokenizer *t, const uint8_t *p, size_t n)
{
    uint64_t h = hash_bytes(p, n);
    for (size_t i = h & t->map_mask;; i = (i + 1) & t->map_mask) {
        const BpeSlot *e = &t->map[i];
        if (!e->id1) return NULL;
        if (e->hash == (uint32_t)h && e->len == n && !memcmp(t->text + t->text_off[e->id1 - 1], p, n)) return e;
    }
}

/* ids out of an encoder: written while there is room, counted always */
typedef struct {
    int *ids;
    size_t max, count;
} Ids;

static void put_id(Ids *o, int id)
{
    if (o->count < o->max) o->ids[o->count] = id;
    o->count++;
}

/* Short pieces (up to PIECE_STACK bytes: nearly all of them) merge as tiktoken does it: an array
 * of parts, a scan for the lowest-ranked pair, the joined pair's neighbours looked up again.
 * Part k is s[start[k] .. start[k+1]) and is token id; rank and pair say which token it would make
 * joined with part k+1 (BPE_NO_RANK: none). */
typedef struct {
    uint32_t start, rank;
    int32_t id, pair;
} Part;

static void pair_of(const Tokenizer *t, const uint8_t *s, Part *p, size_t k)
{
    const BpeSlot *e = map_find(t, s + p[k].start, p[k + 2].start - p[k].start);
    p[k].pair = e ? (int32_t)e->id1 - 1 : -1;
    p[k].rank = e ? e->rank : BPE_NO_RANK;
}

static void merge_short(const Tokenizer *t, const uint8_t *s, size_t n, Ids *o)
{
    Part p[PIECE_STACK + 1];
    size_t m = n; /* parts; p[m] marks the end */
    for (size_t k = 0; k <= n; k++)
        p[k] = (Part){(uint32_t)k, BPE_NO_RANK, k < n ? t->byte_id[s[k]] : -1, -1};
    for (size_t k = 0; k + 1 < m; k++) pair_of(t, s, p, k);
    for (;;) {
        size_t best = 0;
        uint32_t r = BPE_NO_RANK;
        for (size_t k = 0; k + 1 < m; k++)
            if (p[k].rank < r) {
                r = p[k].rank;
                best = k;
            }
        if (r == BPE_NO_RANK) break;
        p[best].id = p[best].pair; /* join parts best and best+1 */
        memmove(p + best + 1, p + best + 2, (m - best - 1) * sizeof *p);
        m--;
        if (best + 1 < m) pair_of(t, s, p, best);
        else p[best].rank = BPE_NO_RANK;
        if (best > 0) pair_of(t, s, p, best - 1);
    }
    for (size_t k = 0; k < m; k++) put_id(o, p[k].id);
}

/* Long pieces give the same merges through a min-heap of candidate pairs ordered by (rank, start):
 * O(n log n) where the scan above is O(n^2), which for a megabyte without a space (one piece) would
 * take hours. The parts are a linked list over their first bytes; a candidate that a merge has made
 * stale (its left part absorbed, or either part grown) is skipped when it comes up. */
typedef struct {
    uint32_t rank, left, end; /* joining the parts s[left .. end) would make token id */
    int32_t id;
} Cand;

/* the scratch memory of one nano_encode call for its long pieces: grown as needed, freed at its end.
 * mem: 12 bytes a byte of the longest piece (its parts); heap: the candidates, grown as they come
 * (it can hold up to 3 a byte, but seldom holds more than one). */
typedef struct {
    void *mem;
    size_t cap;
    Cand *heap;
    size_t heap_cap;
} Scratch;

static int cand_less(const Cand *a, const Cand *b) { return a->rank < b->rank || (a->rank == b->rank && a->left < b->left); }

static int cand_push(Scratch *w, size_t *n, Cand c) /* -1: out of memory */
{
    if (*n == w->heap_cap) {
        size_t cap = w->heap_cap ? 2 * w->heap_cap : 4096;
        Cand *more = cap < (size_t)-1 / sizeof(Cand) ? realloc(w->heap, cap * sizeof(Cand)) : NULL;
        if (!more) return -1;
        w->heap = more;
        w->heap_cap = cap;
    }
    Cand *h = w->heap;
    size_t i = (*n)++;
    for (; i > 0 && cand_less(&c, &h[(i - 1) / 2]); i = (i - 1) / 2) h[i] = h[(i - 1) / 2];
    h[i] = c;
    return 0;
}

static Cand cand_pop(Cand *h, size_t *n)
{
    Cand top = h[0], last = h[--*n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && cand_less(&h[c + 1], &h[c])) c++;
        if (!cand_less(&h[c], &last)) break;
        h[i] = h[c];
        i = c;
    }
    if (*n) h[i] = last;
    return top;
}

/* the candidate of joining the parts s[left .. end), if that is a token; -1: out of memory */
static int cand_try(const Tokenizer *t, const uint8_t *s, Scratch *w, size_t *nh, uint32_t left, uint32_t end)
{
    const BpeSlot *e = map_find(t, s + left, end - left);
    return e && e->rank != BPE_NO_RANK ? cand_push(w, nh, (Cand){e->rank, left, end, (int32_t)e->id1 - 1}) : 0;
}

/* The arrays of the parts of an n-byte string, in w's memory, 12 bytes a byte: next/prev[k], the start of
 * the part after / before the part that starts at k (next = 0: absorbed); id[k], its token. -1: out of memory */
static int parts_alloc(Scratch *w, size_t n, uint32_t **next, uint32_t **prev, int32_t **id)
{
    const size_t per_byte = 2 * sizeof(uint32_t) + sizeof(int32_t);
    if (n >= UINT32_MAX || n > (size_t)-1 / per_byte) return -1;
    if (n * per_byte > w->cap) {
        void *mem = malloc(n * per_byte);
        if (!mem) return -1;
        free(w->mem);
        w->mem = mem;
        w->cap = n * per_byte;
    }
    *next = w->mem;
    *prev = *next + n;
    *id = (int32_t *)(*prev + n);
    return 0;
}

/* Joins the parts of s[0..n) (n >= 1; set up in next, prev and id, the first at 0) by the heap of
 * candidates, then writes their ids; -1 when out of memory */
static int merge_parts(const Tokenizer *t, const uint8_t *s, size_t n, Scratch *w, Ids *o, uint32_t *next,
                       uint32_t *prev, int32_t *id)
{
    size_t nh = 0;
    for (uint32_t k = 0; next[k] < n; k = next[k])
        if (cand_try(t, s, w, &nh, k, next[next[k]])) return -1;
    while (nh) {
        Cand c = cand_pop(w->heap, &nh);
        uint32_t mid = next[c.left];
        if ((c.left && !mid) || mid >= n || next[mid] != c.end) continue; /* stale */
        id[c.left] = c.id; /* join [left, mid) and [mid, end) */
        next[c.left] = c.end;
        next[mid] = 0;
        if (c.end < n) prev[c.end] = c.left;
        if (c.left && cand_try(t, s, w, &nh, prev[c.left], c.end)) return -1;
        if (c.end < n && cand_try(t, s, w, &nh, c.left, next[c.end])) return -1;
    }
    for (uint32_t k = 0; k < n; k = next[k]) put_id(o, id[k]);
    return 0;
}

static int merge_long(const Tokenizer *t, const uint8_t *s, size_t n, Scratch *w, Ids *o)
{
    uint32_t *next, *prev;
    int32_t *id;
    if (parts_alloc(w, n, &next, &prev, &id)) return -1;
    for (uint32_t k = 0; k < n; k++) { /* one part a byte */
        next[k] = k + 1;
        prev[k] = k - 1; /* prev[0] is never read */
        id[k] = t->byte_id[s[k]];
    }
    return merge_parts(t, s, n, w, o, next, prev, id);
}

/* Where no token holds the two bytes on either side of a position, no merge can join across it:
 * the two sides merge apart to the ids of the whole. A piece longer than LONG_PIECE is cut at the
 * first such position past half that length, and again, so that the memory merge_long takes stays
 * bounded by LONG_PIECE (data.py bounds its pieces the same way); one without such a position (a
 * run of characters every neighbouring pair of which some token holds) merges whole. */
#define LONG_PIECE (1u << 16)

static int joinable(const Tokenizer *t, uint8_t a, uint8_t b) { return t->joins[(a << 8 | b) >> 3] >> (b & 7) & 1; }

static int merge_part(const Tokenizer *t, const uint8_t *s, size_t n, Scratch *w, Ids *o)
{
    if (n > PIECE_STACK) return merge_long(t, s, n, w, o);
    merge_short(t, s, n, o);
    return 0;
}

/* step 3 for one piece s[0..n), n >= 1; -1 when out of memory */
static int bpe_piece(const Tokenizer *t, const uint8_t *s, size_t n, Scratch *w, Ids *o)
{
    const BpeSlot *whole = n > 1 && t->whole_first ? map_find(t, s, n) : NULL;
    if (n == 1 || whole) {
        put_id(o, n == 1 ? t->byte_id[s[0]] : (int)whole->id1 - 1);
        return 0;
    }
    size_t start = 0;
    while (n - start > LONG_PIECE) {
        size_t cut = start + LONG_PIECE / 2;
        while (cut < n && joinable(t, s[cut - 1], s[cut])) cut++;
        if (cut == n) break;
        if (merge_part(t, s + start, cut - start, w, o)) return -1;
        start = cut;
    }
    return merge_part(t, s + start, n - start, w, o);
}

/* Decodes s[0..n) into UTF-8 with every ill-formed sequence as U+FFFD (3 bytes: out needs 3n of
 * room). Unless final, a partial sequence at the end is left undecoded: *rest is its length. */
static size_t utf8_clean(const uint8_t *s, size_t n, char *out, size_t *rest, int final);

static int utf8_valid(const uint8_t *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        uint64_t w;
        if (n - i >= 8 && (memcpy(&w, s + i, 8), !(w & 0x8080808080808080ULL))) {
            i += 8; /* eight ASCII bytes */
            continue;
        }
        uint32_t cp;
        size_t k = utf8_next(s + i, n - i, &cp);
        if (cp == 0xFFFD && !(k == 3 && s[i] == 0xEF)) return 0; /* not a real U+FFFD (EF BF BD) */
        i += k;
    }
    return 1;
}

/* The text to tokenize as valid UTF-8: s itself, or (ill-formed sequences as U+FFFD) a copy in
 * *clean that the caller frees, with *s and *len moved to it. 0 when the copy cannot be allocated. */
static int valid_utf8_text(const uint8_t **s, size_t *len, uint8_t **clean)
{
    *clean = NULL;
    if (utf8_valid(*s, *len)) return 1;
    size_t rest;
    *clean = *len < (size_t)-1 / 3 ? malloc(3 * *len) : NULL;
    if (!*clean) return 0;
    *len = utf8_clean(*s, *len, (char *)*clean, &rest, 1);
    *s = *clean;
    return 1;
}

/* The pieces of s[0..n) (a text between special tokens), one after the other, through `piece`.
 * SmolLM (Hugging Face's Sequence[Digits(individual_digits), ByteLevel(use_regex)]) first cuts
 * every number character (\p{N}: Rust's char::is_numeric, the same categories Nd Nl No) out as a
 * piece of its own, then splits each stretch between them with GPT-2's pattern as if it were the
 * whole text: so "a  1" is "a", "  ", "1" (GPT-2 alone: "a", " ", " 1"), since the look-ahead of
 * \s+(?!\S) ends at the digit. */
typedef struct {
    const Tokenizer *t;
    Scratch *w;
    Ids *o;
} PieceSink;

static int pretokenize_text(int pattern, const uint8_t *s, size_t n, PieceSink *k)
{
    if (pattern != BPE_SMOLLM) {
        for (size_t j = 0; j < n;) {
            size_t e = pretokenize(pattern, s, n, j);
            if (bpe_piece(k->t, s + j, e - j, k->w, k->o)) return -1;
            j = e;
        }
        return 0;
    }
    for (size_t j = 0; j < n;) {
        Ch c = ch_at(s, n, j);
        if (c.cls == UC_NUMBER) {
            if (bpe_piece(k->t, s + j, (size_t)c.len, k->w, k->o)) return -1;
            j += (size_t)c.len;
            continue;
        }
        size_t stop = j; /* the stretch up to the next number character */
        while (stop < n) {
            Ch d = ch_at(s, n, stop);
            if (d.cls == UC_NUMBER) break;
            stop += (size_t)d.len;
        }
        for (size_t i = j; i < stop;) {
            size_t e = pre_gpt2(s, stop, i);
            if (bpe_piece(k->t, s + i, e - i, k->w, k->o)) return -1;
            i = e;
        }
        j = stop;
    }
    return 0;
}

static size_t bpe_encode(const Tokenizer *t, const uint8_t *s, size_t len, int *ids, size_t max_ids)
{
    uint8_t *clean = NULL;
    if (!valid_utf8_text(&s, &len, &clean)) return (size_t)-1;
    Ids o = {ids, max_ids, 0};
    Scratch w = {NULL, 0, NULL, 0};
    int bad = 0;
    for (size_t i = 0; i < len && !bad;) {
        size_t at;
        int sp = find_special(t, s, len, i, &at);
        PieceSink k = {t, &w, &o};
        bad = pretokenize_text(t->pattern, s + i, at - i, &k); /* the text before it, on its own */
        if (sp >= 0) put_id(&o, sp);
        i = sp >= 0 ? at + tok_len(t, sp) : at;
    }
    free(w.mem);
    free(w.heap);
    free(clean);
    return bad ? (size_t)-1 : o.count;
}

/* The BPE section (docs/FORMAT.md) at [off, off + size) of the file, inside it (load_2026 checked). */
static int bpe_build(Nano *m, size_t off, size_t size, char *err)
{
    const uint8_t *d = m->blob.data + off;
    Tokenizer *t = &m->tok;
    if (size < BPE_HEADER) return errf(err, "BPE tokenizer section: %zu bytes, shorter than its %d-byte header", size, BPE_HEADER);
    size_t n = rd_u32(d + 4), n_special = rd_u32(d + 20);
    uint32_t version = rd_u32(d + 8), pattern = rd_u32(d + 12), flags = rd_u32(d + 16);
    if (version != 1 && version != 2)
        return errf(err, "BPE tokenizer section version %u (this engine reads versions 1 and 2)", version);
    if (pattern < BPE_GPT2 || pattern > BPE_SMOLLM)
        return errf(err, "BPE pre-tokenization pattern %u unknown (1 = GPT-2, 2 = Llama-3, 3 = Qwen2, 4 = SmolLM)",
                    pattern);
    if (flags & ~BPE_FLAG_WHOLE) return errf(err, "BPE tokenizer flags 0x%x hold unknown bits", flags);
    if (n < 256 || n > (size_t)m->c.vocab_size)
        return errf(err, "BPE tokenizer has %zu tokens; expected 256 .. vocab_size (%d)", n, m->c.vocab_size);
    if (n_special > n) return errf(err, "BPE tokenizer: %zu special tokens of %zu tokens", n_special, n);
    for (int i = 0; i < NANO_N_SPECIAL; i++) {
        int32_t id = rd_i32(d + 24 + 4 * i);
        if (id < -1 || id >= (int64_t)n) return errf(err, "BPE tokenizer: special token id %d out of range", (int)id);
        m->c.special[i] = id;
    }
    /* pass 1: every entry inside the section, kinds and ranks consistent; count the bytes */
    size_t p = BPE_HEADER, total = 0, specials = 0;
    for (size_t i = 0; i < n; i++) {
        if (size - p < BPE_ENTRY) return errf(err, "BPE tokenizer section: token %zu runs past the section's end", i);
        size_t len = rd_u16(d + p);
        unsigned kind = d[p + 2], flags = d[p + 3];
        uint32_t rank = rd_u32(d + p + 4);
        if (len == 0) return errf(err, "BPE tokenizer section: token %zu is empty", i);
        if (kind > 1) return errf(err, "BPE tokenizer section: token %zu has kind %u (0 = merged, 1 = special)", i, kind);
        if (flags & ~(version == 2 ? BPE_ENTRY_STOP : 0u))
            return errf(err, "BPE tokenizer section: token %zu's flags 0x%x hold unknown bits (corrupted)", i, flags);
        if (flags & BPE_ENTRY_STOP) {
            if (t->n_stop == BPE_MAX_STOP)
                return errf(err, "BPE tokenizer section: more than %d tokens end generation", BPE_MAX_STOP);
            t->stop[t->n_stop++] = (int32_t)i;
        }
        if ((kind == 1) != (rank == BPE_NO_RANK))
            return errf(err, "BPE tokenizer section: token %zu: %s", i, kind ? "a special token with a merge rank"
                                                                              : "a merged token without a merge rank");
        specials += kind;
        p += BPE_ENTRY;
        if (size - p < len) return errf(err, "BPE tokenizer section: token %zu runs past the section's end", i);
        p += len;
        total += len;
    }
    if (p != size) return errf(err, "BPE tokenizer section: %zu bytes left after %zu tokens (corrupted)", size - p, n);
    if (specials != n_special)
        return errf(err, "BPE tokenizer section: %zu special tokens, its header says %zu", specials, n_special);
    /* pass 2: the bytes and ranks, the bytes -> token map, the single bytes, the special tokens */
    size_t cap = 16;
    while (cap < 2 * n) cap *= 2;
    t->kind = NANO_TOK_BPE;
    t->n = (int)n;
    t->pattern = (int)pattern;
    t->whole_first = (flags & BPE_FLAG_WHOLE) != 0;
    t->text = malloc(total + 1);
    t->text_off = malloc((n + 1) * sizeof *t->text_off);
    t->rank = malloc(n * sizeof *t->rank);
    t->map = calloc(cap, sizeof *t->map);
    t->special = malloc((n_special ? n_special : 1) * sizeof *t->special);
    if (!t->text || !t->text_off || !t->rank || !t->map || !t->special)
        return errf(err, "out of memory (tokenizer)");
    t->map_mask = cap - 1;
    t->n_special = (int)n_special;
    for (int b = 0; b < 256; b++) t->byte_id[b] = -1;
    memset(t->special_from, 0, sizeof t->special_from);
    size_t tp = 0;
    p = BPE_HEADER;
    for (size_t i = 0; i < n; i++) {
        size_t len = rd_u16(d + p);
        t->rank[i] = rd_u32(d + p + 4);
        p += BPE_ENTRY;
        t->text_off[i] = tp;
        memcpy(t->text + tp, d + p, len);
        tp += len;
        p += len;
        const uint8_t *b = (const uint8_t *)t->text + t->text_off[i];
        if (t->rank[i] == BPE_NO_RANK) {
            t->special_from[b[0] + 1]++; /* counted here, placed below */
            continue;
        }
        if (len == 1) t->byte_id[b[0]] = (int32_t)i;
        for (size_t k = 1; k < len; k++) t->joins[(b[k - 1] << 8 | b[k]) >> 3] |= (uint8_t)(1u << (b[k] & 7));
        const BpeSlot *same = map_find(t, b, len);
        if (same) return errf(err, "BPE tokenizer section: tokens %u and %zu have the same bytes", same->id1 - 1, i);
        uint64_t h = hash_bytes(b, len);
        size_t slot = h & t->map_mask;
        while (t->map[slot].id1) slot = (slot + 1) & t->map_mask;
        t->map[slot] = (BpeSlot){(uint32_t)h, (uint32_t)i + 1, t->rank[i], (uint32_t)len};
    }
    t->text_off[n] = tp;
    for (int b = 0; b < 256; b++) {
        if (t->byte_id[b] < 0) return errf(err, "BPE tokenizer section: byte 0x%02x has no token of its own", b);
        t->special_from[b + 1] += t->special_from[b];
    }
    int32_t next[256];
    memcpy(next, t->special_from, sizeof next);
    for (size_t i = 0; i < n; i++)
        if (t->rank[i] == BPE_NO_RANK) t->special[next[(uint8_t)t->text[t->text_off[i]]]++] = (int32_t)i;
    return 0;
}

/* --------------------------------------------------------------------------------------------
 * 4c. llama2.c's tokenizer (kind 3): SentencePiece BPE by scores with byte fallback, as run.c encodes
 *
 * Encoding a text (valid UTF-8, as in 4b): a " " token first (SentencePiece's dummy prefix; none for
 * an empty text), then each character's token, or, for a character without one, the byte tokens
 * <0xNN> of its bytes (id 3 + byte); then, again and again, the adjacent pair whose joined text is
 * the token of highest score is joined (the leftmost on a tie) until no pair joins. The texts joined
 * are the tokens' own (a byte token's is "<0xNN>"), so the parts are spans of a made-up string, the
 * tokens' texts one after the other, and 4b's heap (merge_parts) joins them: a token's merge rank is
 * its place in the order of scores, high to low (equal scores, equal ranks); a token whose score is
 * at or below run.c's -1e10 is never made by joining. Decoding: a token's text; a byte token's byte.
 * ------------------------------------------------------------------------------------------ */

#define L2C_HEADER 40   /* section bytes before the first token entry */
#define L2C_ENTRY 8     /* bytes of an entry before the token's text: f32 score, u32 length */
#define L2C_BYTE0 3     /* <0x00> .. <0xFF> are ids 3 .. 258 */
#define L2C_NO_MERGE -1e10f

typedef struct {
    float score;
    int32_t id;
} ScoredId;

static int score_desc(const void *a, const void *b)
{
    float x = ((const ScoredId *)a)->score, y = ((const ScoredId *)b)->score;
    return (x < y) - (x > y);
}

/* The llama2.c section (docs/FORMAT.md) at [off, off + size) of the file, inside it (load_2026 checked). */
static int l2c_build(Nano *m, size_t off, size_t size, char *err)
{
    const uint8_t *d = m->blob.data + off;
    Tokenizer *t = &m->tok;
    if (size < L2C_HEADER)
        return errf(err, "llama2.c tokenizer section: %zu bytes, shorter than its %d-byte header", size, L2C_HEADER);
    size_t n = rd_u32(d + 4);
    uint32_t version = rd_u32(d + 8), reserved = rd_u32(d + 12);
    if (version != 1) return errf(err, "llama2.c tokenizer section version %u (this engine reads version 1)", version);
    if (reserved) return errf(err, "llama2.c tokenizer section: reserved field %u, not 0 (corrupted)", reserved);
    if (n < L2C_BYTE0 + 256 || n > (size_t)m->c.vocab_size)
        return errf(err, "llama2.c tokenizer has %zu tokens; expected %d .. vocab_size (%d)", n, L2C_BYTE0 + 256,
                    m->c.vocab_size);
    for (int i = 0; i < NANO_N_SPECIAL; i++) {
        int32_t id = rd_i32(d + 16 + 4 * i);
        if (id < -1 || id >= (int64_t)n) return errf(err, "llama2.c tokenizer: special token id %d out of range", (int)id);
        m->c.special[i] = id;
    }
    /* pass 1: every entry inside the section, its score a number; count the bytes */
    size_t p = L2C_HEADER, total = 0;
    for (size_t i = 0; i < n; i++) {
        if (size - p < L2C_ENTRY) return errf(err, "llama2.c tokenizer section: token %zu runs past the section's end", i);
        float score;
        memcpy(&score, d + p, 4);
        size_t len = rd_u32(d + p + 4);
        if (!isfinite(score)) return errf(err, "llama2.c tokenizer section: token %zu's score is not a finite number", i);
        if (len == 0) return errf(err, "llama2.c tokenizer section: token %zu is empty", i);
        p += L2C_ENTRY;
        if (size - p < len) return errf(err, "llama2.c tokenizer section: token %zu runs past the section's end", i);
        p += len;
        total += len;
    }
    if (p != size) return errf(err, "llama2.c tokenizer section: %zu bytes left after %zu tokens (corrupted)", size - p, n);
    /* pass 2: the texts, the ranks (dense, by score from high to low), the text -> token map */
    size_t cap = 16;
    while (cap < 2 * n) cap *= 2;
    t->kind = NANO_TOK_LLAMA2C;
    t->n = (int)n;
    t->text = malloc(total + 1);
    t->text_off = malloc((n + 1) * sizeof *t->text_off);
    t->rank = malloc(n * sizeof *t->rank);
    t->map = calloc(cap, sizeof *t->map);
    ScoredId *order = malloc(n * sizeof *order);
    if (!t->text || !t->text_off || !t->rank || !t->map || !order) {
        free(order);
        return errf(err, "out of memory (tokenizer)");
    }
    t->map_mask = cap - 1;
    size_t tp = 0;
    p = L2C_HEADER;
    for (size_t i = 0; i < n; i++) {
        size_t len = rd_u32(d + p + 4);
        memcpy(&order[i].score, d + p, 4);
        order[i].id = (int32_t)i;
        p += L2C_ENTRY;
        t->text_off[i] = tp;
        memcpy(t->text + tp, d + p, len);
        tp += len;
        p += len;
    }
    t->text_off[n] = tp;
    qsort(order, n, sizeof *order, score_desc);
    for (size_t k = 0, r = 0; k < n; k++) {
        if (k && order[k].score != order[k - 1].score) r++;
        t->rank[order[k].id] = order[k].score > L2C_NO_MERGE ? (uint32_t)r : BPE_NO_RANK;
    }
    free(order);
    for (int b = 0; b < 256; b++) {
        char want[8];
        snprintf(want, sizeof want, "<0x%02X>", b);
        if (tok_len(t, L2C_BYTE0 + b) != 6 || memcmp(t->text + t->text_off[L2C_BYTE0 + b], want, 6))
            return errf(err, "llama2.c tokenizer: token %d is not the byte token %s (byte fallback needs ids 3..258)",
                        L2C_BYTE0 + b, want);
        t->raw_byte[b] = (uint8_t)b;
    }
    for (size_t i = 0; i < n; i++) {
        const uint8_t *b = (const uint8_t *)t->text + t->text_off[i];
        size_t len = tok_len(t, (int)i);
        const BpeSlot *same = map_find(t, b, len);
        if (same) return errf(err, "llama2.c tokenizer: tokens %u and %zu have the same text", same->id1 - 1, i);
        uint64_t h = hash_bytes(b, len);
        size_t slot = h & t->map_mask;
        while (t->map[slot].id1) slot = (slot + 1) & t->map_mask;
        t->map[slot] = (BpeSlot){(uint32_t)h, (uint32_t)i + 1, t->rank[i], (uint32_t)len};
    }
    t->l2c_words = 1;
    for (size_t i = 0; i < n; i++)
        for (size_t k = t->text_off[i] + 1; k < t->text_off[i + 1]; k++)
            if (t->text[k] == ' ' && t->text[k - 1] != ' ') t->l2c_words = 0;
    const BpeSlot *space = map_find(t, (const uint8_t *)" ", 1);
    if (!space) return errf(err, "llama2.c tokenizer: no \" \" token (the space put before the text)");
    t->space_id = (int)space->id1 - 1;
    return 0;
}

/* the parts l2c_encode starts from: token texts one after the other in str (see merge_parts) */
typedef struct {
    uint8_t *str;
    uint32_t *next, *prev;
    int32_t *id;
    size_t n;      /* bytes of str so far */
    uint32_t last; /* where the last part starts */
} L2cParts;

static void l2c_add(const Tokenizer *t, L2cParts *p, int tok)
{
    size_t len = tok_len(t, tok);
    memcpy(p->str + p->n, t->text + t->text_off[tok], len);
    p->id[p->n] = tok;
    p->prev[p->n] = p->last;
    p->next[p->n] = (uint32_t)(p->n + len);
    p->last = (uint32_t)p->n;
    p->n += len;
}

/* a word of l2c_encode's: where a space follows another byte, unless the tokenizer joins across it */
static int l2c_cut(const Tokenizer *t, const uint8_t *s, size_t i) { return t->l2c_words && s[i] == ' ' && s[i - 1] != ' '; }

/* Where no token holds a space after another byte (SentencePiece's pieces have theirs in front), no join
 * reaches across the start of a run of spaces that follows other text: the words merge apart to the ids
 * of the whole, in memory bounded by the longest word (as Llama2cTokenizer.encode does). */
static size_t l2c_encode(const Tokenizer *t, const uint8_t *s, size_t len, int *ids, size_t max_ids)
{
    if (len == 0) return 0; /* no dummy prefix either */
    uint8_t *clean = NULL;
    if (!valid_utf8_text(&s, &len, &clean)) return (size_t)-1;
    Ids o = {ids, max_ids, 0};
    Scratch w = {NULL, 0, NULL, 0};
    L2cParts p = {NULL, NULL, NULL, NULL, 0, 0};
    size_t longest = 0;
    for (size_t a = 0, i = 1; i <= len; i++)
        if (i == len || l2c_cut(t, s, i)) {
            longest = i - a > longest ? i - a : longest;
            a = i;
        }
    size_t cap = longest < ((size_t)-1 - 1) / 6 ? 6 * longest + 1 : 0; /* " ", then at most 6 bytes a byte */
    int bad = !cap || !(p.str = malloc(cap)) || parts_alloc(&w, cap, &p.next, &p.prev, &p.id);
    for (size_t a = 0, i = 1; !bad && i <= len; i++) {
        if (i < len && !l2c_cut(t, s, i)) continue;
        p.n = p.last = 0;
        if (a == 0) l2c_add(t, &p, t->space_id);
        for (size_t j = a, k; j < i; j += k) { /* a character's token, else its bytes' tokens */
            uint32_t cp;
            k = utf8_next(s + j, i - j, &cp);
            const BpeSlot *e = map_find(t, s + j, k);
            if (e) l2c_add(t, &p, (int)e->id1 - 1);
            else
                for (size_t b = 0; b < k; b++) l2c_add(t, &p, L2C_BYTE0 + s[j + b]);
        }
        bad = merge_parts(t, p.str, p.n, &w, &o, p.next, p.prev, p.id);
        a = i;
    }
    free(w.mem);
    free(w.heap);
    free(p.str);
    free(clean);
    return bad ? (size_t)-1 : o.count;
}

/* -- text streams ---------------------------------------------------------------------------- */

static size_t utf8_need(uint8_t b0) /* bytes of the sequence a byte starts (1: ASCII or invalid) */
{
    return b0 >= 0xC2 && b0 <= 0xDF ? 2 : b0 >= 0xE0 && b0 <= 0xEF ? 3 : b0 >= 0xF0 && b0 <= 0xF4 ? 4 : 1;
}

/* 1 if s[0..n) is well formed so far but a sequence that needs more bytes */
static int utf8_partial(const uint8_t *s, size_t n)
{
    uint32_t cp;
    return n < utf8_need(s[0]) && utf8_next(s, n, &cp) == n;
}

static size_t utf8_clean(const uint8_t *s, size_t n, char *out, size_t *rest, int final)
{
    size_t i = 0, k = 0;
    while (i < n && (final || !utf8_partial(s + i, n - i))) {
        uint32_t cp;
        i += utf8_next(s + i, n - i, &cp);
        k += utf8_put(cp, out + k);
    }
    *rest = n - i;
    return k;
}

size_t nano_utf8_stream(NanoUtf8Stream *st, const char *in, size_t n, char *out)
{
    const uint8_t *s = (const uint8_t *)in;
    size_t k = 0, rest;
    if (st->n_held) { /* the held bytes and up to 4 new ones decide the held sequence */
        uint8_t tmp[7];
        size_t h = (size_t)st->n_held, take = n < 4 ? n : 4, i = 0;
        memcpy(tmp, st->held, h);
        memcpy(tmp + h, s, take);
        while (i < h && !utf8_partial(tmp + i, h + take - i)) {
            uint32_t cp;
            i += utf8_next(tmp + i, h + take - i, &cp);
            k += utf8_put(cp, out + k);
        }
        if (i < h) { /* still partial: then all of `in` (under 4 bytes) joined it */
            st->n_held = (int)(h + take - i);
            memmove(st->held, tmp + i, (size_t)st->n_held);
            return k;
        }
        s += i - h;
        n -= i - h;
    }
    k += utf8_clean(s, n, out + k, &rest, 0);
    memcpy(st->held, s + n - rest, rest);
    st->n_held = (int)rest;
    return k;
}

size_t nano_utf8_finish(NanoUtf8Stream *st, char *out)
{
    size_t k = st->n_held ? utf8_put(0xFFFD, out) : 0;
    st->n_held = 0;
    return k;
}

size_t nano_encode(const Nano *m, const char *text, size_t len, int *ids, size_t max_ids)
{
    const uint8_t *s = (const uint8_t *)text;
    if (m->tok.kind == NANO_TOK_BPE) return bpe_encode(&m->tok, s, len, ids, max_ids);
    if (m->tok.kind == NANO_TOK_LLAMA2C) return l2c_encode(&m->tok, s, len, ids, max_ids);
    return trie_encode(&m->tok, s, len, ids, max_ids);
}

const char *nano_token_text(const Nano *m, int id, size_t *len)
{
    const Tokenizer *t = &m->tok;
    if (id < 0 || id >= t->n) {
        *len = sizeof UNKNOWN_TEXT - 1;
        return UNKNOWN_TEXT;
    }
    if (t->kind == NANO_TOK_LLAMA2C && id >= L2C_BYTE0 && id < L2C_BYTE0 + 256) { /* <0xNN>: the byte */
        *len = 1;
        return (const char *)&t->raw_byte[id - L2C_BYTE0];
    }
    *len = t->text_off[id + 1] - t->text_off[id];
    return t->text + t->text_off[id];
}

int nano_is_stop(const Nano *m, int token)
{
    const NanoConfig *c = &m->c;
    if (token == c->special[NANO_EOS] || (c->tok_kind == NANO_TOK_LLAMA2C && token == c->special[NANO_BOS])) return 1;
    for (int i = 0; i < m->tok.n_stop; i++)
        if (token == m->tok.stop[i]) return 1;
    return 0;
}

/* ============================================================================================
 * 5. forward pass
 * ============================================================================================ */

/* symmetric int8 per group, as the Q8_0 weights; an all-zero group gets scale 0. No libm call is
 * left in it (the prompt quantizes every row of a block, and fmaxf and roundf were a function call
 * per element: 14% of a Q8 prompt): the largest |x| is the largest bit pattern (non-negative floats
 * order as integers), NaN skipped; roundf is truncation plus a step away from zero, the same value
 * (checked on 2M random groups, infinities, zeros and denormals among them). */
static void quantize_group(int8_t *q, float *s, const float *x, int gs)
{
    uint32_t top = 0;
    for (int i = 0; i < gs; i++) {
        uint32_t b;
        memcpy(&b, x + i, 4);
        b &= 0x7FFFFFFFu;
        b = b > 0x7F800000u ? 0 : b; /* NaN */
        top = b > top ? b : top;
    }
    float amax;
    memcpy(&amax, &top, 4);
    float inv = amax > 0 && amax < INFINITY ? 127.0f / amax : 0.0f;
    for (int i = 0; i < gs; i++) {
        float v = x[i] * inv;
        v = v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v == v ? v : 0.0f;
        float t = truncf(v);
        t = fabsf(v - t) >= 0.5f ? t + copysignf(1.0f, v) : t;
        q[i] = (int8_t)(int)t;
    }
    *s = amax / 127.0f;
}

/* x (n wide) quantized group by group (g_quant_group where the lanes fit, else quantize_group): int8
 * values into q, scales into s, and, where the packed kernels run (g_q8_packed: the only readers), each
 * group's sum of its int8 values into sum */
static void quantize_act(int8_t *q, float *s, int32_t *sum, const float *x, int n, int gs)
{
    for (int g = 0; g < n / gs; g++) {
        const float *xg = x + (size_t)g * gs;
        int8_t *qg = q + (size_t)g * gs;
        if (g_quant_group && gs % g_quant_lanes == 0) {
            s[g] = g_quant_group(qg, xg, gs);
        } else {
            quantize_group(qg, s + g, xg, gs);
        }
        if (!g_q8_packed) continue;
        int32_t total = 0; /* for the packed kernels (section 2) */
        for (int i = 0; i < gs; i++) total += qg[i];
        sum[g] = total;
    }
}
/* x quantized for Q8 matrices (quantize_row): int8 values, scales and group sums, each ld apart */
typedef struct {
    const int8_t *q;
    const float *s;
    const int32_t *sum;
} QuantAct;

/* out[r] = W[r] x for rows [r0, r1) (r0 a multiple of Q8_PACK_ROWS for packed matrices) */
static void mat_rows(const Mat *W, int r0, int r1, float *out, const float *x, QuantAct a)
{
    size_t c = (size_t)W->cols;
    const int8_t *xq = a.q;
    const float *xs = a.s;
    if (W->pk) {
        g_q8_packed(W->pk + q8_packed_offset(r0, W->cols, W->gs), xq, xs, a.sum, 0, out + r0, 0, r1 - r0, W->cols,
                    W->gs, 1);
        return;
    }
    if (W->type == NANO_QUANT_F32) {
        g_rows_f32(W->w + r0 * c, x, out + r0, r1 - r0, W->cols);
        return;
    }
    if (W->kr) {
        W->kr(W->q + r0 * c, W->s + r0 * (c / W->gs), xq, xs, out + r0, r1 - r0, W->cols, W->gs);
        return;
    }
    for (int r = r0; r < r1; r++) out[r] = W->kq(W->q + r * c, W->s + r * (c / W->gs), xq, xs, W->cols, W->gs);
}

/* out[t ldo + r] = W[r] x[t] for rows [r0, r1) and T token rows of x (and of xq, xs: x quantized),
 * ld apart. One token: the matvec kernels (mat_rows). More: the matrix-matrix kernels, or where the
 * CPU has none (scalar, wasm), the row kernel over tiles of rows that stay in L1 while every token
 * row passes them. */
static void mat_block(const Mat *W, int r0, int r1, float *out, int ldo, const float *x, QuantAct a, int ld, int T)
{
    size_t c = (size_t)W->cols;
    const int8_t *xq = a.q;
    const float *xs = a.s;
    if (T == 1) {
        mat_rows(W, r0, r1, out, x, a);
    } else if (W->pk) {
        g_q8_packed(W->pk + q8_packed_offset(r0, W->cols, W->gs), xq, xs, a.sum, ld, out + r0, ldo, r1 - r0, W->cols,
                    W->gs, T);
    } else if (W->type == NANO_QUANT_F32 && g_mm_f32) {
        g_mm_f32(W->w + r0 * c, x, ld, out + r0, ldo, r1 - r0, W->cols, T);
    } else if (W->type == NANO_QUANT_Q8 && W->km) {
        W->km(W->q + r0 * c, W->s + r0 * (c / W->gs), xq, xs, ld, out + r0, ldo, r1 - r0, W->cols, W->gs, T);
    } else {
        size_t row_bytes = c * (W->type == NANO_QUANT_F32 ? sizeof(float) : 1);
        int tile = row_bytes < MM_GENERIC_TILE_BYTES ? (int)(MM_GENERIC_TILE_BYTES / row_bytes) : 1;
        for (int r = r0; r < r1; r += tile)
            for (int t = 0; t < T; t++) {
                QuantAct at = {xq + (size_t)t * ld, xs + (size_t)t * ld, a.sum + (size_t)t * ld};
                mat_rows(W, r, r + tile < r1 ? r + tile : r1, out + (size_t)t * ldo, x + (size_t)t * ld, at);
            }
    }
}

/* out[i] = W[i] x for up to 3 matrices that share the input (wq wk wv; w1 w3), as one parallel
 * region over all their rows: one OpenMP fork/join instead of one per matrix. Each thread takes one
 * contiguous range of the concatenated rows, so it streams its weights sequentially (what the
 * prefetchers follow best: kernels that interleave two or four rows measured about 10% slower, and
 * 8 accumulators instead of 4 no faster). x: T token rows, ld apart, as the outputs' rows (ldo
 * apart); a: x quantized, for Q8 matrices. The rows go out in units that are the kernels' tiles: a
 * thread's range of a matrix starts on a multiple of Q8_PACK_ROWS rows for packed matrices, of 4
 * rows for the matrix-matrix kernels. */
static void matmul_multi(const Mat *const *W, float *const *out, int ldo, int n, const float *x, QuantAct a, int ld,
                         int T)
{
    int unit = T > 1 ? 4 : 1, units = 0;
    for (int i = 0; i < n; i++)
        if (W[i]->pk) unit = Q8_PACK_ROWS;
    for (int i = 0; i < n; i++) units += (W[i]->rows + unit - 1) / unit;
#ifdef _OPENMP
#pragma omp parallel if ((long long)units * unit * W[0]->cols * T >= 32768)
#endif
    {
        int nt = 1, t = 0;
#ifdef _OPENMP
        nt = omp_get_num_threads();
        t = omp_get_thread_num();
#endif
        int lo = (int)((long long)units * t / nt), hi = (int)((long long)units * (t + 1) / nt), start = 0;
        for (int i = 0; i < n; i++) { /* [lo, hi) in units of the matrices one after another */
            int mine = (W[i]->rows + unit - 1) / unit;
            int from = lo > start ? lo : start, to = hi < start + mine ? hi : start + mine;
            if (from < to) {
                int r1 = (to - start) * unit < W[i]->rows ? (to - start) * unit : W[i]->rows;
                mat_block(W[i], (from - start) * unit, r1, out[i], ldo, x, a, ld, T);
            }
            start += mine;
        }
    }
}

static void lora_apply(const NanoLora *a, int layer, int t, float *out, const float *x, int in, int outn)
{
    const float *A = a->A[layer * N_TARGETS + t], *B = a->B[layer * N_TARGETS + t];
    if (!A) return;
    int r = a->rank;
    g_rows_f32(A, x, a->tmp, r, in);
    for (int o = 0; o < outn; o++) out[o] += a->scale * dot_f32_scalar(B + (size_t)o * r, a->tmp, r);
}

/* out[i] = W_t[i] x (+ bias) (+ LoRA delta) for the n layers t[] that read x, for T token rows (ld
 * apart, in x and in each out[i]); x quantized already (quantize_row) for Q8 files */
static void linear(Nano *m, int layer, const int *t, int n, float *const *out, const float *x, int T)
{
    const Layer *L = &m->layers[layer];
    const Mat *W[3] = {NULL, NULL, NULL};
    int ld = m->ld;
    for (int i = 0; i < n; i++) W[i] = &L->mat[t[i]];
    matmul_multi(W, out, ld, n, x, (QuantAct){m->aq, m->as, m->asum}, ld, T);
    for (int i = 0; i < n; i++)
        for (int row = 0; row < T; row++) {
            float *o = out[i] + (size_t)row * ld;
            if (L->bias[t[i]])
                for (int j = 0; j < W[i]->rows; j++) o[j] += L->bias[t[i]][j];
            if (m->lora) lora_apply(m->lora, layer, t[i], o, x + (size_t)row * ld, W[i]->cols, W[i]->rows);
        }
}

/* for Q8 files: row t of x (n wide; rows ld apart) into m->aq / m->as / m->asum, the same ld apart */
static void quantize_row(Nano *m, const float *x, int n, int t)
{
    if (m->c.quant != NANO_QUANT_Q8) return;
    size_t at = (size_t)t * m->ld;
    quantize_act(m->aq + at, m->as + at, m->asum + at, x + at, n, m->c.group_size);
}

/* model.RMSNorm: x * rsqrt(mean(x^2) + eps) * weight, in float (the sum in double) */
static void rmsnorm(float *o, const float *x, const float *w, int n, float eps)
{
    double ss = 0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float r = 1.0f / sqrtf((float)(ss / n) + eps);
    for (int i = 0; i < n; i++) o[i] = (x[i] * r) * w[i];
}

/* model.apply_rope: rotate adjacent pairs (2i, 2i+1) of each head */
static void rope(float *v, int heads, int hd, const float *cos_t, const float *sin_t)
{
    for (int h = 0; h < heads; h++) {
        float *x = v + (size_t)h * hd;
        for (int i = 0; i < hd / 2; i++) {
            float e = x[2 * i], o = x[2 * i + 1];
            x[2 * i] = e * cos_t[i] - o * sin_t[i];
            x[2 * i + 1] = e * sin_t[i] + o * cos_t[i];
        }
    }
}

static void embed_row(float *x, const Mat *E, int row)
{
    size_t D = (size_t)E->cols;
    if (E->type == NANO_QUANT_F32) {
        memcpy(x, E->w + (size_t)row * D, D * sizeof(float));
    } else if (E->pk) {
        q8_packed_row(x, E, row);
    } else {
        const int8_t *q = E->q + (size_t)row * D;
        const float *s = E->s + (size_t)row * (D / E->gs);
        for (size_t i = 0; i < D; i++) x[i] = (float)q[i] * s[i / E->gs];
    }
}

/* the layers of a block, grouped by the input they read (each group is one parallel loop) */

/* The steps between the matrix products work row by row (t: the block's row). On a block the rows go
 * to the threads: serial, they left one of two threads waiting for the other through a sixth of a
 * 15M-shape prompt. One token runs the plain loop: no parallel region, which costs even when its
 * `if` is false (six per layer took 3-8% of a small model's decode). */
#ifdef _OPENMP
#define FOR_EACH_ROW(T, ...)                                                      \
    do {                                                                          \
        if ((T) >= 4) {                                                           \
            _Pragma("omp parallel for schedule(static)")                          \
            for (int t = 0; t < (T); t++) { __VA_ARGS__ }                          \
        } else {                                                                  \
            for (int t = 0; t < (T); t++) { __VA_ARGS__ }                          \
        }                                                                         \
    } while (0)
#else
#define FOR_EACH_ROW(T, ...)                           \
    do {                                               \
        for (int t = 0; t < (T); t++) { __VA_ARGS__ }  \
    } while (0)
#endif
static const int QKV[] = {WQ, WK, WV}, WO_[] = {WO}, W13[] = {W1, W3}, W2_[] = {W2};

/* T tokens (T <= m->prefill_rows; checked by the callers) at positions pos .. pos + T - 1 through
 * every layer, their keys and values into the KV cache, each matrix as one product with the block
 * of T rows; the logits of the last n_logits positions (0 .. T) into `logits`, vocab_size apart. One
 * token (nano_forward) is the block of one row. Every step but the matrix products works row by row,
 * with the same code a single token runs, and attention is causal position by position: position
 * pos + t reads the cache up to itself, all of which the block has written before. */
static void forward_block(Nano *m, const int *tokens, int T, int pos, float *logits, int n_logits)
{
    const NanoConfig *c = &m->c;
    int D = c->n_embd, hd = c->head_dim, nh = c->n_head, nkv = c->n_kv_head, Q = nh * hd, H = c->n_hidden;
    int B = c->block_size, group = nh / nkv, ld = m->ld;
    float eps = (float)c->norm_eps, scale = 1.0f / sqrtf((float)hd);
    for (int t = 0; t < T; t++) {
        float *x = m->x + (size_t)t * ld;
        embed_row(x, &m->tok_emb, tokens[t]);
        if (m->pos_emb)
            for (int i = 0; i < D; i++) x[i] += m->pos_emb[(size_t)(pos + t) * D + i];
    }

    for (int l = 0; l < c->n_layer; l++) {
        const Layer *L = &m->layers[l];
        FOR_EACH_ROW(T, rmsnorm(m->xb + (size_t)t * ld, m->x + (size_t)t * ld, L->attn_norm, D, eps);
                        quantize_row(m, m->xb, D, t););
        linear(m, l, QKV, 3, (float *const[]){m->q, m->k, m->v}, m->xb, T);
        FOR_EACH_ROW(T, {
            float *qt = m->q + (size_t)t * ld, *kt = m->k + (size_t)t * ld, *vt = m->v + (size_t)t * ld;
            if (c->use_rope) {
                const float *cos_t = m->rope_cos + (size_t)(pos + t) * (hd / 2);
                const float *sin_t = m->rope_sin + (size_t)(pos + t) * (hd / 2);
                rope(qt, nh, hd, cos_t, sin_t);
                rope(kt, nkv, hd, cos_t, sin_t);
            }
            /* compact cache [layer][kv head][position][head_dim] */
            for (int h = 0; h < nkv; h++) {
                size_t slot = (((size_t)l * nkv + h) * B + pos + t) * hd;
                memcpy(m->kcache + slot, kt + (size_t)h * hd, hd * sizeof(float));
                memcpy(m->vcache + slot, vt + (size_t)h * hd, hd * sizeof(float));
            }
        });
        OMP_FOR_IF((long long)nh * T * (pos + T) * hd >= 16384)
        for (int h = 0; h < nh; h++) {
            const float *kb = m->kcache + ((size_t)l * nkv + h / group) * B * hd; /* GQA: kv head h / group */
            const float *vb = m->vcache + ((size_t)l * nkv + h / group) * B * hd;
            float *att = m->att + (size_t)h * B;
            for (int t = 0; t < T; t++) {
                int n_keys = pos + t + 1;
                g_rows_f32(kb, m->q + (size_t)t * ld + (size_t)h * hd, att, n_keys, hd); /* the cached keys times q */
                g_softmax(att, n_keys, scale);
                g_wsum(m->xb2 + (size_t)t * ld + (size_t)h * hd, att, vb, n_keys, hd);
            }
        }
        FOR_EACH_ROW(T, quantize_row(m, m->xb2, Q, t););
        linear(m, l, WO_, 1, &m->xb, m->xb2, T);
        FOR_EACH_ROW(T, {
            float *x = m->x + (size_t)t * ld, *xb = m->xb + (size_t)t * ld;
            for (int i = 0; i < D; i++) x[i] += xb[i];
            rmsnorm(xb, x, L->ffn_norm, D, eps);
            quantize_row(m, m->xb, D, t);
        });
        linear(m, l, W13, 2, (float *const[]){m->hb, m->hb2}, m->xb, T);
        FOR_EACH_ROW(T, g_swiglu(m->hb + (size_t)t * ld, m->hb2 + (size_t)t * ld, H); /* silu(w1 x) * w3 x */
                        quantize_row(m, m->hb, H, t););
        linear(m, l, W2_, 1, &m->xb, m->hb, T);
        FOR_EACH_ROW(T, for (int i = 0; i < D; i++) m->x[(size_t)t * ld + i] += m->xb[(size_t)t * ld + i];);
    }
    if (n_logits == 0) return; /* a prompt's earlier blocks: no output head */
    const float *last = m->x + (size_t)(T - n_logits) * ld;
    for (int t = 0; t < n_logits; t++) {
        rmsnorm(m->xb + (size_t)t * ld, last + (size_t)t * ld, m->final_norm, D, eps);
        quantize_row(m, m->xb, D, t);
    }
    const Mat *head = &m->head;
    matmul_multi(&head, &logits, c->vocab_size, 1, m->xb, (QuantAct){m->aq, m->as, m->asum}, ld, n_logits);
}

const float *nano_forward(Nano *m, int token, int pos)
{
    const NanoConfig *c = &m->c;
    if (!c->is_causal || token < 0 || token >= c->vocab_size || pos < 0 || pos >= c->block_size) return NULL;
    forward_block(m, &token, 1, pos, m->logits, 1);
    return m->logits;
}

/* ============================================================================================
 * 6. generation context and sampler (model.Transformer.generate, model.sample_next)
 * ============================================================================================ */

void nano_reset(Nano *m)
{
    for (int i = 0; i < m->n_distinct; i++) m->seen[m->distinct[i]] = 0;
    m->n_distinct = m->n_ids = m->pos = m->has_logits = 0;
}

int nano_context_len(const Nano *m) { return m->pos; }

#ifdef _OPENMP
/* Start a new window on one thread or all of them; `loss` > 0: the other choice just lost by that
 * factor, so the window grows (see ThreadTuner). */
static void tune_settle(ThreadTuner *t, int use_full, double loss)
{
    if (loss > 0) {
        double next = 2.0 * t->window > TUNE_COST * loss ? 2.0 * t->window : TUNE_COST * loss;
        t->window = next < TUNE_WINDOW_MAX ? (int)next : TUNE_WINDOW_MAX;
    } else {
        t->window = TUNE_WINDOW_MIN;
    }
    t->use_full = use_full;
    t->probe_left = t->n = 0;
    t->t_use = 0;
    omp_set_num_threads(use_full ? t->full : 1);
}

/* After each forwarded token (dt: its seconds): the bookkeeping of ThreadTuner. */
static void tune_after_token(ThreadTuner *t, double dt)
{
    if (t->full < 2) return;
    if (t->probe_left > 0) {
        t->t_probe += dt;
        t->probe_n++;
        t->t_worst = dt > t->t_worst ? dt : t->t_worst;
        double per_use = t->t_use / TUNE_PROBE, per_probe = t->t_probe / t->probe_n;
        if (--t->probe_left > 0 && dt <= 2 * per_use) return; /* go on probing */
        if (!t->use_full) t->t_one = per_use;
        else t->t_one = per_probe;
        int wins = t->use_full ? per_probe < per_use : per_probe < TUNE_MARGIN * per_use;
        if (wins) tune_settle(t, !t->use_full, 0);
        else tune_settle(t, t->use_full, per_use > 0 ? t->t_worst / per_use : TUNE_WINDOW_MAX);
        return;
    }
    if (t->use_full && t->t_one > 0 && dt > TUNE_GUARD * t->t_one) { /* the cores are taken: back to one */
        tune_settle(t, 0, dt / t->t_one);
        return;
    }
    if (++t->n > t->window - TUNE_PROBE) t->t_use += dt;
    if (t->n == t->window) { /* time the other choice for the next tokens */
        t->probe_left = TUNE_PROBE;
        t->probe_n = 0;
        t->t_probe = t->t_worst = 0;
        omp_set_num_threads(t->use_full ? 1 : t->full);
    }
}
#endif

/* Models in the original 2024.10 layout were trained on, and run by the original engine with,
 * prompts that have no <|bos|> in front; Nano's own data puts one before every sample. A tokenizer
 * without a <|bos|> (id -1: a Hugging Face model whose pipeline puts nothing before a document,
 * Qwen2's) gets none either. Instruct mode needs the two marks: callers check that they exist. */
size_t nano_encode_prompt(const Nano *m, const char *text, size_t len, int instruct, int *ids, size_t max_ids)
{
    int pre[2], n_pre = 0; /* the special ids of the model's tokenizer (fixed 2..5 for the trie) */
    if (m->c.major != 2024 && m->c.special[NANO_BOS] >= 0) pre[n_pre++] = m->c.special[NANO_BOS];
    if (instruct) pre[n_pre++] = m->c.special[NANO_INSTRUCT];
    for (int i = 0; i < n_pre && (size_t)i < max_ids; i++) ids[i] = pre[i];
    size_t room = max_ids > (size_t)n_pre ? max_ids - (size_t)n_pre : 0;
    size_t n = (size_t)n_pre + nano_encode(m, text, len, room ? ids + n_pre : NULL, room);
    if (instruct) {
        if (n < max_ids) ids[n] = m->c.special[NANO_RESPONSE];
        n++;
    }
    return n;
}

/* the token joins the ids the repetition penalty looks at */
static void remember(Nano *m, int token)
{
    m->ids[m->n_ids++] = token;
    if (!m->seen[token]) {
        m->seen[token] = 1;
        m->distinct[m->n_distinct++] = token;
    }
}

/* Like generate(): the token joins the ids (for the repetition penalty) even when the context is
 * full; then it is forwarded if a position is left. */
int nano_feed(Nano *m, int token)
{
    const NanoConfig *c = &m->c;
    if (token < 0 || token >= c->vocab_size) return NANO_ERR;
    if (m->n_ids > c->block_size) return NANO_FULL;
    remember(m, token);
    if (m->pos >= c->block_size) return NANO_FULL;
#ifdef _OPENMP
    double t0 = omp_get_wtime();
#endif
    if (!nano_forward(m, token, m->pos)) return NANO_ERR;
#ifdef _OPENMP
    tune_after_token(&m->tune, omp_get_wtime() - t0);
#endif
    m->pos++;
    m->has_logits = 1;
    return NANO_OK;
}

/* The ids in blocks of prefill_rows tokens (forward_block), the output head for the last position
 * only unless every position's logits are asked for. Threads: all of them (the ThreadTuner's one
 * thread is for decoding, where a parallel loop is a few microseconds; a block's loops are
 * prefill_rows times longer). */
int nano_feed_batch(Nano *m, const int *ids, int n, float *logits)
{
    const NanoConfig *c = &m->c;
    if (n < 1 || !c->is_causal) return NANO_ERR;
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= c->vocab_size) return NANO_ERR;
    if (n > c->block_size - m->pos) return NANO_FULL;
    for (int i = 0; i < n; i++) remember(m, ids[i]);
#ifdef _OPENMP
    int threads_before = omp_get_max_threads();
    if (m->tune.full > 1) omp_set_num_threads(m->tune.full);
#endif
    for (int i = 0; i < n; i += m->prefill_rows) {
        int T = n - i < m->prefill_rows ? n - i : m->prefill_rows;
        if (logits) forward_block(m, ids + i, T, m->pos, logits + (size_t)i * c->vocab_size, T);
        else forward_block(m, ids + i, T, m->pos, m->logits, i + T == n);
        m->pos += T;
    }
    if (logits) memcpy(m->logits, logits + (size_t)(n - 1) * c->vocab_size, (size_t)c->vocab_size * sizeof(float));
#ifdef _OPENMP
    omp_set_num_threads(threads_before);
#endif
    m->has_logits = 1;
    return NANO_OK;
}

int nano_prefill_logits(Nano *m, const int *ids, int n, float *logits)
{
    nano_reset(m);
    int start = n > m->c.block_size ? n - m->c.block_size : 0; /* keep the most recent context that fits */
    return nano_feed_batch(m, ids + start, n - start, logits);
}

int nano_prefill(Nano *m, const int *ids, int n) { return nano_prefill_logits(m, ids, n, NULL); }

void nano_sampler_seed(NanoSampler *s, uint64_t seed)
{
    s->rng = seed ^ 0x9E3779B97F4A7C15ULL;
    if (!s->rng) s->rng = 1;
}

static uint32_t rng_u32(uint64_t *s) /* xorshift64* */
{
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return (uint32_t)((*s * 0x2545F4914F6CDD1DULL) >> 32);
}
static float rng_f32(uint64_t *s) { return (float)(rng_u32(s) >> 8) / 16777216.0f; }

/* first maximum, like torch.argmax; NaN counts as largest. Two passes that the compiler can
 * vectorise (the maximum and whether a NaN is there, then the first index that holds it): a single
 * pass that tracks the index is a chain of dependent compares, slow over a 32000-token vocabulary. */
static int argmax(const float *v, int n)
{
    float mx[8] = {v[0], v[0], v[0], v[0], v[0], v[0], v[0], v[0]};
    int nan = 0, i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) {
            mx[j] = v[i + j] > mx[j] ? v[i + j] : mx[j];
            nan |= v[i + j] != v[i + j];
        }
    for (; i < n; i++) {
        mx[0] = v[i] > mx[0] ? v[i] : mx[0];
        nan |= v[i] != v[i];
    }
    for (int j = 1; j < 8; j++) mx[0] = mx[j] > mx[0] ? mx[j] : mx[0];
    for (i = 0; i < n; i++)
        if (nan ? v[i] != v[i] : v[i] == mx[0]) return i;
    return 0;
}

/* k-th largest value (1 <= k <= n) with a min-heap of the k largest seen */
static float kth_largest(const float *v, int n, int k, float *heap)
{
    for (int i = 0; i < n; i++) {
        float x = v[i] == v[i] ? v[i] : -INFINITY;
        int j;
        if (i < k) {
            for (j = i; j > 0 && heap[(j - 1) / 2] > x; j = (j - 1) / 2) heap[j] = heap[(j - 1) / 2];
            heap[j] = x;
        } else if (x > heap[0]) {
            for (j = 0;;) {
                int a = 2 * j + 1, b = a + 1, s = j;
                float sv = x;
                if (a < k && heap[a] < sv) { s = a; sv = heap[a]; }
                if (b < k && heap[b] < sv) s = b;
                if (s == j) break;
                heap[j] = heap[s];
                j = s;
            }
            heap[j] = x;
        }
    }
    return heap[0];
}

/* top-p without sorting: reorders idx[0..n) (tokens with p > 0) so that idx[0..k) is the kept set
 * and returns k. Kept = the most likely tokens, in descending order, while the mass of those before
 * them is below `target` (the first is always kept) -- sample_next's rule. A quickselect on the
 * cumulative mass: O(n) expected, where sorting 32000 candidates would cost more than a Q8 forward
 * pass. Among equally likely tokens the order is arbitrary, as it is with torch.sort. */
static int top_p_keep(const float *p, int *idx, int n, float target)
{
    int lo = 0, hi = n; /* idx[0..lo) kept, idx[hi..n) dropped, [lo, hi) undecided */
    float acc = 0;      /* mass of the kept ones */
    while (lo < hi) {
        float v = p[idx[lo + (hi - lo) / 2]];
        int a = lo, i = lo, b = hi; /* partition: [lo, a) > v, [a, b) == v, [b, hi) < v */
        while (i < b) {
            int t = idx[i];
            if (p[t] > v) {
                idx[i++] = idx[a];
                idx[a++] = t;
            } else if (p[t] < v) {
                idx[i] = idx[--b];
                idx[b] = t;
            } else {
                i++;
            }
        }
        float gt = 0;
        for (int j = lo; j < a; j++) gt += p[idx[j]];
        if (acc + gt >= target) { /* the cut lies among the more likely ones */
            hi = a;
            continue;
        }
        acc += gt;
        lo = a;
        while (lo < b && acc < target) acc += p[idx[lo++]];
        if (lo < b) break; /* the cut fell among the equal ones */
    }
    return lo;
}

int nano_sample(Nano *m, NanoSampler *s)
{
    if (!m->has_logits) return -1;
    int V = m->c.vocab_size;
    float *l = m->work, *p = m->probs;
    int greedy = !(s->temperature >= NANO_MIN_TEMPERATURE); /* (NaN too) */
    if (greedy && s->rep_penalty == 1.0f) return argmax(m->logits, V); /* plain greedy */
    memcpy(l, m->logits, (size_t)V * sizeof(float));
    /* 1. repetition penalty over the distinct previous ids */
    if (s->rep_penalty != 1.0f)
        for (int i = 0; i < m->n_distinct; i++) {
            float v = l[m->distinct[i]];
            l[m->distinct[i]] = v > 0 ? v / s->rep_penalty : v * s->rep_penalty;
        }
    /* 2. greedy, or temperature */
    if (greedy) return argmax(l, V);
    for (int i = 0; i < V; i++) l[i] /= s->temperature;
    /* 3. top-k: drop what is below the k-th largest (ties with it stay) */
    if (s->top_k > 0 && s->top_k < V) {
        float kth = kth_largest(l, V, s->top_k, p);
        for (int i = 0; i < V; i++)
            if (l[i] < kth) l[i] = -INFINITY;
    }
    /* softmax (unnormalised: p / sum) */
    int best = argmax(l, V);
    float mx = l[best], sum = 0;
    for (int i = 0; i < V; i++) {
        float e = expf(l[i] - mx);
        p[i] = e == e ? e : 0.0f;
        sum += p[i];
    }
    if (!(sum > 0) || sum == INFINITY) return best; /* NaN/inf logits: nothing sensible to sample */
    int *idx = m->order, n = 0;
    for (int i = 0; i < V; i++)
        if (p[i] > 0) idx[n++] = i;
    /* 4. top-p: in descending order, drop a token once the mass of the more likely ones reaches p */
    if (s->top_p < 1.0f) {
        if (!(s->top_p > 0)) return best;
        n = top_p_keep(p, idx, n, s->top_p * sum);
        sum = 0;
        for (int j = 0; j < n; j++) sum += p[idx[j]];
    }
    /* 5. sample from what is left */
    float r = rng_f32(&s->rng) * sum, acc = 0;
    for (int j = 0; j < n; j++) {
        acc += p[idx[j]];
        if (r < acc) return idx[j];
    }
    for (int j = n - 1; j > 0; j--) /* rounding left r >= acc: the last token with mass */
        if (p[idx[j]] > 0) return idx[j];
    return idx[0];
}

/* ============================================================================================
 * 7. LoRA adapters
 * ============================================================================================ */

void nano_lora_free(NanoLora *a)
{
    if (!a) return;
    free(a->tmp);
    free(a->A);
    free(a->B);
    blob_close(&a->blob);
    free(a);
}

static NanoLora *lora_load(NanoLora *a, int verify, char *err)
{
    const uint8_t *d = a->blob.data;
    size_t size = a->blob.size;
    int type = 0;
    if (check_magic(d, size, &a->major, &a->minor, &type, err)) goto fail;
    if (type != TYPE_LORA) {
        errf(err, "this file is a model, not a LoRA adapter (model type %d)", type);
        goto fail;
    }
    NanoConfig c = {0};
    int L, D, Q, KV, H, rows[N_TARGETS], cols[N_TARGETS];
    if (a->major == 2026) {
        if (check_2026_integrity(d, size, verify, err) || read_config_2026(d, &c, err)) goto fail;
        a->rank = rd_i32(d + 184);
        a->targets = rd_i32(d + 188);
        a->alpha = rd_f64(d + 192);
        a->has_fingerprint = c.has_fingerprint;
        memcpy(a->fingerprint, c.fingerprint, 32);
        if (a->targets < 1 || a->targets >= (1 << N_TARGETS)) {
            errf(err, "LoRA targets mask 0x%x invalid", a->targets);
            goto fail;
        }
        if (rd_u64(d + 120) != HEADER_SIZE) {
            errf(err, "LoRA parameters offset %llu, expected 256", (unsigned long long)rd_u64(d + 120));
            goto fail;
        }
        if (c.quant != NANO_QUANT_F32 || c.group_size != 0) {
            errf(err, "LoRA adapter header: quant type %d, group size %d; adapters are fp32 (0, 0)", c.quant,
                 c.group_size);
            goto fail;
        }
        if (rd_i32(d + 96) || rd_i32(d + 100) || rd_u64(d + 104) || rd_u64(d + 112)) {
            errf(err, "LoRA adapter header: tokenizer fields are set, but an adapter has no tokenizer section");
            goto fail;
        }
        a->has_base_config = 1;
        a->base = c;
    } else {
        if (rd_i32(d + 20) != CONFIG_LEN_2024) {
            errf(err, "config length %d, expected 32 for layout 2024.10", rd_i32(d + 20));
            goto fail;
        }
        a->rank = rd_i32(d + 24);
        a->alpha = rd_i32(d + 28);
        c.n_layer = rd_i32(d + 32);
        c.n_embd = rd_i32(d + 36);
        c.n_head = rd_i32(d + 40);
        c.n_kv_head = rd_i32(d + 44);
        c.n_hidden = rd_i32(d + 48);
        c.vocab_size = c.block_size = 6; /* not stored; only to pass check_dims */
        c.use_rope = 1;
        if (c.n_head < 1 || c.n_embd % c.n_head) {
            errf(err, "n_embd %d is not a multiple of n_head %d", c.n_embd, c.n_head);
            goto fail;
        }
        c.head_dim = c.n_embd / c.n_head;
        if (check_dims(&c, err)) goto fail;
        a->targets = (1 << WQ) | (1 << WK) | (1 << WV) | (1 << WO);
    }
    if (a->rank < 1 || a->rank > MAX_DIM) {
        errf(err, "LoRA rank %d out of range", a->rank);
        goto fail;
    }
    if (!isfinite(a->alpha)) {
        errf(err, "LoRA alpha is not finite");
        goto fail;
    }
    a->n_layer = L = c.n_layer;
    a->n_embd = D = c.n_embd;
    a->n_head = c.n_head;
    a->n_kv_head = c.n_kv_head;
    a->n_hidden = H = c.n_hidden;
    a->head_dim = c.head_dim;
    Q = c.n_head * c.head_dim;
    KV = c.n_kv_head * c.head_dim;
    int r0[N_TARGETS] = {Q, KV, KV, D, H, D, H}, c0[N_TARGETS] = {D, D, D, Q, D, H, D};
    memcpy(rows, r0, sizeof rows);
    memcpy(cols, c0, sizeof cols);
    a->scale = (float)(a->alpha / a->rank);
    a->A = calloc((size_t)L * N_TARGETS, sizeof *a->A);
    a->B = calloc((size_t)L * N_TARGETS, sizeof *a->B);
    if (!a->A || !a->B) {
        errf(err, "out of memory");
        goto fail;
    }
    Cur cur = {&a->blob, HEADER_SIZE, size, err};
    if (a->major == 2026) {
        for (int l = 0; l < L; l++)
            for (int t = 0; t < N_TARGETS; t++) {
                if (!(a->targets & (1 << t))) continue;
                if (!(a->A[l * N_TARGETS + t] = take_f32(&cur, (size_t)a->rank * cols[t], ALIGN, "LoRA A", l)) ||
                    !(a->B[l * N_TARGETS + t] = take_f32(&cur, (size_t)rows[t] * a->rank, ALIGN, "LoRA B", l)))
                    goto fail;
            }
        if ((cur.pos + ALIGN - 1) / ALIGN * ALIGN != size) {
            errf(err, "%zu unexpected bytes after the adapter's parameters", size - cur.pos);
            goto fail;
        }
    } else {
        for (int t = WQ; t <= WO; t++) {
            for (int l = 0; l < L; l++)
                if (!(a->A[l * N_TARGETS + t] = take_f32(&cur, (size_t)a->rank * cols[t], 1, "LoRA A", l))) goto fail;
            for (int l = 0; l < L; l++)
                if (!(a->B[l * N_TARGETS + t] = take_f32(&cur, (size_t)rows[t] * a->rank, 1, "LoRA B", l))) goto fail;
        }
        if (cur.pos != size) {
            errf(err, "adapter file is %zu bytes but its header implies %zu", size, cur.pos);
            goto fail;
        }
    }
    a->tmp = calloc((size_t)a->rank, sizeof(float));
    if (!a->tmp) {
        errf(err, "out of memory");
        goto fail;
    }
    return a;
fail:
    nano_lora_free(a);
    return NULL;
}

NanoLora *nano_lora_load_file(const char *path, int verify, char err[NANO_ERRLEN])
{
    NanoLora *a = calloc(1, sizeof *a);
    if (!a) {
        errf(err, "out of memory");
        return NULL;
    }
    if (blob_open(&a->blob, path, err)) {
        free(a);
        return NULL;
    }
    return lora_load(a, verify, err);
}

NanoLora *nano_lora_load_buffer(const void *data, size_t size, int verify, char err[NANO_ERRLEN])
{
    NanoLora *a = calloc(1, sizeof *a);
    if (!a) {
        errf(err, "out of memory");
        return NULL;
    }
    a->blob.data = data;
    a->blob.size = size;
    return lora_load(a, verify, err);
}

/* The header fields beyond the shapes that a 2026.11 adapter records of its base: all must equal
 * the model's (a 2024.10 adapter records the shapes only). 0, or -1 with the first difference. */
static int lora_check_base_config(const NanoConfig *c, const NanoLora *a, char *err)
{
    const NanoConfig *b = &a->base;
    const int mine[] = {b->block_size, b->vocab_size, b->use_rope, b->is_causal, b->bias, b->shared_classifier};
    const int theirs[] = {c->block_size, c->vocab_size, c->use_rope, c->is_causal, c->bias, c->shared_classifier};
    const char *names[] = {"block_size", "vocab_size", "use_rope", "is_causal", "bias", "shared_classifier"};
    for (int i = 0; i < 6; i++)
        if (mine[i] != theirs[i])
            return errf(err, "adapter does not match the model: its base has %s %d, this model %d", names[i], mine[i],
                        theirs[i]);
    if (b->norm_eps != c->norm_eps || (c->use_rope && b->rope_theta != c->rope_theta))
        return errf(err, "adapter does not match the model: its base has norm_eps %g and rope_theta %g, this model %g "
                    "and %g", b->norm_eps, b->rope_theta, c->norm_eps, c->rope_theta);
    return 0;
}

int nano_lora_attach(Nano *m, NanoLora *a, char err[NANO_ERRLEN])
{
    const NanoConfig *c = &m->c;
    if (a->n_layer != c->n_layer || a->n_embd != c->n_embd || a->n_head != c->n_head || a->n_kv_head != c->n_kv_head ||
        a->n_hidden != c->n_hidden || a->head_dim != c->head_dim)
        return errf(err, "adapter does not match the model: adapter for n_layer %d n_embd %d n_head %d n_kv_head %d "
                    "n_hidden %d head_dim %d, model has %d %d %d %d %d %d", a->n_layer, a->n_embd, a->n_head,
                    a->n_kv_head, a->n_hidden, a->head_dim, c->n_layer, c->n_embd, c->n_head, c->n_kv_head,
                    c->n_hidden, c->head_dim);
    if (a->has_base_config && lora_check_base_config(c, a, err)) return -1;
    int warn = 0;
    if (a->has_fingerprint && c->has_fingerprint) {
        if (memcmp(a->fingerprint, c->fingerprint, 32) != 0)
            return errf(err, "adapter was made for another base model (base fingerprint %02x%02x%02x%02x..., "
                        "this model %02x%02x%02x%02x...)", a->fingerprint[0], a->fingerprint[1], a->fingerprint[2],
                        a->fingerprint[3], c->fingerprint[0], c->fingerprint[1], c->fingerprint[2], c->fingerprint[3]);
    } else { /* docs/FORMAT.md: without a fingerprint on either side, say that only the shapes were checked */
        errf(err, "warning: %s (2024.10 layout): only the shapes were checked, so an adapter made for another base "
             "model of the same shapes would not be noticed",
             a->has_fingerprint   ? "the model has no base fingerprint"
             : c->has_fingerprint ? "the adapter has no base fingerprint"
                                  : "neither file has a base fingerprint");
        warn = 1;
    }
    m->lora = a;
    nano_reset(m);
    return warn;
}

void nano_lora_detach(Nano *m)
{
    m->lora = NULL;
    nano_reset(m);
}
