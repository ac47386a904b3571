/* Attention of one step's tokens over the KV slab, read in place.
 *
 * Every token is a row of one query: a decoding request's new token, or token i of a prompt chunk
 * (which attends over its request's first start + i + 1 positions, its own K/V already written). Its
 * keys and values lie in its request's row of the KV slab [rows, kv_heads, max_seq_len, head_dim];
 * torch's batched matmul over a window of that slab copies the window first (its rows are strided),
 * which cost more than the matmuls themselves. This reads each row where it lies: per row and KV
 * head, the scores of the G query heads that share the KV head (one pass over the keys), an fp32
 * softmax, and the probability-weighted sum of the values (one pass over the values). Every sum is in
 * fp32; the output is rounded once to the element type.
 *
 * A row's numbers depend only on its own query, keys and values: not on the other rows, how long
 * they are, or the prompt chunk around it (what the server's batch and prefix-cache invariance need).
 *
 * A call may split its rows over threads (lf_attention's `threads`): the helper pool's (csrc/pool.c)
 * where the call passes one (the server passes the AMX Linear's), else the calling thread's OpenMP
 * team: built with -fopenmp, the library binds to the libgomp torch has loaded, so these are the
 * threads torch's ops use and keep warm (lorafleet_server/openmp.py).
 *
 * Built by lorafleet_server/model/native.py with -O3 -march=<this CPU> -fopenmp (-fopenmp-simd where
 * OpenMP does not build or load: then a call runs on its calling thread). The portable
 * path is plain C that the compiler vectorizes for whatever the CPU has (AVX2, AVX-512); where the CPU
 * has AVX-512 BF16, bf16 slabs take an intrinsics path (below), and with AMX too a row of 32 keys or
 * more takes its scores from AMX tiles (scores_amx). Called through ctypes; no Python or torch
 * headers.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* syscall() under -std=c11 */
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "amx.h"
#include "bf16.h"
#include "pool.h"

#define MAX_HEAD_DIM 256
#define MAX_GROUP 16

/* exp(x) for x <= 0 (scores minus their maximum): Cody-Waite reduction and a degree-6 polynomial
 * (Cephes' expf), ~1 ulp; branch-free, so the softmax loop vectorizes. n, the nearest integer to
 * x / ln 2, comes from the 1.5 * 2^23 trick, not floorf: GCC 12 vectorizes floorf only without
 * trapping math, and with it the loop stayed scalar (the fp32 kernel, 32 rows after 128 tokens, 30
 * layers, one thread on the AMX Xeon: 28.7-31.1 ms with floorf, 26.0-26.1 ms with this). Below -87
 * it returns ~1e-38 instead of denormals or 0: the weight of such a key is below fp32's resolution of
 * the sum anyway. */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(x / ln 2) */
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float y = p * r * r + r + 1.0f;
    const uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}

/* One row and KV head: q [G, D] (already fp32), keys and values [n, D], scores scratch [G, n],
 * out [G, D] fp32. */
static inline void attend_head(const float *q, const void *keys, const void *values, int bf16, int64_t n,
                               int g_count, int d, float scale, float *scores, float *out) {
    float kf[MAX_HEAD_DIM];
    for (int64_t l = 0; l < n; l++) {
        if (bf16) {
            const uint16_t *k = (const uint16_t *)keys + l * d;
#pragma omp simd
            for (int i = 0; i < d; i++) kf[i] = bf16_to_f32(k[i]);
        } else {
            memcpy(kf, (const float *)keys + l * d, (size_t)d * sizeof(float));
        }
        for (int g = 0; g < g_count; g++) {
            const float *qg = q + g * d;
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (int i = 0; i < d; i++) acc += qg[i] * kf[i];
            scores[g * n + l] = acc * scale;
        }
    }
    float inv_sum[MAX_GROUP];
    for (int g = 0; g < g_count; g++) {
        float *s = scores + g * n;
        float m = -INFINITY;
        for (int64_t l = 0; l < n; l++) m = s[l] > m ? s[l] : m;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t l = 0; l < n; l++) {
            s[l] = exp_nonpositive(s[l] - m);
            sum += s[l];
        }
        inv_sum[g] = 1.0f / sum;
    }
    memset(out, 0, (size_t)g_count * (size_t)d * sizeof(float));
    for (int64_t l = 0; l < n; l++) {
        if (bf16) {
            const uint16_t *v = (const uint16_t *)values + l * d;
#pragma omp simd
            for (int i = 0; i < d; i++) kf[i] = bf16_to_f32(v[i]);
        } else {
            memcpy(kf, (const float *)values + l * d, (size_t)d * sizeof(float));
        }
        for (int g = 0; g < g_count; g++) {
            float p = scores[g * n + l];
            float *og = out + g * d;
#pragma omp simd
            for (int i = 0; i < d; i++) og[i] += p * kf[i];
        }
    }
    for (int g = 0; g < g_count; g++) {
        float *og = out + g * d;
#pragma omp simd
        for (int i = 0; i < d; i++) og[i] *= inv_sum[g];
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define LF_AVX512_BF16 1

/* The AVX-512 BF16 path for bf16 slabs whose head_dim is a multiple of 32: q . k with vdpbf16ps on the
 * bf16 values as they are (products exact in fp32, fp32 sums), so a key costs ~a dozen instructions
 * where the portable loop above takes ~120 (its conversion and horizontal sums). */

static inline __m512 bf16x16_to_f32(const uint16_t *p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

/* exp_nonpositive on 16 lanes (the same polynomial; n = floor(x / ln 2 + 0.5), scalef applies 2^n). */
static inline __m512 exp16_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                    _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(y, n);
}

static inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u); }

/* f32_to_bf16 on 16 lanes, the result kept widened to fp32 (what bf16_round gives): round to nearest
 * even by integer adds, NaN kept NaN (quiet) as f32_to_bf16 keeps it; no DAZ/FTZ (vcvtneps2bf16
 * flushes denormals, so it is not used where the scalar path's bits must be met). */
static inline __m512 round16_bf16(__m512 f) {
    const __m512i u = _mm512_castps_si512(f);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    const __mmask16 nan =
        _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
    return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32((int)0xffff0000u)));
}

/* 16 values already rounded to bf16 (round16_bf16's), stored as bf16 */
static inline void store16_bf16(uint16_t *p, __m512 rounded) {
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(rounded), 16)));
}

/* Lane j of the result is the sum of the 16 lanes of a[j]: a transposing tree (30 shuffles, 15 adds
 * for 16 sums, against 8 shuffles per sum one at a time; shuffles have one port). Every j is summed
 * in the same order. */
