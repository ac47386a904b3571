/* Adapter weights into the slots' layout: a scaled, transposed, converted copy in one pass.
 *
 *     dst[k][j][i] = round(src[k][i][j] * scale)        k < n, i < rows, j < cols
 *
 * src is [n, rows, cols] at any element strides (an adapter file's lora_A [r, in] or lora_B [out, r]
 * tensors of one group, one strided view of the file's bytes), dst is [n, cols, rows] contiguous (the
 * host copy's A^T [in, r] and B^T [r, out] blocks, lorafleet_adapters/peft_format.py). The product is
 * one fp32 multiply, rounded once to dst's type (round to nearest even): what torch's
 * mul(src.float(), scale) then .to(dst dtype) gives, bit for bit. scale 1 is a plain conversion.
 *
 * The portable path (torch then numpy) took three or four passes over the data; this takes one, in
 * 16 x 16 tiles that stay in L1, so a 19.5 MB fp32 r=16 all-linear adapter costs about what reading it
 * and writing 9.75 MB of bf16 once costs.
 *
 * Types: 0 fp32, 1 bf16. Built by lorafleet_server/model/native.py with -O3 -march=<this CPU>; called
 * through ctypes. Returns 0, or -1 for arguments it does not take (nothing is written then).
 */
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#define TILE 16

static inline float load(const void *src, int type, int64_t at) {
    return type == 0 ? ((const float *)src)[at] : bf16_to_f32(((const uint16_t *)src)[at]);
}

static inline void store(void *dst, int type, int64_t at, float v) {
    if (type == 0)
        ((float *)dst)[at] = v;
    else
        ((uint16_t *)dst)[at] = f32_to_bf16(v);
}

static inline void tiles(void *dst, int dst_type, const void *src, int src_type, int64_t n, int64_t rows,
                         int64_t cols, int64_t s0, int64_t s1, int64_t s2, float scale) {
    float tile[TILE][TILE];
    for (int64_t k = 0; k < n; k++) {
        for (int64_t i0 = 0; i0 < rows; i0 += TILE) {
            const int64_t ni = rows - i0 < TILE ? rows - i0 : TILE;
            for (int64_t j0 = 0; j0 < cols; j0 += TILE) {
                const int64_t nj = cols - j0 < TILE ? cols - j0 : TILE;
                const int64_t base = k * s0 + i0 * s1 + j0 * s2, out = (k * cols + j0) * rows + i0;
                if (ni == TILE && nj == TILE) { /* constant bounds: unrolled and vectorized */
                    for (int64_t i = 0; i < TILE; i++)
                        for (int64_t j = 0; j < TILE; j++)
                            tile[j][i] = load(src, src_type, base + i * s1 + j * s2) * scale;
                    for (int64_t j = 0; j < TILE; j++)
                        for (int64_t i = 0; i < TILE; i++) store(dst, dst_type, out + j * rows + i, tile[j][i]);
                    continue;
                }
                for (int64_t i = 0; i < ni; i++)
                    for (int64_t j = 0; j < nj; j++)
                        tile[j][i] = load(src, src_type, base + i * s1 + j * s2) * scale;
                for (int64_t j = 0; j < nj; j++)
                    for (int64_t i = 0; i < ni; i++) store(dst, dst_type, out + j * rows + i, tile[j][i]);
            }
        }
    }
}

int lf_transpose_scaled(void *dst, int dst_type, const void *src, int src_type, int64_t n, int64_t rows,
                        int64_t cols, int64_t s0, int64_t s1, int64_t s2, float scale) {
    if (!dst || !src || n < 0 || rows < 0 || cols < 0 || s0 < 0 || s1 < 0 || s2 < 0) return -1;
    if ((dst_type != 0 && dst_type != 1) || (src_type != 0 && src_type != 1)) return -1;
    /* One instance per type pair, so that the inner loops see constant types (and unit strides). */
    if (src_type == 0 && dst_type == 1 && s2 == 1)
        tiles(dst, 1, src, 0, n, rows, cols, s0, s1, 1, scale);
    else if (src_type == 0 && dst_type == 1)
        tiles(dst, 1, src, 0, n, rows, cols, s0, s1, s2, scale);
    else if (src_type == 0)
        tiles(dst, 0, src, 0, n, rows, cols, s0, s1, s2, scale);
    else if (dst_type == 1)
        tiles(dst, 1, src, 1, n, rows, cols, s0, s1, s2, scale);
    else
        tiles(dst, 0, src, 1, n, rows, cols, s0, s1, s2, scale);
    return 0;
}
