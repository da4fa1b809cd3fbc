/* The fused encoder's elementwise passes (wiremap/train/fused.py) as single loops.
 *
 * Compiled on first use by wiremap/train/native.py and called through ctypes. Each entry point
 * splits the rows of one layer's [n, f] block over `threads` POSIX threads; every thread keeps
 * its own per-feature sums in `acc` ([threads, 3, f], zeroed by the caller), which Python adds
 * up. The inner loops carry no cross-iteration state except those per-feature arrays, so the
 * compiler vectorises them without reassociating floating-point sums.
 *
 * Element types: float32, or bfloat16 as raw uint16 (round to nearest even on store, as torch).
 */
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define MAX_THREADS 256

static inline float bf16_load(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float x;
    memcpy(&x, &u, 4);
    return x;
}

static inline uint16_t bf16_store(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    uint16_t rounded = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return x != x ? (uint16_t)0x7FC0 : rounded; /* NaN stays NaN */
}

static inline float f32_load(float x) { return x; }
static inline float f32_store(float x) { return x; }

/* e^x to about 2 ulp: x = n ln2 + r with |r| <= ln2/2, a degree-7 polynomial for e^r, and 2^n
 * built from its exponent bits. x is clamped to [-87, 87], where e^x is a normal float. */
static inline float exp_approx(float x) {
    x = x < -87.0f ? -87.0f : (x > 87.0f ? 87.0f : x);
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest */
    float r = x - n * 0.693145751953125f;
    r = r - n * 1.428606765330187045e-06f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

static inline float sigmoid(float z) { return 1.0f / (1.0f + exp_approx(-z)); }

/* ---- forward: pre-activations -> activations, penalties and statistics ------------------
 * In place over a (W_enc x without bias): p = a + b, d = p - theta, fired = d > 0,
 * a <- p * fired; per feature: acc[0] += min(d, 0), acc[1] += fired,
 * acc[2] += tanh(cn * a) = 2 sigmoid(2 cn * a) - 1; window <- |d| < half_bw (bf16 0 or 1). */
#define FORWARD_ROW(LOAD, STORE, WINDOW)                                    \
    for (int64_t j = 0; j < f; j++) {                                       \
        float p = LOAD(row[j]) + b[j];                                      \
        float d = p - theta[j];                                             \
        float fired = d > 0.0f ? 1.0f : 0.0f;                               \
        gap[j] += d < 0.0f ? d : 0.0f;                                      \
        active[j] += fired;                                                 \
        if (WINDOW) win[j] = (d < half_bw && d > -half_bw) ? 0x3F80 : 0;    \
        float act = p * fired;                                              \
        row[j] = STORE(act);                                                \
        tanh_sum[j] += 2.0f * sigmoid(act * cn2[j]) - 1.0f;                 \
    }

#define FORWARD(NAME, T, LOAD, STORE)                                                        \
    static void NAME(T *restrict a, uint16_t *restrict window, int64_t rows, int64_t f,     \
                     const float *restrict b, const float *restrict theta,                  \
                     const float *restrict cn2, float half_bw, float *restrict acc) {       \
        float *restrict gap = acc, *restrict active = acc + f, *restrict tanh_sum = acc + 2 * f; \
        for (int64_t i = 0; i < rows; i++) {                                                \
            T *restrict row = a + i * f;                                                    \
            if (window) {                                                                   \
                uint16_t *restrict win = window + i * f;                                    \
                FORWARD_ROW(LOAD, STORE, 1)                                                 \
            } else {                                                                        \
                uint16_t *restrict win = 0;                                                 \
                (void)win;                                                                  \
                FORWARD_ROW(LOAD, STORE, 0)                                                 \
            }                                                                               \
        }                                                                                   \
    }

FORWARD(forward_f32, float, f32_load, f32_store)
FORWARD(forward_bf16, uint16_t, bf16_load, bf16_store)

/* ---- backward: the pre-activation gradient and the per-feature sums ----------------------
 * s = sigmoid(2 cn * a), u = s (1 - s), g = k u + grad_a (k = 4 cn dL/dtanh_sum);
 * pre <- a > 0 ? g : below (below = -dL/dgap); per feature: acc[0] += g * window,
 * acc[1] += a u, acc[2] += pre. */
#define BACKWARD_ROW(LOAD, STORE, GRAD, WINDOW)                            \
    for (int64_t j = 0; j < f; j++) {                                      \
        float act = LOAD(row[j]);                                          \
        float s = sigmoid(act * cn2[j]);                                   \
        float u = s - s * s;                                               \
        g_cn[j] += act * u;                                                \
        float g = k[j] * u;                                                \
        if (GRAD) g += LOAD(grow[j]);                                      \
        if (WINDOW) g_window[j] += g * bf16_load(win[j]);                  \
        float out = act > 0.0f ? g : below[j];                             \
        g_b[j] += out;                                                     \
        prow[j] = STORE(out);                                              \
    }

#define BACKWARD(NAME, T, LOAD, STORE)                                                          \
    static void NAME(const T *restrict a, const T *restrict grad_a,                            \
                     const uint16_t *restrict window, T *restrict pre, int64_t rows, int64_t f,\
                     const float *restrict cn2, const float *restrict k,                       \
                     const float *restrict below, float *restrict acc) {                       \
        float *restrict g_window = acc, *restrict g_cn = acc + f, *restrict g_b = acc + 2 * f; \
        for (int64_t i = 0; i < rows; i++) {                                                   \
            const T *restrict row = a + i * f;                                                 \
            const T *restrict grow = grad_a ? grad_a + i * f : 0;                              \
            const uint16_t *restrict win = window ? window + i * f : 0;                        \
            T *restrict prow = pre + i * f;                                                    \
            if (grow && win) {                                                                 \
                BACKWARD_ROW(LOAD, STORE, 1, 1)                                                \
            } else if (grow) {                                                                 \
                BACKWARD_ROW(LOAD, STORE, 1, 0)                                                \
            } else if (win) {                                                                  \
                BACKWARD_ROW(LOAD, STORE, 0, 1)                                                \
            } else {                                                                           \
                BACKWARD_ROW(LOAD, STORE, 0, 0)                                                \
            }                                                                                  \
        }                                                                                      \
    }

BACKWARD(backward_f32, float, f32_load, f32_store)
BACKWARD(backward_bf16, uint16_t, bf16_load, bf16_store)

/* ---- threading: rows split evenly, thread t sums into acc + 3 f t ------------------------ */
typedef struct {
    int backward, bf16;
    char *a, *grad_a, *pre;
    uint16_t *window;
    int64_t rows, f;
    const float *b, *theta, *cn2, *k, *below;
    float half_bw;
    float *acc;
} Job;

static void *run(void *arg) {
    Job *j = (Job *)arg;
    if (!j->backward && j->bf16)
        forward_bf16((uint16_t *)j->a, j->window, j->rows, j->f, j->b, j->theta, j->cn2,
                     j->half_bw, j->acc);
    else if (!j->backward)
        forward_f32((float *)j->a, j->window, j->rows, j->f, j->b, j->theta, j->cn2, j->half_bw,
                    j->acc);
    else if (j->bf16)
        backward_bf16((const uint16_t *)j->a, (const uint16_t *)j->grad_a, j->window,
                      (uint16_t *)j->pre, j->rows, j->f, j->cn2, j->k, j->below, j->acc);
    else
        backward_f32((const float *)j->a, (const float *)j->grad_a, j->window, (float *)j->pre,
                     j->rows, j->f, j->cn2, j->k, j->below, j->acc);
    return 0;
}

/* Runs `proto` over rows [0, n) in `threads` parts; returns 0, or -1 if a thread failed to start
 * (its rows then run on the calling thread, so the result is complete either way). */
static int split(Job proto, int64_t n, int threads) {
    pthread_t tid[MAX_THREADS];
    Job jobs[MAX_THREADS];
    int started[MAX_THREADS] = {0}, status = 0;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > n) threads = (int)n; /* no thread without rows */
    if (threads < 1) threads = 1;
    size_t elem = proto.bf16 ? 2 : 4;
    for (int t = 0; t < threads; t++) {
        int64_t r0 = n * t / threads, r1 = n * (t + 1) / threads, off = r0 * proto.f;
        jobs[t] = proto;
        jobs[t].rows = r1 - r0;
        jobs[t].a = proto.a + off * elem;
        jobs[t].grad_a = proto.grad_a ? proto.grad_a + off * elem : 0;
        jobs[t].pre = proto.pre ? proto.pre + off * elem : 0;
        jobs[t].window = proto.window ? proto.window + off : 0;
        jobs[t].acc = proto.acc + 3 * proto.f * t;
        if (t > 0) started[t] = pthread_create(&tid[t], 0, run, &jobs[t]) == 0;
    }
    run(&jobs[0]);
    for (int t = 1; t < threads; t++) {
        if (started[t]) pthread_join(tid[t], 0);
        else { run(&jobs[t]); status = -1; }
    }
    return status;
}

int wiremap_forward(int bf16, void *a, uint16_t *window, int64_t n, int64_t f, const float *b,
                    const float *theta, const float *cn2, float half_bw, float *acc,
                    int threads) {
    Job job = {0, bf16, (char *)a, 0, 0, window, n, f, b, theta, cn2, 0, 0, half_bw, acc};
    return split(job, n, threads);
}

int wiremap_backward(int bf16, const void *a, const void *grad_a, const uint16_t *window,
                     void *pre, int64_t n, int64_t f, const float *cn2, const float *k,
                     const float *below, float *acc, int threads) {
    Job job = {1,  bf16, (char *)a, (char *)grad_a, (char *)pre, (uint16_t *)window, n, f, 0, 0,
               cn2, k,    below,     0.0f,           acc};
    return split(job, n, threads);
}
