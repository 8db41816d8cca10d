/* Decoding's kernels on AVX2 + FMA (cpu_kernels.py builds, loads and calls
 * them, and sets the limits below): y = (x @ W.T) * scale of a few float32 or
 * bfloat16 rows x [rows, in] and a row-major [out, in] W of float32, bfloat16
 * or int8, accumulated in float32; and one new position's attention (ATTEND).
 *
 * Each thread streams whole rows of W front to back, with a software prefetch
 * a kilobyte ahead, and multiplies each by every row of x: rows of W read side
 * by side defeat the hardware prefetcher. Several accumulators per row of x
 * cover an FMA's latency. */
#include <immintrin.h>
#include <float.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#if !defined(MAX_MATRICES) || !defined(MAX_ROWS)
#error "build with -DMAX_MATRICES=... -DMAX_ROWS=..., as cpu_kernels.py does"
#endif

#define PREFETCH_BYTES 1024

static inline float horizontal_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(s);
}

static inline __m256 load8_f32(const float* p) { return _mm256_loadu_ps(p); }

/* bfloat16 is the top half of a float32. */
static inline __m256 load8_bf16(const uint16_t* p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

static inline __m256 load8_i8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}

static inline float scalar_bf16(uint16_t v) {
    union { uint32_t u; float f; } bits = {(uint32_t)v << 16};
    return bits.f;
}
static inline float scalar_i8(int8_t v) { return (float)v; }
static inline float scalar_f32(float v) { return v; }

/* Sums of x[i] . row for R rows of x (R a constant, so the loops unroll). */
#define DOT(NAME, T, LOAD8, SCALAR, R)                                                    \
    static inline void NAME(const float* x, const T* row, int64_t in, float* sums) {      \
        const int64_t body = in & ~(int64_t)15;                                           \
        __m256 a[R][2];                                                                   \
        for (int i = 0; i < R; i++) a[i][0] = a[i][1] = _mm256_setzero_ps();              \
        for (int64_t k = 0; k < body; k += 16) {                                          \
            if ((k * sizeof(T)) % 64 == 0)                                                \
                _mm_prefetch((const char*)(row + k) + PREFETCH_BYTES, _MM_HINT_T0);       \
            __m256 w0 = LOAD8(row + k), w1 = LOAD8(row + k + 8);                          \
            for (int i = 0; i < R; i++) {                                                 \
                a[i][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * in + k), w0, a[i][0]); \
                a[i][1] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * in + k + 8), w1, a[i][1]); \
            }                                                                             \
        }                                                                                 \
        for (int i = 0; i < R; i++) {                                                     \
            float sum = horizontal_sum(_mm256_add_ps(a[i][0], a[i][1]));                  \
            for (int64_t k = body; k < in; k++) sum += x[i * in + k] * SCALAR(row[k]);    \
            sums[i] = sum;                                                                \
        }                                                                                 \
    }

/* The same for one row of x, with four accumulators over 32 weights. */
#define DOT1(NAME, T, LOAD8, SCALAR)                                                      \
    static inline void NAME(const float* x, const T* row, int64_t in, float* sums) {      \
        const int64_t body = in & ~(int64_t)31;                                           \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                       \
        for (int64_t k = 0; k < body; k += 32) {                                          \
            _mm_prefetch((const char*)(row + k) + PREFETCH_BYTES, _MM_HINT_T0);           \
            if (sizeof(T) == 4) /* 32 float32 span two lines */                           \
                _mm_prefetch((const char*)(row + k) + PREFETCH_BYTES + 64, _MM_HINT_T0);  \
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), LOAD8(row + k), a0);             \
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), LOAD8(row + k + 8), a1);     \
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 16), LOAD8(row + k + 16), a2);   \
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 24), LOAD8(row + k + 24), a3);   \
        }                                                                                 \
        float sum = horizontal_sum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))); \
        for (int64_t k = body; k < in; k++) sum += x[k] * SCALAR(row[k]);                 \
        sums[0] = sum;                                                                    \
    }