static inline __m512 sum_lanes16(const __m512 a[16]) {
    __m512 t[8], u[4];
    for (int i = 0; i < 8; i++) /* per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] of a = a[2i], b = a[2i+1] */
        t[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++) { /* per 128-bit lane: the lane's partial sum of a[4i .. 4i+3] */
        __m512d x = _mm512_castps_pd(t[2 * i]), y = _mm512_castps_pd(t[2 * i + 1]);
        u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    /* fold the four 128-bit lanes: [u0.0+u0.1, u0.2+u0.3, u1.0+u1.1, u1.2+u1.3], then once more */
    __m512 v0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xdd));
    __m512 v1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xdd));
    return _mm512_add_ps(_mm512_shuffle_f32x4(v0, v1, 0x88), _mm512_shuffle_f32x4(v0, v1, 0xdd));
}

#if LF_BUILD_AMX
#define LF_AMX_SCORES 1
#define AMX_MAX_D 128   /* head_dim the AMX scores take: four 32-wide k steps */
#define AMX_MIN_KEYS 32 /* rows with fewer keys keep the AVX-512 loop: the tiles' setup outweighs it */

/* Tile 0: 16 keys x 16 query heads of fp32 scores; 1: 16 keys x 32 dims of K (A); 2-5: q transposed,
 * 32 dims (16 pairs) x 16 heads per k step (B). Set on the thread that computes, before its rows, and
 * released after them: on the Linears' pool and on torch's OpenMP threads alike, no tile state is
 * kept across calls (the AMX Linear and oneDNN configure their own per call). */
static void amx_configure(void) {
    lf_tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 6; t++) {
        c.rows[t] = 16;
        c.colsb[t] = 64;
    }
    _tile_loadconfig(&c);
}

/* scores [G, n] = scale * q [G, D] . keys [n, D]^T for one row and KV head on AMX: per 16 keys one
 * tdpbf16ps per 32 dims computes all G heads at once (keys as the A tile, q as B with its pairs of
 * dims interleaved, columns past G zero), where the AVX-512 loop sums each head's 16 products per key
 * across lanes. Each score is one fp32 sum of the bf16 products in the tile unit's order (not the
 * AVX-512 loop's). Keys past the row's end are not read: the last block is copied, zero-padded. */
static void scores_amx(const uint16_t *q, const uint16_t *keys, int64_t n, int G, int D, float scale,
                       float *scores) {
    uint32_t qb[AMX_MAX_D / 32][16][16] __attribute__((aligned(64))); /* [k step][dim pair][head] */
    uint16_t tail[16 * AMX_MAX_D] __attribute__((aligned(64)));
    float c[16][16] __attribute__((aligned(64))); /* [key][head] */
    const int steps = D / 32;
    memset(qb, 0, (size_t)steps * sizeof qb[0]);
    for (int g = 0; g < G; g++)
        for (int ks = 0; ks < steps; ks++)
            for (int r = 0; r < 16; r++) memcpy(&qb[ks][r][g], q + g * D + 32 * ks + 2 * r, sizeof(uint32_t));
    _tile_loadd(2, qb[0], 64);
    if (steps > 1) _tile_loadd(3, qb[1], 64);
    if (steps > 2) _tile_loadd(4, qb[2], 64);
    if (steps > 3) _tile_loadd(5, qb[3], 64);
    const __m512 vscale = _mm512_set1_ps(scale);
    const __m512i across = _mm512_set_epi32(240, 224, 208, 192, 176, 160, 144, 128, 112, 96, 80, 64, 48, 32, 16, 0);
    const long stride = (long)D * 2;
    for (int64_t l0 = 0; l0 < n; l0 += 16) {
        const int m = n - l0 < 16 ? (int)(n - l0) : 16;
        const uint16_t *kb = keys + l0 * D;
        if (m < 16) {
            memcpy(tail, kb, (size_t)m * (size_t)D * 2);
            memset(tail + m * D, 0, (size_t)(16 - m) * (size_t)D * 2);
            kb = tail;
        }
        _tile_zero(0);
        _tile_loadd(1, kb, stride);
        _tile_dpbf16ps(0, 1, 2);
        if (steps > 1) {
            _tile_loadd(1, kb + 32, stride);
            _tile_dpbf16ps(0, 1, 3);
        }
        if (steps > 2) {
            _tile_loadd(1, kb + 64, stride);
            _tile_dpbf16ps(0, 1, 4);
        }
        if (steps > 3) {
            _tile_loadd(1, kb + 96, stride);
            _tile_dpbf16ps(0, 1, 5);
        }
        _tile_stored(0, c, 64);
        const __mmask16 mask = tail_mask(m);
        for (int g = 0; g < G; g++) {
            const __m512 col = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, across, &c[0][g], 4);
            _mm512_mask_storeu_ps(scores + g * n + l0, mask, _mm512_mul_ps(col, vscale));
        }
    }
}
#endif

/* One row and KV head: q [G, D] bf16, keys and values [n, D] bf16, scores scratch [G, n], out [G, D]
 * fp32. G and D are constants at every call site, so the accumulators stay in registers; amx (a
 * constant too): the scores on AMX (scores_amx), on a thread whose tiles amx_configure set. */
