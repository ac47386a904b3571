/* A bf16 Linear on Intel AMX, or on AVX-512 BF16 where the CPU has no AMX: out[m, n] = x[m, k] .
 * W[n, k]^T (+ bias), fp32 sums rounded once.
 *
 * Why: a decode step is ~200 Linears of 32 rows against weights that do not fit any cache, so each
 * call is a stream of its weight from DRAM. oneDNN's prepacked AMX matmul reached ~3.5 GB/s of weight
 * per call here (half of what one core reads); this one reaches ~6-8 GB/s by reading the weight once,
 * in the order it lies, with software prefetch a few KB ahead (docs/architecture.md, "Measured
 * facts" 13).
 *
 * Layout: the weight is packed once (lf_linear_pack) into panels of 32 output columns; a panel holds,
 * per 32-wide slice of k, two AMX B tiles (16 columns each) of 16 rows x 32 bf16, the pairs of k
 * interleaved (VNNI): packed[p][kb][t][kk/2][j][kk%2] = W[32p + 16t + j][32kb + kk]. A panel is
 * contiguous, so the k loop reads 2 KB after 2 KB.
 *
 * Each block of up to 32 rows of x is two A tiles; per panel four C tiles (rows 0-15 and 16-31 x
 * columns 0-15 and 16-31) sum over k in fp32, in the same order whatever the number of rows, so a
 * row's output is the same bit for bit whether it runs alone or with others (oneDNN's kernels differ
 * with the row count). Panels run in chunks of ~256 KB of weight with every row block inside a chunk,
 * so long prompt chunks read each weight panel from DRAM once. A call on more than one thread cuts its
 * columns into units of whole panels for the helper pool (csrc/pool.c) the caller passes.
 *
 * The AVX-512 BF16 kernel (lf_linear_avx512, lf_linear_parts_avx512: same arguments, same packed
 * layout) is for CPUs with avx512_bf16 but no AMX (AMD Zen 4 and later, Cooper Lake): a B tile's row
 * of 16 column pairs is one zmm, so per pair of k one load of each half-panel, and per row one
 * broadcast of x's pair and two vdpbf16ps into 2 x 16 fp32 sums; blocks of up to MR_AVX512 rows keep
 * their sums in registers while the panel comes from L1/L2 again for the next block. Each output is
 * one fp32 sum over k in pair order (each vdpbf16ps adds its two products in turn), so a row's output
 * is also the same bit for bit alone or in any step; it is not the AMX kernel's sum (the tile unit's
 * order), so a process uses one of the two (docs/architecture.md, "Measured facts" 21).
 *
 * Needs k and n multiples of 32 and a CPU with AMX-BF16 (Sapphire Rapids and later) or AVX512-BF16;
 * the library built for any other CPU only says so (lf_linear_available() and lf_linear_avx512_available()
 * are 0) and the loader keeps oneDNN.
 * Built by lorafleet_server/model/native.py with -O3 -march=native; called through ctypes.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <string.h>

#include "amx.h"
#include "linear.h"
#include "pool.h"

#if LF_BUILD_AMX && defined(__AVX512BF16__)
#define LF_AMX 1
#else
#define LF_AMX 0
#endif
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define LF_AVX512BF16 1
#include <immintrin.h>
#else
#define LF_AVX512BF16 0
#endif

#define PANEL 32                   /* output columns per panel (two B tiles) */
#define KSTEP 32                   /* k per tile: 16 pairs of bf16 */
#define ROWS 32                    /* rows of x per block (two A tiles) */
#define CHUNK_BYTES (256 * 1024)   /* weight bytes per chunk of panels */
#define PREFETCH_BYTES 4096        /* how far ahead of the tile loads the weight is prefetched */

/* 1 when this library has the AMX kernel and the kernel (Linux >= 5.16) lets this process use AMX;
 * 0 otherwise (asked once; lf_linear_parts checks the same answer before every call). */
int lf_linear_available(void) {
#if LF_AMX
    return lf_amx_permitted();
#else
    return 0;
#endif
}

