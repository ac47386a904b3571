/* Helper threads shared by the native kernels of a step: one pool per process, pinned to cores.
 *
 * A call's work is cut into units (lf_pool_run); the calling thread and the helpers take units from
 * one counter until none is left, and the call returns when every unit is done. Which thread runs a
 * unit does not change its numbers, and a helper that comes late (its core busy elsewhere) only leaves
 * more units to the caller, which waits just for units already started. After a call a helper spins
 * up to SPIN_NS for the next one (a step's kernels follow each other within microseconds), yielding
 * its core to any other thread that wants it, then sleeps on a condition variable.
 *
 * Why one pool: the AMX Linear (csrc/linear.c) ran on helpers of its own while the attention and the
 * multi-LoRA split their rows over torch's OpenMP team. On 2 cores a second OpenMP thread then shared
 * its core with the Linear's spinning helper, and a 32-row decode step was no faster with 2 torch
 * threads than with 1 (docs/architecture.md, "Measured facts" 17): every kernel of the step now takes
 * the same helpers.
 *
 * The counter `ticket` holds the call's sequence number (high 32 bits) and its next unit (low 32): a
 * unit is taken by a compare-and-swap that also proves the call is still the one whose fields were
 * read. The caller closes a call (index 0xffffffff) before it writes the next one's fields. One call
 * runs at a time; a call made while another runs (another thread) runs all its units on its caller.
 *
 * Built by lorafleet_server/model/native.py (-O3 -march=native); called through ctypes (lf_pool_helpers)
 * and by the kernel libraries through the address of lf_pool_run. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define LF_PAUSE() _mm_pause()
#else
#define LF_PAUSE() ((void)0)
#endif

#include "pool.h"

#define MAX_HELPERS 15
#define SPIN_NS 2000000LL /* how long a helper spins for the next call before it sleeps */
#define CLOSED 0xffffffffull

/* The current call's fields. Relaxed atomics (plain moves on x86): a helper reads `units` before its
 * compare-and-swap proves the call is still current, while the next call's caller may be writing it;
 * the value of such a stale read is never used (the swap fails), but as a plain field it was a data
 * race (undefined behaviour; ThreadSanitizer reported it). fn and ctx are read only after a swap
 * succeeds, which synchronizes with the release store of `ticket` that published them. */
typedef struct {
    _Atomic(lf_unit_fn) fn;
    _Atomic(void *) ctx;
    _Atomic uint32_t units;
} call_t;

static call_t call __attribute__((aligned(64)));
static _Atomic uint64_t ticket __attribute__((aligned(64))) = CLOSED; /* call 0, closed */
static _Atomic uint32_t done __attribute__((aligned(64)));            /* units finished in the current call */
static pthread_mutex_t sleep_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t sleep_cv = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t call_mu = PTHREAD_MUTEX_INITIALIZER; /* one call at a time */
static pthread_mutex_t start_mu = PTHREAD_MUTEX_INITIALIZER;
static _Atomic int helpers; /* started so far */

/* Take and run units of call `seq` until none is left. */
static void run_units(uint32_t seq) {
    for (;;) {
        uint64_t t = atomic_load_explicit(&ticket, memory_order_acquire);
        if ((uint32_t)(t >> 32) != seq) return;
        const uint32_t unit = (uint32_t)t;
        if (unit >= atomic_load_explicit(&call.units, memory_order_relaxed)) return; /* CLOSED is >= any count */
        if (!atomic_compare_exchange_weak_explicit(&ticket, &t, t + 1, memory_order_acq_rel, memory_order_acquire))
            continue;
        const lf_unit_fn fn = atomic_load_explicit(&call.fn, memory_order_relaxed);
        fn(atomic_load_explicit(&call.ctx, memory_order_relaxed), (int64_t)unit);
        atomic_fetch_add_explicit(&done, 1, memory_order_release);
    }
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* Helper i is pinned to the i-th CPU from the end of the starting thread's CPU set. Left to the
 * scheduler, a woken helper was often placed on its waker's core, and two threads sharing one core
 * made a call slower than one (a 56 MB LM head Linear: 9.2 ms alone, 9-16 ms with an unpinned helper;
 * 5.3-5.5 ms with the two on two cores). The caller stays free to move; should it land on a helper's
 * core, the helper's spin yields to it. */
static int cpu_of_set(const cpu_set_t *set, int index) {
    for (int cpu = 0, seen = 0; cpu < CPU_SETSIZE; cpu++)
        if (CPU_ISSET(cpu, set) && seen++ == index) return cpu;
    return -1;
}

/* 0: helpers are left to the scheduler (lf_pool_set_pinning): where this process may run on more CPUs
 * than it may use (a container's CPU quota on a shared node), every replica on the node would pin its
 * helpers to the same last cores of the node. */
static atomic_int pin_helpers = 1;

void lf_pool_set_pinning(int on) { atomic_store(&pin_helpers, on ? 1 : 0); }

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
            else LF_PAUSE();
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
        run_units(seq);
    }
    return NULL;
}

