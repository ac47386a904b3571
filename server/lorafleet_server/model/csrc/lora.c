/* Multi-LoRA: each token's own adapter added to a base Linear's output, read in place.
 *
 * For token n routed to slot s = slots[n] with rank r = ranks[s] on this module:
 *
 *     y[n] += (x[n] . At[s][:, :r]) . Bt[s][:r]
 *
 * with At [slots, d_in, r_cap] (A transposed) and Bt [slots, r_cap, d_out] (B transposed, already
 * scaled), the layout of lorafleet_server/model/lora.py's MultiLoRALinear. Tokens of slot 0, or of a
 * slot whose adapter does not target the module (rank 0), are left as they are. Both products and the
 * add to y are in fp32: h = x . A in r fp32 sums, then y + h . B in fp32, rounded once to the element
 * type. Each token runs alone in a fixed order, so its numbers do not depend on the rest of the step.
 *
 * The torch kernels it replaces (two embedding_bags per module, or gathers and matmuls) cost a
 * fixed ~50-100 us per call whatever the work: ~60-210 calls per decode step. This reads what each
 * token needs (its adapter's r columns of A and r rows of B) with no copy and no fixed cost.
 *
 * A call may split its tokens over `threads` threads, in contiguous ranges: a token's numbers are the
 * same whichever thread computes it. The threads are the helper pool's (csrc/pool.c) where the call
 * passes one (the server passes the AMX Linear's), else the OpenMP team of the calling thread: built
 * with -fopenmp, the library binds at load time to the libgomp torch has already loaded (same
 * soname), so the threads are the team torch's ops use and keep spinning between ops
 * (lorafleet_server/openmp.py).
 *
 * Built by lorafleet_server/model/native.py with -O3 -march=<this CPU> -fopenmp (or -fopenmp-simd
 * where OpenMP does not build or load: then every call runs on its calling thread); plain C the
 * compiler vectorizes for the CPU it is built on. Called through ctypes.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "bf16.h"
#include "pool.h"

#define MAX_RANK 256
#define TOKEN_BLOCK 8 /* tokens of one slot the AVX-512 path takes at once (below) */
/* a * b + c rounded once where the CPU fuses it (what -ffp-contract=fast makes of the vector sums), so the
 * sums the compiler might leave unfused (a loop's epilogue, a few tail lanes) are the same as the rest */
#ifdef __FMA__
#define LF_FMAF(a, b, c) __builtin_fmaf((a), (b), (c))
#else
#define LF_FMAF(a, b, c) ((a) * (b) + (c))
#endif

/* CASE(T) for blocks of 2 to 8 tokens: the switch cases that pick a block path's instance for a run */
#define LF_BLOCKS_2_TO_8(CASE) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)

/* h[0..r_cap) = x . At for one token: per input element, its row of At (r_cap wide; the columns past
 * the slot's own rank are zeros). Four partial sums over interleaved rows hide the FMA latency; they
 * are added in a fixed order. Inlined with r_cap a constant for the common capacities (below), so the
 * sums stay in registers. */
static inline void project_down(const void *x, const void *at, int bf16, int64_t d_in, const int r_cap, float *h) {
    float acc[4][MAX_RANK];
    for (int p = 0; p < 4; p++)
        for (int j = 0; j < r_cap; j++) acc[p][j] = 0.0f;
    int64_t i = 0;
    for (; i < d_in; i += 4) {
        const int lanes = d_in - i < 4 ? (int)(d_in - i) : 4;
        for (int p = 0; p < lanes; p++) {
            float *a = acc[p];
            if (bf16) {
                const float xi = bf16_to_f32(((const uint16_t *)x)[i + p]);
                const uint16_t *row = (const uint16_t *)at + (i + p) * r_cap;
#pragma omp simd
                for (int j = 0; j < r_cap; j++) a[j] += xi * bf16_to_f32(row[j]);
            } else {
                const float xi = ((const float *)x)[i + p];
                const float *row = (const float *)at + (i + p) * r_cap;
#pragma omp simd
                for (int j = 0; j < r_cap; j++) a[j] += xi * row[j];
            }
        }
    }
    for (int j = 0; j < r_cap; j++) h[j] = (acc[0][j] + acc[1][j]) + (acc[2][j] + acc[3][j]);
}

static void project_down_any(const void *x, const void *at, int bf16, int64_t d_in, int r_cap, float *h) {
#define LF_CASE(R)                                        \
    if (r_cap == (R)) {                                   \
        if (bf16)                                         \
            project_down(x, at, 1, d_in, R, h);           \
        else                                              \
            project_down(x, at, 0, d_in, R, h);           \
        return;                                           \
    }
    LF_CASE(4)
    LF_CASE(8)
    LF_CASE(16)
    LF_CASE(32)
    LF_CASE(64)
#undef LF_CASE
    project_down(x, at, bf16, d_in, r_cap, h);
}

