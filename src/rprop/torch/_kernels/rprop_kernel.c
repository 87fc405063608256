/* The fused Rprop step on CPU: one pass over memory for a whole group.
 *
 * Plain C (C99, optional OpenMP), no Python or torch headers: rprop compiles
 * it at first use with the system C compiler and loads it with ctypes (see
 * rprop/torch/_fused.py). One call steps every tensor of a (device, dtype)
 * group: the caller passes arrays of data pointers and element counts, the
 * threads split the concatenated elements evenly, and each element is read
 * once and written once.
 *
 * Numerics: every operation below is the single IEEE operation that
 * rprop._core.rprop_update performs with torch tensors, in the same order and
 * at the same precision, so the result is bitwise that of the for-loop path.
 * It must be compiled with -ffp-contract=off (no fused multiply-add) and
 * without -ffast-math. float16/bfloat16 compute in float32 and round to the
 * storage type after every operation, as torch's CPU kernels do (each torch
 * op returns a half tensor); the etas, the bounds and weight_decay are float32
 * there, as in torch ("opmath" float).
 *
 * Per element, with g the gradient and p = g * prev:
 *   g = maximize ? -g : g;  g = g + wd * param          (when wd != 0)
 *   step = clamp(p > 0 ? step*eta_plus : p < 0 ? step*eta_minus : step, lo, hi)
 *   forget variants: g = p < 0 ? 0 : g
 *   update = -(sign(g) * step)
 *   delta = (undo and p < 0) ? -prev_update : update;  prev_update = update
 *   param += delta;  prev = g
 */

#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#define RPROP_KERNEL_ABI 2

/* what happens to prev_update, shared with _fused.py */
enum { PU_NONE = 0, PU_UNDO = 1, PU_KEEP = 2 };

/* Work below this many elements runs on the calling thread only. */
#define PARALLEL_MIN 32768
/* Thread boundaries fall on multiples of this many elements (cache lines). */
#define ALIGN_ELEMS 64

static inline float f32_from_bits(uint32_t w) { float f; memcpy(&f, &w, 4); return f; }
static inline uint32_t f32_to_bits(float f) { uint32_t w; memcpy(&w, &f, 4); return w; }

/* IEEE half <-> float, exact, round-to-nearest-even (the branch-free
 * conversions of the FP16 library by Marat Dukhan, MIT licence, which torch
 * also uses). NaN keeps its sign and becomes the quiet NaN 0x7E00. */
static inline float f16_to_f32(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16;
    const uint32_t sign = w & UINT32_C(0x80000000);
    const uint32_t two_w = w + w;
    const float normalized = f32_from_bits((two_w >> 4) + (UINT32_C(0xE0) << 23)) * 0x1.0p-112f;
    const float denormalized = f32_from_bits((two_w >> 17) | (UINT32_C(126) << 23)) - 0.5f;
    const uint32_t bits = two_w < (UINT32_C(1) << 27) ? f32_to_bits(denormalized)
                                                      : f32_to_bits(normalized);
    return f32_from_bits(sign | bits);
}

static inline uint16_t f32_to_f16(float f) {
    float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = f32_to_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & UINT32_C(0x80000000);
    uint32_t bias = shl1_w & UINT32_C(0xFF000000);
    if (bias < UINT32_C(0x71000000)) bias = UINT32_C(0x71000000);
    base = f32_from_bits((bias >> 1) + UINT32_C(0x07800000)) + base;
    const uint32_t bits = f32_to_bits(base);
    const uint32_t nonsign = ((bits >> 13) & UINT32_C(0x7C00)) + (bits & UINT32_C(0x0FFF));
    return (uint16_t)((sign >> 16) | (shl1_w > UINT32_C(0xFF000000) ? UINT32_C(0x7E00) : nonsign));
}

static inline float bf16_to_f32(uint16_t b) { return f32_from_bits((uint32_t)b << 16); }

