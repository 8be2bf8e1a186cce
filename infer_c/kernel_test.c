/*
 * Q8 matrix kernels against the scalar reference (dot_q8_scalar on the file's layout), through the
 * loader's own path: take_mat (which repacks where this CPU runs the packed kernels) and
 * matmul_multi (the threads' split of the rows), for row counts that leave partial tiles, every
 * group size the packed layout allows and some it does not, one token row and blocks of them.
 * tests/test_prefill_packed.py runs it under each NANO_SIMD level and thread count, and under ASan.
 *
 *   make kernel_test && NANO_SIMD=avx512 OMP_NUM_THREADS=2 ./kernel_test
 *
 * Prints "ok: <cases> cases, <kernels> kernels, <packed> packed" or the first mismatch (exit 1). The
 * packed kernels and the scalar one must agree to the bit (the same int32 sums, scaled and added in
 * the same order); the AVX2 kernels add a row's lanes in another order: within float rounding.
 */
#include "nano.c"

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint32_t next_u32(void) { return rng_u32(&rng_state); }

static int failures;

/* the reference: every row of the file's layout against every token row */
static float reference(const int8_t *q, const float *s, int row, int cols, int gs, const int8_t *xq, const float *xs)
{
    return dot_q8_scalar(q + (size_t)row * cols, s + (size_t)row * (cols / gs), xq, xs, cols, gs);
}

/* the size of the terms the AVX2 kernels round (partial sums of products, lane by lane): the sum over
 * groups of sum |w x| |ws xs| */
static double magnitude(const int8_t *q, const float *s, int row, int cols, int gs, const int8_t *xq, const float *xs)
{
    double total = 0;
    for (int g = 0; g < cols / gs; g++) {
        long isum = 0;
        for (int i = g * gs; i < (g + 1) * gs; i++) isum += labs((long)q[(size_t)row * cols + i] * xq[i]);
        total += (double)isum * fabs((double)s[(size_t)row * (cols / gs) + g] * xs[g]);
    }
    return total;
}

/* n matrices of rows[i] x cols sharing their input (as wq wk wv), T token rows; `own`: the blob is
 * the loader's heap (packed in place) rather than a caller's buffer (packed into a heap copy) */