static inline void attend_head_avx512(const uint16_t *q, const uint16_t *keys, const uint16_t *values, int64_t n,
                                      const int G, const int D, float scale, float *scores, float *out,
                                      const int amx) {
#ifdef LF_AMX_SCORES
    const int on_amx = amx;
    if (on_amx) scores_amx(q, keys, n, G, D, scale, scores);
#else
    const int on_amx = 0; /* a build without AMX computes every score below */
    (void)amx;
#endif
    /* scores: 16 keys at a time per query head, each an fp32 vector of pair products, summed across */
    for (int g = 0; g < G && !on_amx; g++) {
        __m512bh qv[MAX_HEAD_DIM / 32];
        for (int c = 0; c < D / 32; c++) qv[c] = (__m512bh)_mm512_loadu_si512(q + g * D + 32 * c);
        for (int64_t l0 = 0; l0 < n; l0 += 16) {
            const int m = n - l0 < 16 ? (int)(n - l0) : 16;
            __m512 acc[16];
            for (int j = 0; j < 16; j++) {
                acc[j] = _mm512_setzero_ps();
                if (j < m) { /* keys past the row's end are not read (they may lie past the slab) */
                    const uint16_t *k = keys + (l0 + j) * D;
                    for (int c = 0; c < D / 32; c++)
                        acc[j] = _mm512_dpbf16_ps(acc[j], qv[c], (__m512bh)_mm512_loadu_si512(k + 32 * c));
                }
            }
            __m512 sc = _mm512_mul_ps(sum_lanes16(acc), _mm512_set1_ps(scale));
            _mm512_mask_storeu_ps(scores + g * n + l0, tail_mask(m), sc);
        }
    }
    float inv_sum[MAX_GROUP];
    for (int g = 0; g < G; g++) {
        float *s = scores + g * n;
        __m512 vmax = _mm512_set1_ps(-INFINITY);
        for (int64_t l = 0; l < n; l += 16)
            vmax = _mm512_mask_max_ps(vmax, tail_mask(n - l), vmax, _mm512_maskz_loadu_ps(tail_mask(n - l), s + l));
        __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
        __m512 vsum = _mm512_setzero_ps();
        for (int64_t l = 0; l < n; l += 16) {
            __mmask16 mask = tail_mask(n - l);
            __m512 e = exp16_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, s + l), m));
            _mm512_mask_storeu_ps(s + l, mask, e);
            vsum = _mm512_mask_add_ps(vsum, mask, vsum, e);
        }
        inv_sum[g] = 1.0f / _mm512_reduce_add_ps(vsum);
    }
    /* values, 32 dims at a time: 32 bf16 load as 16 even and 16 odd fp32 lanes (a shift and a mask,
     * no shuffle); the sums are kept split that way and interleaved back at the end */
    const __m512i high_half = _mm512_set1_epi32((int)0xffff0000u);
    const __m512i lo_idx = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i hi_idx = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    for (int c = 0; c < D / 32; c++) {
        __m512 even[MAX_GROUP], odd[MAX_GROUP];
        for (int g = 0; g < G; g++) even[g] = odd[g] = _mm512_setzero_ps();
        const uint16_t *v = values + 32 * c;
        for (int64_t l = 0; l < n; l++) {
            __m512i x = _mm512_loadu_si512(v + l * D);
            __m512 ve = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
            __m512 vo = _mm512_castsi512_ps(_mm512_and_si512(x, high_half));
            for (int g = 0; g < G; g++) {
                __m512 p = _mm512_set1_ps(scores[g * n + l]);
                even[g] = _mm512_fmadd_ps(p, ve, even[g]);
                odd[g] = _mm512_fmadd_ps(p, vo, odd[g]);
            }
        }
        for (int g = 0; g < G; g++) {
            __m512 inv = _mm512_set1_ps(inv_sum[g]);
            __m512 e = _mm512_mul_ps(even[g], inv), o = _mm512_mul_ps(odd[g], inv);
            _mm512_storeu_ps(out + g * D + 32 * c, _mm512_permutex2var_ps(e, lo_idx, o));
            _mm512_storeu_ps(out + g * D + 32 * c + 16, _mm512_permutex2var_ps(e, hi_idx, o));
        }
    }
}

/* attend_head_avx512 with G and D as constants for the common shapes (head_dim 64 or 128, up to 8
 * query heads per KV head), and as variables otherwise. */
static void attend_head_avx512_any(const uint16_t *q, const uint16_t *keys, const uint16_t *values, int64_t n, int g,
                                   int d, float scale, float *scores, float *out, int amx) {
#define LF_CASE(G, D)                                                          \
    if (g == (G) && d == (D)) {                                                \
        if (amx)                                                               \
            attend_head_avx512(q, keys, values, n, G, D, scale, scores, out, 1); \
        else                                                                   \
            attend_head_avx512(q, keys, values, n, G, D, scale, scores, out, 0); \
        return;                                                                \
    }
#define LF_CASES(D) \
    LF_CASE(1, D); LF_CASE(2, D); LF_CASE(3, D); LF_CASE(4, D); LF_CASE(5, D); LF_CASE(6, D); LF_CASE(7, D); LF_CASE(8, D)
    LF_CASES(64);
    LF_CASES(128);
#undef LF_CASES
#undef LF_CASE
    attend_head_avx512(q, keys, values, n, g, d, scale, scores, out, amx);
}
#endif

/* Asks for the keys and values of the pair after (row b, KV head kh) to be brought into L2 while
 * (b, kh) is computed: each pair's are one contiguous run per slab, but the hardware prefetcher stops
 * at every 4 KB page, and a decode step reads ~3 MB of K/V per layer from DRAM (32 rows after 128
 * tokens: the kernel went 21.9 -> 18.6 ms per 30 layers, bf16 on an Intel Xeon with AMX). Up to
 * PREFETCH_MAX bytes per slab. For bf16 slabs only: on a 2-core AVX2 AMD EPYC the fp32 kernel was
 * ~1.15x faster without it (32 rows after 100 and 300 tokens, 30 layers, two threads: 10.7 -> 9.0 and
 * 28.7 -> 24.9 ms; the burst competes with the loads of the pair at hand, and a stream prefetch a few
 * keys ahead gained nothing over the hardware's). always_inline: as a function of its own, GCC 12
 * finds it free of side effects and drops the call. */
#define PREFETCH_MAX (64 * 1024)
static inline __attribute__((always_inline)) void prefetch_next(const void *k_slab, const void *v_slab, const int64_t *kv_row, const int64_t *len,
                                 int64_t count, int64_t b, int64_t kh, int64_t kv_heads, int64_t max_seq_len,
                                 int64_t head_dim, size_t elem) {
    const int64_t nb = kh + 1 < kv_heads ? b : b + 1, nkh = kh + 1 < kv_heads ? kh + 1 : 0;
    if (nb >= count) return;
    const size_t off = (size_t)((kv_row[nb] * kv_heads + nkh) * max_seq_len * head_dim) * elem;
    size_t bytes = (size_t)len[nb] * (size_t)head_dim * elem;
    if (bytes > PREFETCH_MAX) bytes = PREFETCH_MAX;
    for (size_t o = 0; o < bytes; o += 64) {
        __builtin_prefetch((const char *)k_slab + off + o, 0, 2);
        __builtin_prefetch((const char *)v_slab + off + o, 0, 2);
    }
}