/* torch's c10::BFloat16 rounding: nearest-even; NaN becomes 0x7FC0. */
static inline uint16_t f32_to_bf16(float f) {
    const uint32_t u = f32_to_bits(f);
    const uint32_t r = (u + UINT32_C(0x7FFF) + ((u >> 16) & 1)) >> 16;
    return (uint16_t)(f != f ? UINT32_C(0x7FC0) : r);
}

/* Round a float32 value to half / bfloat16 precision and back. */
static inline float rnd_f16(float x) { return f16_to_f32(f32_to_f16(x)); }
static inline float rnd_bf16(float x) { return bf16_to_f32(f32_to_bf16(x)); }

typedef struct {
    double eta_minus, eta_plus, lo, hi, wd;
    int maximize, has_wd;
} hyper_t;

/* Elements [a, b) of one tensor. Storage types: PT parameter, GT gradient,
 * ST state (prev, step size, prev update); C is the compute type. xLOAD and
 * xSTORE convert between storage and compute type; xRND rounds a computed
 * value to the precision of that storage type, which is where torch rounds:
 * an op's result has the promoted dtype of its tensor operands (a Python
 * scalar does not promote). So wd * param rounds like the parameter, grad +
 * that like the gradient (GT is the parameter's type or wider), and the
 * sign test and step sizes like the state (ST is GT or wider). FORGET and
 * PU are compile-time constants in each instantiation.
 * param and grad are not restrict: a gradient may be its parameter's own
 * memory (p.grad = p.detach()). Each element's gradient is read before the
 * parameter is written, so that is well defined here, and the compiler
 * checks at run time whether it may vectorize. The state arrays are the
 * optimizer's own and alias nothing. */
#define DEFINE_SEGMENT(NAME, PT, GT, ST, C, PLOAD, PSTORE, PRND, GLOAD, GRND, SLOAD, SSTORE, \
                       SRND, FORGET, PU)                                                     \
    static void NAME(void *param_, const void *grad_, void *prev_, void *step_,              \
                     void *prev_update_, int64_t a, int64_t b, const hyper_t *hp) {          \
        PT *param = (PT *)param_;                                                            \
        const GT *grad = (const GT *)grad_;                                                  \
        ST *restrict prev = (ST *)prev_, *restrict step = (ST *)step_;                       \
        ST *restrict prev_update = (ST *)prev_update_;                                       \
        const C eta_minus = (C)hp->eta_minus, eta_plus = (C)hp->eta_plus;                   \
        const C lo = SRND((C)hp->lo), hi = SRND((C)hp->hi), wd = (C)hp->wd;                 \
        const int maximize = hp->maximize, has_wd = hp->has_wd;                             \
        for (int64_t i = a; i < b; i++) {                                                    \
            C g = GLOAD(grad[i]);                                                            \
            if (maximize) g = -g;                                                            \
            if (has_wd) g = GRND(g + PRND(wd * PLOAD(param[i])));                            \
            const C p = SRND(g * SLOAD(prev[i]));                                            \
            C s = SLOAD(step[i]);                                                            \
            s = p > 0 ? SRND(s * eta_plus) : (p < 0 ? SRND(s * eta_minus) : s);             \
            s = s < lo ? lo : s;                                                             \
            s = s > hi ? hi : s;                                                             \
            if (FORGET) g = p < 0 ? (C)0 : g;                                                \
            const C sg = g > 0 ? (C)1 : (g < 0 ? (C)-1 : (C)0);                              \
            const C update = -(sg * s);                                                      \
            C delta = update;                                                                \
            if (PU == PU_UNDO) delta = p < 0 ? -SLOAD(prev_update[i]) : update;              \
            if (PU != PU_NONE) prev_update[i] = SSTORE(update);                              \
            param[i] = PSTORE(PLOAD(param[i]) + delta);                                      \
            prev[i] = SSTORE(g);                                                             \
            step[i] = SSTORE(s);                                                             \
        }                                                                                    \
    }

