/* Fused float8 e4m3fn kernels for `merge --requantize` (docs/design.md §13, "Native kernels").
 *
 * torch on a CPU makes each step of requantizing a band its own pass over memory (decode, block
 * amax, divide, encode, decode again, retention sums, changed-code count); these do the same
 * arithmetic per element in two passes. Bit for bit what lorasurgery/io/fp8.py computes with torch:
 *
 *   decode:  W = float32(code) * scale           (one float32 rounding, as torch)
 *   encode:  code = e4m3fn(clamp(W / scale, ±top)), top ≤ 448: c10's fp8e4m3fn_from_fp32_value
 *            (torch's float32 -> e4m3fn conversion, round to nearest even), whose rounding also
 *            gives the code's value, so deq(W') needs no second decode (e4m3_round)
 *   sums:    kept   = Σ (deq(W') - W) * (W' - W), update = Σ (W' - W)²: each difference and
 *            product rounded to float32, as torch does, then added in float64 in a fixed order
 *            (16 lanes per row, the lanes in order, the rows in order), so that the result does
 *            not depend on the instruction set the compiler picked.
 *
 * Matrices are row-major and contiguous; scales are float32 grids of (ceil(rows/br), ceil(cols/bc))
 * covering the rows given, the first of which starts a row block. No allocation, no threads: the
 * merge's own threads call these, with the GIL released by ctypes.
 */
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(LS_NO_CLONES)
#define LS_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LS_CLONES
#endif

#define LANES 16
typedef float v16f __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
typedef double v8d __attribute__((vector_size(64)));

static inline uint32_t to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* Selects written as masks, so that the compiler vectorises the loops (no branches). */
#define MASK(condition) (0u - (uint32_t)(condition))
static inline uint32_t pick(uint32_t mask, uint32_t a, uint32_t b) { return (a & mask) | (b & ~mask); }

/* c10's fp8e4m3fn_to_fp32_value: exact, subnormals included; 0x7F / 0xFF are NaN. */
static inline float e4m3_decode(uint8_t c) {
    uint32_t code = c;
    uint32_t sign = (code & 0x80u) << 24;
    uint32_t exponent = (code >> 3) & 0xFu;
    uint32_t mantissa = code & 0x7u;
    uint32_t sub = to_bits((float)mantissa * 0.001953125f); /* mantissa * 2^-9, exact */
    uint32_t normal = ((exponent + 120u) << 23) | (mantissa << 20);
    uint32_t value = pick(MASK(exponent == 0u), sub, normal);
    value = pick(MASK((code & 0x7Fu) == 0x7Fu), 0x7FC00000u, value);
    return from_bits(value | sign);
}

/* out[i, j] = decode(codes[i, j]) * scales[(row0 + i) / br, j / bc] for rows row0 .. row0 + rows */
LS_CLONES void ls_fp8_decode(const uint8_t *codes, const float *scales, int64_t rows, int64_t cols,
                             int64_t row0, int64_t br, int64_t bc, float *out) {
    int64_t grid_cols = (cols + bc - 1) / bc;
    for (int64_t i = 0; i < rows; i++) {
        const float *s = scales + ((row0 + i) / br) * grid_cols;
        const uint8_t *c = codes + i * cols;
        float *o = out + i * cols;
        for (int64_t b = 0; b < grid_cols; b++) {
            int64_t start = b * bc, stop = start + bc < cols ? start + bc : cols;
            float scale = s[b];
            for (int64_t j = start; j < stop; j++) o[j] = e4m3_decode(c[j]) * scale;
        }
    }
}

/* amax[rb, b] = max |x| over block (rb, b) of the band x (rows from a row block's start);
 * returns 1 when x holds a NaN (torch's amax would give NaN: the caller decides then). */
LS_CLONES int ls_block_amax(const float *x, int64_t rows, int64_t cols, int64_t br, int64_t bc, float *amax) {
    int64_t grid_cols = (cols + bc - 1) / bc;
    int nan = 0;
    for (int64_t i = 0; i < rows; i++) {
        float *a = amax + (i / br) * grid_cols;
        const float *row = x + i * cols;
        if (i % br == 0)
            for (int64_t b = 0; b < grid_cols; b++) a[b] = 0.0f;
        for (int64_t b = 0; b < grid_cols; b++) {
            int64_t start = b * bc, stop = start + bc < cols ? start + bc : cols;
            /* |x| as bits: their unsigned order is the floats' order, NaN above every number */
            uint32_t m = to_bits(a[b]);
            for (int64_t j = start; j < stop; j++) {
                uint32_t v = to_bits(row[j]) & 0x7FFFFFFFu;
                m = v > m ? v : m;
            }
            nan |= m > 0x7F800000u;
            a[b] = from_bits(m);
        }
    }
    return nan;
}


/* Rows' retention sums, added to sums[0] (kept) and sums[1] (update): each row in 16 float64 lanes
 * (element j to lane j % 16, in order; GCC/clang vector types, so that every instruction set adds
 * the same numbers in the same order), the lanes added in order, then its tail, then the rows. */