/* The rows [b0, b1) of lf_attention (below), with `scores` scratch for g_count x the longest of them. */
static void attend_rows(const void *q, const void *k_slab, const void *v_slab, void *out, const int64_t *tok,
                        const int64_t *kv_row, const int64_t *len, int64_t b0, int64_t b1, int64_t heads,
                        int64_t kv_heads, int64_t max_seq_len, int64_t head_dim, float scale, int bf16, float *scores) {
    const int g_count = (int)(heads / kv_heads);
    const int d = (int)head_dim;
    const size_t elem = bf16 ? sizeof(uint16_t) : sizeof(float);
    float qf[MAX_GROUP * MAX_HEAD_DIM];
    float of[MAX_GROUP * MAX_HEAD_DIM];
#ifdef LF_AMX_SCORES
    const int amx_allowed = bf16 && d % 32 == 0 && d <= AMX_MAX_D && lf_amx_permitted();
    int amx_set = 0; /* the tiles are configured on this thread */
#endif
    for (int64_t b = b0; b < b1; b++) {
#ifdef LF_AMX_SCORES
        const int amx = amx_allowed && len[b] >= AMX_MIN_KEYS;
        if (amx && !amx_set) {
            amx_configure();
            amx_set = 1;
        }
#else
        const int amx = 0;
#endif
        (void)amx;
        for (int64_t kh = 0; kh < kv_heads; kh++) {
            const int64_t head0 = kh * g_count;
            const size_t q_off = (size_t)((tok[b] * heads + head0) * head_dim);
            const int gd = g_count * d;
            const size_t kv_off = (size_t)((kv_row[b] * kv_heads + kh) * max_seq_len * head_dim) * elem;
            const void *keys = (const char *)k_slab + kv_off;
            const void *values = (const char *)v_slab + kv_off;
            if (bf16) prefetch_next(k_slab, v_slab, kv_row, len, b1, b, kh, kv_heads, max_seq_len, head_dim, elem);
#ifdef LF_AVX512_BF16
            if (bf16 && d % 32 == 0) {
                attend_head_avx512_any((const uint16_t *)q + q_off, keys, values, len[b], g_count, d, scale, scores, of,
                                       amx);
                uint16_t *ob = (uint16_t *)out + q_off;
#pragma omp simd
                for (int i = 0; i < gd; i++) ob[i] = f32_to_bf16(of[i]);
                continue;
            }
#endif
            if (bf16) {
                const uint16_t *qb = (const uint16_t *)q + q_off;
#pragma omp simd
                for (int i = 0; i < gd; i++) qf[i] = bf16_to_f32(qb[i]);
            } else {
                memcpy(qf, (const float *)q + q_off, (size_t)gd * sizeof(float));
            }
            /* constant arguments let the compiler specialize the common shapes */
            if (bf16 && d == 64)
                attend_head(qf, keys, values, 1, len[b], g_count, 64, scale, scores, of);
            else if (bf16)
                attend_head(qf, keys, values, 1, len[b], g_count, d, scale, scores, of);
            else if (d == 64)
                attend_head(qf, keys, values, 0, len[b], g_count, 64, scale, scores, of);
            else
                attend_head(qf, keys, values, 0, len[b], g_count, d, scale, scores, of);
            if (bf16) {
                uint16_t *ob = (uint16_t *)out + q_off;
#pragma omp simd
                for (int i = 0; i < gd; i++) ob[i] = f32_to_bf16(of[i]);
            } else {
                memcpy((float *)out + q_off, of, (size_t)gd * sizeof(float));
            }
        }
    }
#ifdef LF_AMX_SCORES
    if (amx_set) _tile_release(); /* no tile state left for the OS to save */
#endif
}

/* 1 where rows of AMX_MIN_KEYS keys or more take their scores from AMX tiles (a build for a CPU with
 * AMX, in a process Linux grants the tiles), else 0. */
int lf_attention_amx(void) {
#ifdef LF_AMX_SCORES
    return lf_amx_permitted();
#else
    return 0;
#endif
}

/* 1 where this build splits a call over OpenMP threads (built with OpenMP), else 0. */
int lf_attention_threaded(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* A call's rows on the helper pool (csrc/pool.c): unit u is rows [bounds[u], bounds[u + 1]). */
typedef struct {
    const void *q, *k_slab, *v_slab;
    void *out;
    const int64_t *tok, *kv_row, *len, *bounds;
    int64_t heads, kv_heads, max_seq_len, head_dim;
    float scale;
    int bf16;
    float *scores; /* per unit: per_unit floats */
    size_t per_unit;
} attention_call;

static void attention_unit(void *ctx, int64_t unit) {
    const attention_call *c = ctx;
    attend_rows(c->q, c->k_slab, c->v_slab, c->out, c->tok, c->kv_row, c->len, c->bounds[unit], c->bounds[unit + 1],
                c->heads, c->kv_heads, c->max_seq_len, c->head_dim, c->scale, c->bf16,
                c->scores + (size_t)unit * c->per_unit);
}

/* q and out: [tokens, heads, head_dim]; k_slab and v_slab: [kv_rows, kv_heads, max_seq_len, head_dim],
 * all contiguous, of one element type (bf16 = 1: bfloat16, else float32). For each of the `count`
 * rows b: its query is token tok[b] of q, it attends over positions [0, len[b]) of KV row
 * kv_row[b], and its output goes to token tok[b] of out. The rows are split into contiguous ranges of
 * about equal key counts (no more ranges than rows, nor than the keys allow at MIN_KEYS_PER_THREAD a
 * range on average; a range may be empty): on the helper pool whose lf_pool_run is `pool_run` where
 * it is not NULL (the server passes the AMX Linear's pool), UNITS_PER_THREAD ranges for each of
 * `threads` (a helper that comes late leaves its share to the others), else one range for each thread
 * of the caller's OpenMP team of `threads` (one thread without OpenMP). A row's numbers are the same
 * whichever thread computes it. Returns 0, or -1 when a size, index or thread
 * count (< 1) is out of range or scratch memory cannot be had (nothing is written then). */
#define MIN_KEYS_PER_THREAD 256
#define MAX_THREADS 256
#define UNITS_PER_THREAD 2
int lf_attention(const void *q, const void *k_slab, const void *v_slab, void *out, const int64_t *tok,
                 const int64_t *kv_row, const int64_t *len, int64_t count, int64_t tokens, int64_t kv_rows,
                 int64_t heads, int64_t kv_heads, int64_t max_seq_len, int64_t head_dim, float scale, int bf16,
                 int threads, lf_pool_run_fn pool_run) {
    if (heads <= 0 || kv_heads <= 0 || heads % kv_heads != 0 || head_dim <= 0 || head_dim > MAX_HEAD_DIM ||
        heads / kv_heads > MAX_GROUP || count < 0 || threads < 1)
        return -1;
    int64_t longest = 0, keys = 0;
    for (int64_t b = 0; b < count; b++) {
        if (len[b] <= 0 || len[b] > max_seq_len || tok[b] < 0 || tok[b] >= tokens || kv_row[b] < 0 ||
            kv_row[b] >= kv_rows)
            return -1;
        longest = len[b] > longest ? len[b] : longest;
        keys += len[b];
    }
    const int pooled = threads > 1 && pool_run != NULL;
    int64_t ranges = pooled ? (int64_t)threads * UNITS_PER_THREAD : threads;
    if (ranges > MAX_THREADS) ranges = MAX_THREADS;
    if (ranges * MIN_KEYS_PER_THREAD > keys) ranges = keys / MIN_KEYS_PER_THREAD;
    if (ranges > count) ranges = count;
    if (ranges < 1) ranges = 1;
#ifndef _OPENMP
    if (!pooled) ranges = 1;
#endif
    const size_t per_range = (size_t)(heads / kv_heads) * (size_t)(longest > 0 ? longest : 1);
    float *scores = malloc((size_t)ranges * per_range * sizeof(float));
    if (scores == NULL) return -1;
    if (ranges == 1) {
        attend_rows(q, k_slab, v_slab, out, tok, kv_row, len, 0, count, heads, kv_heads, max_seq_len, head_dim,
                    scale, bf16, scores);
        free(scores);
        return 0;
    }
    /* bounds[r] = the first row of range r: where the running key count passes r/ranges of all */
    int64_t bounds[MAX_THREADS + 1];
    int64_t seen = 0, b = 0;
    for (int64_t r = 0; r < ranges; r++) {
        const int64_t target = keys * r / ranges;
        while (b < count && seen + len[b] <= target) seen += len[b++];
        bounds[r] = b;
    }
    bounds[ranges] = count;
    if (pooled) {
        attention_call c = {q,     k_slab, v_slab, out,    tok,    kv_row,    len,      bounds,
                            heads, kv_heads, max_seq_len, head_dim, scale, bf16, scores, per_range};
        pool_run(attention_unit, &c, ranges, threads);
    } else {
#ifdef _OPENMP
#pragma omp parallel num_threads((int)ranges)
        {
            /* OpenMP may start fewer threads than asked (OMP_DYNAMIC, OMP_THREAD_LIMIT, a nested
             * region): each thread of the team it got takes every team-th range, so none is skipped */
            const int team = omp_get_num_threads();
            for (int64_t r = omp_get_thread_num(); r < ranges; r += team)
                attend_rows(q, k_slab, v_slab, out, tok, kv_row, len, bounds[r], bounds[r + 1], heads, kv_heads,
                            max_seq_len, head_dim, scale, bf16, scores + (size_t)r * per_range);
        }
#endif
    }
    free(scores);
    return 0;
}

/* ---- The rest of an fp32 decoder layer's glue around the attention (model/runner.py uses these where
 * it runs this kernel in fp32): rotary embedding with the K/V write, and RMSNorm with the residual add.
 * Each replaces ~5-10 small torch ops per layer (~15 ms of a 32-row decode step's ~88 ms went to such
 * ops), and each row is computed alone, so a row's numbers do not depend on the step. */

/* RoPE as transformers' Llama applies it, x * cos + rotate_half(x) * sin with rotate_half(x) =
 * (-x[D/2:], x[:D/2]): each product and the sum rounded on its own (no FMA contraction), so the
 * result is torch's bit for bit. In bf16 each rounding is to bf16, as torch's bf16 ops round each
 * result (computed in fp32) to nearest even. */
#if defined(__clang__)
#define LF_NO_CONTRACT
#else
#define LF_NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#endif
static LF_NO_CONTRACT void rope_row(const float *x, const float *cos, const float *sin, int64_t d, float *out) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
    const int64_t half = d / 2;
    for (int64_t i = 0; i < half; i++) {
        const float a = x[i] * cos[i];
        const float b = -x[i + half] * sin[i];
        out[i] = a + b;
    }
    for (int64_t i = half; i < d; i++) {
        const float a = x[i] * cos[i];
        const float b = x[i - half] * sin[i];
        out[i] = a + b;
    }
}

