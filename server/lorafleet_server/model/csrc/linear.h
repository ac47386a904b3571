/* The AMX Linear's call of several outputs (csrc/linear.c's lf_linear_parts), shared with the layer
 * driver (csrc/layers.c); model/native.py's LinearPart mirrors it and checks its size
 * (lf_linear_part_bytes). */
#ifndef LF_LINEAR_H
#define LF_LINEAR_H
#include <stdint.h>

/* One output of a call: out [m, n] bf16 = x . W^T (+ bias [n] fp32, may be NULL), W packed by
 * lf_linear_pack. A call may have several (a layer's q, k and v; gate and up) sharing x. */
typedef struct {
    const uint16_t *packed;
    const float *bias;
    uint16_t *out;
    int64_t n;
} lf_linear_part;

#endif
