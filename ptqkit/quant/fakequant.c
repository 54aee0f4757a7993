/* Fused elementwise kernels of reconstruction: activation fake quantization with QDrop's keep mask, the unit-input
 * mix, and AdaRound's soft rounding with its regulariser.
 *
 * Built at first use by ptqkit/quant/kernels.py (plain C, OpenMP, no torch headers: about a second to compile) and
 * called through ctypes on contiguous float32 CPU tensors. ptqkit/quant/kernels.py holds the same arithmetic in
 * torch ops (CUDA, or no C compiler).
 *
 * Why: on CPU, a reconstruction iteration is bound by passes over activation-sized tensors and by the number of
 * small dispatches, not by the convolutions alone; in torch ops a dropped LSQ fake quantizer is about a dozen passes
 * forward and three backward, and AdaRound's rounding and regulariser about forty dispatches per layer.
 *
 * Activation fake quantization, element i, with u = x / s, q = round-half-even(u), qc = clamp(q, lo, hi),
 * lo = qmin - z, hi = qmax - z (integers, exact in float):
 *     forward   out_i  = keep_i ? qc * s : x_i
 *     backward  dx_i   = keep_i && q != qc ? 0 : g_i                    (straight-through, clamped elements stop)
 *               ds    += keep_i ? (q != qc ? qc : q - u) * g_i : 0      (LSQ step gradient)
 * With `stop_at_bounds`, "clamped" is q <= lo or q >= hi instead of q != qc: an element that rounds onto the lowest or
 * highest level counts as clipped (dx 0, ds qc). That is the gradient MQBench's round-STE-then-clamp formula gets
 * from torch's clamp since its boundary subgradient became 0 (pytorch#184574); the papers' code had 1 there.
 * The training forward writes, beside `out`, one float per element that holds everything the backward needs:
 * q - u (in [-1/2, 1/2]) where kept inside the grid, 0 where dropped, qc +/- CODE_OFFSET where kept and clamped
 * (integers, exact). The backward is then one light pass over it and the incoming gradient.
 *
 * Keep mask: keep_i = bits16(key, i) < threshold (threshold = round(keep_prob * 65536); 65536 keeps everything),
 * bits16(key, i) = bits 16 (i mod 4) .. 16 (i mod 4) + 15 of splitmix64(key + floor(i / 4) * GAMMA): the SplitMix64
 * generator (Steele et al. 2014) read at position floor(i / 4). A mask depends on the key and the element index
 * only, not on the thread count or the chunking.
 *
 * Sums (step gradient, regulariser) run in LANES float lanes per chunk of CHUNK elements, then lanes and chunks are
 * added in double, in order: also independent of the thread count.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#if defined(__x86_64__) && defined(__GLIBC__)
/* glibc's libmvec has vector versions of these; declaring them lets the loops below vectorise (-fno-math-errno). */
float expf(float) __attribute__((simd("notinbranch")));
float exp2f(float) __attribute__((simd("notinbranch")));
float log2f(float) __attribute__((simd("notinbranch")));
#endif

#define GAMMA 0x9E3779B97F4A7C15ULL
#define CHUNK 16384              /* elements per work item: a multiple of 4, fits in L2 with its operands */
#define LANES 16                 /* float partial sums per chunk */
#define MIN_PARALLEL (4 * CHUNK) /* below this, one thread: OpenMP's fork costs more than the work */
#define CODE_OFFSET 1048576.0f   /* 2^20: marks a clamped element in the saved code; |qc| stays far below it */
#define ZETA 1.1f                /* AdaRound's rectified sigmoid stretch: h = clamp(sigmoid(v)(ZETA - GAMMA_R) + GAMMA_R) */
#define GAMMA_R (-0.1f)

static inline uint64_t splitmix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* 16-bit draws for elements [start, start + n) (start a multiple of 4) into r. */
static inline void draws(uint64_t key, int64_t start, int64_t n, uint16_t *r) {
    uint64_t base = key + (uint64_t)(start >> 2) * GAMMA;
    int64_t words = (n + 3) >> 2;
    for (int64_t w = 0; w < words; w++) {
        uint64_t v = splitmix64(base + (uint64_t)w * GAMMA);
        r[4 * w] = (uint16_t)v;
        r[4 * w + 1] = (uint16_t)(v >> 16);
        r[4 * w + 2] = (uint16_t)(v >> 32);
        r[4 * w + 3] = (uint16_t)(v >> 48);
    }
}

