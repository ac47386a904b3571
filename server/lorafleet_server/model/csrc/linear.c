/* A bf16 Linear on Intel AMX: out[m, n] = x[m, k] . W[n, k]^T (+ bias), fp32 sums rounded once.
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
 * so long prompt chunks read each weight panel from DRAM once.
 *
 * Needs k and n multiples of 32 and a CPU with AMX-BF16 (Sapphire Rapids and later); the library
 * built for any other CPU only says so (lf_linear_available() == 0) and the loader keeps oneDNN.
 * Built by lorafleet_server/model/native.py with -O3 -march=native; called through ctypes.
 */
#define _GNU_SOURCE
#include <sched.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__x86_64__)
#define LF_AMX 1
#include <immintrin.h>
#else
#define LF_AMX 0
#endif

#define ARCH_REQ_XCOMP_PERM 0x1023 /* Linux: ask for an extended state component ... */
#define XFEATURE_XTILEDATA 18      /* ... the AMX tile data */
#define PANEL 32                   /* output columns per panel (two B tiles) */
#define KSTEP 32                   /* k per tile: 16 pairs of bf16 */
#define ROWS 32                    /* rows of x per block (two A tiles) */
#define CHUNK_BYTES (256 * 1024)   /* weight bytes per chunk of panels */
#define PREFETCH_BYTES 4096        /* how far ahead of the tile loads the weight is prefetched */

/* 1 when this library has the AMX kernel and the kernel (Linux >= 5.16) lets this process use AMX;
 * 0 otherwise. Asking twice is harmless. */
int lf_linear_available(void) {
#if LF_AMX
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : 0;
#else
    return 0;
#endif
}

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