#define ID(x) (x)
#define F16_LOAD(x) f16_to_f32(x)
#define F16_STORE(x) f32_to_f16(x)
#define BF16_LOAD(x) bf16_to_f32(x)
#define BF16_STORE(x) f32_to_bf16(x)

/* Storage type, compute type, load, store, round, for each dtype. */
#define F32 float, ID, ID, ID
#define F64 double, ID, ID, ID
#define F16 uint16_t, F16_LOAD, F16_STORE, rnd_f16
#define BF16 uint16_t, BF16_LOAD, BF16_STORE, rnd_bf16

#define SEG(...) DEFINE_SEGMENT(__VA_ARGS__)
/* P, G, S: parameter, gradient and state dtypes (one of the four above). */
#define DEFINE_ALL(C, P, G, S) DEFINE_ALL_(C, P, G, S)
#define DEFINE_ALL_(C, PT, PL, PS, PR, GT, GL, GS, GR, ST, SL, SS, SR)                        \
    SEG(seg_0_0, PT, GT, ST, C, PL, PS, PR, GL, GR, SL, SS, SR, 0, PU_NONE)                   \
    SEG(seg_1_0, PT, GT, ST, C, PL, PS, PR, GL, GR, SL, SS, SR, 1, PU_NONE)                   \
    SEG(seg_0_1, PT, GT, ST, C, PL, PS, PR, GL, GR, SL, SS, SR, 0, PU_UNDO)                   \
    SEG(seg_1_1, PT, GT, ST, C, PL, PS, PR, GL, GR, SL, SS, SR, 1, PU_UNDO)                   \
    SEG(seg_0_2, PT, GT, ST, C, PL, PS, PR, GL, GR, SL, SS, SR, 0, PU_KEEP)                   \
    SEG(seg_1_2, PT, GT, ST, C, PL, PS, PR, GL, GR, SL, SS, SR, 1, PU_KEEP)

/* RPROP_DTYPE selects the dtypes this build steps (each combination is built
 * into its own small library at first use, which keeps compiling fast):
 *   0..3  parameter, gradient and state all float32 / float64 / float16 / bfloat16
 *   4, 5  float16 / bfloat16 parameter and gradient, float32 state
 *   6, 7  float16 / bfloat16 parameter, float32 gradient and state
 * (4..7 are rprop.Rprop(state_dtype=torch.float32) for half parameters.) */
#ifndef RPROP_DTYPE
#define RPROP_DTYPE 0
#endif

#if RPROP_DTYPE == 0
DEFINE_ALL(float, F32, F32, F32)
#elif RPROP_DTYPE == 1
DEFINE_ALL(double, F64, F64, F64)
#elif RPROP_DTYPE == 2
DEFINE_ALL(float, F16, F16, F16)
#elif RPROP_DTYPE == 3
DEFINE_ALL(float, BF16, BF16, BF16)
#elif RPROP_DTYPE == 4
DEFINE_ALL(float, F16, F16, F32)
#elif RPROP_DTYPE == 5
DEFINE_ALL(float, BF16, BF16, F32)
#elif RPROP_DTYPE == 6
DEFINE_ALL(float, F16, F32, F32)
#elif RPROP_DTYPE == 7
DEFINE_ALL(float, BF16, F32, F32)
#else
#error "RPROP_DTYPE must be one of 0..7"
#endif

typedef void (*segment_fn)(void *, const void *, void *, void *, void *, int64_t, int64_t,
                           const hyper_t *);

static const segment_fn SEGMENTS[6] = {seg_0_0, seg_1_0, seg_0_1, seg_1_1, seg_0_2, seg_1_2};

int rprop_kernel_abi(void) { return RPROP_KERNEL_ABI; }

int rprop_kernel_dtype(void) { return RPROP_DTYPE; }