static inline int threads_for(int64_t n, int threads) { return n < MIN_PARALLEL ? 1 : threads; }
static inline int64_t chunk_len(int64_t n, int64_t c) { return n - c * CHUNK < CHUNK ? n - c * CHUNK : CHUNK; }

/* A comparison clamp, not fminf/fmaxf: NaN must stay NaN so that a diverging loss is seen. */
static inline float clampf(float q, float lo, float hi) { return q < lo ? lo : (q > hi ? hi : q); }

static double sum_chunks(double *partial, int64_t chunks) {
    double total = 0.0;
    for (int64_t c = 0; c < chunks; c++) total += partial[c];
    free(partial);
    return total;
}

static inline double sum_lanes(const float *acc) {
    double s = 0.0;
    for (int l = 0; l < LANES; l++) s += acc[l];
    return s;
}

/* ------------------------------------------------------------------------------------ activation quantization */

static inline float kept_code(float u, float q, float qc, float lo, float hi, int stop_at_bounds) {
    int inside = stop_at_bounds ? (q > lo && q < hi) : q == qc;
    return inside ? q - u : (qc >= 0.0f ? qc + CODE_OFFSET : qc - CODE_OFFSET);
}

/* Inference (code == NULL) or training forward (code != NULL, see the header). */
void ptq_fq_forward(const float *x, float *out, float *code, int64_t n, float scale, float lo, float hi,
                    uint64_t key, uint32_t threshold, int stop_at_bounds, int threads) {
    int64_t chunks = (n + CHUNK - 1) / CHUNK;
    int drop = threshold < 65536u;
#pragma omp parallel for schedule(static) num_threads(threads_for(n, threads))
    for (int64_t c = 0; c < chunks; c++) {
        uint16_t r[CHUNK];
        int64_t start = c * CHUNK, len = chunk_len(n, c);
        const float *xc = x + start;
        float *oc = out + start;
        if (drop) draws(key, start, len, r);
        if (code == NULL) {
            for (int64_t i = 0; i < len; i++) {
                float v = clampf(nearbyintf(xc[i] / scale), lo, hi) * scale;
                oc[i] = !drop || r[i] < threshold ? v : xc[i];
            }
            continue;
        }
        float *cc = code + start;
        for (int64_t i = 0; i < len; i++) {
            float u = xc[i] / scale, q = nearbyintf(u), qc = clampf(q, lo, hi);
            int keep = !drop || r[i] < threshold;
            oc[i] = keep ? qc * scale : xc[i];
            cc[i] = keep ? kept_code(u, q, qc, lo, hi, stop_at_bounds) : 0.0f;
        }
    }
}

/* One element of the backward: writes dx, returns its share of the step gradient. */
static inline float fq_grad(float k, float g, float *gx) {
    int clamped = fabsf(k) > 0.5f * CODE_OFFSET;
    float ds = clamped ? (k > 0.0f ? k - CODE_OFFSET : k + CODE_OFFSET) : k;
    *gx = clamped ? 0.0f : g;
    return ds * g;
}

/* dx into gx; returns the step gradient (0 when need_scale_grad is 0, NaN if out of memory). */
double ptq_fq_backward(const float *code, const float *g, float *gx, int64_t n, int need_scale_grad, int threads) {
    int64_t chunks = (n + CHUNK - 1) / CHUNK;
    double *partial = (double *)calloc((size_t)chunks, sizeof(double));
    if (partial == NULL) return NAN;
#pragma omp parallel for schedule(static) num_threads(threads_for(n, threads))
    for (int64_t c = 0; c < chunks; c++) {
        int64_t start = c * CHUNK, len = chunk_len(n, c);
        const float *cc = code + start, *gc = g + start;
        float *oc = gx + start;
        float acc[LANES] = {0};
        int64_t i = 0;
        for (; i + LANES <= len; i += LANES)  /* whole blocks: a fixed lane per element, so it vectorises */
            for (int l = 0; l < LANES; l++) acc[l] += fq_grad(cc[i + l], gc[i + l], oc + i + l);
        for (int l = 0; i < len; i++, l++) acc[l] += fq_grad(cc[i], gc[i], oc + i);
        partial[c] = need_scale_grad ? sum_lanes(acc) : 0.0;
    }
    return sum_chunks(partial, chunks);
}

