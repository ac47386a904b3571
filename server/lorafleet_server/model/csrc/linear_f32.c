/* An fp32 Linear on AVX2 + FMA: out[m, n] = x[m, k] . W[n, k]^T (+ bias), every sum in fp32.
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

#define NR 16 /* output columns per panel: two 8-lane vectors */
#define MR 6  /* rows of x per block: 12 accumulators, 2 panel vectors and a broadcast fit the 16 registers */
#define MAX_THREADS 256

/* 1 when this library has the AVX2 + FMA kernel, else 0. */
int lf_linear_f32_available(void) { return LF_AVX2; }

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
