/* An fp32 Linear on AVX2 + FMA (AVX-512 where the CPU has it): out[m, n] = x[m, k] . W[n, k]^T (+ bias),
 * every sum in fp32.
 *
 * Why: on a 2-core AMD EPYC with AVX2 only, MKL's F.linear reached ~70-100 GFLOP/s on a decode step's
 * 32 rows (it splits few rows poorly over threads) and oneDNN's prepacked call ~110-140, against a
 * peak near 190 (2 cores x 2 FMA units x 8 lanes x 2 flops x ~3 GHz). This one reaches ~165-185 on
 * SmolLM2's shapes at 8-512 rows and ~150 on its 49,152-wide LM head (docs/architecture.md,
 * "Measured facts" 15).
 *
 * Layout: the weight is packed once (lf_linear_f32_pack) into panels of NR = 16 output columns; a
 * panel is k rows of 16 floats, packed[p][kk][j] = W[16p + j][kk] (zeros past n), so the k loop reads
 * it front to back, 64 bytes a step, and the hardware prefetcher streams it. Each block of up to MR =
 * 6 rows of x keeps a 6 x 16 tile of sums in 12 registers: per kk two loads of the panel, six
 * broadcasts of x and twelve FMAs. A panel (36 KB at k = 576) stays in L2 while every row block of
 * the call passes over it.
 *
 * Every output element is one sum over kk = 0..k-1 in that order, FMA by FMA, then + bias: the same
 * whatever the row count, the rows beside it, the block it falls in or the thread that computes it,
 * so a row's output is bit for bit the same alone or in any step (oneDNN and MKL pick kernels by the
 * row count). A call splits its panels over up to `threads` threads of the calling thread's OpenMP
 * team (built with -fopenmp, the library binds to the libgomp torch has loaded, so these are the
 * threads torch's ops use and keep warm).
 *
 * Needs a CPU with AVX2 and FMA; a library built for any other only says so
 * (lf_linear_f32_available() == 0) and the loader keeps torch's Linears. Built by
 * lorafleet_server/model/native.py with -O3 -march=native; called through ctypes.
 */
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX2__) && defined(__FMA__)
#define LF_AVX2 1
#include <immintrin.h>
#else
#define LF_AVX2 0
#endif
#if LF_AVX2 && defined(__AVX512F__)
#define LF_AVX512 1 /* the blocks below take two panels at once in 512-bit registers */
#else
#define LF_AVX512 0
#endif

#define NR 16 /* output columns per panel: two 8-lane vectors */
#define MR 6  /* rows of x per block: 12 accumulators, 2 panel vectors and a broadcast fit the 16 registers */
#define MAX_THREADS 256

/* 1 when this library has the AVX2 + FMA kernel, else 0. */
int lf_linear_f32_available(void) { return LF_AVX2; }

/* 1 when its blocks are the AVX-512 ones (two panels, 12 rows at a time), else 0. */
int lf_linear_f32_avx512(void) { return LF_AVX512; }