/* out[b] = where(keep, a[rows[b]], b_[rows[b]]) row by row, rows of `width` elements; the mask runs over out. */
void ptq_mix_rows(const float *a, const float *b, const int64_t *rows, int64_t batch, int64_t width, float *out,
                  uint64_t key, uint32_t threshold, int threads) {
    int64_t n = batch * width;
    int64_t chunks = (n + CHUNK - 1) / CHUNK;
#pragma omp parallel for schedule(static) num_threads(threads_for(n, threads))
    for (int64_t c = 0; c < chunks; c++) {
        uint16_t r[CHUNK];
        int64_t start = c * CHUNK, len = chunk_len(n, c);
        draws(key, start, len, r);
        int64_t i = 0;
        while (i < len) {
            int64_t e = start + i, row = e / width, col = e % width;
            int64_t span = width - col < len - i ? width - col : len - i;
            const float *ar = a + rows[row] * width + col, *br = b + rows[row] * width + col;
            float *o = out + e;
            const uint16_t *rr = r + i;
            for (int64_t j = 0; j < span; j++) o[j] = rr[j] < threshold ? ar[j] : br[j];
            i += span;
        }
    }
}

/* The keep mask alone, as bytes (0/1), for callers that need it as a tensor. */
void ptq_keep_mask(uint8_t *out, int64_t n, uint64_t key, uint32_t threshold, int threads) {
    int64_t chunks = (n + CHUNK - 1) / CHUNK;
#pragma omp parallel for schedule(static) num_threads(threads_for(n, threads))
    for (int64_t c = 0; c < chunks; c++) {
        uint16_t r[CHUNK];
        int64_t start = c * CHUNK, len = chunk_len(n, c);
        draws(key, start, len, r);
        for (int64_t i = 0; i < len; i++) out[start + i] = r[i] < threshold;
    }
}

/* ----------------------------------------------------------------------------------------- AdaRound rounding */

/* Soft-rounded weights of flat V (`alpha`) and what their backward needs, element i:
 *     h = clamp(sigmoid(v)(ZETA - GAMMA_R) + GAMMA_R, 0, 1),  t = floor(w / s) + h + z
 *     out = (clamp(t, lo, hi) - z) * s,                       coef_w = dh/dv * s, 0 where t is clamped
 * and, when coef_p != NULL, the regulariser sum_i (1 - |2h - 1|^beta) (returned) with coef_p = its d/dv.
 * Per-element arrays: base = floor(w / s), scale, zero, lo, hi. */
/* h(v) and dh/dv (0 where the clamp holds) */
static inline float rectified_sigmoid(float v, float *dh) {
    float sig = 1.0f / (1.0f + expf(-v));
    float raw = sig * (ZETA - GAMMA_R) + GAMMA_R;
    float h = clampf(raw, 0.0f, 1.0f);
    *dh = h == raw ? (sig - sig * sig) * (ZETA - GAMMA_R) : 0.0f;
    return h;
}

static inline void soft_weight(float h, float dh, float base, float scale, float zero, float lo, float hi,
                               float *out, float *coef_w) {
    float t = base + h + zero;
    float tc = clampf(t, lo, hi);
    *out = (tc - zero) * scale;
    *coef_w = tc == t ? dh * scale : 0.0f;
}

/* 1 - |2h - 1|^beta, and its d/dv into coef_p. |d|^(beta-1) as exp2(log2), about three times faster than libmvec's
   powf and as exact here; beta == 1 apart (0 * log2(0) would be NaN). */
static inline float penalty(float h, float dh, float beta, float *coef_p) {
    float d = 2.0f * h - 1.0f;
    float a = fabsf(d);
    float ab1 = beta == 1.0f ? 1.0f : exp2f((beta - 1.0f) * log2f(a));
    float sign = a > 0.0f ? copysignf(1.0f, d) : 0.0f;   /* sign(d), 0 at 0 as torch.sign */
    *coef_p = ab1 * sign * dh * (-2.0f * beta);
    return 1.0f - ab1 * a;
}