static int check(const int *rows, int n, int cols, int gs, int T, int own, int *packed)
{
    char err[NANO_ERRLEN] = "";
    size_t off[3], end = 0;
    for (int i = 0; i < n; i++) { /* each matrix: its int8 values, then its scales at the next 64 bytes */
        off[i] = end;
        size_t vals = (size_t)rows[i] * cols;
        end = (off[i] + vals + 63) / 64 * 64 + 4 * (vals / gs);
        end = (end + 63) / 64 * 64;
    }
    uint8_t *file = calloc(end, 1);
    int8_t *qcopy[3];
    float *scopy[3];
    for (int i = 0; i < n; i++) {
        size_t vals = (size_t)rows[i] * cols, groups = vals / gs;
        int8_t *q = (int8_t *)(file + off[i]);
        float *s = (float *)(void *)(file + (off[i] + vals + 63) / 64 * 64);
        for (size_t j = 0; j < vals; j++) q[j] = (int8_t)((int)(next_u32() % 255) - 127); /* the quantizer's range */
        for (size_t g = 0; g < groups; g++) s[g] = (float)(next_u32() % 1000 + 1) * 1e-5f;
        qcopy[i] = malloc(vals);
        scopy[i] = malloc(4 * groups);
        memcpy(qcopy[i], q, vals);
        memcpy(scopy[i], s, 4 * groups);
    }
    Blob blob = {0};
    blob.data = file;
    blob.size = end;
    if (own) blob.heap = file; /* blob_close frees it */
    Cur cur = {&blob, 0, end, err};
    Mat M[3];
    memset(M, 0, sizeof M);
    int ok = 1;
    for (int i = 0; i < n && ok; i++)
        if (take_mat(&cur, &M[i], rows[i], cols, NANO_QUANT_Q8, gs, 64, "test", i)) ok = 0;
    if (!ok) {
        printf("take_mat failed: %s\n", err);
        exit(1);
    }
    *packed = M[0].pk != NULL;

    /* T token rows of x, quantized as the engine does; ld apart */
    int ld = cols + 8, wide = 0;
    for (int i = 0; i < n; i++) wide = rows[i] > wide ? rows[i] : wide;
    float *x = calloc((size_t)T * ld, 4), *xs = calloc((size_t)T * ld, 4);
    int8_t *xq = calloc((size_t)T * ld, 1);
    int32_t *xsum = calloc((size_t)T * ld, 4);
    for (int t = 0; t < T; t++) {
        for (int j = 0; j < cols; j++) x[(size_t)t * ld + j] = (float)((int)(next_u32() % 2001) - 1000) * 1e-3f;
        quantize_act(xq + (size_t)t * ld, xs + (size_t)t * ld, xsum + (size_t)t * ld, x + (size_t)t * ld, cols, gs);
    }
    int ldo = wide + 3;
    float *out[3];
    const Mat *W[3];
    for (int i = 0; i < n; i++) {
        out[i] = malloc((size_t)T * ldo * 4);
        for (size_t j = 0; j < (size_t)T * ldo; j++) out[i][j] = NAN;
        W[i] = &M[i];
    }
    matmul_multi(W, out, ldo, n, x, (QuantAct){xq, xs, xsum}, ld, T);

    for (int i = 0; i < n && ok; i++)
        for (int t = 0; t < T && ok; t++)
            for (int r = 0; r < rows[i] && ok; r++) {
                float want = reference(qcopy[i], scopy[i], r, cols, gs, xq + (size_t)t * ld, xs + (size_t)t * ld);
                float got = out[i][(size_t)t * ldo + r];
                int exact = *packed || !g_q8_256 || gs % 32; /* packed or scalar: to the bit */
                double tol = exact ? 0 : 1e-6 * magnitude(qcopy[i], scopy[i], r, cols, gs, xq + (size_t)t * ld,
                                                           xs + (size_t)t * ld);
                if (!(fabs((double)got - want) <= tol) || (exact && memcmp(&got, &want, 4))) {
                    printf("mismatch: matrix %d of %d (%d rows), cols %d, gs %d, T %d, token %d, row %d: %.9g, "
                           "want %.9g\n", i, n, rows[i], cols, gs, T, t, r, got, want);
                    ok = 0;
                }
            }
    /* the embedding's row lookup on the same matrix: value times scale, as on the file's layout */
    float *row = malloc((size_t)cols * 4);
    for (int r = 0; r < rows[0] && ok; r++) {
        embed_row(row, &M[0], r);
        for (int j = 0; j < cols && ok; j++) {
            float want = (float)qcopy[0][(size_t)r * cols + j] * scopy[0][((size_t)r * cols + j) / gs];
            if (memcmp(&row[j], &want, 4)) {
                printf("embed_row mismatch: rows %d, cols %d, gs %d, row %d, col %d: %g, want %g\n", rows[0], cols, gs,
                       r, j, row[j], want);
                ok = 0;
            }
        }
    }
    free(row);
    for (int i = 0; i < n; i++) {
        free(out[i]);
        free(qcopy[i]);
        free(scopy[i]);
    }
    free(x);
    free(xs);
    free(xq);
    free(xsum);
    blob_close(&blob);
    if (!own) free(file);
    if (!ok) failures++;
    return ok;
}

int main(void)
{
    static const int group_sizes[] = {4, 8, 12, 16, 20, 32, 64, 128, 256, 2, 6};
    static const int tokens[] = {1, 2, 3, 4, 5, 8, 9, 12, 17, 64};
    static const int row_sets[][3] = {{1, 0, 0}, {5, 0, 0}, {16, 0, 0}, {17, 0, 0}, {37, 0, 0}, {64, 0, 0},
                                      {100, 0, 0}, {24, 8, 8}, {37, 16, 5}, {48, 48, 48}, {33, 1, 0}};
    int cases = 0, packed_cases = 0;
    const char *kernels = nano_kernel_name();
    for (size_t g = 0; g < sizeof group_sizes / sizeof group_sizes[0]; g++)
        for (int groups = 1; groups <= 3; groups += 2)
            for (size_t rs = 0; rs < sizeof row_sets / sizeof row_sets[0]; rs++)
                for (size_t k = 0; k < sizeof tokens / sizeof tokens[0]; k++) {
                    int n = row_sets[rs][2] ? 3 : row_sets[rs][1] ? 2 : 1, packed = 0;
                    if (failures >= 5) break;
                    check(row_sets[rs], n, groups * group_sizes[g], group_sizes[g], tokens[k], (int)(cases % 2),
                          &packed);
                    cases++;
                    packed_cases += packed;
                }
    if (failures) {
        printf("FAILED: %d of %d cases (%s kernels)\n", failures, cases, kernels);
        return 1;
    }
    printf("ok: %d cases, %s kernels, %d packed\n", cases, kernels, packed_cases);
    return 0;
}
