/* The helper-thread pool's entry point as the kernels see it (csrc/pool.c defines it; native.py copies
 * this header next to every source it builds and hashes it into the library's cache key).
 *
 * The pool lives in a library of its own; a kernel call that may run on more than one thread takes the
 * address of its lf_pool_run (native.py passes it, or NULL), so every kernel of a step can run on the
 * same helper threads. */
#ifndef LORAFLEET_POOL_H
#define LORAFLEET_POOL_H

#include <stdint.h>

/* One unit of a call's work: unit u of [0, units). A unit's result must not depend on which thread
 * runs it, nor on which other units run at the same time. */
typedef void (*lf_unit_fn)(void *ctx, int64_t unit);

/* Runs fn(ctx, u) for every u in [0, units) on the calling thread and up to threads - 1 helpers and
 * returns when all have run. */
typedef int (*lf_pool_run_fn)(lf_unit_fn fn, void *ctx, int64_t units, int threads);

/* How many units a call of n items cuts its work into for `threads` threads on a pool: two per thread
 * (a helper that comes late leaves its share to the others), at least min_items items a unit, at
 * least one unit. Unit u is then items [n * u / units, n * (u + 1) / units). */
static inline int64_t lf_pool_units(int64_t n, int threads, int64_t min_items) {
    int64_t units = (int64_t)threads * 2;
    if (units * min_items > n) units = n / min_items;
    return units > 1 ? units : 1;
}

#endif
