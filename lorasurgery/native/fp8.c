/* Fused float8 e4m3fn kernels for `merge --requantize` (docs/design.md §13, "Native kernels").
 *
 * torch on a CPU makes each step of requantizing a band its own pass over memory (decode, block
 * amax, divide, encode, decode again, retention sums, changed-code count); these do the same
 * arithmetic per element in two passes. Bit for bit what lorasurgery/io/fp8.py computes with torch:
 *
 *   decode:  W = float32(code) * scale           (one float32 rounding, as torch)
 *   encode:  code = e4m3fn(clamp(W / scale, ±top)) (torch's float32 -> e4m3fn conversion, ported
 *            from c10's fp8e4m3fn_from_fp32_value: round to nearest even, saturating)
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

static inline uint32_t to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* Selects written as masks, so that the compiler vectorises the loops (no branches). */
#define MASK(condition) (0u - (uint32_t)(condition))
static inline uint32_t pick(uint32_t mask, uint32_t a, uint32_t b) { return (a & mask) | (b & ~mask); }

/* c10's fp8e4m3fn_from_fp32_value (torch 2.13) of x clamped to ±top first (`top_bits`: the bits of
 * top, a positive float; x not NaN). On non-negative floats the order of their bits as unsigned
 * integers is their order as floats, so the clamp is an integer minimum of |x|'s bits. */
static inline uint8_t e4m3_encode_clamped(float x, uint32_t top_bits) {
    uint32_t bits = to_bits(x);
    uint32_t sign = bits & 0x80000000u;
    bits ^= sign;
    bits = bits < top_bits ? bits : top_bits;
    /* below 2^-6 (the smallest normal): the float adds 2^-9 * 2^23 units, as c10 does */
    uint32_t denorm_mask = 141u << 23;
    uint32_t small = to_bits(from_bits(bits) + from_bits(denorm_mask)) - denorm_mask;
    uint32_t mant_odd = (bits >> 20) & 1u;
    uint32_t normal = ((bits + (((uint32_t)(7 - 127)) << 23) + 0x7FFFFu + mant_odd) >> 20) & 0xFFu;
    normal = pick(MASK(normal == 0x7Fu), 0x7Eu, normal); /* a carry into NaN's pattern saturates */
    uint32_t r = pick(MASK(bits < (121u << 23)), small, normal);
    r = pick(MASK(bits >= (1087u << 20)), 0x7Eu, r); /* 480 and above (only when top is) */
    return (uint8_t)((r & 0xFFu) | (sign >> 24));
}

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


/* Rows' retention sums, added to sums[0] (kept) and sums[1] (update): each row in 16 lanes (element
 * j to lane j % 16, in order), the lanes added in order, then its tail, then the rows in order. */
static inline void row_sums(const float *w, const float *m, const float *after, int64_t cols, double *sums) {
    double kept[LANES] = {0}, update[LANES] = {0};
    int64_t whole = cols / LANES * LANES, j;
    for (j = 0; j < whole; j += LANES) {
        for (int l = 0; l < LANES; l++) {
            float delta = m[j + l] - w[j + l];
            kept[l] += (double)((after[j + l] - w[j + l]) * delta);
            update[l] += (double)(delta * delta);
        }
    }
    double k = 0.0, u = 0.0;
    for (int l = 0; l < LANES; l++) {
        k += kept[l];
        u += update[l];
    }
    for (; j < cols; j++) {
        float delta = m[j] - w[j];
        k += (double)((after[j] - w[j]) * delta);
        u += (double)(delta * delta);
    }
    sums[0] += k;
    sums[1] += u;
}

/* codes = encode(clamp(m / scale, ±top)) of a band (its scales' grid given); decoded again
 * (into `row`, scratch of cols floats), the retention sums against w added to sums; returns the
 * count of codes that differ from `old`. */
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
        for (int64_t b = 0; b < grid_cols; b++) {
            int64_t start = b * bc, stop = start + bc < cols ? start + bc : cols;
            float scale = s[b];
            for (int64_t j = start; j < stop; j++) {
                uint8_t c = e4m3_encode_clamped(mr[j] / scale, top_bits);
                cr[j] = c;
                changed += c != oldr[j];
                row[j] = e4m3_decode(c) * scale;
            }
        }
        row_sums(w + i * cols, mr, row, cols, sums);
    }
    return changed;
}

/* The retention sums of float32 rows (deq(W') given): the same order as ls_fp8_requantize's. */
LS_CLONES void ls_retention_sums(const float *w, const float *m, const float *after, int64_t rows, int64_t cols,
                                 double *sums) {
    for (int64_t i = 0; i < rows; i++) row_sums(w + i * cols, m + i * cols, after + i * cols, cols, sums);
}