/* Elements [start, end) without the regulariser, then with it (returns its partial sum). Separate functions with
   restrict pointers: inside the OpenMP body GCC does not vectorise these loops. */
__attribute__((noinline)) static void round_chunk(const float *restrict alpha, const float *restrict base, const float *restrict scale,
                        const float *restrict zero, const float *restrict lo, const float *restrict hi,
                        float *restrict out, float *restrict coef_w, int64_t start, int64_t end) {
    for (int64_t i = start; i < end; i++) {
        float dh, h = rectified_sigmoid(alpha[i], &dh);
        soft_weight(h, dh, base[i], scale[i], zero[i], lo[i], hi[i], out + i, coef_w + i);
    }
}

__attribute__((noinline)) static void round_penalty_chunk(
        const float *restrict alpha, const float *restrict base, const float *restrict scale,
        const float *restrict zero, const float *restrict lo, const float *restrict hi, float beta,
        float *restrict out, float *restrict coef_w, float *restrict coef_p, float *restrict terms, int64_t start,
        int64_t end) {
    for (int64_t i = start; i < end; i++) {
        float dh, h = rectified_sigmoid(alpha[i], &dh);
        soft_weight(h, dh, base[i], scale[i], zero[i], lo[i], hi[i], out + i, coef_w + i);
        terms[i - start] = penalty(h, dh, beta, coef_p + i);
    }
}

/* sum of terms[0, len) in LANES float lanes, then in double */
__attribute__((noinline)) static double lane_sum(const float *restrict terms, int64_t len) {
    float acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= len; i += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += terms[i + l];
    for (int l = 0; i < len; i++, l++) acc[l] += terms[i];
    return sum_lanes(acc);
}

double ptq_round_soft(const float *alpha, const float *base, const float *scale, const float *zero,
                      const float *lo, const float *hi, int64_t n, float beta, float *out, float *coef_w,
                      float *coef_p, int threads) {
    int64_t chunks = (n + CHUNK - 1) / CHUNK;
    double *partial = (double *)calloc((size_t)chunks, sizeof(double));
    if (partial == NULL) return NAN;
#pragma omp parallel for schedule(static) num_threads(threads_for(n, threads))
    for (int64_t c = 0; c < chunks; c++) {
        int64_t start = c * CHUNK, end = start + chunk_len(n, c);
        if (coef_p == NULL)
            round_chunk(alpha, base, scale, zero, lo, hi, out, coef_w, start, end);
        else {
            float terms[CHUNK];
            round_penalty_chunk(alpha, base, scale, zero, lo, hi, beta, out, coef_w, coef_p, terms, start, end);
            partial[c] = lane_sum(terms, end - start);
        }
    }
    return sum_chunks(partial, chunks);
}

/* ------------------------------------------------------------------------------------------------------ Adam */

/* One Adam step (no weight decay, no amsgrad) in torch's single-tensor order of operations:
 *     m += (1 - beta1)(g - m);  v = v beta2 + (1 - beta2) g^2;  p -= (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps)
 * with bc1 = 1 - beta1^t, bc2 = 1 - beta2^t. torch.optim's step costs about 150 us of Python per call, more than a
 * whole iteration of a small unit. */
void ptq_adam(float *p, const float *g, float *m, float *v, int64_t n, float lr, float beta1, float beta2, float eps,
              float bc1, float bc2_sqrt, int threads) {
    float step_size = lr / bc1;
#pragma omp parallel for schedule(static) num_threads(threads_for(n, threads))
    for (int64_t i = 0; i < n; i++) {
        m[i] += (1.0f - beta1) * (g[i] - m[i]);
        v[i] = v[i] * beta2 + (1.0f - beta2) * g[i] * g[i];
        p[i] -= step_size * (m[i] / (sqrtf(v[i]) / bc2_sqrt + eps));
    }
}

/* ------------------------------------------------------------------------- PD-Quant's distribution correction */

/* Mean and the sum of squared deviations of one row: two passes (the row stays in cache), each in LANES float
 * lanes (vectorised) added in double. */