/* In a child process after fork() the helpers are gone and a lock may have been held by one: start
 * afresh. */
static void forget_helpers(void) {
    pthread_mutex_init(&sleep_mu, NULL);
    pthread_cond_init(&sleep_cv, NULL);
    pthread_mutex_init(&call_mu, NULL);
    pthread_mutex_init(&start_mu, NULL);
    atomic_store(&ticket, CLOSED);
    atomic_store(&helpers, 0);
}

static pthread_once_t fork_handler_once = PTHREAD_ONCE_INIT;

static void register_fork_handler(void) { pthread_atfork(NULL, NULL, forget_helpers); }

/* Start helpers up to `want` (at most MAX_HELPERS, and one fewer than the calling thread's CPUs), each
 * pinned to a CPU of its own from the end of that set; returns how many run. */
static int start_helpers(int want) {
    if (want > MAX_HELPERS) want = MAX_HELPERS;
    if (atomic_load(&helpers) >= want) return atomic_load(&helpers);
    pthread_once(&fork_handler_once, register_fork_handler);
    pthread_mutex_lock(&start_mu);
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
        if (want > CPU_COUNT(&set) - 1) want = CPU_COUNT(&set) - 1;
        while (atomic_load(&helpers) < want) {
            pthread_t t;
            pthread_attr_t attr;
            pthread_attr_init(&attr);
            pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
            const int cpu =
                atomic_load(&pin_helpers) ? cpu_of_set(&set, CPU_COUNT(&set) - 1 - atomic_load(&helpers)) : -1;
            const int rc = pthread_create(&t, &attr, helper_main, (void *)(intptr_t)cpu);
            pthread_attr_destroy(&attr);
            if (rc != 0) break;
            atomic_fetch_add(&helpers, 1);
        }
    }
    pthread_mutex_unlock(&start_mu);
    return atomic_load(&helpers);
}

/* How many helpers run. */
int lf_pool_helpers(void) { return atomic_load(&helpers); }

/* fn(ctx, u) for every u in [0, units) on the calling thread and the helpers (threads - 1 of them are
 * started here if fewer run; helpers a call with more threads started also take units of later calls:
 * the server has one thread count, and a unit's result does not depend on who runs it). With one
 * thread, one unit, or another call running, every unit runs on the caller, in order. Returns 0, or
 * -1 when units or threads are out of range (nothing runs then). */
int lf_pool_run(lf_unit_fn fn, void *ctx, int64_t units, int threads) {
    if (fn == NULL || units < 0 || units >= (int64_t)CLOSED || threads < 1) return -1;
    if (threads > 1 && units > 1) start_helpers(threads - 1);
    if (threads == 1 || units <= 1 || atomic_load(&helpers) == 0 || pthread_mutex_trylock(&call_mu) != 0) {
        for (int64_t u = 0; u < units; u++) fn(ctx, u);
        return 0;
    }
    const uint32_t seq = (uint32_t)(atomic_load_explicit(&ticket, memory_order_relaxed) >> 32) + 1;
    atomic_store_explicit(&call.fn, fn, memory_order_relaxed);
    atomic_store_explicit(&call.ctx, ctx, memory_order_relaxed);
    atomic_store_explicit(&call.units, (uint32_t)units, memory_order_relaxed);
    atomic_store_explicit(&done, 0, memory_order_relaxed);
    pthread_mutex_lock(&sleep_mu);
    atomic_store_explicit(&ticket, (uint64_t)seq << 32, memory_order_release);
    pthread_cond_broadcast(&sleep_cv);
    pthread_mutex_unlock(&sleep_mu);
    run_units(seq);
    while (atomic_load_explicit(&done, memory_order_acquire) < (uint32_t)units) LF_PAUSE();
    atomic_store_explicit(&ticket, ((uint64_t)seq << 32) | CLOSED, memory_order_release);
    pthread_mutex_unlock(&call_mu);
    return 0;
}
