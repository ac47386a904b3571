/* A step's decoder layers in one call: the same kernel calls, with the same arguments, as
 * model/runner.py's layer loop makes one by one through ctypes (~19 a layer, ~570 a SmolLM2 decode
 * step, each ~8 us of Python and ctypes around it). The kernels live in their own libraries (linear.c
 * or linear_f32.c, lora.c, attention.c, the pool in pool.c); this one only calls them through the
 * addresses native.py passes, so a layer's numbers are those of the loop, bit for bit. One difference
 * in order, not in numbers: the bf16 Linears of one input (q, k, v; gate, up) run as one
 * lf_linear_parts call, then their LoRAs, where the loop runs each Linear and its LoRA in turn.
 *
 * Llama layers only: per layer
 *   q, k, v = x . Wq/Wk/Wv^T (+ each token's LoRA); RoPE on q and k, k and v written to the KV slabs;
 *   o = attention(q); h += o . Wo^T (+ LoRA); x = rmsnorm(h);
 *   g, u = x . Wgate/Wup^T (+ LoRA); h += (silu(g) * u) . Wdown^T (+ LoRA); x = rmsnorm_next(h)
 * with h the residual stream [n, hidden] updated in place and x [n, hidden] the next layer's input. */
#include <stdint.h>
#include <string.h>

#include "linear.h"
#include "pool.h"

typedef int (*linear_bf16_fn)(const void *x, const void *packed, const float *bias, void *out, int64_t m, int64_t n,
                             int64_t k, int threads, lf_pool_run_fn pool_run);
typedef int (*linear_parts_fn)(const void *x, const lf_linear_part *parts, int count, int64_t m, int64_t k,
                               int threads, lf_pool_run_fn pool_run);
typedef int (*linear_f32_fn)(const void *x, const void *packed, const float *bias, void *out, int64_t m, int64_t n,
                             int64_t k, int threads);
typedef int (*lora_fn)(void *y, const void *x, const void *at, const void *bt, const int64_t *slots,
                       const int64_t *ranks, int64_t n_tokens, int64_t n_slots, int64_t d_in, int64_t d_out,
                       int64_t r_cap, int bf16, int threads, lf_pool_run_fn pool_run);
typedef int (*rope_kv_fn)(void *q, const void *k, const void *v, const void *cos, const void *sin, void *k_slab,
                          void *v_slab, const int64_t *kv_row, const int64_t *pos, int64_t n, int64_t heads,
                          int64_t kv_heads, int64_t head_dim, int64_t kv_rows, int64_t max_seq_len, int bf16,
                          int threads, lf_pool_run_fn pool_run);
typedef int (*attention_fn)(const void *q, const void *k_slab, const void *v_slab, void *out, const int64_t *tok,
                            const int64_t *kv_row, const int64_t *len, int64_t count, int64_t tokens,
                            int64_t kv_rows, int64_t heads, int64_t kv_heads, int64_t max_seq_len, int64_t head_dim,
                            float scale, int bf16, int threads, lf_pool_run_fn pool_run);
typedef int (*add_rmsnorm_fn)(void *x, const void *delta, const void *w, void *out, int64_t n, int64_t d, float eps,
                              int bf16, int threads, lf_pool_run_fn pool_run);
typedef int (*silu_mul_fn)(const void *gate, const void *up, void *out, int64_t n, int64_t d, int bf16, int threads,
                           lf_pool_run_fn pool_run);

enum { PROJ_Q, PROJ_K, PROJ_V, PROJ_O, PROJ_GATE, PROJ_UP, PROJ_DOWN, PROJS };

/* One projection: its base Linear's packed weight and its slot tables (r_cap 0: no loaded adapter
 * targets it). Mirrored by native_layers.py's _Proj. */
typedef struct {
    const void *packed;   /* the Linear kernel's packed weight */
    const float *bias;    /* [d_out] fp32, or NULL */
    const void *lora_at;  /* [n_slots, d_in, r_cap] A transposed */
    const void *lora_bt;  /* [n_slots, r_cap, d_out] B transposed and scaled */
    const int64_t *ranks; /* [n_slots] each slot's rank on this projection */
    int64_t d_in, d_out, r_cap;
} lf_proj;

/* One decoder layer. Mirrored by native_layers.py's _LayerTable. */
typedef struct {
    lf_proj proj[PROJS];
    void *k_slab, *v_slab;  /* [kv_rows, kv_heads, max_seq_len, head_dim] */
    const void *post_norm;  /* [hidden] before the MLP */
    const void *next_norm;  /* [hidden] the next layer's input norm, or the model's final one */
    float post_eps, next_eps, scale;
} lf_layer;

