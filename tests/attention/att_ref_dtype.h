/* Reference decoders of f16 and bf16 for the tests, written from the IEEE 754 / bfloat16 bit
 * layouts with ldexp, independent of attention/att_dtype.h (which they check). Exact: every f16
 * and bf16 value is a double. NaN patterns give a NaN with the pattern's sign. */
#ifndef AT_TESTS_ATTENTION_ATT_REF_DTYPE_H
#define AT_TESTS_ATTENTION_ATT_REF_DTYPE_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* binary16: 1 sign, 5 exponent (bias 15), 10 fraction bits. */
static inline double ref_f16_decode(uint16_t h) {
    unsigned e = (h >> 10) & 0x1fu;
    unsigned m = h & 0x3ffu;
    double v;
    if (e == 0x1fu)
        v = m != 0 ? NAN : INFINITY;
    else if (e == 0)
        v = ldexp((double)m, -24); /* subnormal: m * 2^-14 * 2^-10 */
    else
        v = ldexp((double)(0x400u + m), (int)e - 25); /* (1 + m/2^10) * 2^(e-15) */
    return (h & 0x8000u) ? copysign(v, -1.0) : copysign(v, 1.0);
}

/* bfloat16: 1 sign, 8 exponent (bias 127), 7 fraction bits. */
static inline double ref_bf16_decode(uint16_t h) {
    unsigned e = (h >> 7) & 0xffu;
    unsigned m = h & 0x7fu;
    double v;
    if (e == 0xffu)
        v = m != 0 ? NAN : INFINITY;
    else if (e == 0)
        v = ldexp((double)m, -133); /* subnormal: m * 2^-126 * 2^-7 */
    else
        v = ldexp((double)(0x80u + m), (int)e - 134); /* (1 + m/2^7) * 2^(e-127) */
    return (h & 0x8000u) ? copysign(v, -1.0) : copysign(v, 1.0);
}

static inline double ref_f32_decode(const void *p) {
    float f;
    memcpy(&f, p, sizeof f);
    return (double)f;
}

#endif