int rprop_kernel_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Add 1 to each of the n step counters (may be NULL), float32
 * (counter_kind 0) or float64 (1); return the number of elements of the n
 * tensors. */
static int64_t count_step(int64_t n, const int64_t *numels, void *const *counters,
                          int counter_kind) {
    if (counters != NULL) {
        for (int64_t t = 0; t < n; t++) {
            if (counter_kind == 0)
                *(float *)counters[t] += 1.0f;
            else
                *(double *)counters[t] += 1.0;
        }
    }
    int64_t total = 0;
    for (int64_t t = 0; t < n; t++) total += numels[t];
    return total;
}

/* Step n tensors of one dtype. Each pointer array has n entries;
 * prev_updates is read only when pu_mode != PU_NONE. counters (may be NULL)
 * are the per-tensor step counters, float32 (counter_kind 0) or float64
 * (counter_kind 1), each incremented by 1. Returns 0, or -1 on bad codes. */
int rprop_fused_step(int dtype, int64_t n, void *const *params, void *const *grads,
                     void *const *prevs, void *const *steps, void *const *prev_updates,
                     const int64_t *numels, void *const *counters, int counter_kind,
                     double eta_minus, double eta_plus, double lo, double hi, double wd,
                     int maximize, int forget, int pu_mode, int nthreads) {
    if (dtype != RPROP_DTYPE || pu_mode < 0 || pu_mode > 2 || forget < 0 || forget > 1)
        return -1;
    const segment_fn seg = SEGMENTS[pu_mode * 2 + forget];
    const hyper_t hp = {eta_minus, eta_plus, lo, hi, wd, maximize != 0, wd != 0.0};
    const int64_t total = count_step(n, numels, counters, counter_kind);
    if (total == 0) return 0;
    if (nthreads < 1) nthreads = 1;
    if (total < PARALLEL_MIN) nthreads = 1;

#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
#endif
    {
#ifdef _OPENMP
        const int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads();
#else
        const int64_t tid = 0, nth = 1;
#endif
        /* This thread's share [begin, end) of the concatenated elements. */
        const int64_t share = (total + nth - 1) / nth;
        const int64_t per = (share + ALIGN_ELEMS - 1) / ALIGN_ELEMS * ALIGN_ELEMS;
        int64_t begin = tid * per, end = begin + per;
        if (end > total) end = total;
        int64_t offset = 0; /* global index of tensor t's first element */
        for (int64_t t = 0; t < n && begin < end; t++) {
            const int64_t m = numels[t];
            if (offset + m > begin) {
                const int64_t a = begin - offset;
                const int64_t b = (end - offset < m ? end - offset : m);
                seg(params[t], grads[t], prevs[t], steps[t],
                    pu_mode != PU_NONE ? prev_updates[t] : NULL, a, b, &hp);
                begin = offset + b;
            }
            offset += m;
        }
    }
    return 0;
}

/* ---- GRprop (R neuralnet's "sag" / "slr"), one pass -------------------------
 *
 * One read and one write of every element, as rprop_fused_step: per element
 * the effective gradient g, the Rprop- step-size adaptation, the move
 * param += -(sign(g) * step) and prev = g, exactly as the element rule above
 * with forget = 0 and no prev_update. Along the way it gathers what the
 * whole-step adjustment needs (rprop._core.grprop_adjust):
 *   - the chosen coordinate: the first candidate (g != 0, NaN included) with
 *     the smallest key, |g| ("sag") or the adapted step size ("slr"), a NaN
 *     key counting as +inf; the first candidate if every key is +inf;
 *   - the sum of step * g over all candidates, the chosen one left out
 *     afterwards: finite products in a compensated (double-double) sum,
 *     infinite and NaN ones counted, so that leaving out an infinite chosen
 *     product is exact too.
 * The chosen coordinate is moved with its adapted step size like the others;
 * the caller then recomputes its step size from `out` and moves it again from
 * its old value (out[2]), as the adjustment does before the move.
 *
 * The elements are cut into fixed blocks whatever the number of threads, and
 * the blocks' partial results are combined in block order, so the result
 * does not depend on the thread count. The compensated sum runs in a
 * different order than the halves tree of rprop._core.sum_parts; both are
 * within about an ulp of the exact sum (unless a partial sum overflows). */

