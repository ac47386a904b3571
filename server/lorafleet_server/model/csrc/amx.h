/* What the AMX kernels (csrc/linear.c, csrc/attention.c) share: whether this build targets AMX,
 * asking Linux for the tiles (once), and ldtilecfg's operand. Included after _GNU_SOURCE (syscall() under
 * -std=c11). */
#ifndef LF_AMX_H
#define LF_AMX_H

/* 1 where the compiler targets AMX-BF16 on x86-64 (-march=native on such a CPU). GCC names it
 * __AMX_TILE__ / __AMX_BF16__, clang (14) __AMXTILE__ / __AMXBF16__. */
#if defined(__x86_64__) && \
    ((defined(__AMX_TILE__) && defined(__AMX_BF16__)) || (defined(__AMXTILE__) && defined(__AMXBF16__)))
#define LF_BUILD_AMX 1
#else
#define LF_BUILD_AMX 0
#endif

#if LF_BUILD_AMX
#include <stdatomic.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023 /* Linux: ask for an extended state component ... */
#define XFEATURE_XTILEDATA 18      /* ... the AMX tile data */

/* 1 when the OS kernel (Linux >= 5.16) lets this process use AMX tiles, else 0. Linux hands them out
 * per process on request; asking again is harmless. */
static inline int lf_amx_request(void) {
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : 0;
}

/* 1 where this process may use AMX tiles: lf_amx_request asked once per library (the answer is the
 * process's), so a kernel can check before every call what would otherwise be a SIGILL. */
static inline int lf_amx_permitted(void) {
    static _Atomic int state; /* 0: not asked yet, 1: granted, -1: refused */
    int s = atomic_load_explicit(&state, memory_order_relaxed);
    if (s == 0) {
        s = lf_amx_request() ? 1 : -1;
        atomic_store_explicit(&state, s, memory_order_relaxed);
    }
    return s > 0;
}

/* The tile configuration _tile_loadconfig takes (palette 1: up to 16 rows of 64 bytes a tile). */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} lf_tile_config;

#endif /* LF_BUILD_AMX */
#endif