/* The kernels, the model's shapes and one step's tensors. Mirrored by native_layers.py's _Step. */
typedef struct {
    const void *linear;       /* lf_linear or lf_linear_avx512 (linear_bf16 == 1), or lf_linear_f32 (0) */
    const void *linear_parts; /* lf_linear_parts(_avx512) (linear_bf16 == 1), or NULL: one call a projection */
    const void *lora;         /* lf_lora_add */
    const void *rope_kv;      /* lf_rope_kv */
    const void *attention;    /* lf_attention */
    const void *add_rmsnorm;  /* lf_add_rmsnorm */
    const void *silu_mul;     /* lf_silu_mul */
    const void *pool;         /* lf_pool_run, or NULL */
    int linear_bf16, linear_threads, threads, bf16;
    int64_t hidden, heads, kv_heads, head_dim, intermediate, kv_rows, max_seq_len, n_slots;
    /* the step */
    int64_t n;                 /* tokens (rows of every activation) */
    int64_t tokens;            /* tokens the attention computes; rows [tokens, n) copy rows [0, n - tokens) */
    int64_t att_count;         /* the attention's rows */
    void *h;                   /* [n, hidden] the residual stream, in place */
    void *x;                   /* [n, hidden] the first layer's input; the final norm's output on return */
    const void *cos, *sin;     /* [n, head_dim] */
    const int64_t *kv_row;     /* [n] */
    const int64_t *pos;        /* [n] */
    const int64_t *slots;      /* [n] each token's adapter slot, or NULL: no token uses an adapter */
    const int64_t *att_tok, *att_kv_row, *att_len; /* [att_count] */
    void *work;                /* the activations below, n rows each, elem bytes an element */
} lf_step;

enum { OP_Q = 1, OP_K, OP_V, OP_ROPE, OP_ATTENTION, OP_O, OP_POST_NORM, OP_GATE, OP_UP, OP_SILU, OP_DOWN,
       OP_NEXT_NORM, OP_LORA = 16 };

int lf_layers_ops(void) { return OP_LORA; }

/* The structs' sizes, which native_layers.py checks its ctypes mirrors against. */
int64_t lf_layers_sizes(void) { return (int64_t)sizeof(lf_proj) << 32 | (int64_t)sizeof(lf_layer) << 16 | sizeof(lf_step); }

/* y [n, d_out] += each token's adapter of x [n, d_in] on this projection (nothing where no token uses
 * an adapter or none targets it). 0, or the failing op + OP_LORA. */
static int add_lora(const lf_step *s, const lf_proj *p, const void *x, void *y, int op) {
    if (s->slots == NULL || p->r_cap == 0) return 0;
    const int rc = ((lora_fn)s->lora)(y, x, p->lora_at, p->lora_bt, s->slots, p->ranks, s->n, s->n_slots, p->d_in,
                                      p->d_out, p->r_cap, s->bf16, s->threads, (lf_pool_run_fn)s->pool);
    return rc != 0 ? op + OP_LORA : 0;
}

/* y [n, d_out] = x [n, d_in] . W^T (+ bias), then each token's adapter added in place. 0, or the failing op. */
static int project(const lf_step *s, const lf_proj *p, const void *x, void *y, int op) {
    int rc;
    if (s->linear_bf16)
        rc = ((linear_bf16_fn)s->linear)(x, p->packed, p->bias, y, s->n, p->d_out, p->d_in, s->linear_threads,
                                        (lf_pool_run_fn)s->pool);
    else
        rc = ((linear_f32_fn)s->linear)(x, p->packed, p->bias, y, s->n, p->d_out, p->d_in, s->linear_threads);
    return rc != 0 ? op : add_lora(s, p, x, y, op);
}

/* project() each of `count` projections of one input, in order. 0, or the failing op. */
static int project_each(const lf_step *s, const lf_layer *l, int first, int count, const void *x, void *const *ys,
                        int op) {
    for (int i = 0; i < count; i++) {
        const int rc = project(s, &l->proj[first + i], x, ys[i], op + i);
        if (rc) return rc;
    }
    return 0;
}

/* ys[i] = x . W_i^T (+ bias) (+ each token's LoRA) for the projections `first`, `first` + 1, ... of one
 * input: the bf16 Linears (AMX or AVX-512) in one lf_linear_parts call (one call's start and end instead of `count`),
 * then each projection's LoRA in order; elsewhere project() each. 0, or the failing op. */