/* out (fp32 scratch, d_out) = sum over j < r of h[j] * Bt[j], in order of j. */
static void project_up(const float *h, const void *bt, int bf16, int64_t d_out, int r, float *out) {
    memset(out, 0, (size_t)d_out * sizeof(float));
    for (int j = 0; j < r; j++) {
        const float hj = h[j];
        if (bf16) {
            const uint16_t *row = (const uint16_t *)bt + (int64_t)j * d_out;
#pragma omp simd
            for (int64_t o = 0; o < d_out; o++) out[o] += hj * bf16_to_f32(row[o]);
        } else {
            const float *row = (const float *)bt + (int64_t)j * d_out;
#pragma omp simd
            for (int64_t o = 0; o < d_out; o++) out[o] = LF_FMAF(hj, row[o], out[o]);
        }
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__)
#include <immintrin.h>
#define LF_AVX512_BF16 1

/* The AVX-512 path for bf16 with r_cap 8 or a multiple of 16 (up to 64) and d_out a multiple of 16:
 * the same sums as the portable path above, in registers. One difference in rounding, for values
 * below 2^-126 only: the output's rounding to bf16 (vcvtneps2bf16) flushes them to zero, where the
 * portable path's f32_to_bf16 keeps them; a module's shape decides its path, so a row's numbers still
 * do not depend on the step. */

static inline __m512 bf16x16(const uint16_t *p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

static inline __m256 bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

static inline __m512 bf16x16_masked(const uint16_t *p, __mmask16 m) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

/* r_cap == 8: a vector holds two rows of At; lanes 0-7 take x[i], lanes 8-15 x[i + 1]. The halves of
 * the two accumulators are the four sums of project_down16_avx512 (rows i mod 4: acc0's low and high
 * half, then acc1's), over the same rows (past the last multiple of 16, rows below the last multiple
 * of 4 by i mod 4, the rest to sum 0), added in its order, (0 + 1) + (2 + 3): an adapter's numbers
 * are the same at r_cap 8 as at 16 and up, so they do not change when a larger adapter is loaded into
 * another slot (an outside review: they did, in bf16). */
static void project_down8_avx512(const uint16_t *x, const uint16_t *at, int64_t d_in, float *h,
                                 const uint16_t *next_at) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    const __m512i pair = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    int64_t i = 0;
    for (; i + 16 <= d_in; i += 16) {
        if (next_at != NULL)
            for (int l = 0; l < 4; l++) _mm_prefetch((const char *)(next_at + i * 8) + 64 * l, _MM_HINT_T0);
        const __m512 xv = bf16x16(x + i);
        for (int p = 0; p < 8; p += 2) {
            __m512 x0 = _mm512_permutexvar_ps(_mm512_add_epi32(pair, _mm512_set1_epi32(2 * p)), xv);
            __m512 x1 = _mm512_permutexvar_ps(_mm512_add_epi32(pair, _mm512_set1_epi32(2 * p + 2)), xv);
            acc0 = _mm512_fmadd_ps(x0, bf16x16(at + (i + 2 * p) * 8), acc0);
            acc1 = _mm512_fmadd_ps(x1, bf16x16(at + (i + 2 * p + 2) * 8), acc1);
        }
    }
    const int64_t whole4 = d_in - d_in % 4;
    for (; i < d_in; i++) { /* the rest, a row at a time into its sum's half (the other half adds x * 0) */
        const int q = i < whole4 ? (int)(i % 4) : 0;
        const __m512 xi = _mm512_set1_ps(bf16_to_f32(x[i]));
        const __m256 row = bf16x8(at + i * 8);
        const __m512 zero = _mm512_setzero_ps(); /* the other half: x * 0 (a cast leaves it undefined) */
        const __m512 a = q % 2 ? _mm512_insertf32x8(zero, row, 1) : _mm512_insertf32x8(zero, row, 0);
        if (q < 2)
            acc0 = _mm512_fmadd_ps(xi, a, acc0);
        else
            acc1 = _mm512_fmadd_ps(xi, a, acc1);
    }
    const __m256 s01 = _mm256_add_ps(_mm512_castps512_ps256(acc0), _mm512_extractf32x8_ps(acc0, 1));
    const __m256 s23 = _mm256_add_ps(_mm512_castps512_ps256(acc1), _mm512_extractf32x8_ps(acc1, 1));
    _mm256_storeu_ps(h, _mm256_add_ps(s01, s23));
}

/* r_cap = 16 * C (C = 1..4): each row of At is C vectors; four sets of sums over rows i mod 4, added
 * in a fixed order at the end. */
static inline void project_down16_avx512(const uint16_t *x, const uint16_t *at, int64_t d_in, const int C, float *h,
                                         const uint16_t *next_at) {
    __m512 acc[4][4];
    for (int p = 0; p < 4; p++)
        for (int c = 0; c < C; c++) acc[p][c] = _mm512_setzero_ps();
    const int64_t r_cap = 16 * C;
    int64_t i = 0;
    for (; i + 4 <= d_in; i += 4) {
        if (next_at != NULL)
            for (int l = 0; l < 2 * C; l++) _mm_prefetch((const char *)(next_at + i * r_cap) + 64 * l, _MM_HINT_T0);
        for (int p = 0; p < 4; p++) {
            const __m512 xp = _mm512_set1_ps(bf16_to_f32(x[i + p]));
            for (int c = 0; c < C; c++)
                acc[p][c] = _mm512_fmadd_ps(xp, bf16x16(at + (i + p) * r_cap + 16 * c), acc[p][c]);
        }
    }
    for (; i < d_in; i++) {
        const __m512 x0 = _mm512_set1_ps(bf16_to_f32(x[i]));
        for (int c = 0; c < C; c++) acc[0][c] = _mm512_fmadd_ps(x0, bf16x16(at + i * r_cap + 16 * c), acc[0][c]);
    }
    for (int c = 0; c < C; c++)
        _mm512_storeu_ps(h + 16 * c, _mm512_add_ps(_mm512_add_ps(acc[0][c], acc[1][c]), _mm512_add_ps(acc[2][c], acc[3][c])));
}

/* y[o .. o + 16 * W) = bf16(y + sum over j < r of h[j] * Bt[j, o ..]): W independent sums in flight
 * (one alone is a chain of r dependent FMAs, latency-bound). */
static inline void project_up_add_block(const float *h, const uint16_t *bt, int64_t d_out, int r, uint16_t *y,
                                        int64_t o, const int W, const uint16_t *next_bt, int next_r) {
    __m512 acc[4];
    for (int w = 0; w < W; w++) acc[w] = _mm512_setzero_ps();
    for (int j = 0; j < r; j++) {
        if (next_bt != NULL && j < next_r)
            for (int l = 0; l < W; l += 2) _mm_prefetch((const char *)(next_bt + j * d_out + o) + 64 * (l / 2), _MM_HINT_T0);
        const __m512 hj = _mm512_set1_ps(h[j]);
        for (int w = 0; w < W; w++) acc[w] = _mm512_fmadd_ps(hj, bf16x16(bt + j * d_out + o + 16 * w), acc[w]);
    }
    for (int w = 0; w < W; w++) {
        __m512 sum = _mm512_add_ps(bf16x16(y + o + 16 * w), acc[w]);
        _mm256_storeu_si256((__m256i *)(y + o + 16 * w), (__m256i)_mm512_cvtneps_pbh(sum));
    }
}

/* y[o] = bf16(y[o] + sum over j < r of h[j] * Bt[j, o]), d_out % 16 == 0. */
/* next_bt: the next token's Bt, whose first next_r rows are asked for as these r are read (NULL: none). */
static void project_up_add_avx512(const float *h, const uint16_t *bt, int64_t d_out, int r, uint16_t *y,
                                  const uint16_t *next_bt, int next_r) {
    int64_t o = 0;
    for (; o + 64 <= d_out; o += 64) project_up_add_block(h, bt, d_out, r, y, o, 4, next_bt, next_r);
    for (; o < d_out; o += 16) project_up_add_block(h, bt, d_out, r, y, o, 1, next_bt, next_r);
}

/* Up to TOKEN_BLOCK consecutive tokens of one slot at once (a prompt chunk), r_cap = 16 * C: each
 * vector of At and Bt is loaded and widened once for all T tokens, where a token alone loads it once
 * for itself. Every token's sums are those of the single-token functions above for it alone: the same
 * products, added into the same partial sums in the same order (each of the four sums of
 * project_down16_avx512 takes rows i = p mod 4 of At in turn, the rows past the last multiple of 4
 * going to sum 0; project_up_add_block's sum per 16 outputs takes j = 0 .. r - 1), so a token's
 * numbers do not depend on how the step's tokens were grouped. One 16-column block of h and one of
 * the four sums at a time keeps T sums in registers. */

/* h[k * 64 + 16 * c ..] for tokens k < T: xs holds their x rows widened to fp32 (T x d_in). */
static inline __attribute__((always_inline)) void project_down16_tokens_avx512(const float *xs, const uint16_t *at,
                                                                               int64_t d_in, int64_t r_cap, int c,
                                                                               float *h, const int T) {
    const int64_t whole = d_in - d_in % 4; /* rows of the interleaved sums; the rest go to sum 0 */
    __m512 part[4][TOKEN_BLOCK];
    for (int p = 0; p < 4; p++) {
        __m512 acc[TOKEN_BLOCK];
        for (int k = 0; k < T; k++) acc[k] = _mm512_setzero_ps();
        for (int64_t i = p; i < whole; i += 4) {
            const __m512 a = bf16x16(at + i * r_cap + 16 * c);
            for (int k = 0; k < T; k++) acc[k] = _mm512_fmadd_ps(_mm512_set1_ps(xs[k * d_in + i]), a, acc[k]);
        }
        if (p == 0)
            for (int64_t i = whole; i < d_in; i++) {
                const __m512 a = bf16x16(at + i * r_cap + 16 * c);
                for (int k = 0; k < T; k++) acc[k] = _mm512_fmadd_ps(_mm512_set1_ps(xs[k * d_in + i]), a, acc[k]);
            }
        for (int k = 0; k < T; k++) part[p][k] = acc[k];
    }
    for (int k = 0; k < T; k++)
        _mm512_storeu_ps(h + k * 64 + 16 * c, _mm512_add_ps(_mm512_add_ps(part[0][k], part[1][k]),
                                                            _mm512_add_ps(part[2][k], part[3][k])));
}

/* Outputs [o, o + 16 * W) of tokens k < T: y row k (d_out apart) += h[k * 64 ..] . Bt, rounded once. */
static inline __attribute__((always_inline)) void project_up_add_tokens(const float *h, const uint16_t *bt,
                                                                        int64_t d_out, int r, uint16_t *y, int64_t o,
                                                                        const int W, const int T) {
    __m512 acc[2][TOKEN_BLOCK];
    for (int w = 0; w < W; w++)
        for (int k = 0; k < T; k++) acc[w][k] = _mm512_setzero_ps();
    for (int j = 0; j < r; j++)
        for (int w = 0; w < W; w++) {
            const __m512 b = bf16x16(bt + j * d_out + o + 16 * w);
            for (int k = 0; k < T; k++) acc[w][k] = _mm512_fmadd_ps(_mm512_set1_ps(h[k * 64 + j]), b, acc[w][k]);
        }
    for (int w = 0; w < W; w++)
        for (int k = 0; k < T; k++) {
            uint16_t *yk = y + k * d_out + o + 16 * w;
            __m512 sum = _mm512_add_ps(bf16x16(yk), acc[w][k]);
            _mm256_storeu_si256((__m256i *)yk, (__m256i)_mm512_cvtneps_pbh(sum));
        }
}

/* h[k * 64 ..] (8 floats) for tokens k < T at r_cap 8, the sums of project_down8_avx512: its four
 * 8-wide sums are its two vectors' halves, rows i = 0, 1, 2, 3 mod 4 (in that order: low and high half
 * of the first vector, then of the second), over the rows of whole blocks of 16; each row past them
 * goes to sum i mod 4 below the last multiple of 4, else to sum 0, its sibling half (sum q ^ 1) adding
 * x * 0 as there; and h = (sum 0 + sum 1) + (sum 2 + sum 3). */
static inline __attribute__((always_inline)) void project_down8_tokens_avx512(const float *xs, const uint16_t *at,
                                                                              int64_t d_in, float *h, const int T) {
    const int64_t whole = d_in - d_in % 16, whole4 = d_in - d_in % 4;
    __m256 part[4][TOKEN_BLOCK];
    for (int q = 0; q < 4; q++) {
        __m256 acc[TOKEN_BLOCK];
        for (int k = 0; k < T; k++) acc[k] = _mm256_setzero_ps();
        for (int64_t i = q; i < whole; i += 4) {
            const __m256 a = bf16x8(at + i * 8);
            for (int k = 0; k < T; k++) acc[k] = _mm256_fmadd_ps(_mm256_set1_ps(xs[k * d_in + i]), a, acc[k]);
        }
        for (int64_t i = whole; i < d_in; i++) {
            const int to = i < whole4 ? (int)(i % 4) : 0;
            if (to != q && (to ^ 1) != q) continue;
            const __m256 a = to == q ? bf16x8(at + i * 8) : _mm256_setzero_ps();
            for (int k = 0; k < T; k++) acc[k] = _mm256_fmadd_ps(_mm256_set1_ps(xs[k * d_in + i]), a, acc[k]);
        }
        for (int k = 0; k < T; k++) part[q][k] = acc[k];
    }
    for (int k = 0; k < T; k++)
        _mm256_storeu_ps(h + k * 64, _mm256_add_ps(_mm256_add_ps(part[0][k], part[1][k]),
                                                   _mm256_add_ps(part[2][k], part[3][k])));
}

static inline __attribute__((always_inline)) void lora_tokens_avx512_t(uint16_t *y, const uint16_t *x,
                                                                       const uint16_t *at, const uint16_t *bt,
                                                                       int64_t d_in, int64_t d_out, int64_t r_cap,
                                                                       int r, float *xs, const int T) {
    float h[TOKEN_BLOCK * 64];
    for (int k = 0; k < T; k++)
        for (int64_t i = 0; i < d_in; i++) xs[k * d_in + i] = bf16_to_f32(x[k * d_in + i]);
    if (r_cap == 8)
        project_down8_tokens_avx512(xs, at, d_in, h, T);
    else
        for (int c = 0; c < r_cap / 16; c++) project_down16_tokens_avx512(xs, at, d_in, r_cap, c, h, T);
    const int W = 2; /* 2 * T sums in registers */
    int64_t o = 0;
    for (; o + 16 * W <= d_out; o += 16 * W) project_up_add_tokens(h, bt, d_out, r, y, o, W, T);
    for (; o < d_out; o += 16) project_up_add_tokens(h, bt, d_out, r, y, o, 1, T);
}

/* Tokens n .. n + t (2 <= t <= TOKEN_BLOCK) of one slot; 0 when the shape is not one this path takes
 * (r_cap not 8 or a multiple of 16 up to 64, or d_out not a multiple of 16). xs: TOKEN_BLOCK * d_in floats. */
static int lora_tokens_avx512(uint16_t *y, const uint16_t *x, int t, const uint16_t *at, const uint16_t *bt,
                              int64_t d_in, int64_t d_out, int64_t r_cap, int r, float *xs) {
    if (d_out % 16 != 0 || (r_cap != 8 && r_cap % 16 != 0) || r_cap > 64 || r_cap == 0) return 0;
    switch (t) {
#define LF_CASE(T)                                                            \
    case T: lora_tokens_avx512_t(y, x, at, bt, d_in, d_out, r_cap, r, xs, T); \
        return 1;
        LF_BLOCKS_2_TO_8(LF_CASE)
#undef LF_CASE
    default: return 0;
    }
}

/* One token on the AVX-512 path; 0 when its shape is not one the path takes (the shapes lf_lora_fast
 * names). next_at, next_bt: the next token's adapter (rank next_r), asked for as this one's is read. */
static int lora_token_avx512(uint16_t *y, const uint16_t *x, const uint16_t *at, const uint16_t *bt, int64_t d_in,
                             int64_t d_out, int64_t r_cap, int r, const uint16_t *next_at, const uint16_t *next_bt,
                             int next_r) {
    if (d_out % 16 != 0) return 0;
    float h[64];
    switch (r_cap) {
    case 8: project_down8_avx512(x, at, d_in, h, next_at); break;
    case 16: project_down16_avx512(x, at, d_in, 1, h, next_at); break;
    case 32: project_down16_avx512(x, at, d_in, 2, h, next_at); break;
    case 48: project_down16_avx512(x, at, d_in, 3, h, next_at); break;
    case 64: project_down16_avx512(x, at, d_in, 4, h, next_at); break;
    default: return 0;
    }
    project_up_add_avx512(h, bt, d_out, r, y, next_bt, next_r);
    if (next_bt != NULL && next_r > r) /* the rows of a larger rank than this token's */
        for (int64_t off = (int64_t)r * d_out * 2; off < (int64_t)next_r * d_out * 2; off += 64)
            _mm_prefetch((const char *)next_bt + off, _MM_HINT_T0);
    return 1;
}
#endif

/* The portable path's token blocks: fp32 with r_cap a multiple of 8 (any CPU; GCC's generic vectors,
 * which clang has too: 8 floats, one AVX2 register or two SSE ones). A run of up to 8 / V
 * consecutive tokens of one slot (V = 2 where r_cap is a multiple of 16, else 1) reads each 8 * V
 * columns of an At row and each 8 * V outputs of a Bt row once for the block, where token by token
 * reads them once per token. Every token's numbers are those project_down and project_up give it
 * alone: partial sum p takes At's rows i = p mod 4 in ascending order (the tail rows too, as there),
 * h = (sum 0 + sum 1) + (sum 2 + sum 3), and each output's sum takes j = 0 .. r - 1 from zero, added
 * to y once; the compiler contracts the same vector multiply-adds into FMAs on both (-ffp-contract=fast). One
 * of the four sums and one group of columns at a time keeps the block's T * V sums in registers (eight
 * of AVX2's sixteen). */
typedef float lf_v8 __attribute__((vector_size(32)));
#define PORTABLE_LANES 8
#define PORTABLE_SUMS 8 /* T * V: a block's sums in registers */

static inline lf_v8 v8_load(const float *p) {
    lf_v8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void v8_store(float *p, lf_v8 v) { memcpy(p, &v, sizeof v); }

static inline lf_v8 v8_splat(float f) { return (lf_v8){f, f, f, f, f, f, f, f}; }

/* h[k * r_cap + j0 .. + 8 * V) for tokens k < T (x rows d_in apart). */
static inline __attribute__((always_inline)) void project_down_tokens_f32(const float *x, const float *at,
                                                                          int64_t d_in, int64_t r_cap, int64_t j0,
                                                                          float *h, const int T, const int V) {
    lf_v8 part[4][PORTABLE_SUMS];
    for (int p = 0; p < 4; p++) {
        lf_v8 acc[PORTABLE_SUMS];
        for (int s = 0; s < T * V; s++) acc[s] = v8_splat(0.0f);
        for (int64_t i = p; i < d_in; i += 4) {
            const float *row = at + i * r_cap + j0;
            lf_v8 a[2];
            for (int v = 0; v < V; v++) a[v] = v8_load(row + PORTABLE_LANES * v);
            for (int k = 0; k < T; k++) {
                const lf_v8 xk = v8_splat(x[k * d_in + i]);
                for (int v = 0; v < V; v++) acc[k * V + v] += xk * a[v];
            }
        }
        for (int s = 0; s < T * V; s++) part[p][s] = acc[s];
    }
    for (int k = 0; k < T; k++)
        for (int v = 0; v < V; v++) {
            const int s = k * V + v;
            v8_store(h + k * r_cap + j0 + PORTABLE_LANES * v, (part[0][s] + part[1][s]) + (part[2][s] + part[3][s]));
        }
}

/* Outputs [o, o + 8 * W) of tokens k < T: y row k (d_out apart) += h[k * r_cap ..] . Bt. */
static inline __attribute__((always_inline)) void project_up_add_tokens_f32(const float *h, const float *bt,
                                                                            int64_t d_out, int64_t r_cap, int r,
                                                                            float *y, int64_t o, const int W,
                                                                            const int T) {
    lf_v8 acc[PORTABLE_SUMS];
    for (int s = 0; s < T * W; s++) acc[s] = v8_splat(0.0f);
    for (int j = 0; j < r; j++) {
        lf_v8 b[2];
        for (int w = 0; w < W; w++) b[w] = v8_load(bt + j * d_out + o + PORTABLE_LANES * w);
        for (int k = 0; k < T; k++) {
            const lf_v8 hk = v8_splat(h[k * r_cap + j]);
            for (int w = 0; w < W; w++) acc[k * W + w] += hk * b[w];
        }
    }
    for (int k = 0; k < T; k++)
        for (int w = 0; w < W; w++) {
            float *yk = y + k * d_out + o + PORTABLE_LANES * w;
            v8_store(yk, v8_load(yk) + acc[k * W + w]);
        }
}

static inline __attribute__((always_inline)) void lora_tokens_f32_t(float *y, const float *x, const float *at,
                                                                    const float *bt, int64_t d_in, int64_t d_out,
                                                                    int64_t r_cap, int r, float *h, const int T,
                                                                    const int V) {
    for (int64_t j0 = 0; j0 < r_cap; j0 += PORTABLE_LANES * V) project_down_tokens_f32(x, at, d_in, r_cap, j0, h, T, V);
    int64_t o = 0;
    for (; o + PORTABLE_LANES * V <= d_out; o += PORTABLE_LANES * V) project_up_add_tokens_f32(h, bt, d_out, r_cap, r, y, o, V, T);
    for (; o + PORTABLE_LANES <= d_out; o += PORTABLE_LANES) project_up_add_tokens_f32(h, bt, d_out, r_cap, r, y, o, 1, T);
    if (o == d_out) return;
    /* The last d_out % 8 outputs, each sum an explicit fused multiply-add per j, as project_up's. Left to
     * the compiler, neither way was contracted everywhere: a scalar loop here was not contracted like
     * the single-token path's epilogue (AVX2), and these columns padded into 8 lanes were not where the
     * single-token epilogue was (GCC, AVX-512 EPYC): different bits either way. */
    const int64_t rest = d_out - o;
    for (int k = 0; k < T; k++) {
        float acc[PORTABLE_LANES] = {0};
        for (int j = 0; j < r; j++) {
            const float hk = h[k * r_cap + j];
            for (int64_t l = 0; l < rest; l++) acc[l] = LF_FMAF(hk, bt[j * d_out + o + l], acc[l]);
        }
        for (int64_t l = 0; l < rest; l++) y[k * d_out + o + l] += acc[l];
    }
}

/* Tokens a run takes at once on the portable path for this element type and r_cap (1: token by token). */
static int portable_block(int bf16, int64_t r_cap) {
    if (bf16 || r_cap <= 0 || r_cap % PORTABLE_LANES != 0) return 1;
    return r_cap % (2 * PORTABLE_LANES) == 0 ? PORTABLE_SUMS / 2 : PORTABLE_SUMS;
}

/* Tokens n .. n + t (2 <= t <= portable_block) of one slot, fp32; h: t * r_cap floats. 0 (nothing
 * written) for a t it has no block for. */
static int lora_tokens_f32(float *y, const float *x, int t, const float *at, const float *bt, int64_t d_in,
                            int64_t d_out, int64_t r_cap, int r, float *h) {
    if (r_cap % (2 * PORTABLE_LANES) == 0) {
        switch (t) {
#define LF_CASE(T)                                                             \
    case T: lora_tokens_f32_t(y, x, at, bt, d_in, d_out, r_cap, r, h, T, 2); \
        return 1;
            LF_CASE(2)
            LF_CASE(3)
            LF_CASE(4)
#undef LF_CASE
        }
    }
    switch (t) {
#define LF_CASE(T)                                                             \
    case T: lora_tokens_f32_t(y, x, at, bt, d_in, d_out, r_cap, r, h, T, 1); \
        return 1;
        LF_BLOCKS_2_TO_8(LF_CASE)
#undef LF_CASE
    default: return 0;
    }
}

/* Ask for [p, p + bytes) in cache ahead of use: a token's adapter is a few KB to ~100 KB in DRAM
 * (the base weights stream through the caches every step). Only for the AVX-512 path (the CPUs it
 * was written on): on a 2-core AVX2 AMD EPYC the portable fp32 path read adapters from DRAM ~1.1-1.25x
 * faster without it (the burst of a whole adapter's prefetches competes with the loads of the token
 * at hand; the hardware prefetcher follows each contiguous A and B by itself; docs/architecture.md,
 * "Measured facts" 12). Into L1 (prefetcht0): on the AMX Xeon the L2 hint (prefetcht2) read 32
 * distinct r=16 adapters no faster than no prefetch at all, and t0 ~1.3x faster. */
static inline void prefetch_range(const void *p, int64_t bytes) {
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch((const char *)p + off, 0, 3);
}

/* 1 where a module of this element type (bf16 = 1), d_out and r_cap takes the vector path above. */
int lf_lora_fast(int bf16, int64_t d_out, int64_t r_cap) {
#ifdef LF_AVX512_BF16
    return bf16 && d_out % 16 == 0 && (r_cap == 8 || r_cap == 16 || r_cap == 32 || r_cap == 48 || r_cap == 64);
#else
    (void)bf16;
    (void)d_out;
    (void)r_cap;
    return 0;
#endif
}

/* 1 where a run of one slot's tokens is taken a block at a time (the AVX-512 path's shapes; fp32 with
 * r_cap a multiple of 8 on the portable path), else 0 (token by token): the shapes for which native.py
 * prefers this kernel for prompt chunks as well as decode steps. */
int lf_lora_blocks(int bf16, int64_t d_out, int64_t r_cap) {
    return lf_lora_fast(bf16, d_out, r_cap) || portable_block(bf16, r_cap) > 1;
}

/* Floats of scratch a thread's add_tokens takes: a token's fp32 delta (d_out), then TOKEN_BLOCK x rows
 * widened to fp32 for the AVX-512 path's blocks. */
static size_t scratch_floats(int64_t d_in, int64_t d_out) { return (size_t)d_out + TOKEN_BLOCK * (size_t)d_in; }

/* Tokens [lo, hi) of a call (see lf_lora_add); out: scratch_floats(d_in, d_out) floats of scratch. */
static void add_tokens(void *y, const void *x, const void *at, const void *bt, const int64_t *slots,
                       const int64_t *ranks, int64_t lo, int64_t hi, int64_t d_in, int64_t d_out, int64_t r_cap,
                       int bf16, float *out) {
    float h[MAX_RANK];
    const size_t elem = bf16 ? sizeof(uint16_t) : sizeof(float);
    const int prefetch = lf_lora_fast(bf16, d_out, r_cap); /* the AVX-512 path */
    const int64_t block = prefetch ? TOKEN_BLOCK : portable_block(bf16, r_cap);
    for (int64_t n = lo; n < hi;) {
        const int64_t s = slots[n];
        const int r = (int)ranks[s];
        int64_t run = 1; /* this token and the next ones of its slot, up to a block */
        while (run < block && n + run < hi && slots[n + run] == s) run++;
        /* The next token's adapter, where it has another that targets this module: a lone token with an
         * adapter here asks for it a few lines at a time as its kernel reads its own (next_at, next_bt:
         * a burst of a whole adapter's prefetches stalls on the line fill buffers before the token at
         * hand is computed); a block of tokens, or a token without an adapter here (slot 0 or rank 0),
         * asks for all of it at once. */
        const uint16_t *next_at = NULL, *next_bt = NULL;
        int next_r = 0;
        if (prefetch && n + run < hi && slots[n + run] != s && slots[n + run] != 0 && ranks[slots[n + run]] != 0) {
            const int64_t t = slots[n + run];
            next_r = (int)ranks[t];
            if (run == 1 && s != 0 && r != 0) { /* lora_token_avx512 below: lf_lora_fast's shapes are its own */
                next_at = (const uint16_t *)at + t * d_in * r_cap;
                next_bt = (const uint16_t *)bt + t * r_cap * d_out;
            } else {
                prefetch_range((const char *)at + (size_t)(t * d_in * r_cap) * elem, d_in * r_cap * (int64_t)elem);
                prefetch_range((const char *)bt + (size_t)(t * r_cap * d_out) * elem, ranks[t] * d_out * (int64_t)elem);
            }
        }
#ifndef LF_AVX512_BF16
        (void)next_at, (void)next_bt, (void)next_r; /* prefetch is 0 without the AVX-512 path */
#endif
        if (s == 0 || r == 0) {
            n += run;
            continue;
        }
#ifdef LF_AVX512_BF16
        if (bf16 && run > 1 &&
            lora_tokens_avx512((uint16_t *)y + n * d_out, (const uint16_t *)x + n * d_in, (int)run,
                               (const uint16_t *)at + s * d_in * r_cap, (const uint16_t *)bt + s * r_cap * d_out, d_in,
                               d_out, r_cap, r, out + d_out)) {
            n += run;
            continue;
        }
        if (bf16 && lora_token_avx512((uint16_t *)y + n * d_out, (const uint16_t *)x + n * d_in,
                                      (const uint16_t *)at + s * d_in * r_cap, (const uint16_t *)bt + s * r_cap * d_out,
                                      d_in, d_out, r_cap, r, next_at, next_bt, next_r)) {
            n++;
            continue;
        }
#endif
        float hb[PORTABLE_SUMS * MAX_RANK];
        if (!bf16 && run > 1 && /* block > 1: the portable path's blocks */
            lora_tokens_f32((float *)y + n * d_out, (const float *)x + n * d_in, (int)run,
                            (const float *)at + s * d_in * r_cap, (const float *)bt + s * r_cap * d_out, d_in, d_out,
                            r_cap, r, hb)) {
            n += run;
            continue;
        }
        project_down_any((const char *)x + (size_t)(n * d_in) * elem, (const char *)at + (size_t)(s * d_in * r_cap) * elem,
                         bf16, d_in, (int)r_cap, h);
        project_up(h, (const char *)bt + (size_t)(s * r_cap * d_out) * elem, bf16, d_out, r, out);
        if (bf16) {
            uint16_t *yn = (uint16_t *)y + n * d_out;
#pragma omp simd
            for (int64_t o = 0; o < d_out; o++) yn[o] = f32_to_bf16(bf16_to_f32(yn[o]) + out[o]);
        } else {
            float *yn = (float *)y + n * d_out;
#pragma omp simd
            for (int64_t o = 0; o < d_out; o++) yn[o] += out[o];
        }
        n++;
    }
}

/* 1 where this build splits a call over OpenMP threads (built with OpenMP), else 0. */
int lf_lora_threaded(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* A call's tokens on the helper pool (csrc/pool.c): unit u is tokens [n * u / units, n * (u + 1) / units). */
typedef struct {
    void *y;
    const void *x, *at, *bt;
    const int64_t *slots, *ranks;
    int64_t n_tokens, units, d_in, d_out, r_cap;
    int bf16;
    float *out; /* units x scratch_floats(d_in, d_out) floats of scratch */
} lora_call;

static void lora_unit(void *ctx, int64_t unit) {
    const lora_call *c = ctx;
    add_tokens(c->y, c->x, c->at, c->bt, c->slots, c->ranks, c->n_tokens * unit / c->units,
               c->n_tokens * (unit + 1) / c->units, c->d_in, c->d_out, c->r_cap, c->bf16,
               c->out + unit * scratch_floats(c->d_in, c->d_out));
}

/* y [n_tokens, d_out] (updated in place), x [n_tokens, d_in], at [n_slots, d_in, r_cap], bt [n_slots,
 * r_cap, d_out], all contiguous and of one element type (bf16 = 1: bfloat16, else float32); slots
 * [n_tokens] and ranks [n_slots] int64. The tokens are split over up to `threads` threads, at least
 * MIN_TOKENS_PER_THREAD each, in contiguous ranges: on the helper pool whose lf_pool_run is
 * `pool_run` where it is not NULL (lf_pool_units ranges: two per thread, so a helper that comes late
 * leaves its share to the others), else on the caller's OpenMP team (at most MAX_THREADS; one thread
 * without OpenMP).
 * Returns 0, or -1 when a size, slot, rank or thread count (< 1) is out of range (nothing is written
 * then). */
#define MIN_TOKENS_PER_THREAD 4
#define MAX_THREADS 256
int lf_lora_add(void *y, const void *x, const void *at, const void *bt, const int64_t *slots, const int64_t *ranks,
                int64_t n_tokens, int64_t n_slots, int64_t d_in, int64_t d_out, int64_t r_cap, int bf16, int threads,
                lf_pool_run_fn pool_run) {
    if (n_tokens < 0 || n_slots <= 0 || d_in <= 0 || d_out <= 0 || r_cap < 0 || r_cap > MAX_RANK) return -1;
    if (threads < 1) return -1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    for (int64_t s = 0; s < n_slots; s++)
        if (ranks[s] < 0 || ranks[s] > r_cap) return -1;
    for (int64_t n = 0; n < n_tokens; n++)
        if (slots[n] < 0 || slots[n] >= n_slots) return -1;
    if ((int64_t)threads * MIN_TOKENS_PER_THREAD > n_tokens) threads = (int)(n_tokens / MIN_TOKENS_PER_THREAD);
    if (threads < 1) threads = 1;
    if (threads > 1 && pool_run != NULL) {
        const int64_t units = lf_pool_units(n_tokens, threads, MIN_TOKENS_PER_THREAD);
        float *scratch = malloc((size_t)units * scratch_floats(d_in, d_out) * sizeof(float));
        if (scratch == NULL) return -1;
        lora_call c = {y, x, at, bt, slots, ranks, n_tokens, units, d_in, d_out, r_cap, bf16, scratch};
        pool_run(lora_unit, &c, units, threads);
        free(scratch);
        return 0;
    }
#ifndef _OPENMP
    threads = 1;
#endif
    float *out = malloc((size_t)threads * scratch_floats(d_in, d_out) * sizeof(float)); /* each thread's */
    if (out == NULL) return -1;
    if (threads == 1) {
        add_tokens(y, x, at, bt, slots, ranks, 0, n_tokens, d_in, d_out, r_cap, bf16, out);
    } else {
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
        {
            const int64_t t = omp_get_thread_num(), team = omp_get_num_threads();
            add_tokens(y, x, at, bt, slots, ranks, n_tokens * t / team, n_tokens * (t + 1) / team, d_in, d_out, r_cap,
                       bf16, out + t * scratch_floats(d_in, d_out));
        }
#endif
    }
    free(out);
    return 0;
}