static inline void row_sums(const float *w, const float *m, const float *after, int64_t cols, double *sums) {
    v8d kept_lo = {0}, kept_hi = {0}, update_lo = {0}, update_hi = {0};
    int64_t whole = cols / LANES * LANES, j;
    for (j = 0; j < whole; j += LANES) {
        v16f mv, wv, av;
        memcpy(&mv, m + j, sizeof mv);
        memcpy(&wv, w + j, sizeof wv);
        memcpy(&av, after + j, sizeof av);
        v16f delta = mv - wv;
        v16f kept = (av - wv) * delta, update = delta * delta;
        v8f halves[4]; /* kept's lanes 0-7 and 8-15, then update's (memcpy: GCC 9+ and clang) */
        memcpy(halves, &kept, sizeof kept);
        memcpy(halves + 2, &update, sizeof update);
        kept_lo += __builtin_convertvector(halves[0], v8d);
        kept_hi += __builtin_convertvector(halves[1], v8d);
        update_lo += __builtin_convertvector(halves[2], v8d);
        update_hi += __builtin_convertvector(halves[3], v8d);
    }
    double k = 0.0, u = 0.0;
    for (int l = 0; l < 8; l++) {
        k += kept_lo[l];
        u += update_lo[l];
    }
    for (int l = 0; l < 8; l++) {
        k += kept_hi[l];
        u += update_hi[l];
    }
    for (; j < cols; j++) {
        float delta = m[j] - w[j];
        k += (double)((after[j] - w[j]) * delta);
        u += (double)(delta * delta);
    }
    sums[0] += k;
    sums[1] += u;
}

/* One element of W' / scale, saturated to ±448 (`top_bits`, at most 448's bits): its e4m3fn code, as
 * c10's conversion rounds it, and the float32 value of that code (exact), in one computation: on the
 * normal range the rounded value's float32 bits are |x|'s with the rounding bias added and the 20
 * bits below the code's mantissa cleared, and the code is those bits rebiased (exponent 127 → 7);
 * below 2^-6, |x| + 2^14 rounds to the subnormal spacing 2^-9, and subtracting 2^14 again is exact. */
static inline uint32_t e4m3_round(float x, uint32_t top_bits, uint32_t *value) {
    const float magic = 16384.0f; /* 2^14: bits 141 << 23, c10's denorm_mask */
    uint32_t bits = to_bits(x);
    uint32_t sign = bits & 0x80000000u;
    bits ^= sign;
    bits = bits < top_bits ? bits : top_bits;
    float shifted = from_bits(bits) + magic;
    uint32_t small_code = to_bits(shifted) - (141u << 23);
    uint32_t small_value = to_bits(shifted - magic);
    uint32_t rounded = (bits + 0x7FFFFu + ((bits >> 20) & 1u)) & 0xFFF00000u;
    uint32_t normal_code = (rounded >> 20) - (120u << 3);
    uint32_t small = MASK(bits < (121u << 23));
    *value = pick(small, small_value, rounded) | sign;
    return (pick(small, small_code, normal_code) & 0x7Fu) | (sign >> 24);
}

/* codes = encode(clamp(m / scale, ±top)) of a band (its scales' grid given); decoded again
 * (into `row`, scratch of cols floats), the retention sums against w added to sums; returns the
 * count of codes that differ from `old`. top ≤ 448 (e4m3fn's largest finite value). */
LS_CLONES int64_t ls_fp8_requantize(const float *m, const float *w, const uint8_t *old, const float *scales,
                                    int64_t rows, int64_t cols, int64_t br, int64_t bc, float top,
                                    uint8_t *codes, float *row, double *sums) {
    int64_t grid_cols = (cols + bc - 1) / bc;
    int64_t changed = 0;
    uint32_t top_bits = to_bits(top);
    for (int64_t i = 0; i < rows; i++) {
        const float *s = scales + (i / br) * grid_cols;
        const float *mr = m + i * cols;
        const uint8_t *oldr = old + i * cols;
        uint8_t *cr = codes + i * cols;
        uint32_t row_changed = 0; /* 32 bits: the vectoriser keeps the count in narrow lanes */
        for (int64_t b = 0; b < grid_cols; b++) {
            int64_t start = b * bc, stop = start + bc < cols ? start + bc : cols;
            float scale = s[b];
            for (int64_t j = start; j < stop; j++) {
                uint32_t value;
                uint8_t c = (uint8_t)e4m3_round(mr[j] / scale, top_bits, &value);
                cr[j] = c;
                row_changed += c != oldr[j];
                row[j] = from_bits(value) * scale;
            }
        }
        changed += row_changed;
        row_sums(w + i * cols, mr, row, cols, sums);
    }
    return changed;
}

/* The retention sums of float32 rows (deq(W') given): the same order as ls_fp8_requantize's. */
LS_CLONES void ls_retention_sums(const float *w, const float *m, const float *after, int64_t rows, int64_t cols,
                                 double *sums) {
    for (int64_t i = 0; i < rows; i++) row_sums(w + i * cols, m + i * cols, after + i * cols, cols, sums);
}