static int project_parts(const lf_step *s, const lf_layer *l, int first, int count, const void *x, void *const *ys,
                         int op) {
    if (!s->linear_bf16 || s->linear_parts == NULL) return project_each(s, l, first, count, x, ys, op);
    lf_linear_part parts[PROJS];
    for (int i = 0; i < count; i++) {
        const lf_proj *p = &l->proj[first + i];
        parts[i] = (lf_linear_part){p->packed, p->bias, ys[i], p->d_out};
        if (p->d_in != l->proj[first].d_in) return op + i;
    }
    if (((linear_parts_fn)s->linear_parts)(x, parts, count, s->n, l->proj[first].d_in, s->linear_threads,
                                           (lf_pool_run_fn)s->pool))
        return project_each(s, l, first, count, x, ys, op); /* refused: a call each names the projection */
    for (int i = 0; i < count; i++) {
        const int rc = add_lora(s, &l->proj[first + i], x, ys[i], op + i);
        if (rc) return rc;
    }
    return 0;
}

/* Runs layers [0, n_layers) of the step. Returns 0, or layer * 32 + op + 1 for the first kernel call that
 * refused its arguments (op: the OP_ values, + OP_LORA for a projection's LoRA); from that call on
 * nothing more is computed. */
int lf_layers(const lf_step *s, const lf_layer *layers, int64_t n_layers) {
    const size_t elem = s->bf16 ? 2 : 4;
    const int64_t n = s->n, q_width = s->heads * s->head_dim, kv_width = s->kv_heads * s->head_dim;
    char *w = s->work;
    char *q = w, *k = q + n * q_width * elem, *v = k + n * kv_width * elem, *o = v + n * kv_width * elem;
    char *delta = o + n * q_width * elem, *gate = delta + n * s->hidden * elem;
    char *up = gate + n * s->intermediate * elem, *act = up + n * s->intermediate * elem;
    lf_pool_run_fn pool = (lf_pool_run_fn)s->pool;
    for (int64_t i = 0; i < n_layers; i++) {
        const lf_layer *l = &layers[i];
        const int64_t fail = i * 32 + 1;
        int op;
        void *const qkv[3] = {q, k, v};
        if ((op = project_parts(s, l, PROJ_Q, 3, s->x, qkv, OP_Q))) return (int)(fail + op);
        if (((rope_kv_fn)s->rope_kv)(q, k, v, s->cos, s->sin, l->k_slab, l->v_slab, s->kv_row, s->pos, n, s->heads,
                                     s->kv_heads, s->head_dim, s->kv_rows, s->max_seq_len, s->bf16, s->threads,
                                     pool))
            return (int)(fail + OP_ROPE);
        if (s->att_count > 0 &&
            ((attention_fn)s->attention)(q, l->k_slab, l->v_slab, o, s->att_tok, s->att_kv_row, s->att_len,
                                         s->att_count, n, s->kv_rows, s->heads, s->kv_heads, s->max_seq_len,
                                         s->head_dim, l->scale, s->bf16, s->threads, pool))
            return (int)(fail + OP_ATTENTION);
        if (n > s->tokens) /* a lone token's twin row gets the same attention output */
            memcpy(o + s->tokens * q_width * elem, o, (size_t)((n - s->tokens) * q_width) * elem);
        if ((op = project(s, &l->proj[PROJ_O], o, delta, OP_O))) return (int)(fail + op);
        if (((add_rmsnorm_fn)s->add_rmsnorm)(s->h, delta, l->post_norm, s->x, n, s->hidden, l->post_eps, s->bf16,
                                             s->threads, pool))
            return (int)(fail + OP_POST_NORM);
        void *const gate_up[2] = {gate, up};
        if ((op = project_parts(s, l, PROJ_GATE, 2, s->x, gate_up, OP_GATE))) return (int)(fail + op);
        if (((silu_mul_fn)s->silu_mul)(gate, up, act, n, s->intermediate, s->bf16, s->threads, pool))
            return (int)(fail + OP_SILU);
        if ((op = project(s, &l->proj[PROJ_DOWN], act, delta, OP_DOWN))) return (int)(fail + op);
        if (((add_rmsnorm_fn)s->add_rmsnorm)(s->h, delta, l->next_norm, s->x, n, s->hidden, l->next_eps, s->bf16,
                                             s->threads, pool))
            return (int)(fail + OP_NEXT_NORM);
    }
    return 0;
}