/* A value rounded to bf16 and back: what a torch bf16 op leaves for the next one. */
static inline float bf16_round(float f) { return bf16_to_f32(f32_to_bf16(f)); }

static LF_NO_CONTRACT void rope_row_bf16(const uint16_t *x, const uint16_t *cos, const uint16_t *sin, int64_t d,
                                         uint16_t *out) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
    const int64_t half = d / 2;
    for (int64_t i = 0; i < half; i++) {
        const float a = bf16_round(bf16_to_f32(x[i]) * bf16_to_f32(cos[i]));
        const float b = bf16_round(-bf16_to_f32(x[i + half]) * bf16_to_f32(sin[i]));
        out[i] = f32_to_bf16(a + b);
    }
    for (int64_t i = half; i < d; i++) {
        const float a = bf16_round(bf16_to_f32(x[i]) * bf16_to_f32(cos[i]));
        const float b = bf16_round(bf16_to_f32(x[i - half]) * bf16_to_f32(sin[i]));
        out[i] = f32_to_bf16(a + b);
    }
}

#ifdef LF_AVX512_BF16
/* rope_row_bf16 16 lanes at a time, for d a multiple of 32: the same products, sums and roundings
 * (-x is a sign flip, as the scalar negation is), so the same bits wherever the result is a number (a
 * NaN stays NaN; its sign and payload may differ). Each chunk reads x[i..i+15] and x[half+i..] before
 * it writes out at the same places, so out may be x. */
static void rope_row_bf16_avx512(const uint16_t *x, const uint16_t *cos, const uint16_t *sin, int64_t d,
                                 uint16_t *out) {
    const int64_t half = d / 2;
    const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32((int)0x80000000u));
    for (int64_t i = 0; i < half; i += 16) {
        const __m512 lo = bf16x16_to_f32(x + i), hi = bf16x16_to_f32(x + half + i);
        const __m512 a_lo = round16_bf16(_mm512_mul_ps(lo, bf16x16_to_f32(cos + i)));
        const __m512 b_lo = round16_bf16(_mm512_mul_ps(_mm512_xor_ps(hi, sign), bf16x16_to_f32(sin + i)));
        const __m512 a_hi = round16_bf16(_mm512_mul_ps(hi, bf16x16_to_f32(cos + half + i)));
        const __m512 b_hi = round16_bf16(_mm512_mul_ps(lo, bf16x16_to_f32(sin + half + i)));
        store16_bf16(out + i, round16_bf16(_mm512_add_ps(a_lo, b_lo)));
        store16_bf16(out + half + i, round16_bf16(_mm512_add_ps(a_hi, b_hi)));
    }
}
#endif

/* rope_row_bf16 of x into out, which may be x: 16 lanes at a time where the CPU has AVX-512 BF16 and
 * d is a multiple of 32, else the scalar row (through a copy where out is x). */
static void rope_bf16_into(const uint16_t *x, const uint16_t *cos, const uint16_t *sin, int64_t d, uint16_t *out) {
#ifdef LF_AVX512_BF16
    if (d % 32 == 0) {
        rope_row_bf16_avx512(x, cos, sin, d, out);
        return;
    }
#endif
    if (out != x) {
        rope_row_bf16(x, cos, sin, d, out);
        return;
    }
    uint16_t tmp[MAX_HEAD_DIM];
    rope_row_bf16(x, cos, sin, d, tmp);
    memcpy(out, tmp, (size_t)d * sizeof(uint16_t));
}

/* The glue's calls split their tokens into lf_pool_units ranges (at least GLUE_MIN_TOKENS tokens a
 * range) on the helper pool; without a pool they run on the calling thread. */
#define GLUE_MIN_TOKENS 4