/* Round to nearest even, as PyTorch's float -> bfloat16 does (NaN -> 0x7FC0). */
static inline uint16_t to_bf16(float v) {
    union { float f; uint32_t u; } bits = {v};
    return v != v ? 0x7FC0 : (bits.u + 0x7FFF + ((bits.u >> 16) & 1)) >> 16;
}

/* v rounded to bfloat16, as a float32 again: where the model rounds. */
static inline float round_bf16(float v) { return scalar_bf16(to_bf16(v)); }

/* y[i] = v, or residual[i] + v (v rounded first: the model adds the rounded
 * product), in y's dtype. */
static inline void store(void* y, int64_t i, float v, int y_bf16, const void* residual) {
    if (residual && y_bf16) v = scalar_bf16(((const uint16_t*)residual)[i]) + round_bf16(v);
    else if (residual) v = ((const float*)residual)[i] + v;
    if (y_bf16) ((uint16_t*)y)[i] = to_bf16(v);
    else ((float*)y)[i] = v;
}

/* exp(x) of 8 floats (Cephes's expf: 2^n times a degree-6 polynomial of the
 * remainder, within ~2 ulp), x clamped to [-87, 88]. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* Gemma's tanh-approximate GELU, 0.5 x (1 + tanh(z)) with z = sqrt(2/pi)
 * (x + 0.044715 x^3), written x / (1 + exp(-2z)) (the same function) so it
 * needs only exp8: within a few float32 ulp of PyTorch's. */
static inline __m256 gelu8(__m256 x) {
    const __m256 cube = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
    const __m256 z = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f),
                                   _mm256_add_ps(x, _mm256_mul_ps(_mm256_set1_ps(0.044715f), cube)));
    const __m256 e = exp8(_mm256_mul_ps(_mm256_set1_ps(-2.0f), z));
    return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

/* GeGLU's hidden rows gelu(gate) * up in place of `out` (which holds gate as
 * float32), each rounded to bfloat16 where the model computes in it. */
static void gelu_times(float* out, const void* up, int bf16, int64_t count) {
    const int64_t body = count & ~(int64_t)7;
    for (int64_t k = 0; k < body; k += 8) _mm256_storeu_ps(out + k, gelu8(_mm256_loadu_ps(out + k)));
    for (int64_t k = body; k < count; k++) {
        float lanes[8] = {out[k]};
        _mm256_storeu_ps(lanes, gelu8(_mm256_loadu_ps(lanes)));
        out[k] = lanes[0];
    }
    for (int64_t k = 0; k < count; k++) {
        if (bf16) out[k] = round_bf16(round_bf16(out[k]) * scalar_bf16(((const uint16_t*)up)[k]));
        else out[k] = out[k] * ((const float*)up)[k];
    }
}

/* The rows as float32: converted from bfloat16, and with `norm` Gemma's RMS
 * normalization `x * rsqrt(mean(x^2) + eps) * norm` in float32, rounded to
 * the rows' dtype as the model's layer rounds it. NULL where x serves as is. */
static float* float32_rows(const void* x, int x_bf16, const void* up, const float* norm,
                           float eps, int64_t rows, int64_t in) {
    if (!x_bf16 && !norm && !up) return NULL;
    float* out = (float*)malloc(rows * in * sizeof(float));
    if (!out) return NULL;
    for (int64_t i = 0; i < rows * in; i++)
        out[i] = x_bf16 ? scalar_bf16(((const uint16_t*)x)[i]) : ((const float*)x)[i];
    if (up) gelu_times(out, up, x_bf16, rows * in);
    for (int64_t r = 0; norm && r < rows; r++) {
        float* row = out + r * in;
        float squares = 0.0f;
        for (int64_t k = 0; k < in; k++) squares += row[k] * row[k];
        const float inverse = 1.0f / sqrtf(squares / (float)in + eps);
        for (int64_t k = 0; k < in; k++) {
            row[k] = row[k] * inverse * norm[k];
            if (x_bf16) row[k] = round_bf16(row[k]);
        }
    }
    return out;
}

