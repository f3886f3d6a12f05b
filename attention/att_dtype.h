/* Element types of q, k, v, out and the KV cache, and exact conversions to and from f32.
 *
 * f32 -> f16/bf16 rounds to nearest, ties to even; overflow gives Inf; NaN stays NaN (made quiet,
 * sign kept); Inf stays Inf. f16/bf16 -> f32 is exact. Header-only so the kernels inline them. */
#ifndef AT_ATTENTION_ATT_DTYPE_H
#define AT_ATTENTION_ATT_DTYPE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef enum att_dtype {
    ATT_DTYPE_UNSPECIFIED = 0,
    ATT_DTYPE_F32 = 1,
    ATT_DTYPE_F16 = 2,
    ATT_DTYPE_BF16 = 3,
} att_dtype_t;

/* Bytes per element; 0 for an unknown dtype. */
static inline size_t att_dtype_bytes(att_dtype_t t) {
    switch (t) {
    case ATT_DTYPE_F32: return 4;
    case ATT_DTYPE_F16:
    case ATT_DTYPE_BF16: return 2;
    default: return 0;
    }
}

/* "f32", "f16", "bf16" or "unspecified". */
const char *att_dtype_name(att_dtype_t t);

static inline uint32_t att_f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float att_bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float att_bf16_to_f32(uint16_t h) { return att_bits_f32((uint32_t)h << 16); }

static inline uint16_t att_f32_to_bf16(float f) {
    uint32_t u = att_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x0040u); /* NaN: keep sign and top payload, force quiet */
    u += 0x7fffu + ((u >> 16) & 1u);            /* ties to even; carries into Inf on overflow */
    return (uint16_t)(u >> 16);
}

/* Branch-free so that loops over it vectorize: a multiply by 2^112 rebiases the exponent and
 * normalizes subnormals in one step; exponent 31 (Inf/NaN) is patched with a mask. */
static inline float att_f16_to_f32(uint16_t h) {
    uint32_t mag = (uint32_t)(h & 0x7fffu) << 13;
    uint32_t r = att_f32_bits(att_bits_f32(mag) * 0x1p112f);
    uint32_t special = 0u - (uint32_t)(mag >= 0x0f800000u);
    r = (r & ~special) | ((mag | 0x7f800000u) & special);
    return att_bits_f32(r | ((uint32_t)(h & 0x8000u) << 16));
}

static inline uint16_t att_f32_to_f16(float f) {
    uint32_t u = att_f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) /* NaN: keep the top payload bits, force quiet */
        return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
    if (a >= 0x477ff000u) /* rounds to 65536 or more, or Inf */
        return (uint16_t)(sign | 0x7c00u);
    if (a < 0x38800000u) { /* below the smallest normal f16, 2^-14: result is subnormal or 0 */
        if (a < 0x33000000u) /* at most 2^-25: rounds to 0 (2^-25 itself ties to even 0) */
            return sign;
        uint32_t e = a >> 23;
        uint32_t m = (a & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126u - e; /* 14..24: places the value in units of 2^-24 */
        uint32_t q = m >> shift;
        uint32_t rem = m & ((1u << shift) - 1u);
        uint32_t half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (q & 1u)))
            q++;
        return (uint16_t)(sign | q);
    }
    a += 0xfffu + ((a >> 13) & 1u); /* ties to even on the 13 dropped bits */
    return (uint16_t)(sign | ((a - 0x38000000u) >> 13));
}

/* Element i of a tensor of dtype t, as f32. */
static inline float att_load(att_dtype_t t, const void *p, size_t i) {
    switch (t) {
    case ATT_DTYPE_F16: return att_f16_to_f32(((const uint16_t *)p)[i]);
    case ATT_DTYPE_BF16: return att_bf16_to_f32(((const uint16_t *)p)[i]);
    default: return ((const float *)p)[i];
    }
}

/* Stores f at element i of a tensor of dtype t, rounding as above. */
static inline void att_store(att_dtype_t t, void *p, size_t i, float f) {
    switch (t) {
    case ATT_DTYPE_F16: ((uint16_t *)p)[i] = att_f32_to_f16(f); break;
    case ATT_DTYPE_BF16: ((uint16_t *)p)[i] = att_f32_to_bf16(f); break;
    default: ((float *)p)[i] = f; break;
    }
}

#endif