static int64_t glue_units(int64_t n, int threads, lf_pool_run_fn pool_run) {
    return pool_run == NULL || threads <= 1 ? 1 : lf_pool_units(n, threads, GLUE_MIN_TOKENS);
}

typedef struct {
    void *q;
    const void *k, *v, *cos, *sin;
    void *k_slab, *v_slab;
    const int64_t *kv_row, *pos;
    int64_t n, heads, kv_heads, head_dim, max_seq_len, units;
    int bf16;
} rope_call;

/* Tokens [t0, t1) of lf_rope_kv. */
static void rope_tokens(const rope_call *c, int64_t t0, int64_t t1) {
    const int64_t heads = c->heads, kv_heads = c->kv_heads, head_dim = c->head_dim, max_seq_len = c->max_seq_len;
    const int bf16 = c->bf16;
    const size_t el = bf16 ? sizeof(uint16_t) : sizeof(float);
    /* The slab lines this call writes are far apart and, after a step's weights streamed through the
     * caches, in none of them: ask for them all first, so their misses overlap the RoPE arithmetic
     * instead of stalling each row's stores in turn. */
    for (int64_t t = t0; t < t1; t++)
        for (int64_t h = 0; h < kv_heads; h++) {
            const size_t at = (size_t)(((c->kv_row[t] * kv_heads + h) * max_seq_len + c->pos[t]) * head_dim) * el;
            for (size_t b = 0; b < (size_t)head_dim * el; b += 64) {
                __builtin_prefetch((char *)c->k_slab + at + b, 1, 3);
                __builtin_prefetch((char *)c->v_slab + at + b, 1, 3);
            }
        }
    float tmp[MAX_HEAD_DIM];
    for (int64_t t = t0; t < t1; t++) {
        const int64_t at_c = t * head_dim;
        for (int64_t h = 0; h < heads; h++) {
            const int64_t at = (t * heads + h) * head_dim;
            if (bf16) {
                rope_bf16_into((const uint16_t *)c->q + at, (const uint16_t *)c->cos + at_c,
                               (const uint16_t *)c->sin + at_c, head_dim, (uint16_t *)c->q + at);
            } else {
                rope_row((const float *)c->q + at, (const float *)c->cos + at_c, (const float *)c->sin + at_c,
                         head_dim, tmp);
                memcpy((float *)c->q + at, tmp, (size_t)head_dim * el);
            }
        }
        for (int64_t h = 0; h < kv_heads; h++) {
            const int64_t from = (t * kv_heads + h) * head_dim;
            const size_t at = (size_t)(((c->kv_row[t] * kv_heads + h) * max_seq_len + c->pos[t]) * head_dim);
            if (bf16) {
                rope_bf16_into((const uint16_t *)c->k + from, (const uint16_t *)c->cos + at_c,
                               (const uint16_t *)c->sin + at_c, head_dim, (uint16_t *)c->k_slab + at);
                memcpy((uint16_t *)c->v_slab + at, (const uint16_t *)c->v + from, (size_t)head_dim * el);
            } else {
                rope_row((const float *)c->k + from, (const float *)c->cos + at_c, (const float *)c->sin + at_c,
                         head_dim, (float *)c->k_slab + at);
                memcpy((float *)c->v_slab + at, (const float *)c->v + from, (size_t)head_dim * el);
            }
        }
    }
}

static void rope_unit(void *ctx, int64_t unit) {
    const rope_call *c = ctx;
    rope_tokens(c, c->n * unit / c->units, c->n * (unit + 1) / c->units);
}

/* One step's rotary embedding and K/V write, fp32 (bf16 == 0) or bf16 (bf16 == 1, every tensor bf16):
 * for each token t < n, q[t] [heads, D] is rotated in place; k[t] [kv_heads, D] rotated and v[t]
 * copied to positions pos[t] of KV row kv_row[t] of the slabs [kv_rows, kv_heads, max_seq_len, D];
 * cos and sin [n, D]. On `threads` threads of the helper pool `pool_run` where it is not NULL, else
 * on the calling thread. Returns 0, or -1 when a size or index is out of range (nothing is written
 * then). */
int lf_rope_kv(void *q, const void *k, const void *v, const void *cos, const void *sin, void *k_slab, void *v_slab,
               const int64_t *kv_row, const int64_t *pos, int64_t n, int64_t heads, int64_t kv_heads, int64_t head_dim,
               int64_t kv_rows, int64_t max_seq_len, int bf16, int threads, lf_pool_run_fn pool_run) {
    if (n < 0 || heads <= 0 || kv_heads <= 0 || head_dim <= 0 || head_dim % 2 != 0 || head_dim > MAX_HEAD_DIM ||
        threads < 1)
        return -1;
    for (int64_t t = 0; t < n; t++)
        if (kv_row[t] < 0 || kv_row[t] >= kv_rows || pos[t] < 0 || pos[t] >= max_seq_len) return -1;
    const int64_t units = glue_units(n, threads, pool_run);
    rope_call c = {q,     k,        v,        cos,         sin,   k_slab, v_slab, kv_row, pos,
                   n,     heads,    kv_heads, head_dim,    max_seq_len, units, bf16};
    if (units == 1)
        rope_tokens(&c, 0, n);
    else
        pool_run(rope_unit, &c, units, threads);
    return 0;
}

/* The sum of squares of a row in fp32, in a fixed order (eight lanes, then summed pairwise), not
 * torch's: a row's RMSNorm agrees with transformers' to fp32 rounding, not bit for bit. */
static inline float sum_lanes(const float *lanes) {
    return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

static inline float sum_squares(const float *x, int64_t d) {
    float lanes[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= d; i += 8)
        for (int l = 0; l < 8; l++) lanes[l] += x[i + l] * x[i + l];
    for (; i < d; i++) lanes[i % 8] += x[i] * x[i];
    return sum_lanes(lanes);
}

static inline float sum_squares_bf16(const uint16_t *x, int64_t d) {
    float lanes[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= d; i += 8)
        for (int l = 0; l < 8; l++) {
            const float v = bf16_to_f32(x[i + l]);
            lanes[l] += v * v;
        }
    for (; i < d; i++) {
        const float v = bf16_to_f32(x[i]);
        lanes[i % 8] += v * v;
    }
    return sum_lanes(lanes);
}

typedef struct {
    void *x;
    const void *delta, *w;
    void *out;
    int64_t n, d, units;
    float eps;
    int bf16;
} norm_call;

#ifdef LF_AVX512_BF16
/* norm_rows' bf16 row 16 lanes at a time, for d a multiple of 16: the same add, the same sum of
 * squares (eight lanes, each a chain of fused multiply-adds in element order, as GCC contracts
 * sum_squares_bf16's `lanes[l] += v * v`; a bf16 value's square is exact in fp32, so fused or not is
 * the same; then sum_lanes) and the same roundings: the same bits wherever the result is a number. */
static void norm_row_bf16_avx512(uint16_t *xt, const uint16_t *dt, const uint16_t *wt, uint16_t *ot, int64_t d,
                                 float eps) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < d; i += 16) {
        __m512 v = bf16x16_to_f32(xt + i);
        if (dt != NULL) {
            v = round16_bf16(_mm512_add_ps(v, bf16x16_to_f32(dt + i)));
            store16_bf16(xt + i, v);
        }
        const __m256 lo = _mm512_castps512_ps256(v), hi = _mm512_extractf32x8_ps(v, 1);
        acc = _mm256_fmadd_ps(lo, lo, acc);
        acc = _mm256_fmadd_ps(hi, hi, acc);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, acc);
    const __m512 r = _mm512_set1_ps(1.0f / sqrtf(sum_lanes(lanes) / (float)d + eps));
    for (int64_t j = 0; j < d; j += 16) {
        const __m512 normed = round16_bf16(_mm512_mul_ps(bf16x16_to_f32(xt + j), r));
        store16_bf16(ot + j, round16_bf16(_mm512_mul_ps(bf16x16_to_f32(wt + j), normed)));
    }
}
#endif