/* bfloat16 rows times int8 weights, in integers: each row as int16 times a
 * power of two (its largest magnitude below 2^14), which holds every element
 * within 2^6 of the row's largest exactly (bfloat16 has 8 significant bits)
 * and smaller ones to within 2^-15 of it. vpmaddwd then does 16 weights per
 * instruction where the float path converts 8 in two, so int8 streams as
 * fast as bfloat16. NULL (use the float path) for rows with an inf or NaN,
 * or out of memory. */
static int16_t* int16_rows(const float* x, int64_t rows, int64_t in, float* row_scales) {
    int16_t* out = (int16_t*)malloc(rows * in * sizeof(int16_t));
    for (int64_t r = 0; out && r < rows; r++) {
        const float* row = x + r * in;
        float largest = 0.0f;
        for (int64_t k = 0; k < in; k++) {
            const float magnitude = fabsf(row[k]);
            if (!(magnitude <= FLT_MAX)) {
                free(out);
                return NULL;
            }
            largest = magnitude > largest ? magnitude : largest;
        }
        int exponent;
        frexpf(largest, &exponent); /* largest < 2^exponent */
        const float down = ldexpf(1.0f, 14 - exponent);
        row_scales[r] = ldexpf(1.0f, exponent - 14);
        for (int64_t k = 0; k < in; k++) out[r * in + k] = (int16_t)lrintf(row[k] * down);
    }
    return out;
}

/* Exact integer sums over blocks of 4096 weights: an int32 lane then holds
 * at most 64 products pairs of |w| <= 128 and |x| < 2^14 (2^28 < 2^31 over
 * the four accumulators), converted to float32 once per block. */
static inline float dot_i16(const int16_t* x, const int8_t* row, int64_t in) {
    const int64_t body = in & ~(int64_t)63;
    __m256 total = _mm256_setzero_ps();
    for (int64_t block = 0; block < body; block += 4096) {
        const int64_t end = block + 4096 < body ? block + 4096 : body;
        __m256i a[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                        _mm256_setzero_si256()};
        for (int64_t k = block; k < end; k += 64) {
            _mm_prefetch((const char*)(row + k) + PREFETCH_BYTES, _MM_HINT_T0);
            for (int j = 0; j < 4; j++) {
                __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(row + k + 16 * j)));
                __m256i v = _mm256_loadu_si256((const __m256i*)(x + k + 16 * j));
                a[j] = _mm256_add_epi32(a[j], _mm256_madd_epi16(w, v));
            }
        }
        __m256i sum = _mm256_add_epi32(_mm256_add_epi32(a[0], a[1]), _mm256_add_epi32(a[2], a[3]));
        total = _mm256_add_ps(total, _mm256_cvtepi32_ps(sum));
    }
    int64_t tail = 0;
    for (int64_t k = body; k < in; k++) tail += (int64_t)x[k] * row[k];
    return horizontal_sum(total) + (float)tail;
}

/* y[m] = (x @ w[m].T) * scale[m] for `count` matrices w[m] [outs[m], in] that
 * share x [rows, in], in one pass of the threads, so small matrices cost no
 * call or wake-up of their own; `norm`, `up` (float32_rows) and `residual`
 * (store; one matrix) each save a PyTorch op or two. The threads are PyTorch's
 * own OpenMP workers (cpu_kernels.py checks): a second pool would compete with
 * them while they spin idle. Every check comes before the parallel loop, whose
 * threads write only their own elements of y. -1: bad arguments, or no memory. */