static inline void row_moments(const float *restrict row, int64_t len, double *mean, double *ss) {
    float acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= len; i += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += row[i + l];
    for (int l = 0; i < len; i++, l++) acc[l] += row[i];
    double m = sum_lanes(acc) / (double)len;
    float mf = (float)m, sq[LANES] = {0};
    for (i = 0; i + LANES <= len; i += LANES)
        for (int l = 0; l < LANES; l++) {
            float d = row[i + l] - mf;
            sq[l] += d * d;
        }
    for (int l = 0; i < len; i++, l++) {
        float d = row[i] - mf;
        sq[l] += d * d;
    }
    *mean = m;
    *ss = sum_lanes(sq);
}

/* Mean and unbiased variance of each of `rows` contiguous rows of `len` elements (per sample and channel, over
 * positions). */
void ptq_row_stats(const float *x, int64_t rows, int64_t len, float *mean, float *var, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads_for(rows * len, threads))
    for (int64_t r = 0; r < rows; r++) {
        double m, ss;
        row_moments(x + r * len, len, &m, &ss);
        mean[r] = (float)m;
        var[r] = len > 1 ? (float)(ss / (double)(len - 1)) : NAN;
    }
}

/* Their backward: gx = g_mean / len + (x - mean) g_var 2 / (len - 1), row by row. */
void ptq_row_stats_backward(const float *x, const float *mean, const float *g_mean, const float *g_var, int64_t rows,
                            int64_t len, float *gx, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads_for(rows * len, threads))
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * len;
        float *out = gx + r * len;
        float a = g_mean[r] / (float)len, b = g_var[r] * 2.0f / (float)(len - 1), m = mean[r];
        for (int64_t i = 0; i < len; i++) out[i] = a + (row[i] - m) * b;
    }
}

/* grad += coef (a - b); returns sum (a - b)^2 (in double over chunks): a squared-distance term and its gradient
 * in one pass. */
double ptq_sqdist_grad(const float *a, const float *b, float *grad, int64_t n, float coef, int threads) {
    int64_t chunks = (n + CHUNK - 1) / CHUNK;
    double *partial = (double *)calloc((size_t)chunks, sizeof(double));
    if (partial == NULL) return NAN;
#pragma omp parallel for schedule(static) num_threads(threads_for(n, threads))
    for (int64_t c = 0; c < chunks; c++) {
        int64_t start = c * CHUNK, len = chunk_len(n, c);
        float acc[LANES] = {0};
        int64_t i = 0;
        for (; i + LANES <= len; i += LANES)
            for (int l = 0; l < LANES; l++) {
                float d = a[start + i + l] - b[start + i + l];
                grad[start + i + l] += coef * d;
                acc[l] += d * d;
            }
        for (int l = 0; i < len; i++, l++) {
            float d = a[start + i] - b[start + i];
            grad[start + i] += coef * d;
            acc[l] += d * d;
        }
        partial[c] = sum_lanes(acc);
    }
    return sum_chunks(partial, chunks);
}

/* PD-Quant's BN-statistics distance of one BN input x (N, C, L), per sample:
 *     sum_{n,c} (m_nc - mu_c)^2 + (sqrt(v_nc + eps) - sigma_c)^2, over N
 * with m, v the mean and unbiased variance over L (double, two passes per row in cache). Writes each row's mean
 * and the loss's derivatives by m and v (for ptq_row_stats_backward); returns the loss. */
double ptq_bn_distance(const float *x, int64_t n, int64_t c, int64_t len, const float *mu, const float *sigma,
                       float eps, float *mean, float *d_mean, float *d_var, int threads) {
    double *partial = (double *)calloc((size_t)(n * c), sizeof(double));
    if (partial == NULL) return NAN;
#pragma omp parallel for schedule(static) num_threads(threads_for(n * c * len, threads))
    for (int64_t r = 0; r < n * c; r++) {
        int64_t ch = r % c;
        double m, ss;
        row_moments(x + r * len, len, &m, &ss);
        double v = ss / (double)(len - 1), sd = sqrt(v + eps);
        double dm = m - mu[ch], ds = sd - sigma[ch];
        partial[r] = dm * dm + ds * ds;
        mean[r] = (float)m;
        d_mean[r] = (float)(2.0 * dm / (double)n);
        d_var[r] = (float)(ds / (sd * (double)n));
    }
    return sum_chunks(partial, n * c) / (double)n;
}