/* Rows [t0, t1) of lf_add_rmsnorm. */
static void norm_rows(const norm_call *c, int64_t t0, int64_t t1) {
    const int64_t d = c->d;
    const float eps = c->eps;
    for (int64_t t = t0; t < t1; t++) {
#ifdef LF_AVX512_BF16
        if (c->bf16 && d % 16 == 0) {
            norm_row_bf16_avx512((uint16_t *)c->x + t * d, c->delta == NULL ? NULL : (const uint16_t *)c->delta + t * d,
                                 c->w, (uint16_t *)c->out + t * d, d, eps);
            continue;
        }
#endif
        if (c->bf16) {
            uint16_t *xt = (uint16_t *)c->x + t * d;
            if (c->delta != NULL) {
                const uint16_t *dt = (const uint16_t *)c->delta + t * d;
#pragma omp simd
                for (int64_t i = 0; i < d; i++) xt[i] = f32_to_bf16(bf16_to_f32(xt[i]) + bf16_to_f32(dt[i]));
            }
            const float r = 1.0f / sqrtf(sum_squares_bf16(xt, d) / (float)d + eps);
            const uint16_t *wt = (const uint16_t *)c->w;
            uint16_t *ot = (uint16_t *)c->out + t * d;
#pragma omp simd
            for (int64_t j = 0; j < d; j++) ot[j] = f32_to_bf16(bf16_to_f32(wt[j]) * bf16_round(bf16_to_f32(xt[j]) * r));
        } else {
            float *xt = (float *)c->x + t * d;
            if (c->delta != NULL) {
                const float *dt = (const float *)c->delta + t * d;
#pragma omp simd
                for (int64_t i = 0; i < d; i++) xt[i] += dt[i];
            }
            const float r = 1.0f / sqrtf(sum_squares(xt, d) / (float)d + eps);
            const float *wt = (const float *)c->w;
            float *ot = (float *)c->out + t * d;
#pragma omp simd
            for (int64_t j = 0; j < d; j++) ot[j] = wt[j] * (xt[j] * r);
        }
    }
}

static void norm_unit(void *ctx, int64_t unit) {
    const norm_call *c = ctx;
    norm_rows(c, c->n * unit / c->units, c->n * (unit + 1) / c->units);
}

/* RMSNorm as transformers' Llama computes it, out = w * (x * (1 / sqrt(mean(x^2) + eps))) for n rows of
 * d, the statistics in fp32; with `delta` (else NULL) the residual add first, in place: x += delta.
 * bf16 == 1: x, delta, w and out are bf16, and each step rounds where torch's bf16 ops do: the add,
 * the normalized row (to the input's dtype) and its product with w. On `threads` threads of the
 * helper pool `pool_run` where it is not NULL, else on the calling thread. Returns 0, or -1 when a
 * size or the thread count is out of range. */
int lf_add_rmsnorm(void *x, const void *delta, const void *w, void *out, int64_t n, int64_t d, float eps, int bf16,
                   int threads, lf_pool_run_fn pool_run) {
    if (n < 0 || d <= 0 || threads < 1) return -1;
    const int64_t units = glue_units(n, threads, pool_run);
    norm_call c = {x, delta, w, out, n, d, units, eps, bf16};
    if (units == 1)
        norm_rows(&c, 0, n);
    else
        pool_run(norm_unit, &c, units, threads);
    return 0;
}

/* SiLU of the gate times the up projection, as transformers' Llama MLP computes act_fn(gate) * up:
 * silu(g) = g / (1 + exp(-g)) in fp32, here g * sigmoid(g) with the exponential of -|g| (no overflow),
 * so a value may differ from torch's in its last fp32 bit; in bf16 (bf16 == 1) the SiLU is rounded to
 * bf16 and the product to bf16, as torch's two bf16 ops round them (a rounding of the SiLU can then
 * land one bf16 step away from torch's). gate, up, out: [n, d], contiguous. */
typedef struct {
    const void *gate, *up;
    void *out;
    int64_t n, d, units;
    int bf16;
} silu_call;

static inline float silu(float g) {
    const float e = exp_nonpositive(g < 0.0f ? g : -g); /* exp(-|g|), in (0, 1] */
    const float sigmoid = g < 0.0f ? e / (1.0f + e) : 1.0f / (1.0f + e);
    return g * sigmoid;
}

static void silu_bf16(const uint16_t *restrict g, const uint16_t *restrict u, uint16_t *restrict o, int64_t lo,
                      int64_t hi) {
#ifdef LF_AVX512_BF16
    /* 16 lanes at a time (GCC's loop below uses 8 on these CPUs): the same formula, the exponential of
     * exp16_nonpositive, each rounding to bf16 nearest even as f32_to_bf16 except that vcvtneps2bf16
     * flushes a result below 2^-126 in magnitude to zero (f32_to_bf16 keeps it: keeping it here cost
     * ~20% of this loop, for values that are zero to any later sum). Which lanes take this path depends
     * only on the column (silu_rows goes a row at a time), so a row's bits never depend on its batch. */
    const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
    for (; lo + 16 <= hi; lo += 16) {
        const __m512 x = bf16x16_to_f32(g + lo);
        const __m512 e = exp16_nonpositive(_mm512_min_ps(x, _mm512_sub_ps(zero, x))); /* exp(-|x|) */
        const __mmask16 negative = _mm512_cmp_ps_mask(x, zero, _CMP_LT_OQ);
        const __m512 sigmoid = _mm512_div_ps(_mm512_mask_blend_ps(negative, one, e), _mm512_add_ps(one, e));
        const __m256bh act = _mm512_cvtneps_pbh(_mm512_mul_ps(x, sigmoid));
        const __m512 act_f = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)act), 16));
        _mm256_storeu_si256((__m256i *)(o + lo), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(act_f, bf16x16_to_f32(u + lo))));
    }