#if LF_AMX
typedef struct {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Tiles 0-3: C (fp32 sums; 0, 1 rows of A tile 4, 2, 3 rows of A tile 5); 4, 5: A; 6, 7: B. */
static void configure(int rows0, int rows1) {
    tile_config c;
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
    for (int r = 0; r < rows; r++) {
        __m512 lo = _mm512_loadu_ps(acc + r * PANEL);
        __m512 hi = _mm512_loadu_ps(acc + r * PANEL + 16);
        if (bias) {
            lo = _mm512_add_ps(lo, _mm512_loadu_ps(bias));
            hi = _mm512_add_ps(hi, _mm512_loadu_ps(bias + 16));
        }
        _mm512_storeu_si512((void *)(out + r * n_out), (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
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
            const char *ahead = (const char *)(b + 2 * 512) + PREFETCH_BYTES;
            for (int line = 0; line < 2 * 1024; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
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

#if LF_AMX
/* Columns [c0, c1) of out for every row of x: row blocks inside, so each weight panel is read once. */
static void columns(const uint16_t *x, const uint16_t *packed, const float *bias, uint16_t *out, int64_t m, int64_t n,
                    int64_t k, int64_t c0, int64_t c1) {
    for (int64_t m0 = 0; m0 < m; m0 += ROWS) {
        const int64_t left = m - m0;
        const int rows0 = left < 16 ? (int)left : 16;
        const int rows1 = left <= 16 ? 0 : (left < ROWS ? (int)(left - 16) : 16);
        configure(rows0, rows1);
        block(x + m0 * k, packed, bias, out + m0 * n, rows0, rows1, c0, c1, n, k);
    }
}

/* Helper threads. A call's output columns are cut into units (whole panels, a few per thread); the
 * calling thread and the helpers take units from one counter until none is left, and the call returns
 * when every unit is done. Which thread computes a column does not change its numbers, and a helper
 * that comes late (its core busy elsewhere) only leaves more units to the caller, which waits just for
 * units already started. After a call a helper spins up to SPIN_NS for the next one (a step's Linears
 * follow each other within microseconds), yielding its core to any other thread that wants it, then
 * sleeps on a condition variable.
 *
 * The counter `ticket` holds the call's sequence number (high 32 bits) and its next unit (low 32): a
 * unit is taken by a compare-and-swap that also proves the call is still the one whose fields were
 * read. The caller closes a call (index 0xffffffff) before it writes the next one's fields. */
#define MAX_HELPERS 15
#define SPIN_NS 2000000LL  /* how long a helper spins for the next call before it sleeps */
#define UNITS_PER_THREAD 4 /* a call's units: few, since taking one moves a cache line between cores */
#define CLOSED 0xffffffffull

typedef struct {
    const uint16_t *x, *packed;
    const float *bias;
    uint16_t *out;
    int64_t m, n, k, unit_cols;
    uint32_t units;
} call_t;

static call_t call __attribute__((aligned(64)));
static _Atomic uint64_t ticket __attribute__((aligned(64))) = CLOSED; /* call 0, closed */
static _Atomic uint32_t done __attribute__((aligned(64)));            /* units finished in the current call */
static pthread_mutex_t sleep_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t sleep_cv = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t call_mu = PTHREAD_MUTEX_INITIALIZER; /* one parallel call at a time */
static int helpers;                                         /* started so far */

/* Take and run units of call `seq` until none is left; returns how many this thread ran. */
static uint32_t run_units(uint32_t seq) {
    uint32_t ran = 0;
    for (;;) {
        uint64_t t = atomic_load_explicit(&ticket, memory_order_acquire);
        if ((uint32_t)(t >> 32) != seq) return ran;
        const uint32_t unit = (uint32_t)t;
        if (unit >= call.units) return ran; /* CLOSED is >= any count */
        if (!atomic_compare_exchange_weak_explicit(&ticket, &t, t + 1, memory_order_acq_rel, memory_order_acquire))
            continue;
        const int64_t c0 = (int64_t)unit * call.unit_cols;
        const int64_t c1 = c0 + call.unit_cols < call.n ? c0 + call.unit_cols : call.n;
        columns(call.x, call.packed, call.bias, call.out, call.m, call.n, call.k, c0, c1);
        atomic_fetch_add_explicit(&done, 1, memory_order_release);
        ran++;
    }
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* Helper i is pinned to the i-th CPU from the end of the caller's CPU set. Left to the scheduler, a
 * woken helper was often placed on its waker's core, and two threads sharing one core made a call
 * slower than one (a 56 MB LM head call: 9.2 ms alone, 9-16 ms with an unpinned helper; 5.3-5.5 ms
 * with the two on two cores). The caller stays free to move; should it land on a helper's core, the
 * helper's spin yields to it. */
static int cpu_of_set(const cpu_set_t *set, int index) {
    for (int cpu = 0, seen = 0; cpu < CPU_SETSIZE; cpu++)
        if (CPU_ISSET(cpu, set) && seen++ == index) return cpu;
    return -1;
}

static void pin_self(int cpu) {
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    pthread_setaffinity_np(pthread_self(), sizeof one, &one);
}

static void *helper_main(void *arg) {
    const int cpu = (int)(intptr_t)arg;
    if (cpu >= 0) pin_self(cpu);
    uint32_t seen = 0;
    for (;;) {
        uint32_t seq = (uint32_t)(atomic_load_explicit(&ticket, memory_order_acquire) >> 32);
        const int64_t until = now_ns() + SPIN_NS;
        for (int i = 0; seq == seen; i++) {
            if ((i & 15) == 15) sched_yield(); /* a thread that wants this core (the caller, gRPC) gets it */
            else _mm_pause();
            seq = (uint32_t)(atomic_load_explicit(&ticket, memory_order_acquire) >> 32);
            if ((i & 255) == 255 && now_ns() > until) break;
        }
        if (seq == seen) {
            pthread_mutex_lock(&sleep_mu);
            while ((seq = (uint32_t)(atomic_load_explicit(&ticket, memory_order_acquire) >> 32)) == seen)
                pthread_cond_wait(&sleep_cv, &sleep_mu);
            pthread_mutex_unlock(&sleep_mu);
        }
        seen = seq;
        if (run_units(seq)) _tile_release();
    }
    return NULL;
}

/* In a child process after fork() the helpers are gone and a lock may have been held by one: start
 * afresh. */
static void forget_helpers(void) {
    pthread_mutex_init(&sleep_mu, NULL);
    pthread_cond_init(&sleep_cv, NULL);
    pthread_mutex_init(&call_mu, NULL);
    atomic_store(&ticket, CLOSED);
    helpers = 0;
}

static pthread_once_t fork_handler_once = PTHREAD_ONCE_INIT;

static void register_fork_handler(void) { pthread_atfork(NULL, NULL, forget_helpers); }

/* Start helpers up to `want` (at most MAX_HELPERS, and one fewer than the caller's CPUs), each pinned
 * to a CPU of its own from the end of the caller's set; returns how many run. */
static int ensure_helpers(int want) {
    if (want > MAX_HELPERS) want = MAX_HELPERS;
    if (helpers >= want) return helpers;
    pthread_once(&fork_handler_once, register_fork_handler);
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) != 0) return helpers;
    if (want > CPU_COUNT(&set) - 1) want = CPU_COUNT(&set) - 1;
    while (helpers < want) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int cpu = cpu_of_set(&set, CPU_COUNT(&set) - 1 - helpers);
        const int rc = pthread_create(&t, &attr, helper_main, (void *)(intptr_t)cpu);
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        helpers++;
    }
    return helpers;
}
#endif

/* out [m, n] bf16 = x [m, k] bf16 . W^T (+ bias [n] fp32, may be NULL), W packed by lf_linear_pack,
 * on the calling thread and up to threads - 1 helper threads (started on first use, kept).
 * rc 1: shapes it does not take; 2: no AMX in this build (lf_linear_available() said so). */
int lf_linear(const uint16_t *x, const uint16_t *packed, const float *bias, uint16_t *out, int64_t m, int64_t n,
              int64_t k, int threads) {
    if (m < 0 || n <= 0 || k <= 0 || n % PANEL || k % KSTEP || threads < 1) return 1;
#if LF_AMX
    const int64_t panels = n / PANEL;
    if (threads == 1 || panels < 2 || m == 0 || pthread_mutex_trylock(&call_mu) != 0) {
        const int64_t chunk = CHUNK_BYTES / (PANEL * k * 2) * PANEL; /* ~256 KB of weight per row-block pass */
        for (int64_t c0 = 0; c0 < n; c0 += chunk > PANEL ? chunk : PANEL) {
            const int64_t c1 = c0 + (chunk > PANEL ? chunk : PANEL);
            columns(x, packed, bias, out, m, n, k, c0, c1 < n ? c1 : n);
        }
        _tile_release();
        return 0;
    }
    /* units: UNITS_PER_THREAD per thread (whole panels) */
    int64_t want = (int64_t)threads * UNITS_PER_THREAD;
    if (want > panels) want = panels;
    const int64_t unit_cols = (panels + want - 1) / want * PANEL;
    const int64_t units = (n + unit_cols - 1) / unit_cols;
    ensure_helpers(threads - 1);
    const uint32_t seq = (uint32_t)(atomic_load_explicit(&ticket, memory_order_relaxed) >> 32) + 1;
    call = (call_t){x, packed, bias, out, m, n, k, unit_cols, (uint32_t)units};
    atomic_store_explicit(&done, 0, memory_order_relaxed);
    pthread_mutex_lock(&sleep_mu);
    atomic_store_explicit(&ticket, (uint64_t)seq << 32, memory_order_release);
    pthread_cond_broadcast(&sleep_cv);
    pthread_mutex_unlock(&sleep_mu);
    run_units(seq);
    while (atomic_load_explicit(&done, memory_order_acquire) < (uint32_t)units) _mm_pause();
    atomic_store_explicit(&ticket, ((uint64_t)seq << 32) | CLOSED, memory_order_release);
    pthread_mutex_unlock(&call_mu);
    _tile_release();
    return 0;
#else
    (void)x, (void)packed, (void)bias, (void)out;
    return 2;
#endif
}