#define GR_BLOCK 32768
#define GR_LANES 4 /* GR_ELEM is unrolled for 4 */

typedef struct {
    double hi[GR_LANES], lo[GR_LANES];
    int64_t pinf, ninf, nan, best;
    uint64_t best_bits; /* the best key's bits */
    double best_param, best_grad, best_product;
} gr_part_t;

static inline void gr_two_sum(double *hi, double *lo, double x) {
    const double s = *hi + x, bb = s - *hi;
    *lo += (*hi - (s - bb)) + (x - bb);
    *hi = s;
}

/* Elements [a, b) of one tensor, in chunks that stay in the L1 cache: the
 * element rule over the chunk (the parameters' old values kept aside), then
 * the chunk's tally, from the cache: still one pass over memory. Each part
 * of the tally is a simple loop the compiler can vectorize: the keys, whose
 * minimum is taken on their bits (|g| or |step size|, non-negative floats,
 * order as their bits do as integers; +inf for a non-candidate, g == 0, and
 * for a NaN key), the products (0 where not a finite
 * candidate's) summed in GR_LANES double-double lanes, and a check for a
 * non-finite product, which only then are counted. Only a chunk whose
 * smallest key beats the best so far is looked at again, for where it is. */
#define GR_CHUNK 512
#define DEFINE_GRPROP_SEGMENT(NAME, T, BITS, INF_BITS)                                                 \
    static void NAME(void *param_, const void *grad_, void *prev_, void *step_, int64_t a,   \
                     int64_t b, int64_t base, const hyper_t *hp, int slr, gr_part_t *part) { \
        T *param = (T *)param_;                                                              \
        const T *grad = (const T *)grad_;                                                    \
        T *restrict prev = (T *)prev_, *restrict step = (T *)step_;                          \
        const T eta_minus = (T)hp->eta_minus, eta_plus = (T)hp->eta_plus;                   \
        const T lo = (T)hp->lo, hi = (T)hp->hi, wd = (T)hp->wd;                             \
        const int maximize = hp->maximize, has_wd = hp->has_wd;                             \
        double H[GR_LANES], L[GR_LANES];                                                     \
        for (int j = 0; j < GR_LANES; j++) H[j] = part->hi[j], L[j] = part->lo[j];          \
        const BITS abs_mask = ~(BITS)0 >> 1, inf_bits = INF_BITS;                           \
        const BITS slr_mask = slr ? ~(BITS)0 : 0; /* the key: step size, else |g| */          \
        int64_t best = part->best;                                                           \
        BITS best_bits = (BITS)part->best_bits;                                              \
        T old[GR_CHUNK];                                                                     \
        BITS key[GR_CHUNK];                                                                  \
        double y[GR_CHUNK];                                                                  \
        for (int64_t c = a; c < b; c += GR_CHUNK) {                                          \
            const int64_t m = (c + GR_CHUNK < b ? c + GR_CHUNK : b) - c;                     \
            T *restrict pc = param + c, *restrict vc = prev + c, *restrict sc = step + c;     \
            const T *gc = grad + c;                                                          \
            memcpy(old, pc, (size_t)m * sizeof(T));                                          \
            for (int64_t i = 0; i < m; i++) {                                                \
                T g = gc[i];                                                                 \
                if (maximize) g = -g;                                                        \
                if (has_wd) g = g + wd * old[i];                                             \
                const T p = g * vc[i];                                                       \
                T s = sc[i];                                                                 \
                s = p > 0 ? s * eta_plus : (p < 0 ? s * eta_minus : s);                      \
                s = s < lo ? lo : s;                                                         \
                s = s > hi ? hi : s;                                                         \
                const T sg = g > 0 ? (T)1 : (g < 0 ? (T)-1 : (T)0);                          \
                pc[i] = old[i] + -(sg * s);                                                  \
                vc[i] = g;                                                                   \
                sc[i] = s;                                                                   \
            }                                                                                \
            BITS kmin = inf_bits;                                                            \
            int bad = 0;                                                                     \
            for (int64_t i = 0; i < m; i++) {                                                \
                const T g = vc[i], s = sc[i], product = s * g;                               \
                BITS gb, sb, pb;                                                             \
                memcpy(&gb, &g, sizeof gb);                                                  \
                memcpy(&sb, &s, sizeof sb);                                                  \
                memcpy(&pb, &product, sizeof pb);                                            \
                gb &= abs_mask;                                                              \
                const int cand = gb != 0;                                                    \
                BITS kb = (sb & abs_mask & slr_mask) | (gb & ~slr_mask);                     \
                kb = (kb > inf_bits) | !cand ? inf_bits : kb;                                 \
                key[i] = kb;                                                                 \
                kmin = kb < kmin ? kb : kmin;                                                \
                const int finite = (pb & abs_mask) < inf_bits;                               \
                bad |= (!finite) & cand;                                                       \
                const double pd = (double)product;                                           \
                uint64_t yb;                                                                 \
                memcpy(&yb, &pd, sizeof yb);                                                 \
                yb &= -(uint64_t)(finite & cand); /* 0.0 unless a finite candidate's */      \
                memcpy(&y[i], &yb, sizeof yb);                                               \
            }                                                                                \
            int64_t i = 0;                                                                   \
            for (; i + GR_LANES <= m; i += GR_LANES) {                                       \
                for (int j = 0; j < GR_LANES; j++) {                                         \
                    const double t = H[j] + y[i + j], bb = t - H[j];                         \
                    L[j] += (H[j] - (t - bb)) + (y[i + j] - bb);                             \
                    H[j] = t;                                                                \
                }                                                                            \
            }                                                                                \
            for (; i < m; i++) {                                                             \
                const double t = H[0] + y[i], bb = t - H[0];                                 \
                L[0] += (H[0] - (t - bb)) + (y[i] - bb);                                     \
                H[0] = t;                                                                    \
            }                                                                                \
            if (bad) {                                                                       \
                for (i = 0; i < m; i++) {                                                    \
                    const T g = vc[i], product = sc[i] * g;                                  \
                    if (g == 0 || product - product == 0) continue;                          \
                    if (product != product) part->nan++;                                     \
                    else if (product > 0) part->pinf++;                                      \
                    else part->ninf++;                                                       \
                }                                                                            \
            }                                                                                \
            if (best < 0 || kmin < best_bits) {                                              \
                /* the first candidate with the smallest key (the first, if all are +inf) */ \
                for (i = 0; i < m; i++) {                                                    \
                    if (vc[i] != 0 && key[i] == kmin) {                                      \
                        best = base + c + i;                                                 \
                        best_bits = kmin;                                                    \
                        part->best_param = old[i];                                           \
                        part->best_grad = vc[i];                                             \
                        part->best_product = sc[i] * vc[i];                                  \
                        break;                                                               \
                    }                                                                        \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
        for (int j = 0; j < GR_LANES; j++) part->hi[j] = H[j], part->lo[j] = L[j];          \
        part->best = best;                                                                   \
        part->best_bits = best_bits;                                                         \
    }

typedef void (*gr_segment_fn)(void *, const void *, void *, void *, int64_t, int64_t, int64_t,
                              const hyper_t *, int, gr_part_t *);

#if RPROP_DTYPE == 0
DEFINE_GRPROP_SEGMENT(gr_seg, float, uint32_t, UINT32_C(0x7F800000))
#define HAS_GRPROP 1
#elif RPROP_DTYPE == 1
DEFINE_GRPROP_SEGMENT(gr_seg, double, uint64_t, UINT64_C(0x7FF0000000000000))
#define HAS_GRPROP 1
#else
#define HAS_GRPROP 0
#endif

/* Whether the memory the GRprop step writes (parameters, prevs, step sizes)
 * is shared by two of those tensors or read as a gradient, a gradient that
 * is its own parameter's memory aside (the element rule reads each gradient
 * element before it writes the parameter's): the tensors are walked one
 * after the other, so another tensor's memory as a gradient would be read
 * after it moved, where the batched step reads every gradient first. Each
 * tensor is dense, numels[t] elements of `size` bytes. -1 if the memory for
 * the check cannot be had. */
typedef struct {
    uintptr_t start, stop;
} gr_span_t;

static int gr_span_cmp(const void *a, const void *b) {
    const uintptr_t x = ((const gr_span_t *)a)->start, y = ((const gr_span_t *)b)->start;
    return (x > y) - (x < y);
}

static int gr_aliased(int64_t n, void *const *params, void *const *grads, void *const *prevs,
                      void *const *steps, const int64_t *numels, size_t size) {
    gr_span_t *spans = (gr_span_t *)malloc((size_t)(3 * n + 1) * sizeof(gr_span_t));
    if (spans == NULL) return -1;
    void *const *written[3] = {params, prevs, steps};
    int64_t m = 0;
    for (int64_t t = 0; t < n; t++) {
        if (numels[t] == 0) continue;
        for (int k = 0; k < 3; k++) {
            spans[m].start = (uintptr_t)written[k][t];
            spans[m].stop = spans[m].start + (uintptr_t)numels[t] * size;
            m++;
        }
    }
    qsort(spans, (size_t)m, sizeof(gr_span_t), gr_span_cmp);
    int shared = 0;
    for (int64_t i = 1; i < m && !shared; i++) shared = spans[i].start < spans[i - 1].stop;
    for (int64_t t = 0; t < n && !shared; t++) {
        if (numels[t] == 0 || grads[t] == params[t]) continue;
        const uintptr_t lo = (uintptr_t)grads[t], hi = lo + (uintptr_t)numels[t] * size;
        int64_t a = 0, b = m; /* a: the number of spans starting below hi */
        while (a < b) {
            const int64_t mid = a + (b - a) / 2;
            if (spans[mid].start < hi) a = mid + 1; else b = mid;
        }
        shared = a > 0 && spans[a - 1].stop > lo; /* disjoint and sorted: the last one */
    }
    free(spans);
    return shared;
}

/* One GRprop step of n tensors (float32 or float64 builds; others return
 * -1). `out` receives 8 doubles: [0] 1 if there is a candidate, else 0;
 * [1] its index in the concatenated elements; [2] its parameter before the
 * move; [3] its effective gradient; [4] the sum of step * g over the other
 * candidates (NaN, +-inf or the compensated sum rounded once); [5..7] unused
 * (0). Returns 0, -1 on bad codes, -2 if memory for the blocks' partial
 * results cannot be had, -3 (nothing written) if the tensors share memory
 * the step writes (gr_aliased). */
int rprop_grprop_step(int dtype, int64_t n, void *const *params, void *const *grads,
                      void *const *prevs, void *const *steps, const int64_t *numels,
                      void *const *counters, int counter_kind, double eta_minus,
                      double eta_plus, double lo, double hi, double wd, int maximize, int slr,
                      int nthreads, double *out) {
    for (int k = 0; k < 8; k++) out[k] = 0.0;
    if (dtype != RPROP_DTYPE || !HAS_GRPROP || slr < 0 || slr > 1) return -1;
#if HAS_GRPROP
    const hyper_t hp = {eta_minus, eta_plus, lo, hi, wd, maximize != 0, wd != 0.0};
    const int aliased = gr_aliased(n, params, grads, prevs, steps, numels,
                                   RPROP_DTYPE == 0 ? sizeof(float) : sizeof(double));
    if (aliased != 0) return aliased < 0 ? -2 : -3;
    int64_t total = 0;
    for (int64_t t = 0; t < n; t++) total += numels[t];
    /* Memory first: a refusal (-2) leaves the counters as they were. */
    const int64_t nblocks = (total + GR_BLOCK - 1) / GR_BLOCK;
    gr_part_t *parts = (gr_part_t *)calloc((size_t)(nblocks > 0 ? nblocks : 1), sizeof(gr_part_t));
    int64_t *starts = (int64_t *)malloc((size_t)(n + 1) * sizeof(int64_t));
    if (parts == NULL || starts == NULL) {
        free(parts);
        free(starts);
        return -2;
    }
    count_step(n, numels, counters, counter_kind);
    if (total == 0) {
        free(parts);
        free(starts);
        return 0;
    }
    starts[0] = 0;
    for (int64_t t = 0; t < n; t++) starts[t + 1] = starts[t] + numels[t];
    if (nthreads < 1) nthreads = 1;
    if (total < PARALLEL_MIN) nthreads = 1;

#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
#endif
    for (int64_t blk = 0; blk < nblocks; blk++) {
        gr_part_t *part = &parts[blk];
        part->best = -1;
        const int64_t begin = blk * GR_BLOCK;
        const int64_t end = begin + GR_BLOCK < total ? begin + GR_BLOCK : total;
        /* the first tensor holding element `begin` */
        int64_t lo_t = 0, hi_t = n - 1;
        while (lo_t < hi_t) {
            const int64_t mid = (lo_t + hi_t + 1) / 2;
            if (starts[mid] <= begin) lo_t = mid; else hi_t = mid - 1;
        }
        for (int64_t t = lo_t; t < n && starts[t] < end; t++) {
            const int64_t a = begin > starts[t] ? begin - starts[t] : 0;
            const int64_t b = (end < starts[t + 1] ? end : starts[t + 1]) - starts[t];
            if (a < b)
                gr_seg(params[t], grads[t], prevs[t], steps[t], a, b, starts[t], &hp, slr, part);
        }
    }

    /* Combine the blocks in order: the first smallest key; the sums. */
    int64_t best = -1, pinf = 0, ninf = 0, nan = 0;
    uint64_t best_bits = 0;
    double best_param = 0, best_grad = 0, best_product = 0;
    double shi = 0.0, slo = 0.0;
    for (int64_t blk = 0; blk < nblocks; blk++) {
        const gr_part_t *part = &parts[blk];
        for (int lane = 0; lane < GR_LANES; lane++) {
            gr_two_sum(&shi, &slo, part->hi[lane]);
            slo += part->lo[lane];
        }
        pinf += part->pinf;
        ninf += part->ninf;
        nan += part->nan;
        if (part->best >= 0 && (best < 0 || part->best_bits < best_bits)) {
            best = part->best;
            best_bits = part->best_bits;
            best_param = part->best_param;
            best_grad = part->best_grad;
            best_product = part->best_product;
        }
    }
    free(parts);
    free(starts);
    if (best < 0) return 0;
    /* Leave the chosen product out. */
    if (best_product - best_product == 0) {
        gr_two_sum(&shi, &slo, -best_product);
    } else if (best_product != best_product) {
        nan--;
    } else if (best_product > 0) {
        pinf--;
    } else {
        ninf--;
    }
    double others;
    if (nan > 0 || (pinf > 0 && ninf > 0)) others = NAN;
    else if (pinf > 0) others = INFINITY;
    else if (ninf > 0) others = -INFINITY;
    else others = shi - shi == 0 ? shi + slo : shi;  /* an overflowed sum as it is */
    out[0] = 1.0;
    out[1] = (double)best;
    out[2] = best_param;
    out[3] = best_grad;
    out[4] = others;
#endif
    return 0;
}