#endif
#pragma omp simd
    for (int64_t i = lo; i < hi; i++) o[i] = f32_to_bf16(bf16_round(silu(bf16_to_f32(g[i]))) * bf16_to_f32(u[i]));
}

static void silu_f32(const float *restrict g, const float *restrict u, float *restrict o, int64_t lo, int64_t hi) {
#pragma omp simd
    for (int64_t i = lo; i < hi; i++) o[i] = silu(g[i]) * u[i];
}

static void silu_rows(const silu_call *c, int64_t t0, int64_t t1) {
    if (c->bf16) /* a row at a time: the 16-lane path and the tail take the same columns in every row */
        for (int64_t t = t0; t < t1; t++) silu_bf16(c->gate, c->up, c->out, t * c->d, (t + 1) * c->d);
    else
        silu_f32(c->gate, c->up, c->out, t0 * c->d, t1 * c->d);
}

static void silu_unit(void *ctx, int64_t unit) {
    const silu_call *c = ctx;
    silu_rows(c, c->n * unit / c->units, c->n * (unit + 1) / c->units);
}

/* out = silu(gate) * up for n rows of d, fp32 or bf16 (see silu_rows). On `threads` threads of the
 * helper pool `pool_run` where it is not NULL, else on the calling thread. Returns 0, or -1 when a
 * size or the thread count is out of range. */
int lf_silu_mul(const void *gate, const void *up, void *out, int64_t n, int64_t d, int bf16, int threads,
                lf_pool_run_fn pool_run) {
    if (n < 0 || d <= 0 || threads < 1) return -1;
    const int64_t units = glue_units(n, threads, pool_run);
    silu_call c = {gate, up, out, n, d, units, bf16};
    if (units == 1)
        silu_rows(&c, 0, n);
    else
        pool_run(silu_unit, &c, units, threads);
    return 0;
}

/* ---- Greedy decoding's choice: each row's index of its largest value, as torch's max(-1).indices
 * gives it: the first of tied maxima, and where a row holds a NaN its first NaN (NaN counts as the
 * largest). Read in place from the LM head's output in the compute dtype: a bf16 value widens to fp32
 * exactly, so the index is that of the row converted to fp32, without the conversion's 6 MB pass
 * (32 rows of SmolLM2's 49,152). ARGMAX_LANES running maxima per row, each keeping its first index
 * (only a strictly larger value replaces it), merged at the end by value, then by lowest index. */
#define ARGMAX_LANES 16

static inline float elem_at(const void *row, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)row)[i]) : ((const float *)row)[i];
}

static int64_t first_nan(const void *row, int64_t n, int bf16) {
    for (int64_t i = 0; i < n; i++) {
        const float v = elem_at(row, i, bf16);
        if (v != v) return i;
    }
    return -1;
}

/* bf16 a constant at each call site below, so each element type gets its own vector loop */
static inline int64_t argmax_row(const void *row, int64_t n, int bf16) {
    float best[ARGMAX_LANES];
    int32_t at[ARGMAX_LANES];
    int nan = 0;
    const int64_t full = n / ARGMAX_LANES * ARGMAX_LANES;
    if (full == 0) { /* a row shorter than the lanes: one scan */
        int64_t arg = 0;
        float m = elem_at(row, 0, bf16);
        for (int64_t i = 0; i < n; i++) {
            const float v = elem_at(row, i, bf16);
            if (v != v) return i;
            if (v > m) m = v, arg = i;
        }
        return arg;
    }
    for (int j = 0; j < ARGMAX_LANES; j++) {
        best[j] = elem_at(row, j, bf16);
        at[j] = j;
        nan |= best[j] != best[j];
    }
    for (int64_t i0 = ARGMAX_LANES; i0 < full; i0 += ARGMAX_LANES) {
#pragma omp simd reduction(| : nan)
        for (int j = 0; j < ARGMAX_LANES; j++) {
            const float v = elem_at(row, i0 + j, bf16);
            nan |= v != v;
            const int larger = v > best[j];
            best[j] = larger ? v : best[j];
            at[j] = larger ? (int32_t)(i0 + j) : at[j];
        }
    }
    for (int64_t i = full; i < n; i++) nan |= elem_at(row, i, bf16) != elem_at(row, i, bf16);
    if (nan) return first_nan(row, n, bf16);
    int64_t arg = at[0];
    float m = best[0];
    for (int j = 1; j < ARGMAX_LANES; j++)
        if (best[j] > m || (best[j] == m && at[j] < arg)) m = best[j], arg = at[j];
    for (int64_t i = full; i < n; i++) { /* past every lane's index: only a larger value wins */
        const float v = elem_at(row, i, bf16);
        if (v > m) m = v, arg = i;
    }
    return arg;
}

typedef struct {
    const void *x;
    int64_t *out;
    int64_t rows, cols, units;
    int bf16;
} argmax_call;

static void argmax_rows(const argmax_call *c, int64_t r0, int64_t r1) {
    const size_t row_bytes = (size_t)c->cols * (c->bf16 ? sizeof(uint16_t) : sizeof(float));
    for (int64_t r = r0; r < r1; r++) {
        const void *row = (const char *)c->x + (size_t)r * row_bytes;
        c->out[r] = c->bf16 ? argmax_row(row, c->cols, 1) : argmax_row(row, c->cols, 0);
    }
}

static void argmax_unit(void *ctx, int64_t unit) {
    const argmax_call *c = ctx;
    argmax_rows(c, c->rows * unit / c->units, c->rows * (unit + 1) / c->units);
}

/* out[r] = the index of the largest value of row r of x [rows, cols] (contiguous, fp32 or bf16 ==
 * 1), with torch's max(-1).indices' ties and NaNs (above). On `threads` threads of the helper pool
 * `pool_run` where it is not NULL (the glue's ranges of rows), else on the calling thread. Returns 0, or -1 when
 * a size or the thread count is out of range (cols past 2^31: int32 lane indices). */
int lf_argmax_rows(const void *x, int64_t *out, int64_t rows, int64_t cols, int bf16, int threads,
                   lf_pool_run_fn pool_run) {
    if (rows < 0 || cols <= 0 || cols > INT32_MAX || threads < 1) return -1;
    const int64_t units = glue_units(rows, threads, pool_run);
    argmax_call c = {x, out, rows, cols, units, bf16};
    if (units == 1)
        argmax_rows(&c, 0, rows);
    else
        pool_run(argmax_unit, &c, units, threads);
    return 0;
}