/* 1 where this build splits a call over OpenMP threads (built with OpenMP), else 0. */
int lf_linear_f32_threaded(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* How many floats the packed weight of an n x k Linear takes: whole panels of NR columns. */
int64_t lf_linear_f32_packed_size(int64_t n, int64_t k) { return (n + NR - 1) / NR * NR * k; }

/* packed (lf_linear_f32_packed_size(n, k) floats) = W (n x k, row-major) in the layout above.
 * Returns 0, or -1 when n or k is not positive. */
int lf_linear_f32_pack(const float *w, float *packed, int64_t n, int64_t k) {
    if (n <= 0 || k <= 0) return -1;
    const int64_t panels = (n + NR - 1) / NR;
    for (int64_t p = 0; p < panels; p++) {
        float *panel = packed + p * k * NR;
        for (int64_t kk = 0; kk < k; kk++)
            for (int j = 0; j < NR; j++) {
                const int64_t col = p * NR + j;
                panel[kk * NR + j] = col < n ? w[col * k + kk] : 0.0f;
            }
    }
    return 0;
}

#if LF_AVX2
#if LF_AVX512
/* With AVX-512 (32 registers of 16 floats) a block takes two adjacent panels at once, up to MR512 = 12
 * rows: 24 accumulators, the two panel vectors and a broadcast; per kk two loads of the panels, twelve
 * broadcasts and 24 FMAs, twice the AVX2 block's work per load. The packed layout is the same (panels
 * of 16), and so is every output's sum: one FMA per kk in order from zero, then + bias, so a row's
 * numbers equal the AVX2 path's bit for bit. */
#define MR512 12

/* One row's 16 sums of a panel (+ bias) into o: its first `cols` columns. */
static inline __attribute__((always_inline)) void store_row16(float *o, __m512 c, const float *bias, int cols) {
    const __mmask16 keep = cols >= NR ? (__mmask16)0xffff : (__mmask16)((1u << cols) - 1u);
    if (bias != NULL) c = _mm512_add_ps(c, _mm512_maskz_loadu_ps(keep, bias));
    _mm512_mask_storeu_ps(o, keep, c);
}

#define LF_DECL(r) __m512 c##r##0 = _mm512_setzero_ps(), c##r##1 = _mm512_setzero_ps();
#define LF_FMA(r)                                                           \
    if (rows > r) {                                                         \
        const __m512 a = _mm512_set1_ps(x[r * k + kk]);                     \
        c##r##0 = _mm512_fmadd_ps(a, b0, c##r##0);                          \
        if (two) c##r##1 = _mm512_fmadd_ps(a, b1, c##r##1);                 \
    }
#define LF_STORE(r)                                                                             \
    if (rows > r) {                                                                             \
        store_row16(out + r * n_out, c##r##0, bias, cols0);                                     \
        if (two) store_row16(out + r * n_out + NR, c##r##1, bias != NULL ? bias + NR : NULL, cols1); \
    }
#define LF_ALL(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8) M(9) M(10) M(11)

/* Rows x[0..rows) (row stride k) against panel pa and, where `two`, the next one pb (their columns
 * 16 apart in out, row stride n_out); rows and two are constants at each call below, so the unused
 * accumulators compile away and the sums stay in registers. */
static inline __attribute__((always_inline)) void block512(const float *x, int64_t k, const float *pa,
                                                           const float *pb, const float *bias, float *out,
                                                           int64_t n_out, int cols0, int cols1, const int rows,
                                                           const int two) {
    LF_ALL(LF_DECL)
    for (int64_t kk = 0; kk < k; kk++) {
        const __m512 b0 = _mm512_loadu_ps(pa + kk * NR);
        const __m512 b1 = two ? _mm512_loadu_ps(pb + kk * NR) : _mm512_setzero_ps();
        LF_ALL(LF_FMA)
    }
    LF_ALL(LF_STORE)
}
#undef LF_ALL
#undef LF_STORE
#undef LF_FMA
#undef LF_DECL

#define LF_ROWS_1_TO_12(CASE) CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8) CASE(9) CASE(10) CASE(11) CASE(12)

static void block512_two(const float *x, int64_t k, const float *pa, const float *pb, const float *bias, float *out,
                         int64_t n_out, int cols0, int cols1, int rows) {
    switch (rows) {
#define LF_CASE(R) \
    case R: block512(x, k, pa, pb, bias, out, n_out, cols0, cols1, R, 1); return;
        LF_ROWS_1_TO_12(LF_CASE)
#undef LF_CASE
    }
}

static void block512_one(const float *x, int64_t k, const float *pa, const float *bias, float *out, int64_t n_out,
                         int cols0, int rows) {
    switch (rows) {
#define LF_CASE(R) \
    case R: block512(x, k, pa, NULL, bias, out, n_out, cols0, 0, R, 0); return;
        LF_ROWS_1_TO_12(LF_CASE)
#undef LF_CASE
    }
}
#undef LF_ROWS_1_TO_12

/* Panels [p0, p1) for all m rows, two at a time (the last one alone where the count is odd): per
 * pair, every block of MR512 rows (the last one shorter). */
static void panels(const float *x, const float *packed, const float *bias, float *out, int64_t m, int64_t n,
                   int64_t k, int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; p += 2) {
        const int two = p + 1 < p1;
        const float *pa = packed + p * k * NR, *pb = pa + k * NR;
        const float *bias_p = bias != NULL ? bias + p * NR : NULL;
        const int cols0 = (int)(n - p * NR < NR ? n - p * NR : NR);
        const int cols1 = two ? (int)(n - (p + 1) * NR < NR ? n - (p + 1) * NR : NR) : 0;
        for (int64_t r0 = 0; r0 < m; r0 += MR512) {
            const int rows = (int)(m - r0 < MR512 ? m - r0 : MR512);
            const float *xr = x + r0 * k;
            float *o = out + r0 * n + p * NR;
            if (two)
                block512_two(xr, k, pa, pb, bias_p, o, n, cols0, cols1, rows);
            else
                block512_one(xr, k, pa, bias_p, o, n, cols0, rows);
        }
    }
}
#else /* AVX2 */
/* One row's 16 sums (+ bias) into out: all 16 columns, or the first `cols` of a last, partial panel. */
static inline __attribute__((always_inline)) void store_row(float *o, __m256 lo, __m256 hi, const float *bias,
                                                            int cols) {
    if (bias != NULL) {
        if (cols == NR) {
            lo = _mm256_add_ps(lo, _mm256_loadu_ps(bias));
            hi = _mm256_add_ps(hi, _mm256_loadu_ps(bias + 8));
        } else {
            float b[NR] = {0};
            memcpy(b, bias, (size_t)cols * sizeof(float));
            lo = _mm256_add_ps(lo, _mm256_loadu_ps(b));
            hi = _mm256_add_ps(hi, _mm256_loadu_ps(b + 8));
        }
    }
    if (cols == NR) {
        _mm256_storeu_ps(o, lo);
        _mm256_storeu_ps(o + 8, hi);
        return;
    }
    float tmp[NR];
    _mm256_storeu_ps(tmp, lo);
    _mm256_storeu_ps(tmp + 8, hi);
    memcpy(o, tmp, (size_t)cols * sizeof(float));
}

/* block_<R>: rows x[0..R) (row stride k) against one panel b, into out (row stride n_out), `cols`
 * columns kept. R is a constant in each, so the unused accumulators and FMAs compile away and the R x 16
 * sums stay in registers. */
#define LF_DECL(r) __m256 c##r##0 = _mm256_setzero_ps(), c##r##1 = _mm256_setzero_ps();
#define LF_FMA(r)                                                   \
    if (rows > r) {                                                 \
        const __m256 a = _mm256_broadcast_ss(x + r * k + kk);       \
        c##r##0 = _mm256_fmadd_ps(a, b0, c##r##0);                  \
        c##r##1 = _mm256_fmadd_ps(a, b1, c##r##1);                  \
    }
#define LF_STORE(r) \
    if (rows > r) store_row(out + r * n_out, c##r##0, c##r##1, bias, cols);
#define LF_BLOCK(R)                                                                                          \
    static void block_##R(const float *x, int64_t k, const float *b, const float *bias, float *out,          \
                          int64_t n_out, int cols) {                                                         \
        const int rows = R;                                                                                  \
        LF_DECL(0) LF_DECL(1) LF_DECL(2) LF_DECL(3) LF_DECL(4) LF_DECL(5)                                    \
        for (int64_t kk = 0; kk < k; kk++) {                                                                 \
            const __m256 b0 = _mm256_loadu_ps(b + kk * NR), b1 = _mm256_loadu_ps(b + kk * NR + 8);           \
            LF_FMA(0) LF_FMA(1) LF_FMA(2) LF_FMA(3) LF_FMA(4) LF_FMA(5)                                      \
        }                                                                                                    \
        LF_STORE(0) LF_STORE(1) LF_STORE(2) LF_STORE(3) LF_STORE(4) LF_STORE(5)                              \
    }
LF_BLOCK(1)
LF_BLOCK(2)
LF_BLOCK(3)
LF_BLOCK(4)
LF_BLOCK(5)
LF_BLOCK(6)
#undef LF_BLOCK
#undef LF_STORE
#undef LF_FMA
#undef LF_DECL

/* Panels [p0, p1) for all m rows: per panel, every block of MR rows (the last one shorter). */
static void panels(const float *x, const float *packed, const float *bias, float *out, int64_t m, int64_t n,
                   int64_t k, int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; p++) {
        const float *b = packed + p * k * NR;
        const float *bias_p = bias != NULL ? bias + p * NR : NULL;
        const int cols = (int)(n - p * NR < NR ? n - p * NR : NR);
        for (int64_t r0 = 0; r0 < m; r0 += MR) {
            const float *xr = x + r0 * k;
            float *o = out + r0 * n + p * NR;
            switch (m - r0 < MR ? (int)(m - r0) : MR) {
            case 6: block_6(xr, k, b, bias_p, o, n, cols); break;
            case 5: block_5(xr, k, b, bias_p, o, n, cols); break;
            case 4: block_4(xr, k, b, bias_p, o, n, cols); break;
            case 3: block_3(xr, k, b, bias_p, o, n, cols); break;
            case 2: block_2(xr, k, b, bias_p, o, n, cols); break;
            default: block_1(xr, k, b, bias_p, o, n, cols); break;
            }
        }
    }
}
#endif /* LF_AVX512 */
#endif

/* out [m, n] = x [m, k] . W^T (+ bias [n], or NULL), from `packed` (lf_linear_f32_pack of W), all
 * contiguous fp32. The panels are split over up to `threads` threads (the caller's OpenMP team; one
 * without OpenMP) in contiguous ranges. Returns 0, or -1 when this library has no kernel or a size or
 * the thread count (< 1) is out of range (nothing is written then). */
int lf_linear_f32(const float *x, const float *packed, const float *bias, float *out, int64_t m, int64_t n, int64_t k,
                  int threads) {
    if (!LF_AVX2 || m < 0 || n <= 0 || k <= 0 || threads < 1) return -1;
#if LF_AVX2
    const int64_t n_panels = (n + NR - 1) / NR;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > n_panels) threads = (int)n_panels;
    if (m == 0) return 0;
#ifndef _OPENMP
    threads = 1;
#endif
    if (threads == 1) {
        panels(x, packed, bias, out, m, n, k, 0, n_panels);
    } else {
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
        {
            const int64_t t = omp_get_thread_num(), team = omp_get_num_threads();
            panels(x, packed, bias, out, m, n, k, n_panels * t / team, n_panels * (t + 1) / team);
        }
#endif
    }
#endif
    return 0;
}