#define MATVEC(NAME, T, LOAD8, SCALAR, INT16)                                             \
    DOT(NAME##_dot4, T, LOAD8, SCALAR, 4)                                                 \
    DOT(NAME##_dot3, T, LOAD8, SCALAR, 3)                                                 \
    DOT(NAME##_dot2, T, LOAD8, SCALAR, 2)                                                 \
    DOT1(NAME##_dot1, T, LOAD8, SCALAR)                                                   \
    int NAME(const void* x_in, int bf16, const void* up, const float* norm, float eps,    \
             int count, const void* const* ws, const float* const* scales,                \
             void* const* ys, const int64_t* outs, const void* residual, int64_t in,      \
             int64_t rows, int threads) {                                                 \
        if (count < 1 || count > MAX_MATRICES || rows < 1 || rows > MAX_ROWS || in < 1 || \
            threads < 1 || (residual && count != 1)) return -1;                           \
        int64_t starts[MAX_MATRICES + 1] = {0};                                           \
        for (int m = 0; m < count; m++) starts[m + 1] = starts[m] + outs[m];              \
        float* converted = float32_rows(x_in, bf16, up, norm, eps, rows, in);             \
        if (!converted && (bf16 || norm || up)) return -1;                                \
        const float* x = converted ? converted : (const float*)x_in;                      \
        float row_scales[MAX_ROWS];                                                       \
        int16_t* quantized = INT16 && bf16 ? int16_rows(x, rows, in, row_scales) : NULL;  \
        _Pragma("omp parallel for schedule(static) num_threads(threads) if(threads > 1)") \
        for (int64_t t = 0; t < starts[count]; t++) {                                     \
            int m = 0;                                                                    \
            while (t >= starts[m + 1]) m++;                                               \
            const int64_t n = t - starts[m];                                              \
            const T* row = (const T*)ws[m] + n * in;                                      \
            const float factor = scales[m] ? scales[m][n] : 1.0f; /* exact when 1 */      \
            float sums[4];                                                                \
            for (int64_t i = 0; quantized && i < rows; i++) {                             \
                const float sum = dot_i16(quantized + i * in, (const int8_t*)row, in);    \
                store(ys[m], i * outs[m] + n, sum * row_scales[i] * factor, bf16, residual); \
            }                                                                             \
            for (int64_t first = 0; !quantized && first < rows; first += 4) {             \
                const float* xs = x + first * in;                                         \
                const int64_t group = rows - first < 4 ? rows - first : 4;                \
                if (group == 4) NAME##_dot4(xs, row, in, sums);                           \
                else if (group == 3) NAME##_dot3(xs, row, in, sums);                      \
                else if (group == 2) NAME##_dot2(xs, row, in, sums);                      \
                else NAME##_dot1(xs, row, in, sums);                                      \
                for (int64_t i = 0; i < group; i++)                                       \
                    store(ys[m], (first + i) * outs[m] + n, sums[i] * factor, bf16, residual); \
            }                                                                             \
        }                                                                                 \
        free(converted);                                                                  \
        free(quantized);                                                                  \
        return 0;                                                                         \
    }

MATVEC(matvec_bf16, uint16_t, load8_bf16, scalar_bf16, 0)
MATVEC(matvec_i8, int8_t, load8_i8, scalar_i8, 1)
MATVEC(matvec_f32, float, load8_f32, scalar_f32, 0)

/* One new position's attention for `batch` sequences: rotates the new query
 * and key rows (x * cos + roll(x, h/2) * sin, with cos = [cos, cos] and sin =
 * [-sin, sin]), writes key and value into the caches [batch, max_length,
 * kv_heads, h], and attends query head i to key/value head i / (heads /
 * kv_heads) over slots 0..position. It rounds where the model's layers round,
 * so bfloat16 agrees with them, and replaces a layer's many small PyTorch ops,
 * each costing more than its arithmetic. Each thread's scratch is allocated
 * before the parallel loop, so the loop cannot fail. -1 as for MATVEC. */
#define ATTEND(NAME, T, LOAD8, SCALAR, ROUND, STORE)                                      \
    static inline float NAME##_dot(const float* q, const T* k, int64_t h) {               \
        const int64_t body = h & ~(int64_t)7;                                             \
        __m256 a = _mm256_setzero_ps();                                                   \
        for (int64_t d = 0; d < body; d += 8)                                             \
            a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), LOAD8(k + d), a);                 \
        float sum = horizontal_sum(a);                                                    \
        for (int64_t d = body; d < h; d++) sum += q[d] * SCALAR(k[d]);                    \
        return sum;                                                                       \
    }                                                                                     \
    static void NAME##_rotate(const T* x, const float* cos, const float* sin, int64_t h,  \
                              float* out) {                                               \
        for (int64_t d = 0; d < h; d++) {                                                 \
            const float straight = SCALAR(x[d]) * cos[d];                                 \
            const float crossed = SCALAR(x[(d + h / 2) % h]) * sin[d];                    \
            out[d] = ROUND(straight + crossed);                                           \
        }                                                                                 \
    }                                                                                     \
    int NAME(const T* q, const T* k, const T* v, const float* cos, const float* sin,     \
             float scale, T* key_cache, T* value_cache, int64_t batch, int64_t max_length, \
             int64_t position, int64_t heads, int64_t kv_heads, int64_t h, T* out,         \
             int threads) {                                                               \
        if (batch < 1 || heads < 1 || kv_heads < 1 || heads % kv_heads || h < 2 || h % 2 || \
            position < 0 || position >= max_length || threads < 1) return -1;             \
        const int64_t groups = heads / kv_heads, keys = position + 1;                     \
        const int64_t floats = (batch * heads + 1) * h + threads * (keys + h);            \
        float* queries = (float*)malloc(floats * sizeof(float));                          \
        if (!queries) return -1;                                                          \
        float* rotated = queries + batch * heads * h;                                     \
        float* scratch = rotated + h;                                                     \
        for (int64_t r = 0; r < batch; r++) {                                             \
            for (int64_t j = 0; j < kv_heads; j++) {                                      \
                const int64_t slot = ((r * max_length + position) * kv_heads + j) * h;    \
                NAME##_rotate(k + (r * kv_heads + j) * h, cos, sin, h, rotated);          \
                for (int64_t d = 0; d < h; d++) {                                         \
                    key_cache[slot + d] = STORE(rotated[d]);                              \
                    value_cache[slot + d] = v[(r * kv_heads + j) * h + d];                \
                }                                                                         \
            }                                                                             \
            for (int64_t i = 0; i < heads; i++) {                                         \
                float* query = queries + (r * heads + i) * h;                             \
                NAME##_rotate(q + (r * heads + i) * h, cos, sin, h, query);               \
                for (int64_t d = 0; d < h; d++) query[d] = ROUND(query[d] * scale);       \
            }                                                                             \
        }                                                                                 \
        _Pragma("omp parallel for schedule(static) num_threads(threads) if(threads > 1)") \
        for (int64_t t = 0; t < batch * heads; t++) {                                     \
            const int64_t r = t / heads, j = (t % heads) / groups;                        \
            const T* key_rows = key_cache + (r * max_length * kv_heads + j) * h;          \
            const T* value_rows = value_cache + (r * max_length * kv_heads + j) * h;      \
            const int64_t stride = kv_heads * h;                                          \
            float* weights = scratch + omp_get_thread_num() * (keys + h);                 \
            float* sums = weights + keys;                                                 \
            float largest = -INFINITY, total = 0.0f;                                      \
            for (int64_t s = 0; s < keys; s++) {                                          \
                weights[s] = ROUND(NAME##_dot(queries + t * h, key_rows + s * stride, h)); \
                largest = weights[s] > largest ? weights[s] : largest;                    \
            }                                                                             \
            for (int64_t s = 0; s < keys; s++) total += weights[s] = expf(weights[s] - largest); \
            for (int64_t d = 0; d < h; d++) sums[d] = 0.0f;                               \
            const int64_t body = h & ~(int64_t)7;                                         \
            for (int64_t s = 0; s < keys; s++) {                                          \
                const float p = ROUND(weights[s] / total);                                \
                const T* row = value_rows + s * stride;                                   \
                for (int64_t d = 0; d < body; d += 8)                                     \
                    _mm256_storeu_ps(sums + d, _mm256_fmadd_ps(_mm256_set1_ps(p), LOAD8(row + d), \
                                                               _mm256_loadu_ps(sums + d))); \
                for (int64_t d = body; d < h; d++) sums[d] += p * SCALAR(row[d]);         \
            }                                                                             \
            for (int64_t d = 0; d < h; d++) out[t * h + d] = STORE(sums[d]);              \
        }                                                                                 \
        free(queries);                                                                    \
        return 0;                                                                         \
    }

static inline float identity(float v) { return v; }

ATTEND(attend_bf16, uint16_t, load8_bf16, scalar_bf16, round_bf16, to_bf16)
ATTEND(attend_f32, float, load8_f32, scalar_f32, identity, identity)