/* 1 when this library has the AVX-512 BF16 kernel (lf_linear_avx512), else 0. */
int lf_linear_avx512_available(void) { return LF_AVX512BF16; }

/* packed (n * k bf16) = W (n x k bf16, row-major) in the layout above. rc 1: n or k not a multiple of 32. */
int lf_linear_pack(const uint16_t *w, uint16_t *packed, int64_t n, int64_t k) {
    if (n <= 0 || k <= 0 || n % PANEL || k % KSTEP) return 1;
    int64_t o = 0;
    for (int64_t p = 0; p < n; p += PANEL)
        for (int64_t kb = 0; kb < k; kb += KSTEP)
            for (int t = 0; t < 2; t++)
                for (int kk = 0; kk < KSTEP; kk += 2)
                    for (int j = 0; j < 16; j++) {
                        const uint16_t *row = w + (p + 16 * t + j) * k + kb + kk;
                        packed[o++] = row[0];
                        packed[o++] = row[1];
                    }
    return 0;
}

#if LF_AVX512BF16 /* both kernels (LF_AMX needs AVX512-BF16 too) */
/* One row's 32 sums (+ bias [32] fp32, or NULL) rounded to bf16 (nearest even) into o. */
static inline __attribute__((always_inline)) void store_row32(uint16_t *o, __m512 lo, __m512 hi, const float *bias) {
    if (bias != NULL) {
        lo = _mm512_add_ps(lo, _mm512_loadu_ps(bias));
        hi = _mm512_add_ps(hi, _mm512_loadu_ps(bias + 16));
    }
    _mm512_storeu_si512((void *)o, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}

/* Ask for the weight PREFETCH_BYTES past the 2 KB of a panel's 32 of k at b (the hardware prefetcher
 * stops at page boundaries). */
static inline __attribute__((always_inline)) void prefetch_ahead(const uint16_t *b) {
    const char *ahead = (const char *)(b + 2 * 512) + PREFETCH_BYTES;
    for (int line = 0; line < 2 * 1024; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
}
#endif

#if LF_AMX
/* Tiles 0-3: C (fp32 sums; 0, 1 rows of A tile 4, 2, 3 rows of A tile 5); 4, 5: A; 6, 7: B. */
static void configure(int rows0, int rows1) {
    lf_tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    const int r1 = rows1 > 0 ? rows1 : 1; /* an unused tile still needs a valid shape */
    const uint8_t rows[8] = {(uint8_t)rows0, (uint8_t)rows0, (uint8_t)r1, (uint8_t)r1, (uint8_t)rows0, (uint8_t)r1, 16, 16};
    for (int t = 0; t < 8; t++) {
        c.rows[t] = rows[t];
        c.colsb[t] = 64;
    }
    _tile_loadconfig(&c);
}

/* out rows (n_out apart) = acc rows (32 fp32 each) + bias, rounded to bf16 (nearest even). */
static inline void store_rows(const float *acc, int rows, const float *bias, uint16_t *out, int64_t n_out) {
    for (int r = 0; r < rows; r++)
        store_row32(out + r * n_out, _mm512_loadu_ps(acc + r * PANEL), _mm512_loadu_ps(acc + r * PANEL + 16), bias);
}

/* One block of rows0 + rows1 (<= 32) rows against panels [p0, p1). */
static void block(const uint16_t *x, const uint16_t *packed, const float *bias, uint16_t *out, int rows0, int rows1,
                  int64_t p0, int64_t p1, int64_t n, int64_t k) {
    float acc[ROWS * PANEL] __attribute__((aligned(64))); /* [32 rows][32 columns] */
    const int64_t stride_x = k * 2;                        /* bytes between rows of x */
    const uint16_t *x1 = x + 16 * k;
    for (int64_t p = p0; p < p1; p += PANEL) {
        const uint16_t *b = packed + p * k; /* the panel: k/32 pairs of B tiles, 512 bf16 each */
        _tile_zero(0);
        _tile_zero(1);
        if (rows1) {
            _tile_zero(2);
            _tile_zero(3);
        }
        for (int64_t kb = 0; kb < k; kb += KSTEP, b += 2 * 512) {
            prefetch_ahead(b);
            _tile_loadd(4, x + kb, stride_x);
            _tile_loadd(6, b, 64);
            _tile_loadd(7, b + 512, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            if (rows1) {
                _tile_loadd(5, x1 + kb, stride_x);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 5, 7);
            }
        }
        _tile_stored(0, acc, PANEL * 4);
        _tile_stored(1, acc + 16, PANEL * 4);
        if (rows1) {
            _tile_stored(2, acc + 16 * PANEL, PANEL * 4);
            _tile_stored(3, acc + 16 * PANEL + 16, PANEL * 4);
        }
        store_rows(acc, rows0 + rows1, bias ? bias + p : 0, out + p, n);
    }
}
#endif

#define MAX_PARTS 4

/* sizeof(lf_linear_part), which native.py checks its ctypes mirror against */
int64_t lf_linear_part_bytes(void) { return (int64_t)sizeof(lf_linear_part); }

/* A kernel's work on one block of up to ROWS rows of x (row stride k) against panels [p0, p1), into
 * out (row stride n); `first`: the block that first reads these panels (it prefetches them). */
typedef void (*rows_fn)(const uint16_t *x, const uint16_t *packed, const float *bias, uint16_t *out, int rows,
                        int64_t p0, int64_t p1, int64_t n, int64_t k, int first);

/* Columns [c0, c1) of out for every row of x, in chunks of ~CHUNK_BYTES of weight with the row blocks
 * inside, so a long prompt chunk reads each weight panel from DRAM once (and a block's x stays in L2
 * across the chunk's panels). */
static void columns(rows_fn rows_block, const uint16_t *x, const uint16_t *packed, const float *bias, uint16_t *out,
                    int64_t m, int64_t n, int64_t k, int64_t c0, int64_t c1) {
    const int64_t per_chunk = CHUNK_BYTES / (PANEL * k * 2) * PANEL;
    const int64_t step = per_chunk > PANEL ? per_chunk : PANEL;
    for (int64_t a = c0; a < c1; a += step) {
        const int64_t b = a + step < c1 ? a + step : c1;
        for (int64_t m0 = 0; m0 < m; m0 += ROWS)
            rows_block(x + m0 * k, packed, bias, out + m0 * n, (int)(m - m0 < ROWS ? m - m0 : ROWS), a, b, n, k,
                       m0 == 0);
    }
}

#if LF_AMX
/* rows_fn on AMX: the rows as two A tiles (16 + the rest). */
static void rows_amx(const uint16_t *x, const uint16_t *packed, const float *bias, uint16_t *out, int rows,
                     int64_t p0, int64_t p1, int64_t n, int64_t k, int first) {
    (void)first; /* block() prefetches as it goes */
    const int rows0 = rows < 16 ? rows : 16;
    const int rows1 = rows - rows0;
    configure(rows0, rows1);
    block(x, packed, bias, out, rows0, rows1, p0, p1, n, k);
}
#endif

#if LF_AVX512BF16
#define MR_AVX512 12 /* rows per register block: 24 accumulators, two half-panels and a broadcast of 32 */

#define LD_DECL(r) __m512 c##r##0 = _mm512_setzero_ps(), c##r##1 = _mm512_setzero_ps();
#define LD_DP(r)                                                                    \
    if (rows > r) {                                                                 \
        uint32_t pair;                                                              \
        memcpy(&pair, xk + r * k, sizeof pair);                                     \
        const __m512bh a = (__m512bh)_mm512_set1_epi32((int)pair);                  \
        c##r##0 = _mm512_dpbf16_ps(c##r##0, a, b0);                                 \
        c##r##1 = _mm512_dpbf16_ps(c##r##1, a, b1);                                 \
    }
#define LD_STORE(r) \
    if (rows > r) store_row32(out + r * n_out, c##r##0, c##r##1, bias);
#define LD_ALL(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8) M(9) M(10) M(11)

/* Rows x[0..rows) (row stride k) against one panel (32 columns; per 32 of k two half-panels of 16
 * column pairs a row, 1 KB each) into out (row stride n_out). rows is a constant at each call below,
 * so the unused sums compile away and the rest stay in registers. `fetch`: the block that first reads
 * the panel, which prefetches PREFETCH_BYTES ahead of its loads (into the next panel at its end). */
static inline __attribute__((always_inline)) void dp_block(const uint16_t *x, int64_t k, const uint16_t *panel,
                                                           const float *bias, uint16_t *out, int64_t n_out,
                                                           const int rows, int fetch) {
    LD_ALL(LD_DECL)
    const uint16_t *b = panel;
    for (int64_t kb = 0; kb < k; kb += KSTEP, b += 2 * 512) {
        if (fetch) prefetch_ahead(b);
        for (int q = 0; q < KSTEP / 2; q++) {
            const __m512bh b0 = (__m512bh)_mm512_loadu_si512((const void *)(b + q * 32));
            const __m512bh b1 = (__m512bh)_mm512_loadu_si512((const void *)(b + 512 + q * 32));
            const uint16_t *xk = x + kb + 2 * q;
            LD_ALL(LD_DP)
        }
    }
    LD_ALL(LD_STORE)
}
#undef LD_ALL
#undef LD_STORE
#undef LD_DP
#undef LD_DECL

static void dp_rows(const uint16_t *x, int64_t k, const uint16_t *panel, const float *bias, uint16_t *out,
                    int64_t n_out, int rows, int fetch) {
    switch (rows) {
#define LD_CASE(R) \
    case R: dp_block(x, k, panel, bias, out, n_out, R, fetch); return;
        LD_CASE(1) LD_CASE(2) LD_CASE(3) LD_CASE(4) LD_CASE(5) LD_CASE(6)
        LD_CASE(7) LD_CASE(8) LD_CASE(9) LD_CASE(10) LD_CASE(11) LD_CASE(12)
#undef LD_CASE
    }
}

/* rows_fn on AVX-512 BF16: per panel, register blocks of MR_AVX512 rows. */
static void rows_avx512(const uint16_t *x, const uint16_t *packed, const float *bias, uint16_t *out, int rows,
                        int64_t p0, int64_t p1, int64_t n, int64_t k, int first) {
    for (int64_t p = p0; p < p1; p += PANEL)
        for (int r0 = 0; r0 < rows; r0 += MR_AVX512)
            dp_rows(x + r0 * k, k, packed + p * k, bias != NULL ? bias + p : NULL, out + r0 * n + p, n,
                    rows - r0 < MR_AVX512 ? rows - r0 : MR_AVX512, first && r0 == 0);
}
#endif

/* One call's work for the pool (csrc/pool.c): the parts' columns side by side, part after part; unit u
 * is columns [u * unit_cols, (u + 1) * unit_cols) of that row, which may end in one part and go on in
 * the next. */
typedef struct {
    const uint16_t *x;
    const lf_linear_part *parts;
    int count;
    int64_t m, k, unit_cols;
    rows_fn rows_block;
} linear_call;

/* After a call's work on a thread: AMX leaves no tile state behind for the OS to save. */
static void release_tiles(rows_fn rows_block) {
#if LF_AMX
    if (rows_block == rows_amx) _tile_release();
#else
    (void)rows_block;
#endif
}

static void linear_unit(void *ctx, int64_t unit) {
    const linear_call *c = ctx;
    int64_t c0 = unit * c->unit_cols, c1 = c0 + c->unit_cols; /* in the row of all parts' columns */
    for (int i = 0; i < c->count && c0 < c1; i++) {
        const lf_linear_part *p = &c->parts[i];
        if (c0 < p->n) {
            const int64_t end = c1 < p->n ? c1 : p->n;
            columns(c->rows_block, c->x, p->packed, p->bias, p->out, c->m, p->n, c->k, c0, end);
            c0 = end;
        }
        c0 -= p->n; /* into the next part's columns */
        c1 -= p->n;
    }
    release_tiles(c->rows_block);
}

#define UNITS_PER_THREAD 4 /* a call's units: few, since taking one moves a cache line between cores */

/* The parts' columns in one call, on the calling thread and up to threads - 1 helpers of the pool
 * whose lf_pool_run is `pool_run` (NULL: on the calling thread alone). 1: shapes or counts it does
 * not take. */
static int run_parts(const uint16_t *x, const lf_linear_part *parts, int count, int64_t m, int64_t k, int threads,
                     lf_pool_run_fn pool_run, rows_fn rows_block) {
    if (m < 0 || k <= 0 || k % KSTEP || threads < 1 || count < 1 || count > MAX_PARTS || parts == NULL) return 1;
    int64_t n = 0; /* all parts' columns */
    for (int i = 0; i < count; i++) {
        if (parts[i].n <= 0 || parts[i].n % PANEL) return 1;
        n += parts[i].n;
    }
    if (rows_block == NULL) return 2;
    const int64_t panels = n / PANEL;
    if (threads == 1 || panels < 2 || m == 0 || pool_run == NULL) {
        for (int i = 0; i < count; i++)
            columns(rows_block, x, parts[i].packed, parts[i].bias, parts[i].out, m, parts[i].n, k, 0, parts[i].n);
        release_tiles(rows_block);
        return 0;
    }
    /* units: UNITS_PER_THREAD per thread (whole panels) */
    int64_t want = (int64_t)threads * UNITS_PER_THREAD;
    if (want > panels) want = panels;
    const int64_t unit_cols = (panels + want - 1) / want * PANEL;
    linear_call c = {x, parts, count, m, k, unit_cols, rows_block};
    pool_run(linear_unit, &c, (n + unit_cols - 1) / unit_cols, threads);
    return 0;
}

/* Every part's out = x [m, k] bf16 . W^T (+ bias) in one call on AMX, on the calling thread and up to
 * threads - 1 helpers of the pool whose lf_pool_run is `pool_run` (NULL: on the calling thread alone).
 * The parts' columns are cut into units as one Linear's would be, so several small Linears of the
 * same x (a layer's q, k and v) cost one call's start and end instead of one each (~7 us); each
 * column's sums are those of the part's own call, bit for bit.
 * rc 1: shapes or counts it does not take; 2: no AMX here, in this build or for this process
 * (lf_linear_available() says so). */
int lf_linear_parts(const uint16_t *x, const lf_linear_part *parts, int count, int64_t m, int64_t k, int threads,
                    lf_pool_run_fn pool_run) {
#if LF_AMX
    return run_parts(x, parts, count, m, k, threads, pool_run, lf_amx_permitted() ? rows_amx : NULL);
#else
    return run_parts(x, parts, count, m, k, threads, pool_run, NULL);
#endif
}

/* lf_linear_parts on AVX-512 BF16 instead of AMX: the same arguments, packed weights and units; rc 2:
 * no AVX-512 BF16 in this build (lf_linear_avx512_available() said so). */
int lf_linear_parts_avx512(const uint16_t *x, const lf_linear_part *parts, int count, int64_t m, int64_t k,
                           int threads, lf_pool_run_fn pool_run) {
#if LF_AVX512BF16
    return run_parts(x, parts, count, m, k, threads, pool_run, rows_avx512);
#else
    return run_parts(x, parts, count, m, k, threads, pool_run, NULL);
#endif
}

/* out [m, n] bf16 = x [m, k] bf16 . W^T (+ bias [n] fp32, may be NULL), W packed by lf_linear_pack:
 * lf_linear_parts with one part. */
int lf_linear(const uint16_t *x, const uint16_t *packed, const float *bias, uint16_t *out, int64_t m, int64_t n,
              int64_t k, int threads, lf_pool_run_fn pool_run) {
    const lf_linear_part part = {packed, bias, out, n};
    return lf_linear_parts(x, &part, 1, m, k, threads, pool_run);
}

/* lf_linear on AVX-512 BF16 (lf_linear_parts_avx512 with one part). */
int lf_linear_avx512(const uint16_t *x, const uint16_t *packed, const float *bias, uint16_t *out, int64_t m,
                     int64_t n, int64_t k, int threads, lf_pool_run_fn pool_run) {
    const lf_linear_part part = {packed, bias, out, n};
    return lf_linear_parts_avx512(x, &part, 1, m, k, threads, pool_run);
}
